"""The `finetune` and `eval` sections of a recipe.

```yaml
finetune:
  suite: demo-nb             # a shipped suite (eval/suites/<name>.yaml) or a path to a suite file
  models: [teacher, students] # 'teacher', 'students' (every compress student), student names, or name: folder
  seeds: 3
  learning_curve: [100, 500, 1000]   # train sizes beside 'all', for the models in curve_models
eval:
  baselines: [tfidf, bilstm]
```

Each (task, model, train size, seed) is one job with its own directory, checkpoints and predictions;
jobs are independent, so `shard: i/n` runs every n-th of them (a Slurm array), and the stage is
complete when every job is. Learning rate, batch size and epochs come from the suite's tasks.
"""

from __future__ import annotations

import re

from pydantic import Field, field_validator

from kompakt.config_base import StrictModel
from kompakt.train_config import EngineConfig, RunControl, runtime_field


class TrainOverrides(StrictModel):
    """Replace the suite's per-task hyper-parameters for every task (unset keys keep the suite's):
    a suite's values are tuned for base-size models, and a 2-layer student wants a higher lr."""

    lr: float | None = Field(None, gt=0)
    batch_size: int | None = Field(None, ge=1)
    epochs: int | None = Field(None, ge=1)
    max_seq_len: int | None = Field(None, ge=8)
    patience: int | None = Field(None, ge=0)


class TaskDistill(StrictModel):
    """Task-specific distillation (TinyBERT's second stage): the teacher fine-tuned on each task teaches
    a student (typically a general-distilled one) on the task's training set, optionally augmented.

    `name` is the distilled model's name in the results; `student` and `teacher` name models of
    finetune.models. `alpha` weighs the hard-label loss (TinyBERT: 0, the teacher's predictions only);
    `augment` copies of every training example with words replaced by the teacher's MLM (TinyBERT: 20).
    """

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    student: str
    teacher: str = "teacher"
    alpha: float = Field(0.0, ge=0.0, le=1.0)
    temperature: float = Field(1.0, gt=0.0)
    augment: int = Field(0, ge=0, le=50)
    augment_p: float = Field(0.4, gt=0.0, lt=1.0)


class FinetuneConfig(StrictModel):
    suite: str = "demo-nb"
    tasks: list[str] = Field(default_factory=list, description="a subset of the suite's tasks; empty: all")
    models: list[str | dict[str, str]] = Field(default_factory=lambda: ["teacher", "students"])
    seeds: int = Field(3, ge=1, le=100)
    learning_curve: list[int] = Field(default_factory=list, description="train sizes beside all of it")
    curve_models: list[str] = Field(default_factory=lambda: ["teacher"])
    # Caps a task's training set (after the learning-curve subsample), for quick runs; None: all of it.
    max_train_examples: int | None = Field(None, ge=1)
    train: TrainOverrides = TrainOverrides()
    distill: list[TaskDistill] = Field(default_factory=list)
    # Fine-tuned folders kept: the first seed's of every model and task (the release candidates) or none.
    keep_models: bool = True
    engine: EngineConfig = EngineConfig()
    run: RunControl = RunControl(save_every=10**9, log_every=20)
    # "i/n": this process runs jobs i, i+n, ... (a Slurm array task); out of the hash, every shard
    # writes into the same stage directory.
    shard: str | None = runtime_field(None)

    @field_validator("shard")
    @classmethod
    def _shard(cls, v: str | None) -> str | None:
        if v is not None:
            m = re.fullmatch(r"(\d+)/(\d+)", v.strip())
            if not m or not int(m[1]) < int(m[2]):
                raise ValueError(f"finetune.shard={v!r} must be i/n with 0 <= i < n, e.g. 0/4")
        return v

    @field_validator("learning_curve")
    @classmethod
    def _sizes(cls, v: list[int]) -> list[int]:
        if any(x < 2 for x in v):
            raise ValueError("finetune.learning_curve sizes must be at least 2 examples")
        return sorted(set(v))


class EvalConfig(StrictModel):
    baselines: list[str] = Field(default_factory=lambda: ["tfidf", "bilstm"])
    n_boot: int = Field(1000, ge=100, description="bootstrap replicates for intervals and paired tests")
    # The BiLSTM's epochs (early-stopped on dev) and the seeds of the baselines' learning-curve points
    # (the full training set always gets finetune.seeds seeds, like the models).
    bilstm_epochs: int = Field(10, ge=1)
    curve_seeds: int = Field(1, ge=1)
    # CPU latency (batch 1, sequence 128, 1 thread) and throughput per model, for the report.
    measure_speed: bool = runtime_field(True)

    @field_validator("baselines")
    @classmethod
    def _baselines(cls, v: list[str]) -> list[str]:
        bad = sorted(set(v) - {"tfidf", "bilstm"})
        if bad:
            raise ValueError(f"eval.baselines: {bad} unknown; use tfidf and/or bilstm")
        return v
