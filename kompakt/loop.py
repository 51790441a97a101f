"""The training loop every training stage drives: one explicit function, periodic work as inline `if`s.

A stage supplies a step function (`StepFn`: model, batch, teacher -> the model's output dict with
`loss`, optional named `losses` and `num_predictions`) and a loader (an iterator of this rank's
micro-batches with `state_dict()`/`load_state_dict()`); pretraining's step is the model's own
forward, a distillation step would run a frozen teacher beside the student. What is shared:

- per optimizer step every rank runs `accumulation_steps` micro-batches (forward, backward);
  after the last backward one all_reduce agrees on "a loss was non-finite somewhere", "stop now"
  (SIGTERM/SIGUSR1, the time limit, or a launcher that died) and the step's real tokens;
- a non-finite step is skipped (`TrainEngine.skip_step`) and counted; `run.max_nonfinite_in_a_row`
  of them stop the run with an error;
- a stop request saves a checkpoint at that step boundary and returns `stopped="signal"/"time"`, so
  the stage exits with `REQUEUE_EXIT` and a Slurm requeue continues with `resume: auto`; a request
  before the first step returns at once (nothing new to save);
- metrics rows (`metrics.jsonl`, TensorBoard) every `run.log_every` steps on rank 0; the partial
  logging interval at a checkpoint is saved in it, so an interrupted and resumed run writes the
  same rows as an uninterrupted one, each step once (tokens/s counts the time since the resume);
- held-out evaluation at step 0 (the baseline a run must beat), every `run.eval_every` steps and
  at the end, weighted by `num_predictions`;
- checkpoints every `run.save_every` steps and at the end, with exact resume (kompakt/checkpoint.py).
"""

from __future__ import annotations

import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Protocol

import torch
import torch.distributed as tdist

from kompakt import checkpoint, dist
from kompakt.engine import TrainEngine, to_device
from kompakt.errors import KompaktError
from kompakt.log import info, warn
from kompakt.train_config import TrainSection

# EX_TEMPFAIL from sysexits.h: "try again later" - the job saved and wants a requeue.
REQUEUE_EXIT = 75
_TEST_STEP_SECONDS = float(os.environ.get("KOMPAKT_TEST_STEP_SECONDS", "0") or 0)


def exit_for_requeue(stage: str, why: str) -> None:
    """End the process with `REQUEUE_EXIT` after a save. Under a Slurm job (slurm/templates/prelude.sh)
    rank 0 also leaves `$KOMPAKT_REQUEUE_MARKER`, since torchrun reports its own status, not 75."""
    info(f"{stage}: {why}; exit {REQUEUE_EXIT} so the job can be requeued (resume: auto continues)")
    marker = os.environ.get("KOMPAKT_REQUEUE_MARKER")
    if marker and dist.detect_rank() == 0:
        try:
            Path(marker).touch()
        except OSError as err:  # the exit status still says it; only a torchrun job would miss it
            warn(f"could not leave the requeue marker {marker}: {err}")
    sys.exit(REQUEUE_EXIT)


class NonFiniteLossError(KompaktError):
    """Too many optimizer steps in a row had a non-finite loss."""


class StepFn(Protocol):
    def __call__(self, model: Callable, batch: dict, teacher: torch.nn.Module | None) -> dict: ...


def model_step(model: Callable, batch: dict, teacher: torch.nn.Module | None = None) -> dict:
    """The step of a model that computes its own loss from the batch (every pretraining model)."""
    return model(**batch)


@dataclass
class LoopResult:
    step: int
    tokens_seen: int
    stopped: str                     # "done" (also after early stopping), "signal" or "time"
    num_skipped: int
    last_losses: dict[str, float] = field(default_factory=dict)
    eval_loss: float | None = None
    checkpoint: Path | None = None


