"""Checkpoints that survive a kill at any moment, and resume on any number of processes.

Layout of `<stage>/checkpoints/`:

    latest                      the newest complete tag, written last (DeepSpeed reads it too)
    step-00000017/              one complete checkpoint (a DeepSpeed tag directory):
        mp_rank_00_model_states.pt, *optim_states.pt    DeepSpeed's model, optimizer, scheduler
        rank-00000.pt ...       each rank's RNG states (python, numpy, torch, cuda) and data position
        model.safetensors       ZeRO 0 only: whole fp32 weights (export reads them)
        consolidated.pt         ZeRO 1-2 only: whole fp32 params + optimizer state, for another world size
        train_state.json        step, tokens seen, world size, model config, tokenizer path and digests
        files.json              size and BLAKE2b digest of every other file, for verification on resume
        complete                written before the rename; a tag without it is never loaded
    .tmp-step-00000020/         a save in progress (or one killed mid-way): ignored, then replaced

A save writes everything into `.tmp-<tag>`, waits for every rank, and rank 0 renames it to
`<tag>` (one atomic rename) and only then rewrites `latest`. A kill before the rename leaves the
previous checkpoint as the newest complete one; `resume: auto` picks it.

A complete checkpoint can still be damaged later (a disk error, a truncating copy, a user's
edit): resume verifies the newest one against its `files.json` (rank 0 hashes, about 1 s per GB)
and falls back to the newest intact one with a warning; with none intact it stops with one line.

Resuming on a different number of processes: a rank that did not exist before starts from fresh
RNG states seeded by (seed, rank, step), and the data position of rank 0 is handed to the data
loader, which re-splits it over the new ranks. ZeRO 0 keeps whole optimizer states and loads through DeepSpeed on any world size. DeepSpeed
refuses ZeRO 1-2 partitions of another world size (and its universal-checkpoint converter needs
Megatron's metadata), so a ZeRO 1-2 save also writes `consolidated.pt`: whole fp32 parameters,
optimizer moments, step and schedule, gathered with DeepSpeed's `safe_get_full_*` API; a resume on
another world size scatters it back with `safe_set_full_*`. ZeRO-3 resumes on the same world size.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from kompakt import dist
from kompakt.errors import KompaktError
from kompakt.log import warn
from kompakt.runs import content_digest, write_json_atomic

LATEST = "latest"
COMPLETE = "complete"
TRAIN_STATE = "train_state.json"
FILES = "files.json"
CONSOLIDATED = "consolidated.pt"
WEIGHTS = "model.safetensors"
# The optimizer state tensors of torch AdamW and of kompakt's Lamb, gathered for a world-size change.
_OPTIM_KEYS = ("exp_avg", "exp_avg_sq")
_TAG_RE = re.compile(r"^step-(\d+)$")


class CheckpointError(KompaktError):
    """A checkpoint path that does not exist, is incomplete or does not fit this run."""


def tag_for(step: int) -> str:
    return f"step-{step:08d}"


def _plain(obj: Any) -> Any:
    """numpy scalars and arrays -> Python ints/floats/lists, so `torch.load(weights_only=True)` reads them."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_plain(v) for v in obj)
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


def rng_state() -> dict:
    """The Python, numpy and torch (CPU and CUDA) generator states of this process."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def is_complete(tag_dir: Path) -> bool:
    return (Path(tag_dir) / COMPLETE).is_file() and (Path(tag_dir) / TRAIN_STATE).is_file()


def complete_tags(root: Path) -> list[Path]:
    """Complete checkpoint directories under `root`, oldest step first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for d in root.iterdir():
        m = _TAG_RE.match(d.name)
        if m and d.is_dir() and is_complete(d):
            found.append((int(m.group(1)), d))
    return [d for _, d in sorted(found)]


