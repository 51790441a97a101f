"""DeepSpeed start-up without needless compiler builds and without hanging on a dead build's lock.

On CPU, `deepspeed.init_distributed` constructs `deepspeed.comm.torch.TorchBackend`, which JIT-builds
the `deepspeed_shm_comm` op (csrc/cpu/comm/shm.cpp, about 130 s on 2 cores) through
`torch.utils.cpp_extension.load` into `$TORCH_EXTENSIONS_DIR/deepspeed_shm_comm/` (default
`~/.cache/torch_extensions/py311_cpu/`). The op serves only `inference_all_reduce` (DeepSpeed
inference with tensor parallelism); training collectives go through gloo, so pretraining never
calls it. `prepare_deepspeed` marks it as not compatible, which `build_shm_op` honours.

torch serialises a build with a `FileBaton`: an empty `lock` file created with O_EXCL beside the
build and removed when it ends. A SIGKILL mid-build leaves the file, and every later build of that
op (a fused GPU optimizer, say) waits for it forever, printing nothing. The builder holds the lock
open while it builds, so a lock that no process on this host holds open is stale, unless another
host may be building into the same shared folder (a home directory on NFS).
"""

from __future__ import annotations

import glob
import os
import time
from pathlib import Path

from kompakt.errors import KompaktError
from kompakt.runs import is_shared_filesystem

SHM_COMM_OP = "deepspeed_shm_comm"
# On a shared filesystem a lock nobody here holds may be another host's build in progress; JIT
# builds take minutes (the CUDA ops up to about 10), so one unchanged for an hour is a dead build's.
SHARED_LOCK_STALE_S = 3600
# A builder releases its lock by closing it and then deleting it; a lock seen unheld twice this far
# apart is not one in that last instant.
_RECHECK_S = 0.5


def prepare_deepspeed() -> list[Path]:
    """Call before `deepspeed.init_distributed`: clear stale extension build locks; on CPU skip the shm op.

    Returns the lock files it removed. Raises KompaktError when a lock cannot be removed.
    """
    import torch

    removed = clear_stale_extension_locks()
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        skip_shm_comm_build()
    return removed


def skip_shm_comm_build() -> bool:
    """Stop `deepspeed.init_distributed` from JIT-building the CPU shared-memory comm op; True if done.

    DeepSpeed builds the op only when `deepspeed.ops.__compatible_ops__` lists it as compatible; the
    dict is probed once per process (0.15 s), so marking it here holds for the whole run. Without
    the op DeepSpeed's CPU backend all-reduces through torch.distributed (gloo), as training does anyway.
    """
    import deepspeed.ops
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return False
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if not isinstance(compatible, dict):
        return False
    compatible[SHM_COMM_OP] = False
    return True


def extension_lock_files() -> list[Path]:
    """torch's JIT build locks: `<root>/<name>/lock`, root being $TORCH_EXTENSIONS_DIR or every
    `<python>_<accelerator>` folder under torch's default build root."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if root:
        patterns = [os.path.join(root, "*", "lock")]
    else:
        from torch.utils.cpp_extension import get_default_build_root

        base = get_default_build_root()
        patterns = [os.path.join(base, "*", "*", "lock"), os.path.join(base, "*", "lock")]
    return sorted({Path(p) for pat in patterns for p in glob.glob(pat)})


def lock_holders(lock: Path) -> bool | None:
    """Whether a process on this host holds `lock` open: True, False, or None when it cannot be told.

    Looks through /proc/<pid>/fd; a process of the lock's owner whose descriptors cannot be read
    makes the answer unknown.
    """
    try:
        st = os.stat(lock)
    except FileNotFoundError:
        return False
    if not os.path.isdir("/proc/self/fd"):
        return None
    unknown = False
    real = os.path.realpath(lock)
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        fd_dir = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(fd_dir)
        except PermissionError:
            try:
                unknown |= os.stat(f"/proc/{pid}").st_uid == st.st_uid
            except OSError:
                pass
            continue
        except OSError:  # exited meanwhile
            continue
        for fd in fds:
            try:
                target = os.readlink(f"{fd_dir}/{fd}")
                # Compare names first, so no file is stat'ed that might sit on a hung mount.
                if target != real and os.path.basename(target) != "lock":
                    continue
                t = os.stat(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if (t.st_dev, t.st_ino) == (st.st_dev, st.st_ino):
                return True
    return None if unknown else False


def clear_stale_extension_locks(shared_stale_s: float = SHARED_LOCK_STALE_S) -> list[Path]:
    """Remove torch extension build locks left by killed builds; returns the ones removed.

    A lock is removed when no process on this host holds it and either its folder is on a local
    filesystem or the lock is older than `shared_stale_s`. A younger unheld lock on a shared
    filesystem may be another host's build, so it stays and one warning names it (the start would
    otherwise wait on it in silence). A stale lock that cannot be deleted raises KompaktError.
    """
    from kompakt.log import warn

    removed = []
    for lock in extension_lock_files():
        try:
            st = lock.stat()
        except FileNotFoundError:
            continue
        held = lock_holders(lock)
        if held:
            continue  # a build in progress; torch waits for it to finish
        age = time.time() - st.st_mtime
        if held is None or (is_shared_filesystem(lock.parent) and age < shared_stale_s):
            warn(f"the torch extension build lock {lock} ({age:.0f} s old) is held by no process seen on "
                 "this host; DeepSpeed waits until it disappears. If no other machine is building into "
                 f"that folder, delete it: rm {lock}")
            continue
        time.sleep(_RECHECK_S)
        try:
            again = lock.stat()
        except FileNotFoundError:
            continue  # a builder was just releasing it
        if (again.st_dev, again.st_ino) != (st.st_dev, st.st_ino) or lock_holders(lock):
            continue  # a new build took the lock meanwhile
        try:
            lock.unlink()
        except FileNotFoundError:
            continue  # another rank on this host removed it first
        except OSError as err:
            raise KompaktError(f"{lock} is a stale torch extension build lock (its build was killed) and "
                               f"cannot be removed ({err.strerror}); delete it, then rerun") from None
        warn(f"removed the stale torch extension build lock {lock} (its build was killed, {age:.0f} s ago)")
        removed.append(lock)
    return removed
