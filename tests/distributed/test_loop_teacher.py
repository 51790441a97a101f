"""The shared loop drives any stage's step function with a frozen teacher: a student learns to match
a teacher's hidden states (the shape of a distillation step) through the real DeepSpeed engine, and
the teacher is left untouched (eval mode, no gradients, same weights)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

SCRIPT = r"""
import json, sys, torch
from pathlib import Path
from torch import nn
from kompakt.dist import setup_env
from kompakt.engine import build_engine, init_distributed
from kompakt.loop import train_loop
from kompakt.train_config import TrainSection

class Encoder(nn.Module):
    def __init__(self, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.emb, self.proj = nn.Embedding(32, 8), nn.Linear(8, 8)

    def hidden(self, input_ids):
        return torch.tanh(self.proj(self.emb(input_ids)))

    def forward(self, input_ids, target):
        loss = ((self.hidden(input_ids) - target) ** 2).mean()
        return {"loss": loss, "losses": {"hidden_mse": loss.detach()}, "num_predictions": int(input_ids.numel())}

def distill_step(model, batch, teacher):
    with torch.no_grad():
        target = teacher.hidden(batch["input_ids"])
    return model(input_ids=batch["input_ids"], target=target)

class Batches:
    def __init__(self): self.i = 0
    def state_dict(self): return {"i": self.i}
    def __iter__(self):
        while True:
            g = torch.Generator().manual_seed(self.i); self.i += 1
            yield {"input_ids": torch.randint(0, 32, (64,), generator=g)}

out = Path(sys.argv[1])
section = TrainSection.model_validate({"max_steps": 60, "optim": {"lr": 0.05, "weight_decay": 0.0},
    "engine": {"precision": "fp32", "accumulation_steps": 1}, "run": {"log_every": 10, "save_every": 1000}})
env = setup_env(); init_distributed(env)
teacher = Encoder(seed=1)
before = {k: v.clone() for k, v in teacher.state_dict().items()}
engine, _ = build_engine(Encoder(seed=2), section, env)
result = train_loop(engine, section, Batches(), out_dir=out, ckpt_root=out / "ckpt", step_fn=distill_step,
                    teacher=teacher)
same = all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
print(json.dumps({"same": same, "training": teacher.training,
                  "grads": any(p.requires_grad for p in teacher.parameters()), "step": result.step}))
"""


def test_a_frozen_teacher_drives_a_student_through_the_shared_loop(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "MASTER_PORT", "MASTER_ADDR")}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path)], env={**env, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got == {"same": True, "training": False, "grads": False, "step": 60}
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["loss_hidden_mse"] < 0.3 * rows[0]["loss_hidden_mse"], rows
    assert (tmp_path / "ckpt" / "step-00000060" / "complete").is_file()