def newest_complete(root: Path) -> Path | None:
    tags = complete_tags(root)
    return tags[-1] if tags else None


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _ds(engine):
    """The DeepSpeed engine inside a `kompakt.engine.TrainEngine` (or the DeepSpeed engine itself)."""
    return getattr(engine, "ds", engine)


def _file_table(tag_dir: Path) -> dict[str, list]:
    """{relative path: [size, digest]} of every file in a checkpoint directory but the markers."""
    out = {}
    for path in sorted(p for p in Path(tag_dir).rglob("*") if p.is_file()):
        rel = path.relative_to(tag_dir).as_posix()
        if rel not in (FILES, COMPLETE):
            out[rel] = [path.stat().st_size, content_digest(path)]
    return out


def verify(tag_dir: Path) -> str | None:
    """None if the checkpoint is intact, else what is wrong with it (one line).

    Checks the markers, `train_state.json` and, when the save recorded `files.json`, every file's
    size and digest. Older checkpoints without `files.json` are only checked for the markers.
    """
    tag_dir = Path(tag_dir)
    if not is_complete(tag_dir):
        return f"{tag_dir} is incomplete (no {COMPLETE} marker or {TRAIN_STATE})"
    try:
        json.loads((tag_dir / TRAIN_STATE).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return f"{tag_dir / TRAIN_STATE} is not readable JSON"
    if not (tag_dir / FILES).is_file():
        return None
    try:
        recorded = json.loads((tag_dir / FILES).read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return f"{tag_dir / FILES} is not readable JSON"
    for rel, (size, digest) in sorted(recorded.items()):
        path = tag_dir / rel
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, {size} were saved (truncated?)"
        if content_digest(path) != digest:
            return f"{path} does not match the digest recorded at save time (corrupt)"
    return None


def save(engine, root: Path, step: int, train_state: dict, loader_state: Any, keep_last: int, zero_stage: int) -> Path:
    """Save a checkpoint of `step` from every rank (a collective: all ranks must call it).

    `train_state` (JSON-able: step, tokens seen, configs) is written by rank 0; `loader_state` and
    the RNG states are written by each rank into its own file.
    """
    root = Path(root)
    engine = _ds(engine)
    tag = tag_for(step)
    tmp_tag = f".tmp-{tag}"
    tmp = root / tmp_tag
    rank = dist.rank()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)  # left over from a save that was killed
    dist.barrier()
    engine.save_checkpoint(str(root), tag=tmp_tag, client_state={"kompakt_step": step}, save_latest=False)
    if zero_stage == 0:
        weights = whole_weights(engine)  # a collective under bf16 (fp32 masters are gathered)
        if rank == 0:
            from safetensors.torch import save_file

            save_file(weights, str(tmp / WEIGHTS))
            _fsync_file(tmp / WEIGHTS)
    if zero_stage in (1, 2):
        whole = consolidated_state(engine)  # a collective: every rank takes part in the gathers
        if rank == 0:
            torch.save(whole, tmp / CONSOLIDATED)
            _fsync_file(tmp / CONSOLIDATED)
    rank_file = tmp / f"rank-{rank:05d}.pt"
    torch.save({"rng": rng_state(), "loader": _plain(loader_state)}, rank_file)
    _fsync_file(rank_file)
    if os.environ.get("KOMPAKT_TEST_KILL_IN_SAVE") == str(step):
        os.kill(os.getpid(), 9)  # test hook: die after writing part of the checkpoint
    dist.barrier()
    final = root / tag
    if rank == 0:
        write_json_atomic(tmp / TRAIN_STATE, train_state)
        write_json_atomic(tmp / FILES, _file_table(tmp))
        (tmp / COMPLETE).write_text(f"{step}\n")
        _fsync_file(tmp / COMPLETE)
        if final.exists():  # the same step saved again after a resume: replace it
            shutil.rmtree(final)
        os.replace(tmp, final)
        latest_tmp = root / f".{LATEST}.tmp"
        latest_tmp.write_text(tag)
        _fsync_file(latest_tmp)
        os.replace(latest_tmp, root / LATEST)
        for old in complete_tags(root)[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return final


def _link_optimizer_fragments(engine) -> None:
    """Point every parameter's ZeRO fragment at its optimizer state.

    DeepSpeed 0.19 links them lazily after the first optimizer step, and then only for the first
    parameter group; relinking all groups is what `safe_{get,set}_full_optimizer_state` need.
    """
    opt = engine.optimizer
    opt._hp_optimizer_states_linked = False
    opt._lazy_init_hp_params_optimizer_state()


def whole_weights(engine) -> dict[str, torch.Tensor]:
    """fp32 copies of every parameter (the optimizer's fp32 masters where there are any), on the CPU."""
    from deepspeed.utils import safe_get_full_fp32_param

    engine = _ds(engine)
    out = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        out[name] = (full if full is not None else p).detach().float().cpu().contiguous()
    return out


def consolidated_state(engine) -> dict:
    """Whole fp32 parameters, AdamW/LAMB moments, optimizer step and schedule, gathered from ZeRO 1-2 partitions.

    A collective (every rank must call it). It costs a second copy of the model states (12 bytes
    per parameter) on rank 0's CPU, affordable for compact encoders (a 350M model: about 4 GB).
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    engine = _ds(engine)
    _link_optimizer_fragments(engine)
    params, moments = {}, {}
    for name, p in engine.module.named_parameters():
        params[name] = safe_get_full_fp32_param(p).detach().cpu()
        moments[name] = {k: safe_get_full_optimizer_state(p, k).detach().cpu() for k in _OPTIM_KEYS}
    base = engine.optimizer.optimizer
    step = float(next(iter(base.state.values()))["step"]) if base.state else 0.0
    return {"params": params, "moments": moments, "optim_step": step, "scheduler": engine.lr_scheduler.state_dict()}


def load_consolidated(engine, whole: dict) -> None:
    """Put a `consolidated_state` into a ZeRO 1-2 engine of any world size."""
    from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

    engine = _ds(engine)
    base = engine.optimizer.optimizer
    for group in base.param_groups:  # a fresh engine has no optimizer state yet: create it to fill in
        for flat in group["params"]:
            if not base.state.get(flat):
                on_device = group.get("fused") or group.get("capturable")
                base.state[flat] = {"step": torch.zeros((), dtype=torch.float32, device=flat.device if on_device else "cpu"),
                                    **{k: torch.zeros_like(flat) for k in _OPTIM_KEYS}}
    _link_optimizer_fragments(engine)
    for name, p in engine.module.named_parameters():
        full = whole["params"][name].to(p.device)
        safe_set_full_fp32_param(p, full)
        with torch.no_grad():
            p.data.copy_(full.to(p.dtype))  # ZeRO 1-2 keep the whole working copy on every rank
        for k, v in whole["moments"][name].items():
            safe_set_full_optimizer_state(p, v.to(p.device), k)
    for st in base.state.values():
        st["step"] = torch.full_like(st["step"], whole["optim_step"]) if torch.is_tensor(st["step"]) else whole["optim_step"]
    engine.lr_scheduler.load_state_dict(whole["scheduler"])
    for group, lr in zip(base.param_groups, engine.lr_scheduler.get_last_lr()):
        group["lr"] = lr


def read_train_state(tag_dir: Path) -> dict:
    tag_dir = Path(tag_dir)
    if not is_complete(tag_dir):
        raise CheckpointError(f"{tag_dir} is not a complete kompakt checkpoint (no {COMPLETE} marker or "
                              f"{TRAIN_STATE}); pass a step-* directory under checkpoints/")
    return json.loads((tag_dir / TRAIN_STATE).read_text(encoding="utf-8"))


def load(engine, tag_dir: Path, zero_stage: int, seed: int) -> tuple[dict, Any]:
    """Load model, optimizer, scheduler, this rank's RNG and data position; returns (train_state, loader_state).

    A collective: every rank calls it with the same `tag_dir`. A file that cannot be read is a
    `CheckpointError` naming it (verification on resume catches damage first when `files.json` exists).
    """
    tag_dir = Path(tag_dir)
    engine = _ds(engine)
    state = read_train_state(tag_dir)
    world, rank = dist.world_size(), dist.rank()
    if zero_stage == 3 and state["world_size"] != world:
        raise CheckpointError(f"{tag_dir} was saved by {state['world_size']} processes with ZeRO-3 and cannot load "
                              f"on {world}; resume on {state['world_size']} processes or with zero_stage 0-2")
    try:
        if zero_stage in (1, 2) and state["world_size"] != world:
            # DeepSpeed refuses ZeRO 1-2 optimizer partitions of another world size: use our whole copy.
            if not (tag_dir / CONSOLIDATED).is_file():
                raise CheckpointError(f"{tag_dir} has no {CONSOLIDATED} and was saved by {state['world_size']} "
                                      f"processes; resume on {state['world_size']} processes")
            load_consolidated(engine, torch.load(tag_dir / CONSOLIDATED, weights_only=True))
        else:
            load_path, _ = engine.load_checkpoint(str(tag_dir.parent), tag=tag_dir.name, load_optimizer_states=True,
                                                  load_lr_scheduler_states=True)
            if load_path is None:
                raise CheckpointError(f"DeepSpeed could not load {tag_dir}; the checkpoint files are missing")
        own = tag_dir / f"rank-{rank:05d}.pt"
        if state["world_size"] == world and own.is_file():
            rank_state = torch.load(own, weights_only=True)
            set_rng_state(rank_state["rng"])
            loader_state = rank_state["loader"]
        else:
            # Another world size: fresh RNG per rank, and rank 0's data position for the loader to re-split.
            seed_everything(seed + 1_000_003 * (rank + 1) + state["step"])
            loader_state = torch.load(tag_dir / "rank-00000.pt", weights_only=True)["loader"]
    except (OSError, RuntimeError, EOFError, ValueError, KeyError, pickle.UnpicklingError) as err:
        if isinstance(err, CheckpointError):
            raise
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"{tag_dir} cannot be loaded ({first[:200]}); delete it to resume from the "
                              f"previous checkpoint, or set run.resume to another step-* directory") from None
    return state, loader_state


def _newest_intact(root: Path) -> Path | None:
    """The newest complete checkpoint that verifies, warning about each damaged one passed over."""
    tags = complete_tags(root)
    for tag in reversed(tags):
        problem = verify(tag)
        if problem is None:
            return tag
        warn(f"checkpoint {tag.name} is damaged and skipped: {problem}")
    if tags:
        raise CheckpointError(f"{root}: none of the {len(tags)} complete checkpoint(s) is intact; restore them, or "
                              f"move {root} aside and resume=never to start over")
    return None


def resolve_resume(resume: str, root: Path) -> Path | None:
    """`auto` -> newest intact checkpoint under `root` or None; `never` -> None; else the given path.

    Rank 0 verifies (hashing reads every file once) and every rank gets its choice.
    """
    if resume == "never":
        return None
    if resume == "auto":
        chosen = _newest_intact(Path(root)) if dist.rank() == 0 else None
        step = dist.broadcast_int(int(_TAG_RE.match(chosen.name).group(1)) if chosen is not None else -1)
        return None if step < 0 else Path(root) / tag_for(step)
    path = Path(resume).expanduser()
    if not is_complete(path):
        raise CheckpointError(f"resume={resume}: not a complete checkpoint directory; pass a "
                              f"checkpoints/step-* directory, auto or never")
    problem = verify(path) if dist.rank() == 0 else None
    if dist.broadcast_int(problem is not None):
        raise CheckpointError(f"resume={resume}: {problem or 'the checkpoint is damaged'}")
    return path
