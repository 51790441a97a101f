"""One fine-tuning job: a stock HF head on an exported model, trained on one task with one seed.

Reads top to bottom: tokenizer and model (the task type's stock `AutoModelFor...` class), the
tokenizer checked against the model's vocabulary, features (a Lattice-BERT's with the lexicon words of
their characters appended: kompakt/finetune/lattice.py), the job's training section (epochs x
batches per epoch, linear warmup and decay), the shared loop (kompakt/loop.py: DeepSpeed engine,
checkpoints, signals, metrics) with the dev loss evaluated every epoch and early stopping after
`patience` epochs without improvement, the best epoch's weights restored, predictions on dev and test.
"""

from __future__ import annotations

import copy
import time
from pathlib import Path

import numpy as np
import torch

from kompakt.errors import DataError
from kompakt.log import info
from kompakt.train_config import OptimConfig, RunControl, ScheduleConfig, TrainSection

from kompakt.finetune.heads import task_type
from kompakt.finetune.loader import BucketLoader, eval_batches


def load_model(model_dir: Path, kind, labels: list[str]):
    """(tokenizer, stock HF model with the task's head) from a model folder; the vocabularies must agree."""
    import transformers
    from transformers import AutoConfig, AutoTokenizer
    from transformers.utils import logging as hf_logging

    import kompakt

    kompakt.register_hf()  # a Lattice-BERT folder (model_type lattice-bert) loads through the same Auto classes
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception:
        raise DataError(f"{model_dir} holds no tokenizer that AutoTokenizer can read; save it beside the model") from None
    config = AutoConfig.from_pretrained(str(model_dir))
    if len(tokenizer) > config.vocab_size:
        raise DataError(f"the tokenizer in {model_dir} has {len(tokenizer):,} tokens but the model only "
                        f"{config.vocab_size:,} embeddings; they do not belong together")
    cls = getattr(transformers, kind.auto_class)
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # "some weights were newly initialised": the head, as intended
    try:
        model = cls.from_pretrained(str(model_dir), **kind.head_kwargs(labels), attn_implementation="sdpa")
    finally:
        hf_logging.set_verbosity(level)
    return tokenizer, model


def job_section(train_cfg, num_batches: int, engine, run: RunControl, seed: int) -> tuple[TrainSection, int]:
    """The TrainSection of one job: epochs x batches, warmup_ratio of it, dev loss every epoch."""
    max_steps = max(2, train_cfg.epochs * num_batches)
    warmup = min(max_steps - 1, round(train_cfg.warmup_ratio * max_steps))
    run = run.model_copy(update={"eval_every": num_batches, "save_every": max(run.save_every, max_steps)})
    section = TrainSection(max_steps=max_steps, seed=seed,
                           optim=OptimConfig(lr=train_cfg.lr, weight_decay=train_cfg.weight_decay, beta2=0.999,
                                             eps=1e-8),
                           schedule=ScheduleConfig(kind="linear", warmup_steps=warmup), engine=engine, run=run)
    return section, max_steps


@torch.no_grad()
def predict(model, kind, features: list[dict], examples: list[dict], labels: list[str], batch_size: int,
            pad_id: int, device) -> list:
    """Predictions per example, batches sorted by length (least padding) and put back in order."""
    model.eval()
    rows: list = [None] * len(features)
    lengths = np.array([len(f["input_ids"]) for f in features])
    for ids in eval_batches(lengths, batch_size):
        batch = kind.collate([features[i] for i in ids], pad_id)
        batch = {k: v.to(device) for k, v in batch.items() if k not in ("labels", "start_positions", "end_positions")}
        for i, row in zip(ids, kind.rows(model(**batch), batch)):
            rows[i] = row
    return kind.predict(rows, features, examples, labels)


@torch.no_grad()
def soft_targets(teacher_dir: Path, kind, features: list[dict], labels: list[str], batch_size: int, device,
                 cache_dir: Path | None, pad_id: int = 0) -> tuple[list[np.ndarray], bool]:
    """The fine-tuned teacher's logits for every training feature (the student's own tokenisation, which
    the teacher shares), read from a content-addressed cache when an earlier job computed them.

    Returns (rows, from_cache)."""
    import hashlib

    from kompakt.runs import content_digest

    h = hashlib.sha256(content_digest(teacher_dir / "model.safetensors").encode())
    for f in features:
        h.update(np.asarray(f["input_ids"], dtype=np.int64).tobytes())
    path = cache_dir / f"soft-{h.hexdigest()[:32]}.npz" if cache_dir is not None else None
    if path is not None and path.is_file():
        with np.load(path) as z:
            return [z[str(i)] for i in range(len(features))], True
    _, teacher = load_model(teacher_dir, kind, labels)
    teacher.to(device).eval()
    rows: list = [None] * len(features)
    lengths = np.array([len(f["input_ids"]) for f in features])
    for ids in eval_batches(lengths, batch_size):
        batch = kind.collate([features[i] for i in ids], pad_id)
        batch = {k: v.to(device) for k, v in batch.items() if k not in ("labels",)}
        for i, row in zip(ids, kind.rows(teacher(**batch), batch)):
            rows[i] = row
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(tmp, **{str(i): r for i, r in enumerate(rows)})
        tmp.replace(path)
    return rows, False


