"""The `pretrain` section of a recipe: a training section (kompakt/train_config.py) plus objective and data.

The objective (masking, SOP, sequence length) and the packed data loader (micro-batch and global
batch in tokens) are nested sections owned by the objectives code (kompakt/objective_config.py).
Optimizer, schedule, engine and run control are the sections every training stage shares.
Runtime state (step, RNG, data position) never lives here: it is in the checkpointed train state.
"""

from __future__ import annotations

from pydantic import Field, model_validator

from kompakt.objective_config import DataLoaderConfig, ObjectiveConfig
from kompakt.train_config import EngineConfig, OptimConfig, RunControl, ScheduleConfig, TrainSection

__all__ = ["PretrainConfig", "OptimConfig", "ScheduleConfig", "EngineConfig", "RunControl"]


class PretrainConfig(TrainSection):
    """Objectives and the packed loader on top of the shared training keys."""

    seed: int = Field(0, ge=0, description="model initialisation and torch RNG; data order is data.seed")
    objective: ObjectiveConfig = ObjectiveConfig()
    data: DataLoaderConfig = DataLoaderConfig()

    @model_validator(mode="after")
    def _check(self) -> PretrainConfig:
        if self.data.global_batch_tokens < self.data.tokens_per_micro_batch:
            raise ValueError(f"pretrain.data.global_batch_tokens={self.data.global_batch_tokens} is below "
                             f"pretrain.data.tokens_per_micro_batch={self.data.tokens_per_micro_batch}")
        return self

    def accumulation_steps(self, world_size: int) -> int:
        """Micro-batches per rank per optimizer step: global tokens / (micro-batch tokens x ranks), rounded up."""
        if self.engine.accumulation_steps is not None:
            return self.engine.accumulation_steps
        per_pass = self.data.tokens_per_micro_batch * world_size
        return max(1, -(-self.data.global_batch_tokens // per_pass))
