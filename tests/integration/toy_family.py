"""A toy model family registered from outside kompakt: one file and one `register(...)` line.

Imported by test_toy_family.py's subprocess; everything a family needs comes from here.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from kompakt import families


class ToyForMaskedLM(nn.Module):
    """Embeddings and a tied MLM head over the packed batch contract; predicts masked rows only."""

    def __init__(self, cfg):
        super().__init__()
        self.cfg = cfg
        self.emb = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.norm = nn.LayerNorm(cfg.hidden_size)

    def forward(self, input_ids, mlm_positions, mlm_labels, **unused):
        h = self.norm(self.emb(input_ids[mlm_positions]))
        loss = F.cross_entropy(h @ self.emb.weight.T, mlm_labels)
        return {"loss": loss, "losses": {"mlm": loss.detach()}, "num_predictions": int(mlm_positions.numel())}


def toy_flops(cfg, seq_lens, num_predictions) -> float:
    return 6.0 * cfg.vocab_size * cfg.hidden_size * num_predictions


def toy_export(model, out_dir, tokenizer_dir=None, model_card=None) -> Path:
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(out / "model.safetensors"))
    (out / "README.md").write_text(model_card or "", encoding="utf-8")
    return out


families.register(families.Family("toy", build="toy_family:ToyForMaskedLM", flops="toy_family:toy_flops",
                                  export="toy_family:toy_export", load="toy_family:toy_export"))
