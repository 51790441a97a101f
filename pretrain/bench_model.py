"""`kompakt bench model`: training throughput of our packed MLM model against the stock class of its family
(`BertForMaskedLM`, or `ModernBertForMaskedLM` with `--family modernbert`).

One run, one device, the same weights and sizes and the same real documents (the demo corpus tokenised
by the recipe's tokenizer). Each step is forward + backward of the MLM loss over the same number of
real (non-padding) tokens; warm-up steps are excluded. Three ways to feed those tokens:

- ours: documents packed into a flat stream of `tokens_per_step` tokens with `cu_seqlens`, attention
  kept inside each document, the MLM head on the 15% masked rows only;
- padded (HF baseline 1): whole documents (truncated to `seq_len`) padded to the longest in the batch,
  `attention_mask`, logits on every position as `BertForMaskedLM` computes them;
- concat (HF baseline 2): documents concatenated and cut into full rows of `seq_len`, as run_mlm.py's
  group_texts (no padding, but attention crosses documents), logits on every position.

Reported: real tokens/s for each (median over the timed steps), `ratio` = ours / padded,
`ratio_concat` = ours / concat.
"""

from __future__ import annotations

import gzip
import statistics
import time
from pathlib import Path

import torch

from kompakt.log import info, table

MASK_RATE = 0.15


def _documents(recipe, tok_stage: Path, max_docs: int, seq_len: int) -> tuple[list[list[int]], int, int]:
    """Token ids of the demo corpus's documents (truncated to seq_len), the vocab size and the [MASK] id."""
    from kompakt.tokenizer import load_tokenizer

    tok = load_tokenizer(tok_stage / "tokenizer")
    texts = []
    for path in recipe.resolve_inputs():
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
        texts += [t.strip() for t in raw.decode("utf-8").split("\n\n") if t.strip()]
        if len(texts) >= max_docs:
            break
    docs = [e.ids[:seq_len] for e in tok.encode_batch(texts[:max_docs])]
    docs = [d for d in docs if len(d) >= 4]
    mask_id = tok.token_to_id("[MASK]")
    assert mask_id is not None, f"{tok_stage} has no [MASK] token"
    return docs, tok.get_vocab_size(), mask_id


def _mask(ids: torch.Tensor, real: torch.Tensor, mask_id: int, g: torch.Generator):
    """15% of the real positions, replaced by [MASK]: (masked ids, boolean chosen positions)."""
    chosen = (torch.rand(ids.shape, generator=g) < MASK_RATE) & real
    return ids.masked_fill(chosen, mask_id), chosen


def _steps(docs: list[list[int]], tokens_per_step: int, num_steps: int) -> list[list[list[int]]]:
    """Consecutive groups of whole documents holding at most `tokens_per_step` real tokens each."""
    steps, cur, n, i = [], [], 0, 0
    while len(steps) < num_steps:
        d = docs[i % len(docs)]
        i += 1
        if n + len(d) > tokens_per_step:
            steps.append(cur)
            cur, n = [], 0
        cur.append(d)
        n += len(d)
    return steps


