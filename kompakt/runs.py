"""Run directories and manifests.

Every stage writes into `<run_dir>/<stage>-<hash>/`. The hash covers the stage's resolved config
and the hashes of its inputs (upstream stage hashes or raw-file fingerprints), so a changed config
gives a new directory and nothing is overwritten in place.

A stage is built in a temporary sibling (`.<stage>-<hash>.tmp-<pid>`) and renamed into place only
after `manifest.json` with `complete: true` has been written; a failed or killed stage therefore
never leaves a directory that looks complete. A complete stage is skipped on re-run unless forced.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

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
    """Content hash of a raw input file: whole below `full_limit` bytes, else size plus head and tail.

    Content rather than mtime, so a corpus copied to another machine keeps its stage hashes.
    """
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


@contextmanager
def open_stage(run_dir: str | Path, stage: str, config: dict, inputs: dict[str, str]) -> Iterator[StageRun]:
    """Build a stage directory atomically.

    The body writes into `run.work_dir`; on success the manifest (with `complete: true` last) is
    written and the work directory is renamed to `run.final_dir`, replacing an older one only now.
    On any exception the work directory is removed and nothing that looks complete remains.
    """
    final = stage_dir(run_dir, stage, config, inputs)
    final.parent.mkdir(parents=True, exist_ok=True)
    work = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    if work.exists():
        shutil.rmtree(work)
    work.mkdir(parents=True)
    run = StageRun(stage, final.name.rsplit("-", 1)[1], final, work, config, inputs)
    write_json_atomic(work / RESOLVED_CONFIG, config)
    t0 = time.perf_counter()
    try:
        yield run
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
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
    if final.exists():  # only with --force: move the old one aside, then swap, then delete it
        trash = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, trash)
        os.replace(work, final)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(work, final)
