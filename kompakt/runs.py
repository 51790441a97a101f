"""Run directories and manifests.

Every stage writes into `<run_dir>/<stage>-<hash>/`. The hash covers the stage's resolved config
and the hashes of its inputs (upstream stage hashes or raw-file fingerprints), so a changed config
gives a new directory and nothing is overwritten in place.

A stage is built in a temporary sibling (`.<stage>-<hash>.tmp-<host>-<pid>-<start>`, where `start`
is the process's start time in clock ticks since boot) and renamed into place only after
`manifest.json` with `complete: true` has been written; a failed or killed stage therefore never
leaves a directory that looks complete. A complete stage is skipped on re-run unless forced.
A SIGKILL cannot clean up, so `open_stage` first removes the temporary directories of processes
that are gone (see `reap_orphans`).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

from kompakt.errors import DataError

MANIFEST = "manifest.json"
RESOLVED_CONFIG = "config.json"
# Bump when an artifact format changes, so old stage directories are not mistaken for new ones.
FORMAT_VERSION = 1
_VERSIONED_PACKAGES = ("kompakt", "torch", "transformers", "tokenizers", "datasets", "deepspeed", "numpy",
                       "pyarrow", "datasketch", "lingua-language-detector", "pydantic")


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def hash_obj(obj: Any, n: int = 12) -> str:
    """A short, stable hex digest of JSON-able data."""
    return hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()[:n]


def file_fingerprint(path: Path, full_limit: int = 256 << 20, chunk: int = 16 << 20) -> str:
    """Content hash of a raw input: whole below `full_limit` bytes, else size plus head and tail.

    Content rather than mtime, so a corpus copied to another machine keeps its stage hashes. A
    directory (a `datasets.save_to_disk` folder, say) hashes the relative path and fingerprint of
    every file under it, in sorted order, each file under the same head/tail rule.
    """
    path = Path(path)
    if path.is_dir():
        return _dir_fingerprint(path, full_limit, chunk)
    size = path.stat().st_size
    h = hashlib.blake2b(digest_size=16)
    h.update(str(size).encode())
    with open(path, "rb") as f:
        if size <= full_limit:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        else:
            h.update(f.read(chunk))
            f.seek(size - chunk)
            h.update(f.read(chunk))
    return h.hexdigest()


def _dir_fingerprint(root: Path, full_limit: int, chunk: int) -> str:
    h = hashlib.blake2b(digest_size=16)
    h.update(b"dir\0")  # a folder never hashes like a file whose bytes happen to match
    seen: set[str] = set()
    # followlinks so a folder of symlinks into a shared store is hashed by what it points at;
    # `seen` (real paths) stops a link loop.
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames.sort()
        for name in sorted(filenames):
            f = Path(dirpath) / name
            rel = f.relative_to(root).as_posix()
            if not f.exists():
                raise DataError(f"{f}: a broken symlink in the input folder {root}; fix or remove it")
            h.update(f"{rel}\0{file_fingerprint(f, full_limit, chunk)}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


# errno -> (what happened, what to do); `disk_error_message` turns these into the CLI's one line.
_DISK_ERRORS = {
    errno.ENOSPC: ("no space left on the device",
                   "free space there or set run_dir to a larger disk, then rerun"),
    errno.EDQUOT: ("disk quota exceeded",
                   "free space within your quota or set run_dir elsewhere, then rerun"),
    errno.EROFS: ("read-only file system",
                  "set run_dir to a writable place or remount it read-write, then rerun"),
    errno.EACCES: ("permission denied",
                   "give this user access to it (read for inputs, write for run_dir) or choose another path, "
                   "then rerun"),
}


def disk_error_message(err: OSError) -> str | None:
    """One line for a full disk, an exceeded quota, a read-only or a forbidden path; None for other errors.

    Names `err.filename`; a failed write often has none (pyarrow and `write()` give only the errno),
    so `open_stage` re-raises such an error with the stage directory as its filename.
    """
    if err.errno not in _DISK_ERRORS:
        return None
    what, todo = _DISK_ERRORS[err.errno]
    where = f"{err.filename}" if err.filename else "a file being written (rerun with --debug to see which)"
    if err.filename2:
        where += f" -> {err.filename2}"
    return f"{what}: {where}; {todo} (earlier outputs are intact)"


def content_digest(path: Path) -> str:
    """BLAKE2b-128 of a file's bytes (an artifact's identity, recorded in manifests and checkpoints)."""
    h = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(4 << 20), b""):
            h.update(block)
    return h.hexdigest()


# The files that say what a tokenizer stage's token ids mean, relative to its directory.
TOKENIZER_ARTIFACTS = ("tokenizer/tokenizer.json", "tokens/index.json", "heldout/index.json")


def artifact_digests(stage_dir_: Path, names=TOKENIZER_ARTIFACTS) -> dict[str, str]:
    """{relative path: digest} of the named files that exist under a stage directory."""
    return {n: content_digest(Path(stage_dir_) / n) for n in names if (Path(stage_dir_) / n).is_file()}


def package_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _VERSIONED_PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def read_manifest(stage_dir: Path) -> dict | None:
    try:
        return json.loads((Path(stage_dir) / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def is_complete(stage_dir: Path) -> bool:
    m = read_manifest(stage_dir)
    return bool(m and m.get("complete") is True)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to a temporary name, fsync and rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False, sort_keys=True, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


@dataclass
class StageRun:
    """What a stage body gets: where to write, and a place to record counts and timings."""

    name: str
    hash: str
    final_dir: Path
    work_dir: Path
    config: dict
    inputs: dict[str, str]
    counts: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)

    @contextmanager
    def timed(self, what: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.timings[what] = round(self.timings.get(what, 0.0) + time.perf_counter() - t0, 4)


def stage_hash(stage: str, config: dict, inputs: dict[str, str]) -> str:
    return hash_obj({"stage": stage, "format": FORMAT_VERSION, "config": config, "inputs": inputs})


def stage_dir(run_dir: str | Path, stage: str, config: dict, inputs: dict[str, str]) -> Path:
    return Path(run_dir) / f"{stage}-{stage_hash(stage, config, inputs)}"


# Filesystems that several hosts can mount at once: a process id there may belong to another host.
_SHARED_FS = ("nfs", "nfs4", "lustre", "gpfs", "beegfs", "cifs", "smb3", "smbfs", "ceph", "glusterfs",
              "fuse", "9p", "afs", "pvfs2", "orangefs", "wekafs", "panfs", "virtiofs")
# A temporary directory from another host (or of unknown origin on a shared filesystem) is removed
# only when nothing in it changed for this long: a stage over a large corpus runs for a day or more.
FOREIGN_ORPHAN_AGE_S = 7 * 24 * 3600
_TMP_RE = re.compile(r"^\.(?P<final>.+-[0-9a-f]{12})\.(?:tmp|old)-(?P<host>.+)-(?P<pid>\d+)-(?P<start>\d+)$")
# Names written before the host and start time were recorded: `.<stage>-<hash>.tmp-<pid>`.
_LEGACY_TMP_RE = re.compile(r"^\.(?P<final>.+-[0-9a-f]{12})\.(?:tmp|old)-(?P<pid>\d+)$")


def host_tag() -> str:
    """This host's name, safe inside a file name."""
    return re.sub(r"[^A-Za-z0-9._]", "_", platform.node()) or "localhost"


