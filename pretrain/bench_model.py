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

`kompakt bench mfu` (`mfu_throughput`) runs the same three feeds at BERT-base's shape (12 x 768, 12 heads,
FFN 3072) and sequence 512 on a CUDA GPU, in bf16 autocast with a fused AdamW step, and turns tokens/s
into model FLOPs utilisation against the GPU's peak bf16 FLOP/s.
"""

from __future__ import annotations

import contextlib
import gzip
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from kompakt.errors import ConfigError, DeviceError
from kompakt.log import info, table

MASK_RATE = 0.15


@dataclass(frozen=True)
class Setup:
    """One model benchmark's shape: model sizes, tokens per row, rows of real tokens per step, steps."""

    sizes: dict
    seq_len: int
    rows: int
    num_warmup: int
    num_steps: int
    max_docs: int = 20_000


MODEL_SETUP = Setup(dict(hidden_size=256, num_layers=4, num_heads=4, intermediate_size=1024), 128, 32, 2, 8)
MODEL_QUICK = Setup(dict(hidden_size=128, num_layers=2, num_heads=2, intermediate_size=512), 64, 16, 1, 3, 4_000)
# BERT-base at sequence 512. 64 rows = 32,768 real tokens a step, so every matmul has 32k rows (the padded
# feed: micro-batches of at most 64 documents) and kernel launches are a small share of a step. The 13 steps
# take about 430k tokens, some 9,600 demo documents of 45 tokens on average. Not yet tuned on a GPU.
MFU_SETUP = Setup(dict(hidden_size=768, num_layers=12, num_heads=12, intermediate_size=3072), 512, 64, 3, 10)
MFU_QUICK = Setup(dict(hidden_size=64, num_layers=2, num_heads=2, intermediate_size=256), 64, 8, 1, 2, 2_000)

NEEDS_GPU = "needs a CUDA GPU: MFU is against a GPU's peak bf16 FLOP/s"


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


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _step(model, batches: list[dict], device: torch.device, optimizer=None) -> float:
    """Seconds of one step: forward + backward of each micro-batch (gradients accumulate), then the optimizer
    step when there is one. On CUDA in bf16 autocast, with the queue drained before and after the clock."""
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    with torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext():
        for batch in batches:
            out = model(**batch)
            (out["loss"] if isinstance(out, dict) else out.loss).backward()
    if optimizer is not None:
        optimizer.step()
    model.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def _interleaved(runs: list[tuple], num_warmup: int, device: torch.device) -> tuple[list[float], list[dict | None]]:
    """Real tokens/s of each (model, steps, optimizer) run, a step being (micro-batches, real tokens): the
    median over the timed steps of the step's real tokens over its seconds. The runs take their steps in
    turn and the median drops outliers, so a burst of load from other processes on a shared machine falls
    on all runs alike and skews none.

    On CUDA also each run's memory over its timed steps, in GiB: `peak` is torch.cuda.max_memory_allocated
    (which includes every run's resident weights and optimizer state, as the models stay on the device
    together) and `step` the peak above what was allocated when the step began (activations, gradients,
    logits: what the feed itself costs). None on CPU."""
    rates = [[] for _ in runs]
    memory = [{"peak": 0.0, "step": 0.0} if device.type == "cuda" else None for _ in runs]
    for model, _, _ in runs:
        model.train()
    for i in range(len(runs[0][1])):
        for r, (model, steps, optimizer) in enumerate(runs):
            batches, num_real = steps[i]
            if memory[r] is not None:
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            dt = _step(model, batches, device, optimizer)
            if i >= num_warmup:
                rates[r].append(num_real / dt)
                if memory[r] is not None:
                    peak = torch.cuda.max_memory_allocated(device)
                    memory[r]["peak"] = max(memory[r]["peak"], round(peak / 2**30, 3))
                    memory[r]["step"] = max(memory[r]["step"], round((peak - before) / 2**30, 3))
    return [statistics.median(x) for x in rates], memory


