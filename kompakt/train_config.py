"""Config sections shared by every training stage: optimizer, schedule, engine and run control.

A training stage's section (`pretrain`, and later `distill`, `finetune`) subclasses `TrainSection`
and adds its own objective and data keys. `kompakt/engine.py` is built from `optim`, `schedule`
and `engine`; `kompakt/loop.py` reads `run`.

What is hashed. A stage directory's hash covers what a stage computes, not how it is driven:
`hashed_config` drops every `RunControl` subsection as a whole and every field declared with
`runtime_field` (for example `data.num_proc`). A key added to `RunControl` later is therefore out
of the hash by construction, and a requeued job with a new time limit or save interval continues
in the same directory.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, model_validator

from kompakt.config_base import StrictModel
from kompakt.log import warn


def runtime_field(default: Any, **kwargs) -> Any:
    """A `Field` that changes how fast a stage runs, not what it writes: kept out of the stage hash."""
    extra = dict(kwargs.pop("json_schema_extra", None) or {}, runtime=True)
    return Field(default, json_schema_extra=extra, **kwargs)


def is_runtime(field_info) -> bool:
    extra = field_info.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("runtime"))


class OptimConfig(StrictModel):
    """AdamW (torch, fused on CUDA) or LAMB (DeepSpeed's FusedLamb on CUDA, kompakt's own on CPU)."""

    name: Literal["adamw", "lamb"] = "adamw"
    lr: float = Field(1e-3, gt=0.0)
    beta1: float = Field(0.9, ge=0.0, lt=1.0)
    # 0.98 rather than 0.999: RoBERTa found it steadier with large batches.
    beta2: float = Field(0.98, ge=0.0, lt=1.0)
    eps: float = Field(1e-6, gt=0.0)
    # Decoupled weight decay; biases and LayerNorm weights are exempt (BERT's convention).
    weight_decay: float = Field(0.01, ge=0.0)


class ScheduleConfig(StrictModel):
    """Learning-rate multiplier over optimizer steps: linear warmup, then a decay shape.

    linear  1 -> min_lr_ratio linearly until max_steps (BERT)
    cosine  half cosine from 1 to min_lr_ratio
    wsd     warmup-stable-decay: 1 until the last `decay_fraction` of steps, then linear to min_lr_ratio
    constant  1 after warmup
    """

    kind: Literal["linear", "cosine", "wsd", "constant"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    decay_fraction: float = Field(0.1, gt=0.0, le=1.0, description="wsd: share of max_steps spent decaying")
    min_lr_ratio: float = Field(0.0, ge=0.0, le=1.0)


class EngineConfig(StrictModel):
    """How DeepSpeed runs the step: ZeRO stage, precision, accumulation, clipping, compile."""

    # DeepSpeed ZeRO: 0 plain data parallel, 1 optimizer states, 2 + gradients, 3 + parameters sharded.
    zero_stage: int = Field(0, ge=0, le=3)
    # auto: bf16 on a GPU that supports it, fp32 on CPU.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # Micro-batches per rank per optimizer step; None: derived from the stage's global batch
    # (pretraining: data.global_batch_tokens over the measured micro-batch fill).
    accumulation_steps: int | None = Field(None, ge=1)
    # Global gradient 2-norm clip; 0 disables clipping.
    grad_clip: float = Field(1.0, ge=0.0)
    # torch.compile the model (pays off on GPU for long runs; off on CPU, where compile time dominates).
    compile: bool = False


class RunControl(StrictModel):
    """How a training run is driven; the whole subsection is kept out of the stage hash."""

    # auto: continue from the newest intact checkpoint of this stage directory if there is one;
    # never: start fresh (an existing checkpoint is an error); or a path to a checkpoint tag directory.
    resume: str = "auto"
    # Wall-clock budget of this process in minutes; at the limit it saves and exits for a requeue.
    time_limit_minutes: float | None = Field(None, gt=0.0)
    save_every: int = Field(1000, ge=1, description="steps between checkpoints (one is also written at the end)")
    keep_last: int = Field(3, ge=1, description="complete checkpoints kept; older ones are deleted")
    log_every: int = Field(10, ge=1, description="steps between metrics.jsonl / TensorBoard rows")
    eval_every: int = Field(0, ge=0, description="steps between held-out evaluations; 0: only at the end")
    eval_batches: int = Field(8, ge=1, description="held-out micro-batches per evaluation")
    max_nonfinite_in_a_row: int = Field(5, ge=1)
    # Micro-batches built ahead by a background thread; 0 builds them in the training thread.
    # Unused when num_workers > 0 (the workers build ahead themselves).
    prefetch: int = Field(2, ge=0, le=64)
    # Worker processes that mask and collate micro-batches in parallel (0: none). One core builds a
    # 16k-token micro-batch in 50-130 ms (ngram/span + SOP slowest), while an H100 trains a base-size
    # model on it in ~35 ms (6 x 110M FLOPs/token x 16k tokens at ~300 TFLOP/s), and a thread cannot
    # help (the GIL), so a GPU run wants about 4 per GPU, with cores to spare for them. Batches and
    # resume are identical for every value.
    num_workers: int = Field(0, ge=0, le=64)

    @model_validator(mode="after")
    def _check(self) -> RunControl:
        if self.resume not in ("auto", "never") and not self.resume.strip():
            raise ValueError("run.resume must be auto, never or a checkpoint path")
        return self


# Keys of the flat layout before `engine` and `run` existed, and where they live now.
_MOVED = {**{k: ("engine", k) for k in ("zero_stage", "precision", "compile")},
          **{k: ("run", k) for k in RunControl.model_fields}}
_MOVED_NESTED = {("optim", "grad_clip"): ("engine", "grad_clip"), ("data", "prefetch"): ("run", "prefetch"),
                 ("data", "num_workers"): ("run", "num_workers")}


class TrainSection(StrictModel):
    """The keys every training stage has; a stage subclasses it with its objective and data."""

    max_steps: int = Field(100, ge=1, description="optimizer steps")
    seed: int = Field(0, ge=0, description="model initialisation and torch RNG")
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    engine: EngineConfig = EngineConfig()
    run: RunControl = RunControl()

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, raw: Any) -> Any:
        """Accept the older flat layout (`pretrain.save_every`, `pretrain.optim.grad_clip`) with a warning."""
        if not isinstance(raw, dict):
            return raw
        raw = dict(raw)
        moves = [((k,), _MOVED[k]) for k in list(raw) if k in _MOVED]
        moves += [(old, new) for old, new in _MOVED_NESTED.items()
                  if isinstance(raw.get(old[0]), dict) and old[1] in raw[old[0]]]
        for old, (sub, key) in moves:
            if len(old) == 1:
                value = raw.pop(old[0])
            else:
                parent = dict(raw[old[0]])
                value = parent.pop(old[1])
                raw[old[0]] = parent
            target = raw.get(sub)
            target = dict(target) if isinstance(target, dict) else {}
            # The old spelling wins: it is most often a dotted override on top of a new-layout recipe.
            target[key] = value
            raw[sub] = target
            warn(f"{'.'.join(old)} is now {sub}.{key} in a training section; using it as {sub}.{key}")
        return raw

    @model_validator(mode="after")
    def _check_steps(self) -> TrainSection:
        if self.schedule.warmup_steps >= self.max_steps:
            raise ValueError(f"schedule.warmup_steps={self.schedule.warmup_steps} must be below "
                             f"max_steps={self.max_steps}")
        return self


def hashed_config(section: BaseModel | None) -> dict:
    """A section as JSON-able data without its run control and runtime fields (see the module docstring)."""
    if section is None:
        return {}
    out = {}
    for name, info in type(section).model_fields.items():
        value = getattr(section, name)
        if is_runtime(info) or isinstance(value, RunControl):
            continue
        if isinstance(value, BaseModel):
            out[name] = hashed_config(value)
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, BaseModel) for v in value):
            out[name] = [hashed_config(v) for v in value]  # compress.students: each a section of its own
        else:
            out[name] = section.__pydantic_serializer__.to_python(section, mode="json", include={name})[name]
    return out
