"""`kompakt bench train`: end-to-end pretraining throughput and quality against the Hugging Face Trainer.

One run, one device, the recipe's model sizes and tokenizer, the same training documents and the
same number of optimizer steps of about `global_batch_tokens` real tokens each. Measured: real
(non-padding) tokens per second over the steps after a warm-up, data loading and optimizer
included, and the held-out MLM loss after the same steps.

- ours: the shared training loop (kompakt/loop.py) on the DeepSpeed engine with the packed loader
  over the tokenizer stage's training shards; MLM-only token masking, so the objective matches.
- HF grouped: `transformers.Trainer` with the stock `BertForMaskedLM`/`AlbertForMaskedLM` (or
  `ModernBertForMaskedLM` with `sparse_prediction`, for `--family modernbert`) of the same
  sizes and `DataCollatorForLanguageModeling`, one document per row (truncated to `max_seq_len`),
  `train_sampling_strategy="group_by_length"` so rows of similar length share a batch (what a
  careful user picks to avoid padding), logits on every position.
- HF line-by-line: the same without grouping (padded to the longest row of a random batch).
- HF concat: documents concatenated and cut into full `max_seq_len` rows (run_mlm.py's
  group_texts): no padding, but attention crosses documents.

Quality at the same budget: every model (ours exported to the stock class) is evaluated by one
function on the same pre-masked held-out documents (the tokenizer stage's `heldout/` shards, never
trained on by any side): cross-entropy over the masked positions. A unigram model of the training
tokens is the floor to beat. `ratio` = ours / the fastest HF feed; each ratio is reported too.
"""

from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kompakt.log import info, table

MASK_RATE = 0.15


def _documents(shards, doc_ids, max_len: int, cls_id: int, sep_id: int) -> list[list[int]]:
    """Documents `doc_ids` of the shards as `[CLS] ids [SEP]`, truncated to `max_len` tokens."""
    docs = []
    for g in doc_ids:
        tokens, _, _ = shards.document(g)
        docs.append([cls_id, *np.asarray(tokens[: max_len - 2]).tolist(), sep_id])
    return docs