def _models(family: str, vocab: int, sizes: dict, seq_len: int, attention: str = "auto"):
    """Our pretraining model (attention backend `attention`) and the stock one holding the same weights
    (strict load), sdpa attention.

    modernbert: a GeGLU two thirds as wide (the parameters of BERT's feed-forward), local windows of
    seq_len / 2, and the stock model's own `sparse_prediction` (its head on masked rows only), the
    setting its authors train with."""
    from kompakt.model_config import ModelConfig
    from kompakt.models import build_pretraining_model

    common = dict(vocab_size=(vocab + 63) // 64 * 64, max_position_embeddings=512, attention=attention)
    if family == "modernbert":
        from kompakt.hf_modernbert import to_hf_model

        width = (sizes["intermediate_size"] * 2 // 3 + 63) // 64 * 64
        cfg = ModelConfig(family="modernbert", layer_norm_eps=1e-5, modernbert={"local_attention": seq_len // 2},
                          **common, **{**sizes, "intermediate_size": width})
    elif family == "bert":
        from kompakt.hf import to_hf_model

        cfg = ModelConfig(family="bert", **common, **sizes)
    else:
        raise ConfigError(f"bench model --family {family!r}: use bert or modernbert")
    torch.manual_seed(0)
    ours = build_pretraining_model(cfg)
    hf = to_hf_model(ours, "masked_lm")
    if family == "modernbert":  # read at construction as self.sparse_prediction, kept in the config for saving
        hf.config.sparse_prediction = hf.sparse_prediction = True
    hf.set_attn_implementation("sdpa")
    return cfg, ours, hf


def model_throughput(recipe, tok_stage: Path, quick: bool = False, family: str = "bert", setup: Setup | None = None,
                     device: str | torch.device = "cpu", optimizer: bool = False, padded_rows: int | None = None,
                     show: bool = True) -> dict:
    """Real tokens/s of our packed model vs the stock class (BertForMaskedLM or ModernBertForMaskedLM),
    padded and concatenated.

    `setup` replaces the shape (default MODEL_SETUP, or MODEL_QUICK with `quick`). On a CUDA `device` the
    steps run in bf16 autocast and our attention is "auto" resolved for bf16 compute (the flash varlen
    kernel where torch has it): under autocast the embeddings come out in fp32, and "auto" planned on
    their dtype would pick FlexAttention, not the kernel bf16 training uses. `optimizer` adds an AdamW
    step (fused on CUDA) to every step of every feed. `padded_rows` splits the padded feed's step into
    micro-batches of at most that many documents (gradients accumulated), so its padding stays within
    `padded_rows * seq_len` slots; None pads the whole step as one batch. `flops_per_token` is model
    FLOPs (kompakt/models/flops.py, forward + backward) per real token of our packed batches."""
    from kompakt.models.flops import model_flops, seq_lens_from_cu
    from kompakt.models.packing import resolve_backend

    setup = setup or (MODEL_QUICK if quick else MODEL_SETUP)
    device = torch.device(device)
    seq_len, num_warmup, num_steps = setup.seq_len, setup.num_warmup, setup.num_steps
    tokens_per_step = setup.rows * seq_len
    docs, vocab, mask_id = _documents(recipe, tok_stage, setup.max_docs, seq_len)
    compute_dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    attention = resolve_backend("auto", device, compute_dtype)
    cfg, ours, hf = _models(family, vocab, setup.sizes, seq_len, attention)
    ours, hf = ours.to(device), hf.to(device)

    groups = _steps(docs, tokens_per_step, num_warmup + num_steps)
    g = torch.Generator().manual_seed(0)
    ours_steps, padded_steps, concat_steps = [], [], []
    for grp in groups:
        batch, n = _ours_batch(grp, mask_id, g)
        ours_steps.append(([_to(batch, device)], n))
        chunks = [grp[i:i + (padded_rows or len(grp))] for i in range(0, len(grp), padded_rows or len(grp))]
        padded = [_padded_batch(c, mask_id, g) for c in chunks]
        padded_steps.append(([_to(b, device) for b, _ in padded], sum(n for _, n in padded)))
        batch, n = _concat_batch(grp, seq_len, mask_id, g)
        concat_steps.append(([_to(batch, device)], n))
    padded_slots = sum(b["input_ids"].numel() for bs, _ in padded_steps[num_warmup:] for b in bs)
    padded_real = sum(n for _, n in padded_steps[num_warmup:])
    # Model FLOPs of the timed steps' packed batches (each document a sequence, the head on masked rows).
    flops = sum(model_flops(cfg, seq_lens_from_cu(bs[0]["cu_seqlens"]), int(bs[0]["mlm_positions"].numel()))
                for bs, _ in ours_steps[num_warmup:])
    flops_per_token = flops / sum(n for _, n in ours_steps[num_warmup:])
    info(f"bench model: {len(docs)} documents, {tokens_per_step} tokens/step, {num_steps} timed steps on {device}, "
         f"attention {attention}, padding {1 - padded_real / padded_slots:.0%} of the padded baseline's slots")

    def adamw(model):
        if not optimizer:
            return None
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.type == "cuda")

    hf_opt = adamw(hf)  # one stock model serves both of its feeds, so one optimizer
    (ours_tps, padded_tps, concat_tps), memory = _interleaved(
        [(ours, ours_steps, adamw(ours)), (hf, padded_steps, hf_opt), (hf, concat_steps, hf_opt)], num_warmup,
        device)
    result = {
        "tokens_per_s": ours_tps, "tokens_per_s_padded": padded_tps, "tokens_per_s_concat": concat_tps,
        "ratio": ours_tps / padded_tps, "ratio_concat": ours_tps / concat_tps,
        "padding_fraction": 1 - padded_real / padded_slots, "tokens_per_step": tokens_per_step,
        "seq_len": seq_len, "num_steps": num_steps, "attention": attention, "family": family,
        "model": {**setup.sizes, "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size},
        "flops_per_token": flops_per_token, "device_type": device.type, "optimizer": "adamw" if optimizer else None,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32", "padded_rows": padded_rows,
        "memory_gib": dict(zip(("ours", "padded", "concat"), memory)) if device.type == "cuda" else None,
    }
    if show:
        stock = type(hf).__name__
        table(f"model ({family}): forward+backward real tokens/s (MLM)", ["feed", "tokens/s", "ours / this"], [
            ["ours: packed, cu_seqlens, head on masked rows", round(ours_tps), 1.0],
            [f"HF {stock} sdpa: padded documents", round(padded_tps), result["ratio"]],
            [f"HF {stock} sdpa: concatenated rows", round(concat_tps), result["ratio_concat"]],
        ])
    return result


def mfu_device(peak: float | None = None) -> tuple[torch.device, float]:
    """The device `kompakt bench mfu` runs on and the peak FLOP/s it divides by: the CUDA GPU and its
    data-sheet bf16 peak (pretrain/stage.py), or `peak` when given (which also lets a CPU run, as a test
    of the arithmetic). A DeviceError without a GPU or a peak; a ConfigError for a GPU of unknown peak."""
    if torch.cuda.is_available():
        device = torch.device("cuda")
        if peak is None:
            from kompakt.pretrain.stage import peak_flops

            peak = peak_flops(device)
        if peak is None:
            raise ConfigError(f"bench mfu: no peak bf16 FLOP/s known for {torch.cuda.get_device_name(device)} "
                              "(pretrain/stage.py PEAK_BF16_FLOPS); pass --peak-flops with its data-sheet figure")
        return device, float(peak)
    if peak is None:
        raise DeviceError(f"bench mfu {NEEDS_GPU}, and this machine has none")
    return torch.device("cpu"), float(peak)


def mfu_throughput(recipe, tok_stage: Path, quick: bool = False, peak: float | None = None) -> dict:
    """`kompakt bench mfu`: model FLOPs utilisation of BERT-base training at sequence 512 (`model_throughput`
    at MFU_SETUP, a fused AdamW step included), ours against stock BertForMaskedLM on the same GPU.

    MFU = flops_per_token * tokens/s / peak. One FLOP count serves every feed: model FLOPs per real token of
    our packed batches (kompakt/models/flops.py), the work the task needs, not the padding, cross-document
    attention or full-vocabulary logits the stock model also computes. So each MFU ratio equals its
    tokens/s ratio. The count is forward + backward; the timed step also holds the AdamW update (a few
    elementwise FLOPs per parameter, left out), as the MFU of the training logs does (kompakt/loop.py).
    `ratio` is ours over the stock model's stronger feed (concatenated rows, as a rule).
    `quick` is a tiny shape; with `peak` given it also runs on CPU, to check the arithmetic and the keys."""
    device, peak = mfu_device(peak)
    setup = MFU_QUICK if quick else MFU_SETUP
    r = model_throughput(recipe, tok_stage, family="bert", setup=setup, device=device, optimizer=True,
                         padded_rows=setup.rows, show=False)
    fpt = r["flops_per_token"]
    feeds = {"ours": r["tokens_per_s"], "padded": r["tokens_per_s_padded"], "concat": r["tokens_per_s_concat"]}
    baseline = max(("padded", "concat"), key=feeds.get)
    result = {
        **r, "peak_flops": peak, "baseline": baseline,
        "ratio": feeds["ours"] / feeds[baseline],
        "ratio_padded": feeds["ours"] / feeds["padded"], "ratio_concat": feeds["ours"] / feeds["concat"],
        "mfu": fpt * feeds["ours"] / peak, "mfu_padded": fpt * feeds["padded"] / peak,
        "mfu_concat": fpt * feeds["concat"] / peak,
        "flops_counted": "model FLOPs of our packed batches (kompakt/models/flops.py) for every feed, "
                         "so each MFU ratio equals its tokens/s ratio",
    }
    memory = r["memory_gib"] or {}
    names = {"ours": f"ours: packed, {r['attention']}", "padded": f"HF sdpa: padded, {setup.rows} docs",
             "concat": f"HF sdpa: rows of {setup.seq_len}"}
    shape = setup.sizes
    table(f"mfu: {shape['num_layers']}x{shape['hidden_size']} BERT, sequence {setup.seq_len}, {r['precision']}, "
          f"AdamW; {fpt:.4g} model FLOP per real token, peak {peak:.4g} FLOP/s",
          ["feed", "tokens/s", "MFU", "ours/this", "GiB peak (step)"],
          [[names[k], round(v), f"{100 * fpt * v / peak:.3g}%", round(feeds["ours"] / v, 3),
            f"{memory[k]['peak']} ({memory[k]['step']})" if k in memory else "-"] for k, v in feeds.items()])
    return result
