"""DeepSpeed engine + training loop across processes: 2 ranks vs 1, exact resume after SIGKILL,
a kill during a save, and a 2-rank checkpoint resumed on 1 rank. Each rank is a real process
(tests/distributed/worker.py) talking gloo over 127.0.0.1."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from kompakt.dist import free_port

WORKER = Path(__file__).with_name("worker.py")
pytestmark = pytest.mark.distributed


def launch(out: Path, *args: str, world: int = 1, env: dict | None = None) -> list[subprocess.Popen]:
    port = str(free_port())
    procs = []
    for rank in range(world):
        e = {**os.environ, "RANK": str(rank), "WORLD_SIZE": str(world), "LOCAL_RANK": str(rank),
             "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
             **(env or {})}
        log = open(out.parent / f"{out.name}-rank{rank}.log", "ab")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), str(out), *args], env=e,
                                      stdout=log, stderr=subprocess.STDOUT))
    return procs


def run(out: Path, *args: str, world: int = 1, env: dict | None = None, expect: int = 0) -> None:
    procs = launch(out, *args, world=world, env=env)
    codes = [p.wait(timeout=300) for p in procs]
    logs = "\n".join((out.parent / f"{out.name}-rank{r}.log").read_text(errors="replace")[-3000:] for r in range(world))
    assert all(c == expect for c in codes), f"exit codes {codes}, expected {expect}\n{logs}"


def losses(out: Path) -> dict[int, float]:
    """Loss per step; a resume drops the rows after its checkpoint, so every step is logged once."""
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "loss" in r]
    assert steps == sorted(set(steps)), f"steps logged twice or out of order: {steps}"
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def weights(out: Path) -> dict[str, torch.Tensor]:
    return torch.load(out / "final.pt", weights_only=True)


def test_two_ranks_zero2_match_one_rank_on_the_combined_batch(tmp_path):
    """Rank 0 and 1 each take one micro-batch; one rank takes both with accumulation: same update."""
    common = ["--steps", "3", "--dropout", "0", "--micro-per-step", "2", "--zero", "2", "--save-every", "100"]
    two, one = tmp_path / "two", tmp_path / "one"
    run(two, *common, world=2)
    run(one, *common, world=1)
    assert json.loads((two / "result.json").read_text())["accum"] == 1
    assert json.loads((one / "result.json").read_text())["accum"] == 2
    w2, w1 = weights(two), weights(one)
    assert set(w2) == set(w1)
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], rtol=1e-5, atol=1e-6)
    l2, l1 = losses(two), losses(one)
    assert sorted(l2) == [1, 2, 3]
    for s in l1:
        assert l2[s] == pytest.approx(l1[s], rel=1e-5)


def test_exact_resume_after_kill_in_save_and_sigkill(tmp_path):
    """40 steps straight vs: killed inside the save of step 10 (resume picks step 5), then SIGKILLed
    in step 18 (resume picks step 15): identical loss at every step and identical final weights."""
    common = ["--steps", "40", "--save-every", "5", "--dropout", "0.1"]
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    ref_proc = launch(ref, *common)
    # 1) die inside save(step 10) after the tag's files were partly written
    run(cut, *common, env={"KOMPAKT_TEST_KILL_IN_SAVE": "10"}, expect=-signal.SIGKILL)
    ckpts = cut / "checkpoints"
    assert (ckpts / ".tmp-step-00000010").is_dir() and not (ckpts / "step-00000010").exists()
    assert (ckpts / "latest").read_text() == "step-00000005"
    # 2) resume from step 5; the loader waits before the first micro-batch of step 18 and we SIGKILL it
    procs = launch(cut, *common, "--pause-before-micro", str(2 * (17 - 5)))
    deadline = time.time() + 120
    while not (cut / "paused-0").exists():
        assert procs[0].poll() is None and time.time() < deadline, "worker ended before reaching step 18"
        time.sleep(0.05)
    os.kill(procs[0].pid, signal.SIGKILL)
    procs[0].wait()
    assert (ckpts / "latest").read_text() == "step-00000015"
    # 3) resume from step 15 to the end
    run(cut, *common)
    assert ref_proc[0].wait(timeout=300) == 0
    l_ref, l_cut = losses(ref), losses(cut)
    assert sorted(l_ref) == sorted(l_cut) == list(range(1, 41))
    for s in l_ref:
        assert l_cut[s] == l_ref[s], f"step {s}: {l_cut[s]} != {l_ref[s]}"
    w_ref, w_cut = weights(ref), weights(cut)
    for k in w_ref:
        assert torch.equal(w_ref[k], w_cut[k]), k
    result = json.loads((cut / "result.json").read_text())
    assert result["step"] == 40 and result["tokens_seen"] == 40 * 2 * 48
    # keep_last=2: only the two newest complete checkpoints remain
    assert sorted(p.name for p in ckpts.glob("step-*")) == ["step-00000035", "step-00000040"]


@pytest.mark.slow  # ~15-30 s of process start-ups; `make test-all` runs it
def test_two_rank_checkpoint_resumes_on_one_rank(tmp_path):
    """ZeRO-2 on 2 ranks for 6 steps, then 1 rank to step 10 = 1 rank for 10 steps straight."""
    common = ["--dropout", "0", "--zero", "2", "--schedule", "constant", "--save-every", "3"]
    mixed, ref = tmp_path / "mixed", tmp_path / "ref"
    ref_proc = launch(ref, *common, "--steps", "10")
    run(mixed, *common, "--steps", "6", world=2)
    run(mixed, *common, "--steps", "10", world=1)
    assert ref_proc[0].wait(timeout=300) == 0
    result = json.loads((mixed / "result.json").read_text())
    assert result["step"] == 10 and result["tokens_seen"] == 10 * 2 * 48
    w_ref, w_mixed = weights(ref), weights(mixed)
    for k in w_ref:
        torch.testing.assert_close(w_mixed[k], w_ref[k], rtol=1e-4, atol=1e-5)


def _saved_weights(tag_dir: Path) -> dict[str, torch.Tensor]:
    if (tag_dir / "consolidated.pt").is_file():
        return torch.load(tag_dir / "consolidated.pt", weights_only=True)["params"]
    from safetensors.torch import load_file

    return load_file(str(tag_dir / "model.safetensors"))


@pytest.mark.slow  # ~15-30 s of process start-ups; `make test-all` runs it
def test_nonfinite_loss_skips_the_update_and_too_many_stop_the_run(tmp_path):
    """ZeRO-2: a NaN in step 3 leaves the weights of step 2 untouched, step 4 updates again.
    ZeRO-0: NaN from step 3 on stops the run after max_nonfinite_in_a_row (5) skipped steps."""
    one = tmp_path / "one"
    run(one, "--steps", "4", "--zero", "2", "--save-every", "1", "--keep-last", "4", "--dropout", "0",
        env={"WORKER_NAN_CALLS": "5"})  # 2 micro-batches per step: call 5 is step 3's first
    ck = one / "checkpoints"
    w1, w2, w3, w4 = (_saved_weights(ck / f"step-0000000{i}") for i in (1, 2, 3, 4))
    assert all(torch.equal(w2[k], w3[k]) for k in w2), "a non-finite step changed the weights"
    assert not all(torch.equal(w1[k], w2[k]) for k in w2) and not all(torch.equal(w3[k], w4[k]) for k in w3)
    rows = {json.loads(line)["step"]: json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()}
    assert rows[2]["num_skipped"] == 0 and rows[3]["num_skipped"] == 1 and rows[4]["num_skipped"] == 1
    assert all(torch.isfinite(v).all() for v in w4.values())

    many = tmp_path / "many"
    procs = launch(many, "--steps", "20", "--zero", "0", "--save-every", "1", "--keep-last", "4",
                   env={"WORKER_NAN_CALLS": "5+"})
    assert procs[0].wait(timeout=300) != 0
    log = (tmp_path / "many-rank0.log").read_text()
    assert "5 optimizer steps in a row had a non-finite loss" in log
    ck = many / "checkpoints"
    assert sorted(p.name for p in ck.glob("step-*")) == [f"step-0000000{i}" for i in (3, 4, 5, 6)]
    w3, w6 = _saved_weights(ck / "step-00000003"), _saved_weights(ck / "step-00000006")
    assert all(torch.equal(w3[k], w6[k]) for k in w3), "ZeRO-0 applied a non-finite step"


@pytest.mark.slow  # ~15-30 s of process start-ups; `make test-all` runs it
def test_sigterm_saves_at_the_step_boundary_and_exits_for_a_requeue(tmp_path):
    """Slurm's warning: SIGTERM mid-run -> checkpoint at that step, exit 75; resume: auto finishes with
    every micro-batch seen exactly once (tokens seen = steps x tokens per step)."""
    from kompakt.pretrain.loop import REQUEUE_EXIT

    out = tmp_path / "run"
    common = ["--steps", "300", "--save-every", "1000", "--dropout", "0"]
    procs = launch(out, *common)
    deadline = time.time() + 120
    while not ((out / "metrics.jsonl").exists() and len((out / "metrics.jsonl").read_text().splitlines()) >= 3):
        assert procs[0].poll() is None and time.time() < deadline
        time.sleep(0.02)
    os.kill(procs[0].pid, signal.SIGTERM)
    assert procs[0].wait(timeout=120) == REQUEUE_EXIT
    stopped_at = int((out / "checkpoints" / "latest").read_text().removeprefix("step-"))
    assert 3 <= stopped_at < 300
    assert max(losses(out)) == stopped_at
    run(out, *common)
    result = json.loads((out / "result.json").read_text())
    assert result == {"step": 300, "tokens_seen": 300 * 2 * 48, "stopped": "done", "num_skipped": 0, "accum": 2}