def heldout_batches(docs: list[list[int]], mask_id: int, pad_id: int, rows_per_batch: int = 32,
                    seed: int = 1234) -> list[dict]:
    """Padded, pre-masked MLM batches of `docs` ([CLS] ids [SEP] rows): 15% of the inner tokens are
    [MASK] (at least one per row), labels -100 elsewhere. Fixed by `seed`, so every model sees the same."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(0, len(docs), rows_per_batch):
        rows = docs[i:i + rows_per_batch]
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        labels = torch.full_like(ids, -100)
        attn = torch.zeros_like(ids)
        for r, row in enumerate(rows):
            ids[r, :len(row)] = torch.tensor(row)
            attn[r, :len(row)] = 1
            inner = torch.arange(1, len(row) - 1)
            k = max(1, round(MASK_RATE * len(inner)))
            pick = inner[torch.randperm(len(inner), generator=g)[:k]]
            labels[r, pick] = ids[r, pick]
            ids[r, pick] = mask_id
        out.append({"input_ids": ids, "attention_mask": attn, "labels": labels})
    return out


@torch.no_grad()
def heldout_mlm_loss(hf_model, batches: list[dict]) -> float:
    """Mean cross-entropy (nats) over every masked position of `batches`, for any stock MLM model."""
    hf_model.eval()
    total, count = 0.0, 0
    for b in batches:
        logits = hf_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.float()
        keep = b["labels"] != -100
        total += float(torch.nn.functional.cross_entropy(logits[keep], b["labels"][keep], reduction="sum"))
        count += int(keep.sum())
    return total / max(count, 1)


def unigram_loss(train_docs: list[list[int]], batches: list[dict], vocab_size: int) -> float:
    """Held-out loss of predicting every masked token by its training frequency (add-one smoothed)."""
    counts = np.ones(vocab_size, dtype=np.float64)
    for d in train_docs:
        np.add.at(counts, np.asarray(d[1:-1], dtype=np.int64), 1.0)
    logp = np.log(counts / counts.sum())
    labels = np.concatenate([b["labels"][b["labels"] != -100].numpy() for b in batches])
    return float(-logp[labels].mean())


def _hf_throughput(model_cfg, rows: list[list[int]], rows_per_step: int, num_warmup: int, num_steps: int,
                   hf_tokenizer, lr: float, strategy: str = "random"):
    """(real tokens/s of `transformers.Trainer` over steps num_warmup+1 .. num_warmup+num_steps, the model)."""
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainerCallback, TrainingArguments

    model = stock_model(model_cfg)
    mlm = DataCollatorForLanguageModeling(hf_tokenizer, mlm=True, mlm_probability=MASK_RATE)
    real_tokens: list[int] = []

    def collate(features):
        batch = mlm(features)
        real_tokens.append(int(batch["attention_mask"].sum()))
        return batch

    times: dict[int, float] = {}

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            times[state.global_step] = time.perf_counter()

    dataset = [{"input_ids": r} for r in rows]
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, max_steps=num_warmup + num_steps, per_device_train_batch_size=rows_per_step,
                                 learning_rate=lr, weight_decay=0.01, warmup_steps=0, logging_steps=10**9,
                                 save_strategy="no", report_to=[], dataloader_num_workers=0, seed=0,
                                 bf16=torch.cuda.is_available(), use_cpu=not torch.cuda.is_available(),
                                 disable_tqdm=True, train_sampling_strategy=strategy)
        Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate,
                callbacks=[StepClock()]).train()
    measured = sum(real_tokens[num_warmup:num_warmup + num_steps])
    return measured / (times[num_warmup + num_steps] - times[num_warmup]), model


def stock_model(model_cfg):
    """The stock MLM class of the family, freshly initialised: BertForMaskedLM, AlbertForMaskedLM, or
    ModernBertForMaskedLM with its own `sparse_prediction` (head and loss on masked rows only), the setting
    its authors train with and the strongest a careful Trainer user has."""
    from transformers import AlbertForMaskedLM, BertForMaskedLM, ModernBertForMaskedLM

    if model_cfg.family == "modernbert":
        from kompakt.hf_modernbert import to_hf_config

        hf_cfg = to_hf_config(model_cfg)
        hf_cfg.sparse_prediction = True
        return ModernBertForMaskedLM(hf_cfg)
    from kompakt.hf import to_hf_config

    return (AlbertForMaskedLM if model_cfg.family == "albert" else BertForMaskedLM)(to_hf_config(model_cfg))


def as_modernbert(model_cfg, seq_len: int):
    """The recipe's sizes as a ModernBERT: a GeGLU two thirds as wide (about the feed-forward parameters of
    the BERT it replaces), local windows of seq_len / 2 on two of every three layers, no ALBERT factorisation."""
    from kompakt.model_config import ModelConfig

    width = (model_cfg.intermediate_size * 2 // 3 + 63) // 64 * 64
    return ModelConfig(family="modernbert", vocab_size=model_cfg.vocab_size, hidden_size=model_cfg.hidden_size,
                       num_layers=model_cfg.num_layers, num_heads=model_cfg.num_heads, intermediate_size=width,
                       max_position_embeddings=model_cfg.max_position_embeddings, layer_norm_eps=1e-5,
                       modernbert={"local_attention": seq_len // 2})


def _to_stock(model):
    """Our trained model as the stock class of its family (strict load), for the shared held-out loss."""
    if model.cfg.family == "modernbert":
        from kompakt.hf_modernbert import to_hf_model

        hf = to_hf_model(model, "masked_lm")
        hf.sparse_prediction = False  # logits on every position, as heldout_mlm_loss indexes them
        return hf
    from kompakt.hf import to_hf_model

    return to_hf_model(model, "masked_lm")


def _bench_data(cfg, tok_stage: Path, specials, quick: bool):
    """(training shards, training examples, up to 20,000 training documents as token rows, pre-masked
    held-out batches): training documents for every side; held-out documents for the evaluation only."""
    from kompakt.pretrain.data import build_examples, layout
    from kompakt.pretrain.stage import heldout_by_document, heldout_doc_ids
    from kompakt.shards import TokenShards

    seq_len = cfg.objective.max_seq_len
    shards = TokenShards(tok_stage / "tokens")
    lay = layout(cfg.objective)
    examples = build_examples(shards, lay.max_tokens, lay.min_tokens)
    if (tok_stage / "heldout" / "index.json").is_file():
        heldout_shards, train_examples = TokenShards(tok_stage / "heldout"), examples
        held_ids = range(heldout_shards.num_docs)
        train_ids = range(shards.num_docs)
    else:  # older tokenizer stages: hold out whole documents of tokens/ as pretraining does
        heldout_shards = shards
        train_examples, _ = heldout_by_document(shards, examples)
        held_ids = heldout_doc_ids(shards.num_docs).tolist()
        train_ids = sorted(set(range(shards.num_docs)) - set(held_ids))
    max_docs = 4000 if quick else 20000
    docs = _documents(shards, train_ids[:max_docs], seq_len, specials.cls, specials.sep)
    held_docs = [d for d in _documents(heldout_shards, held_ids[:400], seq_len, specials.cls, specials.sep) if len(d) >= 4]
    eval_batches = heldout_batches(held_docs, specials.mask, specials.pad)
    return shards, train_examples, docs, eval_batches


def train_throughput(recipe, tok_stage: Path, quick: bool = False, family: str | None = None) -> dict:
    """Ours and the three HF feeds on the recipe's corpus and sizes; returns speed and held-out quality.
    `family="modernbert"` trains the recipe's sizes as a ModernBERT on both sides (`as_modernbert`)."""
    from transformers import AutoTokenizer

    from kompakt import checkpoint
    from kompakt.dist import setup_env
    from kompakt.engine import build_engine, init_distributed
    from kompakt.errors import ConfigError
    from kompakt.model_config import check_vocab
    from kompakt.models import build_pretraining_model
    from kompakt.pretrain.data import PackedLoader
    from kompakt.pretrain.loop import train
    from kompakt.tokenizer import SpecialIds, load_tokenizer

    if recipe.model is None or recipe.pretrain is None or recipe.model.family == "lattice":
        raise ConfigError(f"{recipe.name}: bench train needs a bert/albert/spanbert/modernbert model and a pretrain section")
    tok = load_tokenizer(tok_stage / "tokenizer")
    specials = SpecialIds.from_tokenizer(tok)
    model_cfg = check_vocab(recipe.model, specials.vocab_size, str(tok_stage / "tokenizer"))
    if model_cfg.family == "spanbert":
        model_cfg = model_cfg.model_copy(update={"family": "bert"})  # the baseline has no SBO head
    num_warmup, num_steps = (2, 10) if quick else (5, 195)
    base = recipe.pretrain
    seq_len = base.objective.max_seq_len
    if family == "modernbert" and model_cfg.family != "modernbert":
        model_cfg = as_modernbert(model_cfg, seq_len)
    elif family not in (None, "bert", model_cfg.family):
        raise ConfigError(f"bench train --family {family!r}: use bert (the recipe's own model) or modernbert")
    cfg = base.model_copy(update={
        "max_steps": num_warmup + num_steps,
        "run": base.run.model_copy(update={"log_every": num_warmup, "save_every": 10**9, "keep_last": 1,
                                           "eval_every": 0, "resume": "never", "time_limit_minutes": None}),
        "objective": base.objective.model_copy(update={"masking": "token", "sop": False}),
        "schedule": base.schedule.model_copy(update={"warmup_steps": min(base.schedule.warmup_steps,
                                                                         num_warmup + num_steps - 1)}),
    })

    shards, train_examples, docs, eval_batches = _bench_data(cfg, tok_stage, specials, quick)

    # --- HF Trainer first: once DeepSpeed has started torch.distributed the Trainer would wrap its
    # model in DistributedDataParallel, which a single-process baseline should not pay for.
    hf_tok = AutoTokenizer.from_pretrained(tok_stage / "tokenizer")
    mean_len = sum(map(len, docs)) / len(docs)
    tokens_per_step = cfg.data.global_batch_tokens
    line_rows = max(1, round(tokens_per_step / mean_len))
    flat = [t for d in docs for t in d]
    concat = [flat[i:i + seq_len] for i in range(0, len(flat) - seq_len + 1, seq_len)]
    concat_rows = max(1, round(tokens_per_step / seq_len))
    lr = cfg.optim.lr
    feeds = {}
    for name, rows, per_step, strategy in (("hf_grouped", docs, line_rows, "group_by_length"),
                                           ("hf_line", docs, line_rows, "random"),
                                           ("hf_concat", concat, concat_rows, "random")):
        torch.manual_seed(0)
        speed, model = _hf_throughput(model_cfg, rows, per_step, num_warmup, num_steps, hf_tok, lr, strategy)
        if model_cfg.family == "modernbert":
            model.sparse_prediction = False
        feeds[name] = (speed, heldout_mlm_loss(model, eval_batches))
        info(f"bench train: {name} {speed:,.0f} tokens/s, held-out MLM loss {feeds[name][1]:.4f}")
        del model

    # --- ours
    env = setup_env()
    init_distributed(env)
    loader = PackedLoader(shards, cfg.objective, cfg.data, specials, env.rank, env.world_size, train_examples,
                          prefetch=cfg.run.prefetch, num_workers=cfg.run.num_workers)
    accum = loader.steps_info().grad_accum_steps
    checkpoint.seed_everything(0)
    engine, engine_info = build_engine(build_pretraining_model(model_cfg), cfg, env, accum)
    with tempfile.TemporaryDirectory() as out:
        train(engine, engine_info, cfg, loader, out_dir=Path(out), ckpt_root=Path(out) / "checkpoints")
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    loader.close()
    measured = [r["tokens_per_s"] for r in rows if r["step"] > num_warmup and "tokens_per_s" in r]
    ours = float(np.median(measured))
    ours_tokens_per_step = rows[-1]["tokens_seen"] / rows[-1]["step"]
    ours_loss = heldout_mlm_loss(_to_stock(engine.module.cpu().eval()), eval_batches)
    del engine
    info(f"bench train: ours {ours:,.0f} tokens/s, held-out MLM loss {ours_loss:.4f}")
    unigram = unigram_loss(docs, eval_batches, model_cfg.vocab_size)

    best = max(feeds, key=lambda k: feeds[k][0])
    result = {
        "ours_tokens_per_s": round(ours, 1), "ratio": round(ours / feeds[best][0], 3), "ratio_against": best,
        **{f"{k}_tokens_per_s": round(v[0], 1) for k, v in feeds.items()},
        **{f"ratio_{k.removeprefix('hf_')}": round(ours / v[0], 3) for k, v in feeds.items()},
        "heldout_mlm_loss": {"ours": round(ours_loss, 4), **{k: round(v[1], 4) for k, v in feeds.items()},
                             "unigram": round(unigram, 4)},
        "num_heldout_predictions": int(sum(int((b["labels"] != -100).sum()) for b in eval_batches)),
        "tokens_per_step": round(ours_tokens_per_step), "num_steps": num_steps, "num_warmup_steps": num_warmup,
        "family": model_cfg.family, "max_seq_len": seq_len, "mean_doc_tokens": round(mean_len, 1),
        "num_params": sum(p.numel() for p in _to_stock(build_pretraining_model(model_cfg)).parameters()),
    }
    table("bench train: real tokens/s (data loading and optimizer included) and held-out MLM loss after "
          f"{num_warmup + num_steps} steps", ["feed", "tokens/s", "ours / it", "held-out loss"], [
        ("kompakt (packed, DeepSpeed)", round(ours), 1.0, round(ours_loss, 4)),
        ("HF Trainer group_by_length", round(feeds["hf_grouped"][0]), result["ratio_grouped"],
         round(feeds["hf_grouped"][1], 4)),
        ("HF Trainer line-by-line (padded)", round(feeds["hf_line"][0]), result["ratio_line"],
         round(feeds["hf_line"][1], 4)),
        ("HF Trainer concatenated rows", round(feeds["hf_concat"][0]), result["ratio_concat"],
         round(feeds["hf_concat"][1], 4)),
        ("unigram (floor to beat)", "-", "-", round(unigram, 4)),
    ])
    return result


