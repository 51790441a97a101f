"""Temporary stage folders of killed processes are removed by the next stage; live ones are kept."""

import os
import platform
import signal
import subprocess
import sys
import textwrap
import time

from kompakt.runs import (FOREIGN_ORPHAN_AGE_S, is_complete, is_shared_filesystem, open_stage,
                          process_start_time, stage_dir)

# A process that opens a stage and stays inside it, as a long data_prep or tokenizer stage does.
INSIDE = textwrap.dedent("""
    import sys, time
    from kompakt.runs import open_stage
    with open_stage(sys.argv[1], sys.argv[2], {}, {}) as run:
        (run.work_dir / "half.parquet").write_bytes(b"half")
        print(run.work_dir, flush=True)
        time.sleep(600)
""")


def _inside(run_dir, stage):
    p = subprocess.Popen([sys.executable, "-c", INSIDE, str(run_dir), stage], stdout=subprocess.PIPE,
                         text=True)
    work = p.stdout.readline().strip()
    assert work, "the stage process died before opening its stage"
    return p, os.path.basename(work)


def _hidden(run_dir):
    return sorted(p.name for p in run_dir.iterdir() if p.name.startswith("."))


def test_killed_stage_tmp_is_reaped_and_live_one_kept(tmp_path):
    killed, killed_tmp = _inside(tmp_path, "prepare_part")
    live, live_tmp = _inside(tmp_path, "tokenizer")
    try:
        killed.send_signal(signal.SIGKILL)
        # Wait for the exit without reaping it: the pid stays taken, by a zombie, as under a parent
        # that has not waited yet.
        os.waitid(os.P_PID, killed.pid, os.WEXITED | os.WNOWAIT)
        assert _hidden(tmp_path) == sorted([killed_tmp, live_tmp])
        with open_stage(tmp_path, "prepare", {"x": 1}, {}) as run:
            (run.work_dir / "out").write_text("ok")
        assert _hidden(tmp_path) == [live_tmp]
        killed.wait()
        assert is_complete(stage_dir(tmp_path, "prepare", {"x": 1}, {}))
    finally:
        live.kill()
        live.wait()


def test_reused_pid_old_style_and_other_hosts(tmp_path):
    """A live pid with another start time is a reused pid; another host's folder waits for its age."""
    host = platform.node()
    final = "prepare_part-0123456789ab"
    # This pid is alive, but the process that made the folder started at another tick: a reused pid.
    reused = tmp_path / f".{final}.tmp-{host}-{os.getpid()}-{process_start_time(os.getpid()) + 1}"
    foreign = tmp_path / f".{final}.tmp-other-node-{os.getpid()}-5"
    foreign_old = tmp_path / f".{final}.tmp-other-node-77-5"
    dead = subprocess.Popen([sys.executable, "-c", ""])
    dead.wait()
    legacy_dead = tmp_path / f".{final}.tmp-{dead.pid}"  # written before hosts were recorded
    legacy_live = tmp_path / f".{final}.tmp-{os.getpid()}"
    not_ours = tmp_path / ".cache-0123456789ab"
    for d in (reused, foreign, foreign_old, legacy_dead, legacy_live, not_ours):
        d.mkdir()
        (d / "f").write_text("x")
    old = time.time() - FOREIGN_ORPHAN_AGE_S - 60
    for p in (foreign_old / "f", foreign_old):
        os.utime(p, (old, old))
    with open_stage(tmp_path, "s", {}, {}):
        pass
    kept = [foreign, legacy_live, not_ours] + ([legacy_dead] if is_shared_filesystem(tmp_path) else [])
    assert _hidden(tmp_path) == sorted(d.name for d in kept)
