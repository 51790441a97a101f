"""The pretraining loop: one explicit function, periodic work as inline `if`s.

Per optimizer step every rank runs `accumulation_steps` micro-batches (forward, backward); after
the last backward one all_reduce agrees on two flags: "a loss was non-finite somewhere" and "stop
now" (SIGTERM/SIGUSR1 or the time limit). A non-finite step is skipped (no optimizer update) and
counted; `max_nonfinite_in_a_row` of them stop the run with an error. A stop request saves a
checkpoint at that step boundary and exits with `REQUEUE_EXIT` so a Slurm requeue continues with
`resume: auto`.

Metrics rows (`metrics.jsonl`, TensorBoard) are written by rank 0 every `log_every` steps. On
resume, rows of steps after the checkpoint are dropped (they run again), so each step appears once.
"""

from __future__ import annotations

import json
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as tdist

from kompakt import checkpoint, dist
from kompakt.engine import EngineInfo, to_device
from kompakt.errors import KompaktError
from kompakt.log import info
from kompakt.pretrain_config import PretrainConfig

# EX_TEMPFAIL from sysexits.h: "try again later" - the job saved and wants a requeue.
REQUEUE_EXIT = 75


class NonFiniteLossError(KompaktError):
    """Too many optimizer steps in a row had a non-finite loss."""


@dataclass
class LoopResult:
    step: int
    tokens_seen: int
    stopped: str                     # "done", "signal" or "time"
    num_skipped: int
    last_losses: dict[str, float] = field(default_factory=dict)
    eval_loss: float | None = None
    checkpoint: Path | None = None


