"""Hostile runs of the pretrain stage in real processes: kills and signals at the worst moments,
damaged checkpoints and a tokenizer changed under a checkpoint. Each case of the training-core
issue has its test here (the numbers are the issue's)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_pretrain import build_tokenizer_stage

WORKER = Path(__file__).resolve().parent / "stage_worker.py"
REQUEUE = 75


@pytest.fixture(scope="module")
def tok(tmp_path_factory, demo_docs) -> Path:
    return build_tokenizer_stage(tmp_path_factory.mktemp("tok"), demo_docs[:1200], vocab_size=512)


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def start(tok: Path, out: Path, overrides: dict | None = None, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, str(WORKER), str(tok), str(out), json.dumps(overrides or {})],
                            env=_env(**env), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run(tok: Path, out: Path, overrides: dict | None = None, expect: int = 0, **env) -> str:
    proc = start(tok, out, overrides, **env)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == expect, f"exit {proc.returncode}, expected {expect}\n{err[-3000:]}"
    return err


def wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def rows(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_case1_kill_after_the_last_checkpoint_resumes_to_the_export(tok, tmp_path):
    out = tmp_path / "run"
    run(tok, out, expect=-signal.SIGKILL, KOMPAKT_TEST_KILL_AT="before_export")
    assert (out / "checkpoints" / "step-00000010" / "complete").exists()
    assert not (out / "manifest.json").exists() and not (out / "export").exists()
    run(tok, out)  # resumes at step == max_steps: straight to evaluation and export
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] is True and manifest["counts"]["steps"] == 10
    assert (out / "export" / "model.safetensors").is_file()
    card = (out / "export" / "README.md").read_text()
    assert "license: apache-2.0" in card and "language: [nb]" in card and "CC BY 4.0" in card
    assert "Held-out MLM loss" not in card and "summed over the objectives" in card


@pytest.mark.parametrize("damage", ["truncate-model", pytest.param("flip-byte-rank-file", marks=pytest.mark.slow),
                                    pytest.param("train-state", marks=pytest.mark.slow)])
def test_case2_a_damaged_newest_checkpoint_falls_back_with_a_warning(tok, tmp_path, damage):
    out = tmp_path / "run"
    run(tok, out, KOMPAKT_TEST_KILL_AT="before_export", expect=-signal.SIGKILL)
    newest = out / "checkpoints" / "step-00000010"
    if damage == "truncate-model":
        f = newest / "mp_rank_00_model_states.pt"
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    elif damage == "flip-byte-rank-file":
        f = newest / "rank-00000.pt"
        data = bytearray(f.read_bytes())
        data[len(data) // 2] ^= 0xFF
        f.write_bytes(bytes(data))
    else:
        (newest / "train_state.json").write_text('{"step": 10, "tokens_')
    err = run(tok, out, {"max_steps": 12})
    assert "checkpoint step-00000010 is damaged and skipped" in err
    assert "resumed from" in err and "step-00000005" in err
    steps = [r["step"] for r in rows(out) if "loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 12


@pytest.mark.slow  # ~15 s
def test_case2_no_intact_checkpoint_is_one_clear_line(tok, tmp_path):
    out = tmp_path / "run"
    run(tok, out, KOMPAKT_TEST_KILL_AT="before_export", expect=-signal.SIGKILL)
    for tag in (out / "checkpoints").glob("step-*"):
        (tag / "mp_rank_00_model_states.pt").write_bytes(b"garbage")
    err = run(tok, out, {"max_steps": 12}, expect=2)
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and "none of the 2 complete checkpoint(s) is intact" in last
    assert "Traceback" not in err


def sigterm_at(tok: Path, tmp_path: Path, point: str) -> Path:
    """Run the stage until it pauses at `point`, send SIGTERM there, and expect the requeue exit."""
    out, flag = tmp_path / "run", tmp_path / "flag"
    proc = start(tok, out, KOMPAKT_TEST_PAUSE_AT=point, KOMPAKT_TEST_FLAG=str(flag))
    wait_for(flag, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == REQUEUE, err[-2000:]
    return out


def test_case6_sigterm_during_start_up_exits_for_a_requeue(tok, tmp_path):
    out = sigterm_at(tok, tmp_path, "startup")
    assert not list((out / "checkpoints").glob("step-*")) if (out / "checkpoints").exists() else True
    run(tok, out)
    assert json.loads((out / "manifest.json").read_text())["complete"] is True


@pytest.mark.slow  # ~15 s; the start-up case above runs in `make test`
def test_case6_sigterm_before_the_export_exits_for_a_requeue_then_exports(tok, tmp_path):
    out = sigterm_at(tok, tmp_path, "before_export")
    assert not (out / "manifest.json").exists()
    run(tok, out)
    assert (out / "export" / "config.json").is_file()


def test_case7_a_requeued_run_logs_the_rows_of_an_uninterrupted_one(tok, tmp_path):
    straight, requeued = tmp_path / "straight", tmp_path / "requeued"
    run(tok, straight, {"max_steps": 12})
    run(tok, requeued, {"max_steps": 12}, expect=REQUEUE, KOMPAKT_TEST_SIGTERM_AT_STEP="6")
    assert (requeued / "checkpoints" / "step-00000007").is_dir()  # saved at the next step boundary
    run(tok, requeued, {"max_steps": 12})
    a, b = rows(straight), rows(requeued)
    assert [r["step"] for r in b] == [r["step"] for r in a] == [0, 4, 8, 12]
    for x, y in zip(a, b):
        for key in ("loss", "loss_mlm", "eval_loss", "tokens_seen"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=1e-9, abs=1e-12), (x["step"], key)


@pytest.mark.slow  # ~15 s
def test_case7_a_kill_after_the_step0_evaluation_logs_step0_once(tok, tmp_path):
    out = tmp_path / "run"
    run(tok, out, expect=-signal.SIGKILL, KOMPAKT_TEST_KILL_AT="after_step0_eval")
    assert [r["step"] for r in rows(out)] == [0]
    run(tok, out)
    steps = [r["step"] for r in rows(out)]
    assert steps.count(0) == 1 and steps == sorted(steps)


def test_resume_refuses_a_tokenizer_that_changed_under_the_checkpoint(tok, tmp_path):
    import shutil

    mine = tmp_path / "tok"
    shutil.copytree(tok, mine)
    out = tmp_path / "run"
    run(mine, out, expect=-signal.SIGKILL, KOMPAKT_TEST_KILL_AT="before_export")
    path = mine / "tokenizer" / "tokenizer.json"
    data = json.loads(path.read_text())
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab)[10], sorted(vocab)[20]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two ids swapped, as a retrained tokenizer would
    path.write_text(json.dumps(data))
    err = run(mine, out, {"max_steps": 12}, expect=2)
    assert "tokenizer.json changed since" in err.strip().splitlines()[-1]


@pytest.mark.distributed
def test_case9_workers_of_a_killed_torchrun_save_and_exit(tok, tmp_path):
    """SIGKILL of the torchrun launcher: its two workers notice their parent is gone at the next step
    boundary, save a checkpoint together and exit, instead of training on as orphans."""
    import psutil

    out = tmp_path / "run"
    torchrun = Path(sys.executable).with_name("torchrun")
    launcher = subprocess.Popen([str(torchrun), "--nproc_per_node", "2", "--master_port", str(_free_port()),
                                 str(WORKER), str(tok), str(out), json.dumps({"max_steps": 100000,
                                                                                "run": {"log_every": 1}})],
                                env=_env(DS_ACCELERATOR="cpu"), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 180
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert launcher.poll() is None, launcher.communicate()[1][-3000:]
        assert time.time() < deadline, "training never started"
        time.sleep(0.1)
    workers = psutil.Process(launcher.pid).children(recursive=True)
    assert len(workers) >= 2
    launcher.kill()
    launcher.wait(timeout=30)
    gone, alive = psutil.wait_procs(workers, timeout=90)
    for p in alive:
        p.kill()
    assert not alive, f"{len(alive)} worker(s) kept running after their launcher died"
    assert list((out / "checkpoints").glob("step-*")), "the workers did not save before exiting"


def _free_port() -> int:
    from kompakt.dist import free_port

    return free_port()


def test_a_tokenizer_stage_edited_after_its_manifest_is_refused(tok, tmp_path):
    import shutil

    from kompakt.runs import artifact_digests, read_manifest, write_json_atomic

    mine = tmp_path / "tok"
    shutil.copytree(tok, mine)
    write_json_atomic(mine / "manifest.json", {**read_manifest(mine), "digests": artifact_digests(mine)})
    index = mine / "tokens" / "index.json"
    index.write_text(index.read_text().replace('"num_docs"', '"num_docs" ', 1))
    err = run(mine, tmp_path / "run", expect=2)
    assert "tokens/index.json differ from what its manifest recorded" in err.strip().splitlines()[-1]
