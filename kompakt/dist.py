"""Rank, world size and rendezvous from whichever launcher started us.

Launchers and what they set:

- `torchrun`, `deepspeed`: RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT
- `srun` (Slurm, one task per process): SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID and
  SLURM_NODELIST; the first host of the node list becomes MASTER_ADDR
- plain `python` / `kompakt`: nothing; a single process gets RANK=0, WORLD_SIZE=1,
  LOCAL_RANK=0, MASTER_ADDR=127.0.0.1 and a free MASTER_PORT

`setup_env()` writes the result back into `os.environ` because `torch.distributed`'s env://
rendezvous (used by DeepSpeed) reads it from there, even for a single process.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass

# Slurm's default port range for the rendezvous when MASTER_PORT is not given: derived from the job
# id so that two jobs sharing a node do not collide, in 20000-29999 (below the ephemeral range).
_SLURM_PORT_BASE = 20_000
_SLURM_PORT_SPAN = 10_000


@dataclass(frozen=True)
class DistEnv:
    """Where this process sits: its global rank, the number of processes, and its rank on the node."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port that is free on this host right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list: `gpu[012-015,020],cpu1` -> `gpu012`."""
    first = re.split(r",(?![^\[]*\])", nodelist.strip())[0]
    m = re.match(r"^([^\[]+)\[([^\]]+)\]", first)
    if not m:
        return first
    prefix, ranges = m.group(1), m.group(2)
    return prefix + ranges.split(",")[0].split("-")[0]


def detect() -> DistEnv:
    """Read the launcher's variables without changing anything."""
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        rank, world = int(env["RANK"]), int(env["WORLD_SIZE"])
        local = int(env.get("LOCAL_RANK", rank))
    elif "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        rank, world = int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"])
        local = int(env.get("SLURM_LOCALID", 0))
    else:
        rank, world, local = 0, 1, 0
    if "MASTER_ADDR" in env:
        addr = env["MASTER_ADDR"]
    elif "SLURM_NODELIST" in env and world > 1:
        addr = first_slurm_host(env["SLURM_NODELIST"])
    else:
        addr = "127.0.0.1"
    if "MASTER_PORT" in env:
        port = int(env["MASTER_PORT"])
    elif "SLURM_JOB_ID" in env and world > 1:
        port = _SLURM_PORT_BASE + int(env["SLURM_JOB_ID"]) % _SLURM_PORT_SPAN
    elif world > 1:
        raise RuntimeError("MASTER_PORT is not set for a multi-process run; launch with torchrun, srun or deepspeed")
    else:
        port = free_port()
    assert 0 <= rank < world, f"rank {rank} outside world size {world}"
    return DistEnv(rank, world, local, addr, port)


def setup_env() -> DistEnv:
    """Detect the launcher and export RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT."""
    d = detect()
    os.environ.update(RANK=str(d.rank), WORLD_SIZE=str(d.world_size), LOCAL_RANK=str(d.local_rank),
                      MASTER_ADDR=d.master_addr, MASTER_PORT=str(d.master_port))
    return d


def is_initialized() -> bool:
    import torch.distributed as tdist

    return tdist.is_available() and tdist.is_initialized()


def all_true(flag: bool, device=None) -> bool:
    """True only if `flag` is True on every rank (one all_reduce of a single int)."""
    return not any_true(not flag, device)


def any_true(flag: bool, device=None) -> bool:
    """True if `flag` is True on any rank; every rank gets the same answer."""
    import torch
    import torch.distributed as tdist

    if not is_initialized():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=device)
    tdist.all_reduce(t, op=tdist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    import torch.distributed as tdist

    if is_initialized():
        tdist.barrier()


def rank() -> int:
    """This process's rank in the process group; 0 before torch.distributed is initialised (alone)."""
    import torch.distributed as tdist

    return tdist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """The process group's size; 1 before torch.distributed is initialised (alone)."""
    import torch.distributed as tdist

    return tdist.get_world_size() if is_initialized() else 1


def detect_rank() -> int:
    """The launcher's rank without a rendezvous (0 for a plain process); cheap, never raises."""
    env = os.environ
    for var in ("RANK", "SLURM_PROCID"):
        if env.get(var, "").isdigit():
            return int(env[var])
    return 0


def broadcast_int(value: int, src: int = 0, device=None) -> int:
    """`value` of rank `src` on every rank (one small collective); the value itself without a group."""
    import torch
    import torch.distributed as tdist

    if not is_initialized():
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64, device=device)
    tdist.broadcast(t, src=src)
    return int(t.item())