# ------------------------------------------------------------------------------------- equal time

def matched_sizes(model_cfg, family: str):
    """A post-LN BERT or a ModernBERT with the recipe's layers and heads whose parameter count is closest to
    the recipe's model (ALBERT's shared layers and factorised embeddings make it small for its width): the
    width is searched in steps of 32 (feed-forward 4x wide for BERT, GeGLU 8/3x for ModernBERT)."""
    from kompakt.model_config import ModelConfig
    from kompakt.models import build_pretraining_model

    def count(cfg) -> int:
        return sum(p.numel() for p in _to_stock(build_pretraining_model(cfg)).parameters())

    target = count(model_cfg)
    best = None
    for width in range(32, 1025, 32):
        if width % model_cfg.num_heads:
            continue
        if family == "bert":
            cfg = ModelConfig(family="bert", vocab_size=model_cfg.vocab_size, hidden_size=width,
                              num_layers=model_cfg.num_layers, num_heads=model_cfg.num_heads,
                              intermediate_size=4 * width, max_position_embeddings=model_cfg.max_position_embeddings)
        else:
            cfg = as_modernbert(model_cfg.model_copy(update={"hidden_size": width, "intermediate_size": 4 * width}),
                                model_cfg.max_position_embeddings)
        n = count(cfg)
        if best is None or abs(n - target) < abs(best[1] - target):
            best = (cfg, n)
        if n > 2 * target:
            break
    return best[0], best[1], target