def kd_loss(logits: torch.Tensor, soft: torch.Tensor, labels: torch.Tensor, temperature: float,
            regression: bool) -> torch.Tensor:
    """KL(teacher || student) at temperature T, times T^2 (Hinton et al.), over the labelled positions
    (every row for sequence tasks, first sub-words for token tasks); MSE to the teacher for regression."""
    if regression:
        return torch.nn.functional.mse_loss(logits.float().view(-1), soft.float().view(-1))
    if logits.dim() == 3:  # token classification: (B, L, C) on positions with a label
        keep = labels != -100
        logits, soft = logits[keep], soft[keep]
    log_s = torch.log_softmax(logits.float() / temperature, dim=-1)
    log_t = torch.log_softmax(soft.float() / temperature, dim=-1)
    return torch.nn.functional.kl_div(log_s, log_t, log_target=True, reduction="batchmean") * temperature ** 2


def run_job(model_dir: Path, task, splits: dict[str, list[dict]], labels: list[str], *, seed: int, work_dir: Path,
            engine_cfg, run_cfg: RunControl, stop, keep_dir: Path | None = None, distill: dict | None = None,
            corpus: dict[str, str] | None = None) -> dict:
    """Fine-tune, early-stop on dev, predict dev and test; returns predictions and figures.

    `keep_dir`: where the fine-tuned model is saved as an HF folder (atomically), or None.
    `distill` (task-specific distillation): `teacher_dir` (the fine-tuned teacher), `alpha` (weight of
    the hard-label loss; TinyBERT uses 0), `temperature`, `extra` (augmented training examples, whose
    labels only the teacher's predictions supervise when alpha is 0) and `cache_dir`.
    `corpus` (retrieval tasks: doc id -> text): the job is kompakt.finetune.retrieval's bi-encoder.
    """
    from kompakt import checkpoint, dist

    from kompakt.finetune import lattice

    if task.type == "retrieval":
        lattice.check_task(task, model_dir)
        if distill is not None:
            from kompakt.errors import ConfigError

            raise ConfigError("task distillation of a retrieval task is not supported; fine-tune the student instead")
        from kompakt.finetune.retrieval import run_retrieval_job

        return run_retrieval_job(model_dir, task, splits, corpus or {}, seed=seed, work_dir=work_dir,
                                 engine_cfg=engine_cfg, run_cfg=run_cfg, stop=stop, keep_dir=keep_dir)
    t0 = time.perf_counter()
    kind = task_type(task.type)
    checkpoint.seed_everything(seed)
    tokenizer, model = load_model(model_dir, kind, labels)
    kind = lattice.for_model(kind, model, model_dir, tokenizer)  # a Lattice-BERT's features carry the words
    label2id = {l: i for i, l in enumerate(labels)}
    cfg = task.train
    train_rows = splits["train"] + list((distill or {}).get("extra") or [])
    enc = {name: kind.encode(rows, tokenizer, cfg.max_seq_len, label2id, train=name == "train")
           for name, rows in {**splits, "train": train_rows}.items()}
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    kd_figures = {}
    if distill is not None:
        if task.type == "qa":
            from kompakt.errors import ConfigError

            raise ConfigError("task distillation of extractive QA is not supported; fine-tune the student instead")
        from kompakt.engine import choose_device

        soft, cached = soft_targets(Path(distill["teacher_dir"]), kind, enc["train"], labels, cfg.batch_size,
                                    choose_device(dist.setup_env()), distill.get("cache_dir"), pad_id)
        for f, row in zip(enc["train"], soft):
            f["soft"] = row
        kd_figures = {"teacher_logits_from_cache": cached, "train_features": len(enc["train"]),
                      "augmented_examples": len(train_rows) - len(splits["train"])}

    def collate(fs: list[dict]) -> dict:
        batch = kind.collate(fs, pad_id)
        if "soft" in fs[0]:
            if fs[0]["soft"].ndim == 1:
                batch["soft"] = torch.from_numpy(np.stack([f["soft"] for f in fs]))
            else:  # token rows (L_i, C): padded to the batch's length
                width = batch["input_ids"].shape[1]
                batch["soft"] = torch.from_numpy(np.stack([np.pad(f["soft"], ((0, width - len(f["soft"])), (0, 0)))
                                                           for f in fs]))
        return batch

    loader = BucketLoader(enc["train"], collate, cfg.batch_size, seed)
    dev_lengths = np.array([len(f["input_ids"]) for f in enc["dev"]])
    dev_batches = [kind.collate([enc["dev"][i] for i in ids], pad_id) for ids in eval_batches(dev_lengths, cfg.batch_size)]

    def step_fn(m, batch, teacher):
        soft = batch.pop("soft", None)
        out = m(**batch)
        if soft is None:  # fine-tuning, and every dev evaluation (hard labels)
            return {"loss": out.loss, "num_predictions": kind.num_predictions(batch)}
        a = float(distill.get("alpha", 0.0))
        kd = kd_loss(out.logits, soft, batch.get("labels"), float(distill.get("temperature", 1.0)),
                     task.type == "regression")
        loss = kd if a == 0 else a * out.loss + (1 - a) * kd
        return {"loss": loss, "losses": {"kd": kd.detach(), "ce": out.loss.detach()},
                "num_predictions": kind.num_predictions(batch)}

    fit = train_early_stopping(model, loader, dev_batches, step_fn, cfg, engine_cfg=engine_cfg, run_cfg=run_cfg,
                               seed=seed, work_dir=work_dir, stop=stop, name=f"{task.name} s{seed}",
                               extra={"task": task.name, "model_dir": str(model_dir), "seed": seed})
    if fit["stopped"] != "done":
        return {"stopped": fit["stopped"], "step": fit["step"]}
    final, device = fit["model"], fit["device"]
    preds = {name: predict(final, kind, enc[name], splits[name], labels, cfg.batch_size, pad_id, device)
             for name in ("dev", "test")}
    if keep_dir is not None:
        save_model(copy.deepcopy(final).cpu(), tokenizer, keep_dir, extra_files=lattice.folder_files(kind, model_dir))
    info(f"finetune: {task.name} seed {seed}: {fit['steps']} steps of {fit['max_steps']}, best dev loss "
         f"{fit['dev_loss']:.4f} at step {fit['best_step']}")
    return {"stopped": "done", **fit["figures"], "predictions": preds, "train_examples": len(splits["train"]),
            "seconds": round(time.perf_counter() - t0, 2), **({"distill": kd_figures} if kd_figures else {})}