def _proc_stat(pid: int) -> tuple[str, int]:
    """(state, start time in clock ticks since boot) from /proc/<pid>/stat (fields 3 and 22)."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # The command name (field 2) is in parentheses and may hold spaces or ')', so split after the last ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    return fields[0], int(fields[19])


def process_start_time(pid: int) -> int | None:
    """A process's start time in clock ticks since boot; None where /proc cannot tell.

    With the pid it names one process: a pid reused after a kill has another start time.
    """
    try:
        return _proc_stat(pid)[1]
    except (OSError, ValueError, IndexError):
        return None


def process_alive(pid: int, start_time: int | None = None) -> bool:
    """Whether process `pid` runs on this host (and, given `start_time`, is still the same process).

    A zombie counts as gone: it writes nothing any more. Where the start time cannot be read (no
    /proc, or another user's process hidden by `hidepid`), a pid that exists counts as alive.
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass  # another user's process
    try:
        state, now = _proc_stat(pid)
    except FileNotFoundError:
        return not Path("/proc/self/stat").exists()  # exited just now; without /proc, trust kill()
    except (OSError, ValueError, IndexError):
        return True
    if state in ("Z", "X"):
        return False
    return start_time is None or now == start_time


def filesystem_type(path: Path) -> str | None:
    """The filesystem type holding `path` (its longest mount point in /proc/self/mountinfo), or None."""
    try:
        lines = Path("/proc/self/mountinfo").read_text().splitlines()
    except OSError:
        return None
    real = os.path.realpath(path)
    best, best_type = "", None
    for line in lines:
        left, _, right = line.partition(" - ")
        fields = left.split()
        if len(fields) < 5 or not right:
            continue
        mount = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), fields[4])
        if (real == mount or real.startswith(mount.rstrip("/") + "/")) and len(mount) >= len(best):
            best, best_type = mount, right.split()[0]
    return best_type


def is_shared_filesystem(path: Path) -> bool:
    """Whether other hosts may write under `path` (NFS, Lustre, GPFS, ...); True when it cannot be told."""
    fs = filesystem_type(path)
    return fs is None or fs.split(".")[0] in _SHARED_FS


