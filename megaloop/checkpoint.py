"""Crash-safe checkpoints.

Layout: RUN_DIR/checkpoints/step_00000100/{meta.json, model.pt, optim.pt, trainer.pt, rank*.pt}
and RUN_DIR/checkpoints/latest (a one-line pointer). A checkpoint is written into a hidden
temporary folder, every file is fsynced, the folder is renamed into place (atomic on POSIX), and
only then is `latest` replaced (write-temp + fsync + rename). So `latest` only ever names a
complete checkpoint; a crash mid-save leaves at most a stray temp folder, which is ignored and
cleaned up by the next save. Old checkpoints are deleted only after the new one is complete.
Under several ranks the checkpoint is published only after every rank has written its files: a
rank that fails mid-save never reaches that point, and the others are stopped (parallel/failfast).
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
import threading
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch

from .errors import UserError

STEP_RE = re.compile(r"^step_(\d{8})$")
META = "meta.json"
# Held while a checkpoint is renamed into place and `latest` replaced: a rank stopped because
# another rank failed waits for it, so it never exits between the two steps.
PUBLISH_LOCK = threading.Lock()


class CheckpointError(UserError):
    pass


# What to do about the causes a save can meet; anything else is named as is.
_FIXES = {
    errno.ENOSPC: "free disk space", errno.EDQUOT: "free some of your disk quota",
    errno.EACCES: "fix the run directory's permissions", errno.EPERM: "fix the run directory's permissions",
    errno.EROFS: "put the run directory on a writable file system",
    errno.ENOENT: "a file or folder of the save vanished while it was written: make sure no other process "
                  "writes to this run directory",
    errno.ESTALE: "the network file system dropped the file handle: check the mount",
    errno.EIO: "the storage reported an I/O error: check the disk or the mount",
}


def os_error_cause(e: OSError) -> tuple[str, str]:
    """(the real cause, with errno name and path; the fix for it) of a failed write."""
    name = errno.errorcode.get(e.errno, "") if e.errno else ""
    cause = f"{e.strerror or e}" + (f" ({name})" if name else "") + (f": {e.filename}" if e.filename else "")
    return cause, _FIXES.get(e.errno, "fix that")


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_atomic(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


@contextmanager
def atomic_output_dir(out: str, prefix: str = ".tmp_out_") -> Iterator[str]:
    """Yield a temporary folder beside `out`; on success it replaces `out` in one rename, on any
    failure it is removed, so `out` is either the old folder or the complete new one."""
    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        yield tmp
        if os.path.exists(out):
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def torch_save_synced(obj: Any, path: str) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def torch_save_atomic(obj: Any, path: str) -> None:
    """Replace one file of a published checkpoint: readers see the old file or the new one."""
    tmp = f"{path}.tmp{os.getpid()}"
    torch_save_synced(obj, tmp)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")


def check_out_dir(out: str, sources: list, force: bool) -> None:
    """An output folder (export, convert) must lie outside every source: one that is a source,
    holds one or lies inside one would destroy it when --force replaces it. It must also be a
    folder, and empty unless --force."""
    o = os.path.realpath(out)
    for src in sources:
        s = os.path.realpath(src)
        common = os.path.commonpath([o, s])
        if common in (o, s):
            how = "is" if o == s else ("holds" if common == o else "is inside")
            raise UserError(f"--out {out} {how} the source {src}: writing there (and replacing it with --force) "
                            f"would destroy the source. Choose an --out folder outside {src} (nothing was changed)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--out {out} exists and is a file, not a folder; choose another --out")
    if os.path.exists(out) and os.listdir(out) and not force:
        raise UserError(f"{out} exists and is not empty; choose another --out or pass --force")


def ckpt_root(run_dir: str) -> str:
    return os.path.join(run_dir, "checkpoints")


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


def list_complete(run_dir: str) -> list[int]:
    root = ckpt_root(run_dir)
    if not os.path.isdir(root):
        return []
    steps = []
    for name in os.listdir(root):
        m = STEP_RE.match(name)
        if m and os.path.isfile(os.path.join(root, name, META)):
            steps.append(int(m.group(1)))
    return sorted(steps)


def latest_path(run_dir: str) -> Optional[str]:
    """The checkpoint named by `latest`, verified complete; None when there is none."""
    root = ckpt_root(run_dir)
    ptr = os.path.join(root, "latest")
    if not os.path.isfile(ptr):
        return None
    with open(ptr) as f:
        name = f.read().strip()
    path = os.path.join(root, name)
    if not STEP_RE.match(name) or not os.path.isfile(os.path.join(path, META)):
        raise CheckpointError(
            f"{ptr} names '{name}', which is not a complete checkpoint. Point it at one of "
            f"{[step_dir_name(s) for s in list_complete(run_dir)]} or start a fresh run directory")
    return path


def save(run_dir: str, step: int, write_files: Callable[[str], None], meta: dict, keep: int,
         is_writer: bool = True, barrier: Callable[[], None] = lambda: None) -> str:
    """Write a checkpoint for `step` through `write_files(tmp_dir)` (called on every rank, each
    writing its own files), then publish it atomically from the writer rank."""
    root = ckpt_root(run_dir)
    final = os.path.join(root, step_dir_name(step))
    tmp = os.path.join(root, f".tmp_{step_dir_name(step)}")
    if is_writer:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):  # leftovers of an interrupted save
            if name.startswith(".tmp_"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    try:
        write_files(tmp)
    except OSError as e:
        # No barrier on failure: the others wait in the next one, so the writer never publishes a
        # checkpoint without this rank's files; the failing rank's exit stops them.
        if is_writer:
            shutil.rmtree(tmp, ignore_errors=True)
        cause, fix = os_error_cause(e)
        raise CheckpointError(
            f"could not write checkpoint for step {step} in {root}: {cause}. The previous "
            f"checkpoint is intact; {fix}, then resume with --resume") from None
    barrier()  # every rank's files are on disk
    if is_writer:
        old = os.path.join(root, f".tmp_old_{step_dir_name(step)}")
        try:
            write_atomic(os.path.join(tmp, META), json.dumps(dict(meta, step=step)).encode())
            with PUBLISH_LOCK:
                if os.path.exists(final):  # a re-save of the same step (e.g. after a resume)
                    os.replace(final, old)
                os.replace(tmp, final)
                _fsync_dir(root)
                write_atomic(os.path.join(root, "latest"), step_dir_name(step).encode())
            shutil.rmtree(old, ignore_errors=True)
        except OSError as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if os.path.isdir(old) and not os.path.exists(final):  # put the re-saved step back
                os.replace(old, final)
            cause, fix = os_error_cause(e)
            raise CheckpointError(
                f"could not publish checkpoint for step {step} in {root}: {cause}. The previous "
                f"checkpoint is intact; {fix}, then resume with --resume") from None
        for stale in list_complete(run_dir)[:-keep]:
            shutil.rmtree(os.path.join(root, step_dir_name(stale)), ignore_errors=True)
    barrier()
    return final


def load_file(path: str, name: str) -> Any:
    full = os.path.join(path, name)
    if not os.path.isfile(full):
        raise CheckpointError(f"checkpoint file missing: {full}. The checkpoint is incomplete; "
                              f"resume from another one or start a fresh run directory")
    try:
        return torch.load(full, map_location="cpu", weights_only=False)
    except Exception as e:  # noqa: BLE001 - any unpickling failure is corruption
        raise CheckpointError(f"checkpoint file {full} is corrupt ({type(e).__name__}). Delete "
                              f"that checkpoint folder and resume from an earlier one") from None


def read_meta(path: str) -> dict:
    with open(os.path.join(path, META)) as f:
        return json.load(f)
