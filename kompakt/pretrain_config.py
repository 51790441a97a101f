"""The `pretrain` section of a recipe (owned by kompakt/pretrain; filled in by the pretraining issue)."""

from __future__ import annotations

from kompakt.config_base import StrictModel


class PretrainConfig(StrictModel):
    """Objectives, optimisation, checkpointing and DeepSpeed settings."""

    max_steps: int = 100