class _StopFlag:
    """Set by SIGTERM / SIGUSR1 (Slurm's warning signal); read at the next step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old = {}

    def __enter__(self) -> _StopFlag:
        for s in (signal.SIGTERM, signal.SIGUSR1):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def _all_reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        tdist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(engine, batches: list[dict], device) -> float:
    """Mean loss over held-out micro-batches, weighted by predictions, averaged over ranks."""
    engine.eval()
    total, count = 0.0, 0.0
    for batch in batches:
        out = engine(**to_device(batch, device))
        total += float(out["loss"]) * int(out["num_predictions"])
        count += int(out["num_predictions"])
    engine.train()
    total, count = _all_reduce_sum([total, count], device)
    return total / max(count, 1.0)


def _trim_metrics(path: Path, step: int) -> None:
    """Drop the rows logged after `step`, the checkpoint a run resumes from: those steps run again.

    Like TensorBoard's `purge_step`, so `metrics.jsonl` holds each step once after a kill and resume.
    """
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    # A kill mid-write can leave a last line without its newline: it is dropped with the others.
    kept = [line for line in lines if line.endswith("\n") and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)


def train(engine, engine_info: EngineInfo, cfg: PretrainConfig, loader, *, out_dir: Path, ckpt_root: Path,
          start: dict | None = None, train_state_extra: dict | None = None, eval_batches: list[dict] | None = None,
          flops_per_token: float | None = None, peak_flops: float | None = None,
          describe: Callable[[dict], str] | None = None) -> LoopResult:
    """Train until `cfg.max_steps`, a stop signal or the time limit; returns where it stopped.

    `loader` yields this rank's micro-batches and has `state_dict()` (the position after the last
    full round). `start` is the train state of a resumed checkpoint (step, tokens_seen), or None.
    `flops_per_token` (model FLOPs, forward + backward) and `peak_flops` (per device) give MFU.
    """
    device, accum, world = engine_info.device, engine_info.accumulation_steps, engine_info.world_size
    is_main = int(os.environ.get("RANK", "0")) == 0
    step = int(start["step"]) if start else 0
    tokens_seen = int(start["tokens_seen"]) if start else 0
    num_skipped = int(start.get("num_skipped", 0)) if start else 0
    nonfinite_in_a_row = 0
    deadline = time.monotonic() + cfg.time_limit_minutes * 60 if cfg.time_limit_minutes else math.inf
    writer, metrics_file, progress = None, None, None
    if is_main:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tb"), purge_step=step if step else None)
        _trim_metrics(out_dir / "metrics.jsonl", step)
        metrics_file = open(out_dir / "metrics.jsonl", "a", encoding="utf-8")
        progress = Progress(TextColumn("pretrain"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TextColumn("{task.fields[status]}"), TimeRemainingColumn(), transient=False)
        task = progress.add_task("steps", total=cfg.max_steps, completed=step, status="")
        progress.start()
    batches: Iterator[dict] = iter(loader)
    interval = {"tokens": 0.0, "loss": 0.0, "steps": 0, "ok": 0, "t0": time.perf_counter()}
    interval_losses: dict[str, float] = {}
    last_losses: dict[str, float] = {}
    eval_loss = None
    stopped = "done"
    saved_at = None
    fp32_grad_norm = None

    def save() -> Path:
        state = {"step": step, "tokens_seen": tokens_seen, "num_skipped": num_skipped, "world_size": world,
                 "accumulation_steps": accum, **(train_state_extra or {})}
        return checkpoint.save(engine, ckpt_root, step, state, loader.state_dict(), cfg.keep_last, cfg.zero_stage)

    if eval_batches and not start:  # the held-out loss before any update: the baseline a run must beat
        eval_loss = evaluate(engine, eval_batches, device)
        if is_main:
            metrics_file.write(json.dumps({"step": 0, "eval_loss": eval_loss}) + "\n")
    with _StopFlag() as stop_flag:
        while step < cfg.max_steps:
            # --- one optimizer step: accum micro-batches, then one agreement, then update or skip
            step_loss = torch.zeros((), dtype=torch.float64, device=device)
            step_parts: dict[str, torch.Tensor] = {}
            finite = torch.ones((), dtype=torch.bool, device=device)
            step_tokens = 0
            for micro in range(accum):
                batch = next(batches)
                if describe is not None and is_main and step == 0 and micro == 0 and not start:
                    info("first masked sample: " + describe(batch))
                step_tokens += int(batch["input_ids"].numel())
                out = engine(**to_device(batch, device))
                loss = out["loss"]
                finite &= torch.isfinite(loss.detach())
                step_loss += loss.detach().double()
                for name, value in out.get("losses", {}).items():
                    step_parts[name] = step_parts.get(name, 0.0) + value.detach().double()
                engine.backward(loss)
                if micro < accum - 1:
                    engine.step()  # not a boundary: DeepSpeed only advances its micro-step counter
            # One all_reduce (sum) per step: non-finite ranks, ranks asking to stop, real tokens.
            stop_requested = stop_flag.signum is not None or time.monotonic() > deadline
            agree = torch.stack([(~finite).long(), torch.tensor(int(stop_requested), device=device),
                                 torch.tensor(step_tokens, device=device)])
            if dist.is_initialized():
                tdist.all_reduce(agree)
            num_nonfinite, num_stop, global_tokens = agree.tolist()
            nonfinite, stop_now = num_nonfinite > 0, num_stop > 0
            if nonfinite:
                skipped_before = engine.skipped_steps
                last_epoch = engine.lr_scheduler.last_epoch
                if cfg.zero_stage == 0 and engine_info.precision == "fp32":
                    # Plain data parallel has no overflow check: drop the gradients (torch optimizers leave
                    # a parameter without one untouched) and let DeepSpeed only advance its counters,
                    # with clipping off for this call since there is nothing to clip.
                    engine.zero_grad()
                    clip, engine._config.gradient_clipping = engine._config.gradient_clipping, 0.0
                    try:
                        engine.step()
                    finally:
                        engine._config.gradient_clipping = clip
                else:
                    engine.step()  # ZeRO / bf16 see the non-finite norm and skip the update themselves
                    assert engine.skipped_steps == skipped_before + 1, "DeepSpeed applied a non-finite step"
                if engine.lr_scheduler.last_epoch == last_epoch:
                    engine.lr_scheduler.step()  # the schedule follows steps taken, skipped or not
                num_skipped += 1
                nonfinite_in_a_row += 1
                info(f"step {step + 1}: non-finite loss, update skipped ({nonfinite_in_a_row} in a row)")
                if nonfinite_in_a_row >= cfg.max_nonfinite_in_a_row:
                    raise NonFiniteLossError(
                        f"{nonfinite_in_a_row} optimizer steps in a row had a non-finite loss (pretrain."
                        f"max_nonfinite_in_a_row={cfg.max_nonfinite_in_a_row}); lower pretrain.optim.lr, add warmup "
                        f"or resume from an earlier checkpoint")
            else:
                if (step + 1) % cfg.log_every == 0 and cfg.zero_stage == 0 and engine_info.precision == "fp32":
                    # DeepSpeed clips fp32 ZeRO-0 gradients without keeping the norm; measure it for the log.
                    grads = [p.grad for p in engine.module.parameters() if p.grad is not None]
                    fp32_grad_norm = float(torch.nn.utils.get_total_norm(grads)) if grads else None
                engine.step()
                nonfinite_in_a_row = 0
            step += 1
            tokens_seen += global_tokens
            interval["tokens"] += global_tokens
            interval["steps"] += 1
            if not nonfinite:
                interval["ok"] += 1
                interval["loss"] += float(step_loss) / accum
                for name, value in step_parts.items():
                    interval_losses[name] = interval_losses.get(name, 0.0) + float(value) / accum

            # --- periodic work
            evaluated = bool(cfg.eval_every and eval_batches and step % cfg.eval_every == 0)
            if evaluated:
                eval_loss = evaluate(engine, eval_batches, device)
            if step % cfg.log_every == 0 or step == cfg.max_steps or stop_now:
                dt = time.perf_counter() - interval["t0"]
                loss_sum, ok_sum, *part_sums = _all_reduce_sum(
                    [interval["loss"], interval["ok"]] +
                    [interval_losses[k] for k in sorted(interval_losses)], device)
                last_losses = {"loss": loss_sum / max(ok_sum, 1.0)}
                last_losses.update({k: v / max(ok_sum, 1.0) for k, v in zip(sorted(interval_losses), part_sums)})
                tokens_per_s = interval["tokens"] / max(dt, 1e-9)
                if is_main:
                    row = {"step": step, "tokens_seen": tokens_seen, "lr": engine.get_lr()[0],
                           "grad_norm": _grad_norm(engine) if fp32_grad_norm is None else fp32_grad_norm, "tokens_per_s": round(tokens_per_s, 1),
                           "num_skipped": num_skipped, **{f"loss_{k}" if k != "loss" else k: v
                                                          for k, v in last_losses.items()}}
                    if flops_per_token and peak_flops:
                        row["mfu"] = flops_per_token * tokens_per_s / (peak_flops * world)
                    if evaluated:
                        row["eval_loss"] = eval_loss
                    metrics_file.write(json.dumps(row) + "\n")
                    metrics_file.flush()
                    for k, v in row.items():
                        if k != "step" and v is not None:
                            writer.add_scalar(f"train/{k}", v, step)
                    progress.update(task, completed=step,
                                    status=f"loss {last_losses['loss']:.4f}  {tokens_per_s:,.0f} tok/s")
                interval = {"tokens": 0.0, "loss": 0.0, "steps": 0, "ok": 0, "t0": time.perf_counter()}
                interval_losses = {}
            if step % cfg.save_every == 0 or step == cfg.max_steps or stop_now:
                saved_at = save()
            if stop_now:
                stopped = "signal" if stop_flag.signum is not None else "time"
                break
    if is_main:
        progress.stop()
        writer.close()
        metrics_file.close()
    if eval_batches and stopped == "done":
        eval_loss = evaluate(engine, eval_batches, device)
    return LoopResult(step, tokens_seen, stopped, num_skipped, last_losses, eval_loss, saved_at)


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return None
    norm = float(norm)
    return norm if math.isfinite(norm) else None
