"""Pretraining's use of the shared training loop (kompakt/loop.py): the model computes its own loss.

Kept as the name the pretraining code and tests call; every behaviour lives in the core loop.
"""

from __future__ import annotations

from kompakt.engine import EngineInfo, TrainEngine
from kompakt.loop import REQUEUE_EXIT, LoopResult, NonFiniteLossError, model_step, train_loop
from kompakt.pretrain_config import PretrainConfig

__all__ = ["REQUEUE_EXIT", "LoopResult", "NonFiniteLossError", "train"]


def train(engine: TrainEngine, engine_info: EngineInfo, cfg: PretrainConfig, loader, **kwargs) -> LoopResult:
    """`kompakt.loop.train_loop` with the pretraining models' own forward as the step function."""
    assert engine.info is engine_info, "engine_info must be the one build_engine returned with this engine"
    return train_loop(engine, cfg, loader, step_fn=model_step, name="pretrain", **kwargs)