class StopFlag:
    """Set by SIGTERM / SIGUSR1 (Slurm's warning signal); read at the next step boundary.

    A stage enters it before its start-up, so a signal during start-up, training, the final
    evaluation or the export ends in a requeue exit instead of killing the process. It also
    notices a launcher that died (torchrun killed with SIGKILL leaves its workers orphaned): when
    the process was started by torchrun (TORCHELASTIC_RUN_ID) or KOMPAKT_WATCH_PARENT=1, a changed
    parent process counts as a stop request, so the workers save and exit instead of training on.
    """

    def __init__(self, watch_parent: bool | None = None) -> None:
        self.signum: int | None = None
        self._old = {}
        if watch_parent is None:
            watch_parent = "TORCHELASTIC_RUN_ID" in os.environ or os.environ.get("KOMPAKT_WATCH_PARENT") == "1"
        self._parent = os.getppid() if watch_parent else None

    def __enter__(self) -> StopFlag:
        for s in (signal.SIGTERM, signal.SIGUSR1):
            self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signum = signum
        _PAUSED_SIGNAL.append(signum)

    def parent_died(self) -> bool:
        return self._parent is not None and os.getppid() != self._parent

    @property
    def requested(self) -> bool:
        return self.signum is not None or self.parent_died()

    def __exit__(self, *exc) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)


def test_hook(point: str) -> None:
    """Tests' kill points: KOMPAKT_TEST_KILL_AT=point SIGKILLs here, KOMPAKT_TEST_PAUSE_AT=point writes
    `$KOMPAKT_TEST_FLAG` and waits here for a signal (the stage's StopFlag records it)."""
    if os.environ.get("KOMPAKT_TEST_KILL_AT") == point:
        os.kill(os.getpid(), signal.SIGKILL)
    if os.environ.get("KOMPAKT_TEST_PAUSE_AT") == point:
        Path(os.environ["KOMPAKT_TEST_FLAG"]).write_text(point)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not _PAUSED_SIGNAL:
            time.sleep(0.05)


# Set by StopFlag's handler, so a paused test hook returns as soon as the signal arrived.
_PAUSED_SIGNAL: list[int] = []


def _all_reduce_sum(values: list[float], device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_initialized():
        tdist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def evaluate(engine: TrainEngine, batches: list[dict], step_fn: StepFn = model_step,
             teacher: torch.nn.Module | None = None) -> float:
    """Mean loss over held-out micro-batches, weighted by predictions, averaged over ranks."""
    device = engine.info.device
    engine.eval()
    total, count = 0.0, 0.0
    for batch in batches:
        out = step_fn(engine, to_device(batch, device), teacher)
        total += float(out["loss"]) * int(out["num_predictions"])
        count += int(out["num_predictions"])
    engine.train()
    total, count = _all_reduce_sum([total, count], device)
    return total / max(count, 1.0)


def _trim_metrics(path: Path, step: int | None) -> None:
    """Drop the rows logged after `step`, the checkpoint a run resumes from: those steps run again.

    Like TensorBoard's `purge_step`, so `metrics.jsonl` holds each step once after a kill and
    resume; `step=None` (a fresh start) drops every row, the step-0 evaluation included.
    """
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    # A kill mid-write can leave a last line without its newline: it is dropped with the others.
    kept = [] if step is None else [line for line in lines
                                    if line.endswith("\n") and json.loads(line).get("step", 0) <= step]
    if len(kept) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(kept), encoding="utf-8")
        os.replace(tmp, path)


def _interval_sums(interval: dict, device) -> tuple[float, float, dict[str, float]]:
    """(loss sum, finite steps, named-loss sums) of a logging interval, summed over ranks (a collective)."""
    parts = sorted(interval["parts"])
    loss_sum, ok_sum, *part_sums = _all_reduce_sum(
        [interval["loss"], interval["ok"]] + [interval["parts"][k] for k in parts], device)
    return loss_sum, ok_sum, dict(zip(parts, part_sums))


def _new_interval() -> dict:
    return {"tokens": 0.0, "loss": 0.0, "steps": 0, "ok": 0, "parts": {}}


