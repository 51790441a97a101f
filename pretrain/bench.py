"""`kompakt bench train`: end-to-end pretraining throughput against the Hugging Face Trainer.

One run, one device, the recipe's model sizes and tokenizer, the same demo corpus and the same
number of optimizer steps of about `global_batch_tokens` real tokens each. Measured: real
(non-padding) tokens per second over the steps after a warm-up, data loading and optimizer
included.

- ours: `kompakt.pretrain.loop.train` on the DeepSpeed engine with the packed loader (prefetch
  thread, masking, collation) over the tokenizer stage's shards; MLM-only token masking, so the
  work matches the baseline's objective.
- HF line-by-line: `transformers.Trainer` with the stock `BertForMaskedLM`/`AlbertForMaskedLM` of the
  same sizes and `DataCollatorForLanguageModeling`, one document per row (truncated to
  `max_seq_len`) padded to the longest in the batch, logits on every position.
- HF concat: the same Trainer on the documents concatenated and cut into full `max_seq_len` rows
  (run_mlm.py's group_texts): no padding, but attention crosses documents.

`ratio` = ours / line-by-line, `ratio_concat` = ours / concat.
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


def _documents(shards, max_docs: int, max_len: int, cls_id: int, sep_id: int) -> list[list[int]]:
    """The first documents of the shards as `[CLS] ids [SEP]`, truncated to `max_len` tokens."""
    docs = []
    for g in range(min(max_docs, shards.num_docs)):
        tokens, _, _ = shards.document(g)
        docs.append([cls_id, *np.asarray(tokens[: max_len - 2]).tolist(), sep_id])
    return docs


def _hf_throughput(model_cfg, rows: list[list[int]], rows_per_step: int, num_warmup: int, num_steps: int,
                   hf_tokenizer, lr: float) -> float:
    """Real tokens/s of `transformers.Trainer` over steps num_warmup+1 .. num_warmup+num_steps."""
    from transformers import (AlbertForMaskedLM, BertForMaskedLM, DataCollatorForLanguageModeling, Trainer,
                              TrainerCallback, TrainingArguments)

    from kompakt.hf import to_hf_config

    model_cls = AlbertForMaskedLM if model_cfg.family == "albert" else BertForMaskedLM
    model = model_cls(to_hf_config(model_cfg))
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
                                 disable_tqdm=True)
        Trainer(model=model, args=args, train_dataset=dataset, data_collator=collate,
                callbacks=[StepClock()]).train()
    measured = sum(real_tokens[num_warmup:num_warmup + num_steps])
    return measured / (times[num_warmup + num_steps] - times[num_warmup])


def train_throughput(recipe_path: str = "recipes/demo-nb.yaml", quick: bool = False) -> dict:
    """Run ours, HF line-by-line and HF concat on the recipe's corpus and sizes; returns the figures."""
    from transformers import AutoTokenizer

    from kompakt import checkpoint, pipeline
    from kompakt.config import load_recipe
    from kompakt.dist import setup_env
    from kompakt.engine import build_engine, init_distributed
    from kompakt.errors import ConfigError
    from kompakt.model_config import check_vocab
    from kompakt.models import build_pretraining_model
    from kompakt.pretrain.data import PackedLoader
    from kompakt.pretrain.loop import train
    from kompakt.pretrain.masking import SpecialIds
    from kompakt.pretrain.stage import load_tokenizer
    from kompakt.shards import TokenShards

    recipe = load_recipe(recipe_path)
    if recipe.model is None or recipe.pretrain is None or recipe.model.family == "lattice":
        raise ConfigError(f"{recipe_path}: bench train needs a bert/albert/spanbert model and a pretrain section")
    tok_stage = pipeline.tokenizer(recipe)
    tok = load_tokenizer(tok_stage / "tokenizer")
    specials = SpecialIds.from_tokenizer(tok)
    model_cfg = check_vocab(recipe.model, specials.vocab_size, str(tok_stage / "tokenizer"))
    if model_cfg.family == "spanbert":
        model_cfg = model_cfg.model_copy(update={"family": "bert"})  # the baseline has no SBO head
    num_warmup, num_steps = (2, 4) if quick else (3, 12)
    base = recipe.pretrain
    seq_len = base.objective.max_seq_len
    cfg = base.model_copy(update={
        "max_steps": num_warmup + num_steps, "log_every": num_warmup, "save_every": 10**9, "keep_last": 1,
        "eval_every": 0, "resume": "never", "time_limit_minutes": None,
        "objective": base.objective.model_copy(update={"masking": "token", "sop": False}),
        "schedule": base.schedule.model_copy(update={"warmup_steps": 0}),
    })
    if num_steps % num_warmup:
        cfg = cfg.model_copy(update={"max_steps": num_warmup * (1 + -(-num_steps // num_warmup))})
        num_steps = cfg.max_steps - num_warmup

    # --- HF Trainer first: once DeepSpeed has started torch.distributed the Trainer would wrap its
    # model in DistributedDataParallel, which a single-process baseline should not pay for.
    hf_tok = AutoTokenizer.from_pretrained(tok_stage / "tokenizer")
    shards = TokenShards(tok_stage / "tokens")
    docs = _documents(shards, 4000 if quick else 20000, seq_len, specials.cls, specials.sep)
    mean_len = sum(map(len, docs)) / len(docs)
    tokens_per_step = cfg.data.global_batch_tokens
    line_rows = max(1, round(tokens_per_step / mean_len))
    flat = [t for d in docs for t in d]
    concat = [flat[i:i + seq_len] for i in range(0, len(flat) - seq_len + 1, seq_len)]
    concat_rows = max(1, round(tokens_per_step / seq_len))
    lr = cfg.optim.lr
    line = _hf_throughput(model_cfg, docs, line_rows, num_warmup, num_steps, hf_tok, lr)
    info(f"bench train: HF line-by-line {line:,.0f} tokens/s ({line_rows} rows per step)")
    cat = _hf_throughput(model_cfg, concat, concat_rows, num_warmup, num_steps, hf_tok, lr)
    info(f"bench train: HF concat {cat:,.0f} tokens/s ({concat_rows} rows of {seq_len} per step)")

    # --- ours
    env = setup_env()
    init_distributed(env)
    loader = PackedLoader(shards, cfg.objective, cfg.data, specials, env.rank, env.world_size)
    accum = loader.steps_info().grad_accum_steps
    checkpoint.seed_everything(0)
    engine, engine_info = build_engine(build_pretraining_model(model_cfg), cfg, env, accum)
    with tempfile.TemporaryDirectory() as out:
        train(engine, engine_info, cfg, loader, out_dir=Path(out), ckpt_root=Path(out) / "checkpoints")
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    measured = [r for r in rows if r["step"] > num_warmup]
    ours = sum(r["tokens_per_s"] for r in measured) / len(measured)
    ours_tokens_per_step = rows[-1]["tokens_seen"] / rows[-1]["step"]
    del engine
    info(f"bench train: ours {ours:,.0f} tokens/s ({ours_tokens_per_step:,.0f} tokens per step)")

    result = {
        "ours_tokens_per_s": round(ours, 1), "hf_line_tokens_per_s": round(line, 1),
        "hf_concat_tokens_per_s": round(cat, 1), "ratio": round(ours / line, 3), "ratio_concat": round(ours / cat, 3),
        "tokens_per_step": round(ours_tokens_per_step), "num_steps": num_steps, "num_warmup_steps": num_warmup,
        "family": model_cfg.family, "max_seq_len": seq_len, "mean_doc_tokens": round(mean_len, 1),
    }
    table("bench train: real tokens/s, data loading and optimizer included", ["feed", "tokens/s", "ours / it"], [
        ("kompakt (packed, DeepSpeed)", round(ours), 1.0),
        ("HF Trainer line-by-line (padded)", round(line), result["ratio"]),
        ("HF Trainer concatenated rows", round(cat), result["ratio_concat"]),
    ])
    return result