def equal_time(recipe, tok_stage: Path, seconds: float | None = None, quick: bool = False) -> dict:
    """`kompakt bench families`: held-out MLM loss after the same training time for the recipe's model (the
    demo's ALBERT), a post-LN BERT and a ModernBERT of about its parameter count.

    Each is trained by kompakt's own loop on the same packed training documents with the recipe's optimizer,
    learning rate, batch tokens and MLM-only token masking (SOP off, so the objectives match). Equal time:
    a 12-step calibration run gives each model's steps per second, and its real run gets the steps that fit
    `seconds` (the linear schedule spans them), so a faster architecture sees more data, as it would on a
    cluster with a time budget. The measured training seconds are reported beside the losses, all on the
    same pre-masked held-out documents. `ratio` = the better of the other two losses / ModernBERT's (above
    1: ModernBERT is ahead)."""
    from kompakt import checkpoint
    from kompakt.dist import setup_env
    from kompakt.engine import build_engine, init_distributed
    from kompakt.errors import ConfigError
    from kompakt.model_config import check_vocab
    from kompakt.models import build_pretraining_model
    from kompakt.pretrain.data import PackedLoader
    from kompakt.pretrain.loop import train
    from kompakt.tokenizer import SpecialIds, load_tokenizer

    if recipe.model is None or recipe.pretrain is None or recipe.model.family in ("lattice", "modernbert"):
        raise ConfigError(f"{recipe.name}: bench families needs a bert/albert/spanbert model and a pretrain section")
    seconds = seconds or (20.0 if quick else 150.0)
    tok = load_tokenizer(tok_stage / "tokenizer")
    specials = SpecialIds.from_tokenizer(tok)
    own = check_vocab(recipe.model, specials.vocab_size, str(tok_stage / "tokenizer"))
    if own.family == "spanbert":
        own = own.model_copy(update={"family": "bert"})
    base = recipe.pretrain
    cfg0 = base.model_copy(update={
        "run": base.run.model_copy(update={"log_every": 2, "save_every": 10**9, "keep_last": 1, "eval_every": 0,
                                           "resume": "never", "time_limit_minutes": None}),
        "objective": base.objective.model_copy(update={"masking": "token", "sop": False})})
    shards, train_examples, docs, eval_batches = _bench_data(cfg0, tok_stage, specials, quick)
    env = setup_env()
    init_distributed(env)
    models = {f"{own.family} (recipe)": own}
    for fam in ("bert", "modernbert"):
        if fam != own.family:
            models[f"{fam} (matched)" if fam == "modernbert" else "bert post-LN (matched)"] = matched_sizes(own, fam)[0]

    def run(model_cfg, steps: int) -> tuple[float, int, object]:
        cfg = cfg0.model_copy(update={"max_steps": steps, "schedule": cfg0.schedule.model_copy(
            update={"warmup_steps": max(1, min(cfg0.schedule.warmup_steps, steps // 10))})})
        loader = PackedLoader(shards, cfg.objective, cfg.data, specials, env.rank, env.world_size, train_examples,
                              prefetch=cfg.run.prefetch, num_workers=cfg.run.num_workers)
        checkpoint.seed_everything(0)
        engine, einfo = build_engine(build_pretraining_model(model_cfg), cfg, env,
                                     loader.steps_info().grad_accum_steps)
        with tempfile.TemporaryDirectory() as out:
            t0 = time.perf_counter()
            train(engine, einfo, cfg, loader, out_dir=Path(out), ckpt_root=Path(out) / "checkpoints")
            dt = time.perf_counter() - t0
            rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
        loader.close()
        return dt, rows[-1]["tokens_seen"], engine

    results = {}
    for name, model_cfg in models.items():
        calib, _, _ = run(model_cfg, 12)
        steps = max(20, int(seconds / (calib / 12)))
        dt, tokens, engine = run(model_cfg, steps)
        loss = heldout_mlm_loss(_to_stock(engine.module.cpu().eval()), eval_batches)
        n = sum(p.numel() for p in _to_stock(build_pretraining_model(model_cfg)).parameters())
        results[name] = {"heldout_mlm_loss": round(loss, 4), "train_seconds": round(dt, 1), "steps": steps,
                         "tokens": int(tokens), "num_params": int(n),
                         "size": f"{model_cfg.num_layers}x{model_cfg.hidden_size} ff {model_cfg.intermediate_size}"}
        info(f"bench families: {name}: {steps} steps in {dt:.0f} s, held-out MLM loss {loss:.4f}")
        del engine
    unigram = unigram_loss(docs, eval_batches, own.vocab_size)
    mb = next(v for k, v in results.items() if k.startswith("modernbert"))
    others = [v["heldout_mlm_loss"] for k, v in results.items() if not k.startswith("modernbert")]
    table(f"bench families: held-out MLM loss after about {seconds:.0f} s of training each (lower is better)",
          ["model", "size", "params", "steps", "seconds", "held-out loss"],
          [(k, v["size"], f"{v['num_params']:,}", v["steps"], v["train_seconds"], v["heldout_mlm_loss"])
           for k, v in results.items()] + [("unigram (floor to beat)", "-", "-", "-", "-", round(unigram, 4))])
    return {"ratio": round(min(others) / mb["heldout_mlm_loss"], 4), "seconds_budget": seconds, "models": results,
            "unigram_loss": round(unigram, 4), "lr": cfg0.optim.lr, "tokens_per_step": cfg0.data.global_batch_tokens,
            "num_heldout_predictions": int(sum(int((b["labels"] != -100).sum()) for b in eval_batches))}