def train_loop(engine: TrainEngine, section: TrainSection, loader, *, out_dir: Path, ckpt_root: Path,
               step_fn: StepFn = model_step, teacher: torch.nn.Module | None = None, start: dict | None = None,
               train_state_extra: dict | None = None, eval_batches: list[dict] | None = None,
               flops_per_token: float | None = None, peak_flops: float | None = None,
               describe: Callable[[dict], str] | None = None, stop: StopFlag | None = None,
               name: str = "train", on_eval: Callable[[int, float], bool] | None = None) -> LoopResult:
    """Train until `section.max_steps`, a stop request or the time limit; returns where it stopped.

    `loader` yields this rank's micro-batches and has `state_dict()` (the position after the last
    full round). `start` is the train state of a resumed checkpoint, or None. `teacher` (frozen,
    in eval mode) is handed to `step_fn`. `flops_per_token` (model FLOPs, forward + backward) and
    `peak_flops` (per device) give MFU. `stop` is the stage's StopFlag (one is made if None).
    `on_eval(step, eval_loss)` sees every periodic held-out evaluation; returning True stops the run
    there (early stopping: a checkpoint is saved and `stopped="early"`, which is a finished run).
    """
    if stop is None:
        with StopFlag() as own:
            return train_loop(engine, section, loader, out_dir=out_dir, ckpt_root=ckpt_root, step_fn=step_fn,
                              teacher=teacher, start=start, train_state_extra=train_state_extra,
                              eval_batches=eval_batches, flops_per_token=flops_per_token, peak_flops=peak_flops,
                              describe=describe, stop=own, name=name, on_eval=on_eval)
    run = section.run
    device, accum, world = engine.info.device, engine.info.accumulation_steps, engine.info.world_size
    is_main = dist.rank() == 0
    if teacher is not None:
        teacher.eval().requires_grad_(False)
    step = int(start["step"]) if start else 0
    tokens_seen = int(start["tokens_seen"]) if start else 0
    num_skipped = int(start.get("num_skipped", 0)) if start else 0
    checkpoint_path = Path(start["checkpoint"]) if start and start.get("checkpoint") else None
    nonfinite_in_a_row = 0
    deadline = time.monotonic() + run.time_limit_minutes * 60 if run.time_limit_minutes else math.inf
    # The partial logging interval saved with the checkpoint: global sums, held by rank 0 only.
    interval = _new_interval()
    if start and start.get("interval") and is_main:
        saved = start["interval"]
        interval.update(loss=saved["loss"], ok=saved["ok"], steps=saved["steps"], parts=dict(saved["parts"]))
    timed_tokens, t0 = 0.0, time.perf_counter()
    if stop.requested:  # a signal during start-up: nothing new to save
        return LoopResult(step, tokens_seen, "signal", num_skipped, checkpoint=checkpoint_path)

    writer, metrics_file, progress = None, None, None
    if is_main:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(out_dir / "tb"), purge_step=step if step else None)
        _trim_metrics(out_dir / "metrics.jsonl", step if start else None)
        metrics_file = open(out_dir / "metrics.jsonl", "a", encoding="utf-8")
        progress = Progress(TextColumn(name), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TextColumn("{task.fields[status]}"), TimeRemainingColumn(), transient=False)
        task = progress.add_task("steps", total=section.max_steps, completed=step, status="")
        progress.start()
    batches: Iterator[dict] = iter(loader)
    last_losses: dict[str, float] = {}
    eval_loss = None
    stopped = "done"
    fp32_grad_norm = None

    def save() -> Path:
        # The partial interval, summed over ranks (save is a collective, so every rank is here).
        loss_sum, ok_sum, part_sums = _interval_sums(interval, device)
        state = {"step": step, "tokens_seen": tokens_seen, "num_skipped": num_skipped, "world_size": world,
                 "accumulation_steps": accum,
                 "interval": {"loss": loss_sum, "ok": ok_sum, "steps": interval["steps"],
                              "parts": part_sums},
                 **(train_state_extra or {})}
        return checkpoint.save(engine, ckpt_root, step, state, loader.state_dict(), run.keep_last,
                               section.engine.zero_stage)

    try:
        if eval_batches and not start:  # the held-out loss before any update: the baseline a run must beat
            eval_loss = evaluate(engine, eval_batches, step_fn, teacher)
            if is_main:
                metrics_file.write(json.dumps({"step": 0, "eval_loss": eval_loss}) + "\n")
                metrics_file.flush()
            test_hook("after_step0_eval")
        while step < section.max_steps:
            # --- one optimizer step: accum micro-batches, then one agreement, then update or skip
            step_loss = torch.zeros((), dtype=torch.float64, device=device)
            step_parts: dict[str, torch.Tensor] = {}
            finite = torch.ones((), dtype=torch.bool, device=device)
            step_tokens = 0
            if _TEST_STEP_SECONDS:  # test hook: a step that takes a known wall time, for the Slurm time-limit tests
                time.sleep(_TEST_STEP_SECONDS)
            for micro in range(accum):
                batch = next(batches)
                if describe is not None and is_main and step == 0 and micro == 0 and not start:
                    info("first masked sample: " + describe(batch))
                step_tokens += int(batch["input_ids"].numel())
                out = step_fn(engine, to_device(batch, device), teacher)
                loss = out["loss"]
                finite &= torch.isfinite(loss.detach())
                step_loss += loss.detach().double()
                for key, value in out.get("losses", {}).items():
                    step_parts[key] = step_parts.get(key, 0.0) + value.detach().double()
                engine.backward(loss)
                if micro < accum - 1:
                    engine.micro_step()
            # One all_reduce (sum) per step: non-finite ranks, ranks asking to stop, real tokens.
            stop_requested = stop.requested or time.monotonic() > deadline
            agree = torch.stack([(~finite).long(), torch.tensor(int(stop_requested), device=device),
                                 torch.tensor(step_tokens, device=device)])
            if dist.is_initialized():
                tdist.all_reduce(agree)
            num_nonfinite, num_stop, global_tokens = agree.tolist()
            nonfinite, stop_now = num_nonfinite > 0, num_stop > 0
            if nonfinite:
                engine.skip_step()
                num_skipped += 1
                nonfinite_in_a_row += 1
                info(f"step {step + 1}: non-finite loss, update skipped ({nonfinite_in_a_row} in a row)")
                if nonfinite_in_a_row >= run.max_nonfinite_in_a_row:
                    raise NonFiniteLossError(
                        f"{nonfinite_in_a_row} optimizer steps in a row had a non-finite loss (run."
                        f"max_nonfinite_in_a_row={run.max_nonfinite_in_a_row}); lower optim.lr, add warmup "
                        f"or resume from an earlier checkpoint")
            else:
                if (step + 1) % run.log_every == 0 and not engine.measures_own_grad_norm():
                    fp32_grad_norm = engine.grad_norm_now()
                engine.step()
                nonfinite_in_a_row = 0
            step += 1
            if os.environ.get("KOMPAKT_TEST_SIGTERM_AT_STEP") == str(step):
                os.kill(os.getpid(), signal.SIGTERM)  # test hook: Slurm's warning arriving during this step
            tokens_seen += global_tokens
            interval["tokens"] += global_tokens
            timed_tokens += global_tokens
            interval["steps"] += 1
            if not nonfinite:
                interval["ok"] += 1
                interval["loss"] += float(step_loss) / accum
                for key, value in step_parts.items():
                    interval["parts"][key] = interval["parts"].get(key, 0.0) + float(value) / accum

            # --- periodic work
            evaluated = bool(run.eval_every and eval_batches and step % run.eval_every == 0)
            early = False
            if evaluated:
                eval_loss = evaluate(engine, eval_batches, step_fn, teacher)
                early = bool(on_eval is not None and on_eval(step, eval_loss))
            if step % run.log_every == 0 or step == section.max_steps:
                dt = time.perf_counter() - t0
                loss_sum, ok_sum, part_sums = _interval_sums(interval, device)
                last_losses = {"loss": loss_sum / max(ok_sum, 1.0)}
                last_losses.update({k: v / max(ok_sum, 1.0) for k, v in part_sums.items()})
                tokens_per_s = timed_tokens / max(dt, 1e-9)
                if is_main:
                    row = {"step": step, "tokens_seen": tokens_seen, "lr": engine.lr(),
                           "grad_norm": engine.last_grad_norm() if fp32_grad_norm is None else fp32_grad_norm,
                           "tokens_per_s": round(tokens_per_s, 1), "num_skipped": num_skipped,
                           **{f"loss_{k}" if k != "loss" else k: v for k, v in last_losses.items()}}
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
                interval = _new_interval()
                timed_tokens, t0 = 0.0, time.perf_counter()
            elif evaluated and is_main:
                metrics_file.write(json.dumps({"step": step, "eval_loss": eval_loss}) + "\n")
                metrics_file.flush()
            if step % run.save_every == 0 or step == section.max_steps or stop_now or early:
                checkpoint_path = save()
            if early:
                stopped = "early"
                break
            if stop_now:
                stopped = "signal" if stop.requested else "time"
                if stop.parent_died():
                    warn("the launcher that started this process is gone; saved and stopping")
                break
    finally:
        if is_main:
            progress.stop()
            writer.close()
            metrics_file.close()
    if eval_batches and stopped == "done":
        eval_loss = evaluate(engine, eval_batches, step_fn, teacher)
    if stopped == "early":
        stopped = "done"  # early stopping finished the run; `step` says where
    return LoopResult(step, tokens_seen, stopped, num_skipped, last_losses, eval_loss, checkpoint_path)
