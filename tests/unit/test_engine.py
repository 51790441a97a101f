"""Engine pieces that need no processes: LAMB, the schedules, the generated DeepSpeed config,
launcher detection and the checkpoint directory rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from kompakt import checkpoint, dist
from kompakt.engine import Lamb, deepspeed_config, lr_multiplier, param_groups
from kompakt.errors import ConfigError
from kompakt.pretrain_config import PretrainConfig, ScheduleConfig


def test_lamb_first_step_matches_the_formula():
    torch.manual_seed(0)
    p0 = torch.randn(4, 3)
    g = torch.randn(4, 3)
    lr, wd, eps = 0.1, 0.01, 1e-6
    p = torch.nn.Parameter(p0.clone())
    opt = Lamb([p], lr=lr, betas=(0.9, 0.999), eps=eps, weight_decay=wd)
    p.grad = g.clone()
    opt.step()
    # step 1: bias-corrected moments are g and g^2, so u = g / (|g| + eps) + wd p
    u = g / (g.abs() + eps) + wd * p0
    expected = p0 - lr * (p0.norm() / u.norm()) * u
    torch.testing.assert_close(p.detach(), expected)


def test_lamb_minimises_a_quadratic_and_handles_zero_weights():
    torch.manual_seed(0)
    target = torch.randn(16)
    w = torch.nn.Parameter(torch.zeros(16))  # ||w|| = 0: trust ratio falls back to 1
    opt = Lamb([w], lr=0.05)
    losses = []
    for _ in range(200):
        loss = ((w - target) ** 2).sum()
        losses.append(loss.item())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert losses[-1] < 0.01 * losses[0]


def test_no_weight_decay_on_biases_and_norms():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
    decay, no_decay = param_groups(model, 0.1)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 4])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0.0


@pytest.mark.parametrize("kind", ["linear", "cosine", "wsd", "constant"])
def test_schedules_warm_up_then_decay_to_the_floor(kind):
    f = lr_multiplier(ScheduleConfig(kind=kind, warmup_steps=10, decay_fraction=0.2, min_lr_ratio=0.1), 100)
    assert f(0) == pytest.approx(0.1) and f(4) == pytest.approx(0.5) and f(9) == pytest.approx(1.0)
    values = [f(s) for s in range(10, 101)]
    assert all(a >= b - 1e-12 for a, b in zip(values, values[1:])), "not monotone after warmup"
    if kind == "constant":
        assert values[-1] == 1.0
    else:
        assert f(100) == pytest.approx(0.1)
    if kind == "wsd":
        assert f(79) == 1.0 and f(90) == pytest.approx(0.1 + 0.9 * 0.5)
    if kind == "cosine":
        assert f(55) == pytest.approx(0.1 + 0.9 * 0.5)
    if kind == "linear":
        assert f(55) == pytest.approx(0.1 + 0.9 * 0.5)


def test_deepspeed_config_is_generated_from_the_typed_config():
    cfg = PretrainConfig.model_validate({"zero_stage": 2, "optim": {"grad_clip": 0.5},
                                         "data": {"tokens_per_micro_batch": 16384, "global_batch_tokens": 262144}})
    assert cfg.accumulation_steps(4) == 4 and cfg.accumulation_steps(1) == 16 and cfg.accumulation_steps(32) == 1
    # a global batch that does not divide: round up so a step holds at least the asked tokens
    assert PretrainConfig.model_validate({"data": {"tokens_per_micro_batch": 1000, "global_batch_tokens": 2500}}
                                         ).accumulation_steps(1) == 3
    ds = deepspeed_config(cfg, accumulation_steps=4, world_size=4, precision="bf16")
    assert ds["train_batch_size"] == 16 and ds["gradient_accumulation_steps"] == 4
    assert ds["train_micro_batch_size_per_gpu"] == 1
    assert ds["zero_optimization"] == {"stage": 2}
    assert ds["bf16"]["enabled"] is True and ds["gradient_clipping"] == 0.5
    assert deepspeed_config(cfg, accumulation_steps=1, world_size=1, precision="fp32")["bf16"]["enabled"] is False


def test_pretrain_config_rejects_inconsistent_values():
    with pytest.raises(ValueError, match="warmup_steps"):
        PretrainConfig.model_validate({"max_steps": 10, "schedule": {"warmup_steps": 10}})
    with pytest.raises(ValueError, match="global_batch_tokens"):
        PretrainConfig.model_validate({"data": {"tokens_per_micro_batch": 4096, "global_batch_tokens": 1024}})
    with pytest.raises(ValueError):
        PretrainConfig.model_validate({"zero_stage": 4})


def test_launcher_detection(monkeypatch):
    import os

    # setup_env writes RANK and friends into os.environ itself; give it a copy so nothing leaks into
    # later tests (a leaked RANK=5 silences rank-0 status lines in every test after this one).
    monkeypatch.setattr(os, "environ", os.environ.copy())
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_PROCID", "SLURM_NTASKS",
                "SLURM_LOCALID", "SLURM_NODELIST", "SLURM_JOB_ID"):
        monkeypatch.delenv(var, raising=False)
    single = dist.detect()
    assert (single.rank, single.world_size, single.local_rank, single.master_addr) == (0, 1, 0, "127.0.0.1")
    assert 0 < single.master_port < 65536
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_NODELIST", "gpu[012-015,020],cpu1")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    srun = dist.setup_env()
    assert (srun.rank, srun.world_size, srun.local_rank, srun.master_addr) == (5, 8, 1, "gpu012")
    assert srun.master_port == 20000 + 123456 % 10000
    import os

    assert os.environ["RANK"] == "5" and os.environ["MASTER_ADDR"] == "gpu012"
    monkeypatch.setenv("RANK", "2")  # torchrun's variables win over Slurm's
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "2")
    assert dist.detect().rank == 2 and dist.detect().world_size == 4
    assert dist.first_slurm_host("node7") == "node7"


def test_resume_picks_the_newest_complete_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    for step, complete in ((5, True), (10, True), (15, False)):
        d = root / checkpoint.tag_for(step)
        d.mkdir(parents=True)
        if complete:
            (d / checkpoint.COMPLETE).write_text(str(step))
            (d / checkpoint.TRAIN_STATE).write_text('{"step": %d}' % step)
    (root / ".tmp-step-00000020").mkdir()  # a save killed half-way
    assert [p.name for p in checkpoint.complete_tags(root)] == ["step-00000005", "step-00000010"]
    assert checkpoint.resolve_resume("auto", root).name == "step-00000010"
    assert checkpoint.resolve_resume("never", root) is None
    assert checkpoint.resolve_resume("auto", tmp_path / "none") is None
    with pytest.raises(checkpoint.CheckpointError, match="not a complete checkpoint"):
        checkpoint.resolve_resume(str(root / "step-00000015"), root)


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    import random

    checkpoint.seed_everything(7)
    state = checkpoint.rng_state()
    torch.save({"rng": state, "loader": checkpoint._plain({"position": np.int64(3), "arr": np.arange(3)})},
               tmp_path / "r.pt")
    expected = (random.random(), float(np.random.rand()), float(torch.rand(())))
    loaded = torch.load(tmp_path / "r.pt", weights_only=True)
    checkpoint.set_rng_state(loaded["rng"])
    assert (random.random(), float(np.random.rand()), float(torch.rand(()))) == expected
    assert loaded["loader"]["position"] == 3 and math.isclose(float(loaded["loader"]["arr"].sum()), 3.0)


def test_pretrain_without_sections_is_a_config_error(tmp_path):
    from kompakt.config import validate_recipe
    from kompakt.pipeline import pretrain

    recipe = validate_recipe({"name": "x", "run_dir": str(tmp_path), "data": {"inputs": ["a.txt"]}})
    with pytest.raises(ConfigError, match="no model or pretrain section"):
        pretrain(recipe)