def _ours_batch(group, mask_id, g):
    ids = torch.tensor([t for d in group for t in d])
    masked, chosen = _mask(ids, torch.ones_like(ids, dtype=torch.bool), mask_id, g)
    cu = torch.zeros(len(group) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(torch.tensor([len(d) for d in group]), 0)
    positions = chosen.nonzero().squeeze(1)
    return {"input_ids": masked, "cu_seqlens": cu, "max_seqlen": max(len(d) for d in group),
            "mlm_positions": positions, "mlm_labels": ids[positions]}, len(ids)


def _padded_batch(group, mask_id, g):
    L = max(len(d) for d in group)
    ids = torch.zeros(len(group), L, dtype=torch.long)
    real = torch.zeros_like(ids, dtype=torch.bool)
    for i, d in enumerate(group):
        ids[i, :len(d)] = torch.tensor(d)
        real[i, :len(d)] = True
    masked, chosen = _mask(ids, real, mask_id, g)
    return {"input_ids": masked, "attention_mask": real.long(),
            "labels": ids.masked_fill(~chosen, -100)}, int(real.sum())


def _concat_batch(group, seq_len, mask_id, g):
    flat = torch.tensor([t for d in group for t in d])
    rows = flat[: len(flat) // seq_len * seq_len].view(-1, seq_len)
    masked, chosen = _mask(rows, torch.ones_like(rows, dtype=torch.bool), mask_id, g)
    return {"input_ids": masked, "labels": rows.masked_fill(~chosen, -100)}, rows.numel()


def _step(model, batch) -> float:
    """Seconds of one forward + backward."""
    start = time.perf_counter()
    out = model(**batch)
    (out["loss"] if isinstance(out, dict) else out.loss).backward()
    model.zero_grad(set_to_none=True)
    return time.perf_counter() - start


def _interleaved(runs: list[tuple], num_warmup: int) -> list[float]:
    """Real tokens/s of each (model, batches) run: the median over the timed steps of the step's real
    tokens over its seconds. The runs take their steps in turn and the median drops outliers, so a
    burst of load from other processes on a shared machine falls on all runs alike and skews none."""
    rates = [[] for _ in runs]
    for model, _ in runs:
        model.train()
    for i in range(len(runs[0][1])):
        for r, (model, batches) in enumerate(runs):
            batch, num_real = batches[i]
            dt = _step(model, batch)
            if i >= num_warmup:
                rates[r].append(num_real / dt)
    return [statistics.median(x) for x in rates]


def _models(family: str, vocab: int, sizes: dict, seq_len: int):
    """Our pretraining model and the stock one holding the same weights (strict load), sdpa attention.

    modernbert: a GeGLU two thirds as wide (the parameters of BERT's feed-forward), local windows of
    seq_len / 2, and the stock model's own `sparse_prediction` (its head on masked rows only), the
    setting its authors train with."""
    from kompakt.model_config import ModelConfig
    from kompakt.models import build_pretraining_model

    common = dict(vocab_size=(vocab + 63) // 64 * 64, max_position_embeddings=512)
    if family == "modernbert":
        from kompakt.hf_modernbert import to_hf_model

        width = (sizes["intermediate_size"] * 2 // 3 + 63) // 64 * 64
        cfg = ModelConfig(family="modernbert", layer_norm_eps=1e-5, modernbert={"local_attention": seq_len // 2},
                          **common, **{**sizes, "intermediate_size": width})
    elif family == "bert":
        from kompakt.hf import to_hf_model

        cfg = ModelConfig(family="bert", **common, **sizes)
    else:
        from kompakt.errors import ConfigError

        raise ConfigError(f"bench model --family {family!r}: use bert or modernbert")
    torch.manual_seed(0)
    ours = build_pretraining_model(cfg)
    hf = to_hf_model(ours, "masked_lm")
    if family == "modernbert":  # read at construction as self.sparse_prediction, kept in the config for saving
        hf.config.sparse_prediction = hf.sparse_prediction = True
    hf.set_attn_implementation("sdpa")
    return cfg, ours, hf


def model_throughput(recipe, tok_stage: Path, quick: bool = False, family: str = "bert") -> dict:
    """Real tokens/s of our packed model vs the stock class (BertForMaskedLM or ModernBertForMaskedLM),
    padded and concatenated."""

    if quick:
        sizes = dict(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512)
        seq_len, rows, num_warmup, num_steps = 64, 16, 1, 3
    else:
        sizes = dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024)
        seq_len, rows, num_warmup, num_steps = 128, 32, 2, 8
    tokens_per_step = rows * seq_len
    docs, vocab, mask_id = _documents(recipe, tok_stage, 20_000 if not quick else 4_000, seq_len)
    cfg, ours, hf = _models(family, vocab, sizes, seq_len)

    groups = _steps(docs, tokens_per_step, num_warmup + num_steps)
    g = torch.Generator().manual_seed(0)
    ours_batches = [_ours_batch(grp, mask_id, g) for grp in groups]
    padded_batches = [_padded_batch(grp, mask_id, g) for grp in groups]
    concat_batches = [_concat_batch(grp, seq_len, mask_id, g) for grp in groups]
    padded_slots = sum(b["input_ids"].numel() for b, _ in padded_batches[num_warmup:])
    padded_real = sum(n for _, n in padded_batches[num_warmup:])
    info(f"bench model: {len(docs)} documents, {tokens_per_step} tokens/step, {num_steps} timed steps, "
         f"padding {1 - padded_real / padded_slots:.0%} of the padded baseline's slots")

    ours_tps, padded_tps, concat_tps = _interleaved(
        [(ours, ours_batches), (hf, padded_batches), (hf, concat_batches)], num_warmup)
    result = {
        "tokens_per_s": ours_tps, "tokens_per_s_padded": padded_tps, "tokens_per_s_concat": concat_tps,
        "ratio": ours_tps / padded_tps, "ratio_concat": ours_tps / concat_tps,
        "padding_fraction": 1 - padded_real / padded_slots, "tokens_per_step": tokens_per_step,
        "seq_len": seq_len, "num_steps": num_steps, "attention": cfg.attention, "family": family,
        "model": {**sizes, "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size},
    }
    stock = type(hf).__name__
    table(f"model ({family}): forward+backward real tokens/s (MLM)", ["feed", "tokens/s", "ours / this"], [
        ["ours: packed, cu_seqlens, head on masked rows", round(ours_tps), 1.0],
        [f"HF {stock} sdpa: padded documents", round(padded_tps), result["ratio"]],
        [f"HF {stock} sdpa: concatenated rows", round(concat_tps), result["ratio_concat"]],
    ])
    return result
