"""Model definitions: torch only; transformers only inside kompakt/hf.py.

Every pretraining model takes one packed micro-batch as keyword tensors (`forward(**batch)`):
`input_ids` (T,), `cu_seqlens` (B+1,) int32, `max_seqlen`, optional `position_ids`/`token_type_ids`,
`mlm_positions`/`mlm_labels` (M,) and the family's extras (`sop_labels`, `nsp_labels`, `sbo_left`,
`sbo_right`, `sbo_rel`, `lattice_*`). It returns a dict with `loss` (sum of the objectives, each a mean
over its predictions), `losses` (name -> scalar) and `num_predictions` (M), plus the logits.
"""

from __future__ import annotations

from torch import nn

from kompakt.model_config import ModelConfig


def build_pretraining_model(cfg: ModelConfig) -> nn.Module:
    """The pretraining model of `cfg.family`, built by its registry entry (kompakt/families.py):
    bert -> MLM (NorBERT), albert -> MLM + SOP, spanbert -> MLM + SBO, lattice -> Lattice-BERT."""
    from kompakt import families

    if cfg.vocab_size is None:
        raise ValueError("model.vocab_size is unset; fill it from the tokenizer with kompakt.model_config.check_vocab")
    return families.get(cfg.family).resolve("build")(cfg)
