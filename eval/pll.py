"""Zero-shot check of a masked LM: pseudo-log-likelihood on held-out text (Salazar et al. 2020).

Each token of a sentence is masked in turn and scored by the model given the rest; the sentence's
PLL is the sum of those log-probabilities, and the pseudo-perplexity exp(-sum PLL / tokens) over the
sample is comparable between models that share a tokenizer (a teacher and its students). All masked
copies of a sentence go through the model in one batch: n forwards of one row each become one of n
rows. No fine-tuning is involved, so it says whether pretraining or compression damaged the model
before any task does.

A Lattice-BERT (model_type lattice-bert) reads each masked copy as its lattice, as pretraining's masked
segment prediction did: the characters, then the lexicon words found in them except those that cover the
masked character (they would give it away); the masked character is scored among the characters (the word
half of the output layer is left out).
"""

from __future__ import annotations

import math
from pathlib import Path

import torch


def has_mlm_head(folder: Path) -> bool:
    """Whether a folder's weights include an MLM head (BERT `cls.predictions`, ALBERT `predictions`)."""
    from safetensors import safe_open

    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        return False
    with safe_open(str(path), "pt") as f:
        return any(k.startswith(("cls.predictions", "predictions.")) for k in f.keys())


@torch.no_grad()
def pseudo_perplexity(folder: Path, texts: list[str], *, max_len: int = 64, max_texts: int = 200) -> dict | None:
    """{pseudo_perplexity, pll_per_token, tokens, texts} of the folder's MLM on `texts`, or None without a head."""
    if not has_mlm_head(folder):
        return None
    from transformers import AutoModelForMaskedLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import kompakt
    from kompakt.hf import logits_at

    kompakt.register_hf()  # model_type lattice-bert
    tok = AutoTokenizer.from_pretrained(str(folder))
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForMaskedLM.from_pretrained(str(folder)).eval()
    finally:
        hf_logging.set_verbosity(level)
    lexicon = None
    if model.config.model_type == "lattice-bert":
        from kompakt.hf_lattice import folder_lexicon

        lexicon = folder_lexicon(folder, model.config)
    total, count = 0.0, 0
    special = set(tok.all_special_ids)
    sample = [t for t in texts if t and t.strip()][:max_texts]
    for text in sample:
        ids = tok(text, truncation=True, max_length=max_len, return_tensors="pt")["input_ids"][0]
        positions = [i for i, t in enumerate(ids.tolist()) if t not in special]
        if not positions:
            continue
        rows = torch.arange(len(positions))
        cols = torch.tensor(positions)
        if lexicon is None:
            batch = ids.repeat(len(positions), 1)
            batch[rows, cols] = tok.mask_token_id
            inputs = {"input_ids": batch, "attention_mask": torch.ones_like(batch)}
        else:
            inputs = _masked_lattices(ids.tolist(), positions, lexicon, tok)
        # The output layer on the masked position of each row only (a lattice's: its characters' part).
        logits = logits_at(model, inputs, rows, cols).float()[:, :model.config.vocab_size]
        logp = torch.log_softmax(logits, -1)
        total += float(logp[rows, ids[cols]].sum())
        count += len(positions)
    if count == 0:
        return None
    return {"pseudo_perplexity": math.exp(-total / count), "pll_per_token": total / count, "tokens": count,
            "texts": len(sample)}


def _masked_lattices(ids: list[int], positions: list[int], lexicon, tok) -> dict:
    """One padded lattice row per masked position: the row's characters with that one masked, and the lexicon
    words that do not cover it (characters keep their positions, so `positions` index the rows as before)."""
    from kompakt.hf_lattice import lattice_batch, lattice_of_row, mask_character

    lat = lattice_of_row(ids, lexicon, cls_id=tok.cls_token_id, sep_id=tok.sep_token_id)
    rows = [mask_character(lat, at, tok.mask_token_id) for at in positions]
    return lattice_batch(rows, tok.pad_token_id if tok.pad_token_id is not None else 0)
