"""Run the pretrain stage in its own process, as `kompakt pretrain` would: `python stage_worker.py
TOKENIZER_STAGE OUT '{"max_steps": 10, ...}'`. A user error prints one line and exits 2; a requeue
exits 75. The model is the tiny BERT of test_pretrain.py."""

from __future__ import annotations

import json
import sys
from pathlib import Path

if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import torch

    torch.set_num_threads(1)
    from kompakt.errors import KompaktError
    from kompakt.model_config import ModelConfig
    from kompakt.pretrain import stage
    from kompakt.pretrain_config import PretrainConfig

    tok, out, overrides = Path(sys.argv[1]), Path(sys.argv[2]), json.loads(sys.argv[3])
    raw = {"max_steps": 10, "seed": 0, "objective": {"masking": "whole_word", "max_seq_len": 64},
           "data": {"tokens_per_micro_batch": 512, "global_batch_tokens": 1024},
           "optim": {"lr": 5e-3}, "schedule": {"warmup_steps": 2},
           "engine": {"precision": "fp32"},
           "run": {"save_every": 5, "keep_last": 3, "log_every": 4, "eval_every": 0, "eval_batches": 2, "prefetch": 0}}
    for key, value in overrides.items():
        if isinstance(value, dict):
            raw.setdefault(key, {}).update(value)
        else:
            raw[key] = value
    model = ModelConfig(family="bert", hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                        max_position_embeddings=64)
    try:
        stage.run(model, PretrainConfig.model_validate(raw), tok, out, stage_hash="test", inputs={}, recipe_name="t",
                  release={"license": "apache-2.0", "language": ["nb"], "data_license": "CC BY 4.0"})
    except KompaktError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
