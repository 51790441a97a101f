"""Zero-shot check of a masked LM: pseudo-log-likelihood on held-out text (Salazar et al. 2020).

Each token of a sentence is masked in turn and scored by the model given the rest; the sentence's
PLL is the sum of those log-probabilities, and the pseudo-perplexity exp(-sum PLL / tokens) over the
sample is comparable between models that share a tokenizer (a teacher and its students). All masked
copies of a sentence go through the model in one batch: n forwards of one row each become one of n
rows. No fine-tuning is involved, so it says whether pretraining or compression damaged the model
before any task does.
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

    tok = AutoTokenizer.from_pretrained(str(folder))
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForMaskedLM.from_pretrained(str(folder)).eval()
    finally:
        hf_logging.set_verbosity(level)
    total, count = 0.0, 0
    special = set(tok.all_special_ids)
    sample = [t for t in texts if t and t.strip()][:max_texts]
    for text in sample:
        ids = tok(text, truncation=True, max_length=max_len, return_tensors="pt")["input_ids"][0]
        positions = [i for i, t in enumerate(ids.tolist()) if t not in special]
        if not positions:
            continue
        batch = ids.repeat(len(positions), 1)
        rows = torch.arange(len(positions))
        cols = torch.tensor(positions)
        batch[rows, cols] = tok.mask_token_id
        logp = torch.log_softmax(model(input_ids=batch, attention_mask=torch.ones_like(batch)).logits.float(), -1)
        total += float(logp[rows, cols, ids[cols]].sum())
        count += len(positions)
    if count == 0:
        return None
    return {"pseudo_perplexity": math.exp(-total / count), "pll_per_token": total / count, "tokens": count,
            "texts": len(sample)}