def _newest_mtime(d: Path) -> float:
    """The newest mtime of a directory and its direct entries: a stage writing into it touches them."""
    newest = d.stat().st_mtime
    with os.scandir(d) as it:
        for e in it:
            try:
                newest = max(newest, e.stat(follow_symlinks=False).st_mtime)
            except OSError:
                pass
    return newest


def reap_orphans(run_dir: str | Path, foreign_age_s: float = FOREIGN_ORPHAN_AGE_S) -> list[Path]:
    """Remove the temporary stage directories in `run_dir` whose process is gone; returns them.

    One of this host's is an orphan when its pid is not running, or runs with another start time
    (the pid was reused). Another host's pid cannot be checked, so its directory, like an old-style
    one (`.tmp-<pid>`, no host) on a shared filesystem, goes only after `foreign_age_s` without change.
    """
    run_dir = Path(run_dir)
    try:
        entries = list(os.scandir(run_dir))
    except OSError:
        return []
    host, removed, shared = host_tag(), [], None
    for e in entries:
        if not e.name.startswith(".") or not e.is_dir(follow_symlinks=False):
            continue
        m, legacy = _TMP_RE.match(e.name), _LEGACY_TMP_RE.match(e.name)
        if m is None and legacy is None:
            continue
        path = Path(e.path)
        if m is not None and m["host"] == host:
            orphan = not process_alive(int(m["pid"]), int(m["start"]))
        else:
            if legacy is not None and shared is None:
                shared = is_shared_filesystem(run_dir)
            if legacy is not None and not shared:
                orphan = not process_alive(int(legacy["pid"]))
            else:
                try:
                    orphan = time.time() - _newest_mtime(path) > foreign_age_s
                except OSError:
                    continue
        if orphan:
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                removed.append(path)
    return removed


def _own_tmp_name(final: Path, kind: str) -> Path:
    pid = os.getpid()
    return final.with_name(f".{final.name}.{kind}-{host_tag()}-{pid}-{process_start_time(pid) or 0}")


@contextmanager
def open_stage(run_dir: str | Path, stage: str, config: dict, inputs: dict[str, str]) -> Iterator[StageRun]:
    """Build a stage directory atomically.

    The body writes into `run.work_dir`; on success the manifest (with `complete: true` last) is
    written and the work directory is renamed to `run.final_dir`, replacing an older one only now.
    On any exception the work directory is removed and nothing that looks complete remains; a full
    disk or read-only run directory is re-raised naming the stage directory (see
    `disk_error_message`). First, temporary directories left by killed processes are removed.
    """
    final = stage_dir(run_dir, stage, config, inputs)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        _raise_naming(err, final.parent)
    removed = reap_orphans(final.parent)
    if removed:
        from kompakt.log import info

        info(f"removed {len(removed)} temporary stage folder(s) left by killed runs: "
             + ", ".join(p.name for p in removed))
    work = _own_tmp_name(final, "tmp")
    try:
        if work.exists():
            shutil.rmtree(work)
        work.mkdir(parents=True)
    except OSError as err:
        _raise_naming(err, final.parent, work)
    run = StageRun(stage, final.name.rsplit("-", 1)[1], final, work, config, inputs)
    t0 = time.perf_counter()
    try:
        write_json_atomic(work / RESOLVED_CONFIG, config)
        yield run
        run.timings["total_s"] = round(time.perf_counter() - t0, 4)
        manifest = {
            "stage": stage,
            "hash": run.hash,
            "config": config,
            "inputs": inputs,
            "versions": package_versions(),
            "host": platform.node(),
            "argv": sys.argv,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "counts": run.counts,
            "timings": run.timings,
            **run.extra,
            "complete": True,
        }
        write_json_atomic(work / MANIFEST, manifest)
    except OSError as err:
        shutil.rmtree(work, ignore_errors=True)
        _raise_naming(err, final, work)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    if final.exists():  # only with --force: move the old one aside, then swap, then delete it
        trash = _own_tmp_name(final, "old")
        os.replace(final, trash)
        os.replace(work, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(work, final)


def _raise_naming(err: OSError, path: Path, work: Path | None = None) -> None:
    """Re-raise `err`. A disk error without a file name (a failed write has none) names `path`; one
    naming the hidden work directory, which is gone when the user reads it, names its place in `path`."""
    if err.errno in _DISK_ERRORS:
        name = str(err.filename) if err.filename is not None else ""
        inside = work is not None and (name == str(work) or name.startswith(f"{work}{os.sep}"))
        if not name or inside or work is None:
            if inside and name != str(work):
                path = path / os.path.relpath(name, work)
            raise OSError(err.errno, os.strerror(err.errno), str(path)) from err
    raise err


def git_commit() -> str | None:
    """The commit of this checkout (None outside a git checkout), for reports and benchmark records."""
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=Path(__file__).resolve().parent).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