def train_early_stopping(model, loader, dev_batches: list[dict], step_fn, cfg, *, engine_cfg, run_cfg: RunControl,
                         seed: int, work_dir: Path, stop, name: str, extra: dict) -> dict:
    """The shared part of every fine-tuning job: the engine, resume from the job's newest checkpoint, the loop
    with the dev loss every epoch and early stopping after `cfg.patience` epochs without improvement, and the
    best epoch's weights restored.

    Returns {"stopped": "done", "model": the trained module, "device", "steps", "max_steps", "best_step",
    "dev_loss", "figures": those four as result.json keys}, or {"stopped": "signal"/"time", "step"}."""
    from kompakt import checkpoint, dist
    from kompakt.engine import build_engine
    from kompakt.loop import train_loop

    section, max_steps = job_section(cfg, loader.batches_per_epoch, engine_cfg, run_cfg, seed)
    engine, einfo = build_engine(model, section, dist.setup_env(), accumulation_steps=1)
    best = {"loss": float("inf"), "step": 0, "state": None, "bad": 0}

    def on_eval(step: int, dev_loss: float) -> bool:
        if dev_loss < best["loss"] - 1e-6:
            best.update(loss=dev_loss, step=step, bad=0,
                        state={k: v.detach().cpu().clone() for k, v in engine.module.state_dict().items()})
        else:
            best["bad"] += 1
        return cfg.patience > 0 and best["bad"] >= cfg.patience  # patience 0: no early stopping

    ckpt_root = work_dir / "checkpoints"
    tag = checkpoint.resolve_resume(run_cfg.resume, ckpt_root)
    start = None
    if tag is not None:
        start, loader_state = checkpoint.load(engine, tag, 0, seed)
        start["checkpoint"] = str(tag)
        loader.load_state_dict(loader_state)
    result = train_loop(engine, section, loader, out_dir=work_dir, ckpt_root=ckpt_root, step_fn=step_fn, start=start,
                        train_state_extra=extra, eval_batches=dev_batches, stop=stop, name=name, on_eval=on_eval)
    if result.stopped != "done":
        return {"stopped": result.stopped, "step": result.step}
    final = engine.module
    if best["state"] is not None and (result.eval_loss is None or best["loss"] < result.eval_loss):
        final.load_state_dict(best["state"])
    dev_loss = min(best["loss"], result.eval_loss if result.eval_loss is not None else float("inf"))
    figures = {"steps": result.step, "max_steps": max_steps, "best_step": best["step"] or result.step,
               "dev_loss": dev_loss}
    return {"stopped": "done", "model": final, "device": einfo.device, **figures, "figures": figures}


def save_model(model, tokenizer, out: Path, extra_files: list[Path] = ()) -> None:
    """An ordinary HF folder (config with id2label/label2id, safetensors, tokenizer, and `extra_files` such as a
    Lattice-BERT's lexicon.txt), written then renamed."""
    import shutil

    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    for f in extra_files:
        shutil.copy2(f, tmp / Path(f).name)
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
