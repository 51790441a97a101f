"""A new model family is one file and one registry line: a toy family registered from outside the
package trains through the real pretrain stage (engine, loop, checkpoints) and exports with a card."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from test_pretrain import build_tokenizer_stage

HERE = Path(__file__).resolve().parent

SCRIPT = """
import sys, torch
sys.path.insert(0, {here!r})
import toy_family  # the one registry line runs here
from kompakt.model_config import ModelConfig
from kompakt.models import build_pretraining_model
from kompakt.models.flops import model_flops
from kompakt.pretrain import stage
from kompakt.pretrain_config import PretrainConfig

cfg = ModelConfig(family="toy", hidden_size=16, num_layers=1, num_heads=1, intermediate_size=16, vocab_size=512)
assert type(build_pretraining_model(cfg)).__name__ == "ToyForMaskedLM"
assert model_flops(cfg, [10, 20], 4) == 6.0 * 512 * 16 * 4
pre = PretrainConfig.model_validate({{"max_steps": 4, "objective": {{"masking": "token", "max_seq_len": 32}},
    "data": {{"tokens_per_micro_batch": 256, "global_batch_tokens": 256}}, "engine": {{"precision": "fp32"}},
    "run": {{"save_every": 2, "log_every": 2, "eval_batches": 1, "prefetch": 0}}}})
stage.run(cfg.model_copy(update={{"vocab_size": None}}), pre, {tok!r}, {out!r}, stage_hash="t", inputs={{}},
          recipe_name="toy")
"""


def test_a_registered_toy_family_trains_and_exports(tmp_path, demo_docs):
    tok = build_tokenizer_stage(tmp_path / "tok", demo_docs[:600], vocab_size=512)
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT.format(here=str(HERE), tok=str(tok), out=str(out))],
                          env={**env, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["counts"]["steps"] == 4
    card = (out / "export" / "README.md").read_text()
    assert "tags: [kompakt, toy, fill-mask]" in card and (out / "export" / "model.safetensors").is_file()
