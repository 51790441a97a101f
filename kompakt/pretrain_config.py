"""The `pretrain` section of a recipe: optimisation, schedule, DeepSpeed, checkpoints and limits.

The objective (masking, SOP, sequence length) and the packed data loader (micro-batch and global
batch in tokens) are nested sections owned by the objectives code (kompakt/objective_config.py).
Runtime state (step, RNG, data position) never lives here: it is in the checkpointed train state.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from kompakt.config_base import StrictModel
from kompakt.objective_config import DataLoaderConfig, ObjectiveConfig


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
    # Global gradient 2-norm clip; 0 disables clipping.
    grad_clip: float = Field(1.0, ge=0.0)


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


class PretrainConfig(StrictModel):
    """Objectives, optimisation, checkpointing and DeepSpeed settings."""

    max_steps: int = Field(100, ge=1, description="optimizer steps")
    seed: int = Field(0, ge=0, description="model initialisation and torch RNG; data order is data.seed")
    objective: ObjectiveConfig = ObjectiveConfig()
    data: DataLoaderConfig = DataLoaderConfig()
    optim: OptimConfig = OptimConfig()
    schedule: ScheduleConfig = ScheduleConfig()
    # DeepSpeed ZeRO: 0 plain data parallel, 1 optimizer states, 2 + gradients, 3 + parameters sharded.
    zero_stage: int = Field(0, ge=0, le=3)
    # auto: bf16 on a GPU that supports it, fp32 on CPU.
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    # torch.compile the model (pays off on GPU for long runs; off on CPU, where compile time dominates).
    compile: bool = False
    save_every: int = Field(1000, ge=1, description="steps between checkpoints (one is also written at the end)")
    keep_last: int = Field(3, ge=1, description="complete checkpoints kept; older ones are deleted")
    # auto: continue from the newest complete checkpoint of this stage directory if there is one;
    # never: start fresh (an existing checkpoint is an error); or a path to a checkpoint tag directory.
    resume: str = "auto"
    # Wall-clock budget of this process in minutes; at the limit it saves and exits for a requeue.
    time_limit_minutes: float | None = Field(None, gt=0.0)
    max_nonfinite_in_a_row: int = Field(5, ge=1)
    log_every: int = Field(10, ge=1, description="steps between metrics.jsonl / TensorBoard rows")
    eval_every: int = Field(0, ge=0, description="steps between held-out MLM evaluations; 0: only at the end")
    eval_batches: int = Field(8, ge=1, description="held-out micro-batches per evaluation")

    @model_validator(mode="after")
    def _check(self) -> PretrainConfig:
        if self.schedule.warmup_steps >= self.max_steps:
            raise ValueError(f"pretrain.schedule.warmup_steps={self.schedule.warmup_steps} must be below "
                             f"pretrain.max_steps={self.max_steps}")
        if self.data.global_batch_tokens < self.data.tokens_per_micro_batch:
            raise ValueError(f"pretrain.data.global_batch_tokens={self.data.global_batch_tokens} is below "
                             f"pretrain.data.tokens_per_micro_batch={self.data.tokens_per_micro_batch}")
        if self.resume not in ("auto", "never") and not self.resume.strip():
            raise ValueError("pretrain.resume must be auto, never or a checkpoint path")
        return self

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per rank per optimizer step: global tokens / (micro-batch tokens x ranks), rounded up."""
        per_pass = self.data.tokens_per_micro_batch * world_size
        return max(1, -(-self.data.global_batch_tokens // per_pass))
