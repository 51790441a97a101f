"""Golden losses: a tiny BERT, ALBERT (n-gram masking + SOP) and SpanBERT (spans + SBO) trained 20
steps on fixed synthetic shards give the recorded per-step losses to 1e-5 (fp32, one CPU thread).

Recorded before the training core was shared between stages (tests/golden/losses.json); any change
to masking, packing, the engine or the loop that moves a number fails here. Each run is a fresh
process so that torch.distributed and thread settings start clean.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

GOLDEN = Path(__file__).resolve().parents[1] / "golden"


@pytest.mark.parametrize("family", ["bert", "albert", "spanbert"])
def test_training_reproduces_the_recorded_losses(family, tmp_path, repo):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    proc = subprocess.run([sys.executable, str(GOLDEN / "worker.py"), family, str(tmp_path / "run")],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    want = json.loads((GOLDEN / "losses.json").read_text())[family]
    assert got["accum"] == want["accum"]
    assert len(got["losses"]) == len(want["losses"]) == 20
    for step, (g, w) in enumerate(zip(got["losses"], want["losses"]), start=1):
        assert g.keys() == w.keys(), f"step {step}: {sorted(g)} != {sorted(w)}"
        for name in w:
            assert abs(g[name] - w[name]) < 1e-5, f"step {step} {name}: {g[name]!r} != recorded {w[name]!r}"
