"""A read-only or full run directory is one error line and exit 2; earlier outputs stay as they were.

Tests run as root, where chmod does not stop a write, so each test mounts a real tmpfs (read-only,
or a few hundred KB) inside a private mount namespace (`unshare -m`): the mount cannot outlive the
test, and nobody else on the machine sees it. The driver prints what it saw into `out/`.
"""

import shutil
import subprocess
import sys
import textwrap

import pytest

from kompakt.runs import is_complete

DRIVER_HEAD = textwrap.dedent("""
    set -u
    mnt=$1; out=$2; recipe=$3; shift 3
    mkdir -p "$mnt"
    kompakt() { "$PY" -m kompakt.cli prepare "$recipe" "run_dir=$mnt/run" "$@"; }
    snapshot() {
        (cd "$mnt" && find . | sort && find . -type f -print0 | sort -z | xargs -0 -r sha256sum) > "$out/$1"
    }
""")


def _can_mount() -> str | None:
    """Why tmpfs cannot be mounted in a private namespace here, or None when it can."""
    if shutil.which("unshare") is None:
        return "unshare is not installed"
    probe = subprocess.run(["unshare", "-m", "--propagation", "private", "sh", "-c",
                            "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d && rmdir $d"],
                           capture_output=True, text=True)
    if probe.returncode != 0:
        return f"cannot mount a tmpfs in a private namespace: {probe.stderr.strip()}"
    return None


pytestmark = pytest.mark.skipif(_can_mount() is not None, reason=str(_can_mount()))


def _drive(tmp_path, body, recipe, inputs):
    out = tmp_path / "out"
    out.mkdir()
    script = DRIVER_HEAD + textwrap.dedent(body)
    env_py = f"PY={sys.executable}"
    proc = subprocess.run(["unshare", "-m", "--propagation", "private", "env", env_py, "bash", "-c", script,
                           "drv", str(tmp_path / "mnt"), str(out), str(recipe), *inputs],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return out


def _one_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr[-4000:]
    lines = [ln for ln in stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 1 and stderr.rstrip().endswith(lines[0]), stderr[-4000:]
    return lines[0]


def test_read_only_run_dir(repo, tmp_path, demo_docs):
    corpus = tmp_path / "small.txt"
    corpus.write_text("\n\n".join(demo_docs[:200]), encoding="utf-8")
    out = _drive(tmp_path, """
        mount -t tmpfs -o size=16m tmpfs "$mnt" || exit 10
        kompakt "$@" 2> "$out/first.err" || exit 11
        snapshot before
        mount -o remount,ro "$mnt" || exit 12
        # A changed config is a new stage directory, which cannot be made now.
        kompakt "$@" data.min_chars=21 2> "$out/ro.err"; echo $? > "$out/ro.rc"
        snapshot after
    """, repo / "recipes" / "demo-nb.yaml", [f"data.inputs=[{corpus}]", "data.num_proc=1"])
    assert (out / "ro.rc").read_text().strip() == "2"
    line = _one_error_line((out / "ro.err").read_text())
    assert line.startswith(f"error: read-only file system: {tmp_path / 'mnt' / 'run'};"), line
    assert "run_dir" in line
    before = (out / "before").read_text()
    assert "./run/prepare-" in before and "manifest.json" in before
    assert (out / "after").read_text() == before  # the earlier stages, byte for byte, and nothing new


def test_full_disk_run_dir(repo, tmp_path):
    out = _drive(tmp_path, """
        mount -t tmpfs -o size=512k tmpfs "$mnt" || exit 10
        kompakt 2> "$out/full.err"; echo $? > "$out/full.rc"
        snapshot after
        # What is left must not look complete: copy every manifest out for the test to read.
        mkdir -p "$out/manifests"
        (cd "$mnt" && find . -name manifest.json -print0 | xargs -0 -r cp --parents -t "$out/manifests")
        df -k "$mnt" | tail -1 > "$out/df"
    """, repo / "recipes" / "demo-nb.yaml", [])
    assert (out / "full.rc").read_text().strip() == "2"
    line = _one_error_line((out / "full.err").read_text())
    assert line.startswith(f"error: no space left on the device: {tmp_path / 'mnt' / 'run'}/"), line
    after = (out / "after").read_text()
    assert ".tmp-" not in after and ".old-" not in after, after  # the half-written stage is gone
    # A stage directory may remain only if it is complete (a part that fitted before the merge did not).
    paths = [ln for ln in after.splitlines() if ln.startswith("./run/")]
    stage_dirs = {ln.split("/")[2] for ln in paths}
    for name in stage_dirs:
        assert is_complete(out / "manifests" / "run" / name), name
    assert not any(name.startswith("prepare-") for name in stage_dirs)
