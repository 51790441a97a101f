"""A build lock left by a killed DeepSpeed op build no longer hangs every later start.

On CPU `deepspeed.init_distributed` JIT-builds the shm comm op under torch's FileBaton lock
(`$TORCH_EXTENSIONS_DIR/deepspeed_shm_comm/lock`); a SIGKILL mid-build leaves the lock and the next
start waits for it forever. Each test makes the lock the way a killed builder leaves it: a real
process acquires torch's FileBaton and is SIGKILLed while holding it.
"""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from kompakt.dist import free_port
from kompakt.ds_ops import SHM_COMM_OP, clear_stale_extension_locks

# What kompakt's engine does at start-up: init_distributed, then initialize on a (tiny) model.
START = textwrap.dedent("""
    import sys, torch
    print("init_distributed", flush=True)
    if sys.argv[1] == "prepared":  # kompakt's own start-up path
        from kompakt.dist import setup_env
        from kompakt.engine import init_distributed
        init_distributed(setup_env())
    import deepspeed
    if sys.argv[1] != "prepared":
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False, rank=0,
                                   world_size=1)
    model = torch.nn.Linear(8, 8)
    config = {"train_micro_batch_size_per_gpu": 1, "train_batch_size": 1, "steps_per_print": 2**31 - 1}
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters()),
                                           config=config)
    engine.backward(engine(torch.ones(1, 8)).sum())
    engine.step()
    print("started", flush=True)
""")

HOLD = textwrap.dedent("""
    import sys, time
    from torch.utils.file_baton import FileBaton
    assert FileBaton(sys.argv[1]).try_acquire()
    print("held", flush=True)
    time.sleep(600)
""")


def _env(ext_dir):
    env = dict(os.environ, TORCH_EXTENSIONS_DIR=str(ext_dir), DS_ACCELERATOR="cpu", RANK="0", WORLD_SIZE="1",
               LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    env.pop("CUDA_VISIBLE_DEVICES", None)
    return env


def _hold(lock, env):
    """A process holding torch's build lock, as a builder does while it compiles."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    p = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE, text=True, env=env)
    assert p.stdout.readline().strip() == "held"
    return p


def _killed_build_lock(ext_dir, env, op=SHM_COMM_OP):
    lock = ext_dir / op / "lock"
    p = _hold(lock, env)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert lock.exists()
    return lock


@pytest.mark.slow  # waits out a deliberate 60 s hang
def test_stale_lock_hangs_an_unprepared_start(tmp_path):
    """The hazard is real: without prepare_deepspeed the start waits on the dead build's lock."""
    env = _env(tmp_path / "ext")
    lock = _killed_build_lock(tmp_path / "ext", env)
    with pytest.raises(subprocess.TimeoutExpired) as hung:
        subprocess.run([sys.executable, "-c", START, "plain"], capture_output=True, text=True, env=env,
                       timeout=60)
    out = hung.value.stdout.decode() if isinstance(hung.value.stdout, bytes) else (hung.value.stdout or "")
    assert "init_distributed" in out and "started" not in out
    # Waiting on the lock, not compiling: torch writes build.ninja only once it holds the lock.
    assert lock.exists() and not (lock.parent / "build.ninja").exists()


def test_prepared_start_ignores_stale_lock_and_builds_nothing(tmp_path):
    env = _env(tmp_path / "ext")
    lock = _killed_build_lock(tmp_path / "ext", env)
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", START, "prepared"], capture_output=True, text=True, env=env,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "started" in proc.stdout
    assert f"removed the stale torch extension build lock {lock}" in proc.stderr
    assert not lock.exists()
    # No JIT build at all on CPU: nothing compiled, no compiler needed, no lock taken.
    assert not list((tmp_path / "ext").rglob("*.so")) and not list((tmp_path / "ext").rglob("build.ninja"))
    assert time.monotonic() - t0 < 120


def test_lock_of_a_live_build_is_kept(tmp_path, monkeypatch):
    env = _env(tmp_path / "ext")
    live = _hold(tmp_path / "ext" / "fused_lamb" / "lock", env)
    try:
        stale = _killed_build_lock(tmp_path / "ext", env, op="cpu_adam")
        monkeypatch.setenv("TORCH_EXTENSIONS_DIR", env["TORCH_EXTENSIONS_DIR"])
        assert clear_stale_extension_locks() == [stale]
        assert (tmp_path / "ext" / "fused_lamb" / "lock").exists() and not stale.exists()
    finally:
        live.kill()
        live.wait()
