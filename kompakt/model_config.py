"""The `model` section of a recipe (owned by kompakt/models; filled in by the models issue)."""

from __future__ import annotations

from typing import Literal

from kompakt.config_base import StrictModel


class ModelConfig(StrictModel):
    """Model family and sizes; `vocab_size` must match the tokenizer's."""

    family: Literal["bert", "albert", "spanbert", "lattice"] = "bert"
