"""Crash-safe checkpoints.

Layout: RUN_DIR/checkpoints/step_00000100/{meta.json, trainer.pt, state/} (state/: the model and
optimiser state, one DCP checkpoint that any layout loads: megaloop/parallel/dcp_state.py) and
RUN_DIR/checkpoints/latest (a one-line pointer). A checkpoint is written into a hidden
temporary folder, every file is fsynced, the folder is renamed into place (atomic on POSIX), and
only then is `latest` replaced (write-temp + fsync + rename). So `latest` only ever names a
complete checkpoint; a crash mid-save leaves at most a stray temp folder, which is ignored and
cleaned up by the next save. Old checkpoints are deleted only after the new one is complete.
Under several ranks the checkpoint is published only after every rank has written its files: a
rank that fails mid-save never reaches that point, and the others are stopped (parallel/failfast).
A save may also write in the background (train.async_save): it is published the same way once its
writes are complete, so `latest` still never names a half-written checkpoint.
"""
from __future__ import annotations

import errno
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from typing import Any, Callable, Iterator, Optional

import torch

from .errors import UserError

STEP_RE = re.compile(r"^step_(\d{8})$")
META = "meta.json"
# Held while a checkpoint is renamed into place and `latest` replaced: a rank stopped because
# another rank failed waits for it, so it never exits between the two steps.
# held while a checkpoint is renamed into place; the fail-fast watchdog waits for it before exiting
from .parallel.failfast import PUBLISH_LOCK, host_of  # noqa: E402
from .errors import CheckpointError  # noqa: E402,F401 - raised here, defined with the other user errors


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


def branch_points(run_dir: str) -> str:
    """Where a trunk keeps the checkpoints its branches start from (train.save_at): laid out as a
    run directory of its own (BRANCH_POINTS/checkpoints/step_N), none of them ever pruned."""
    return os.path.join(run_dir, "branch_points")


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


def _begin(run_dir: str, step: int, is_writer: bool, barrier: Callable[[], None]) -> str:
    """The hidden folder the checkpoint of `step` is written into (created by the writer rank,
    after removing the leftovers of interrupted saves; no save is in flight here)."""
    root = ckpt_root(run_dir)
    tmp = os.path.join(root, f".tmp_{step_dir_name(step)}")
    if is_writer:
        os.makedirs(root, exist_ok=True)
        for name in os.listdir(root):  # leftovers of an interrupted save
            if name.startswith(".tmp_"):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
        os.makedirs(tmp)
    barrier()
    return tmp


def _write_failed(e: OSError, run_dir: str, step: int, tmp: str, is_writer: bool) -> CheckpointError:
    if is_writer:
        shutil.rmtree(tmp, ignore_errors=True)
    cause, fix = os_error_cause(e)
    rank = getattr(e, "failed_rank", None)  # set where every rank learns of one rank's failed write
    if rank is not None:
        cause = f"rank {rank}" + (f" on host {host_of(rank)}" if host_of(rank) else "") + f": {cause}"
    return CheckpointError(
        f"could not write checkpoint for step {step} in {ckpt_root(run_dir)}: {cause}. The previous "
        f"checkpoint is intact; {fix}, then resume with --resume")


def _publish(run_dir: str, step: int, tmp: str, meta: dict, keep: int) -> str:
    """Writer rank, every rank's files on disk: rename `tmp` into place, then point `latest` at it."""
    root = ckpt_root(run_dir)
    final = os.path.join(root, step_dir_name(step))
    old = os.path.join(root, f".tmp_old_{step_dir_name(step)}")
    try:
        for sub, _, _ in os.walk(tmp):  # the folder entries of the files too (DCP writes a sub-folder)
            _fsync_dir(sub)
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
    return final


def save(run_dir: str, step: int, write_files: Callable[[str], None], meta: dict, keep: int,
         is_writer: bool = True, barrier: Callable[[], None] = lambda: None) -> str:
    """Write a checkpoint for `step` through `write_files(tmp_dir)` (called on every rank, each
    writing its own files), then publish it atomically from the writer rank."""
    tmp = _begin(run_dir, step, is_writer, barrier)
    try:
        write_files(tmp)
    except OSError as e:
        # No barrier on failure: the others wait in the next one, so the writer never publishes a
        # checkpoint without this rank's files; the failing rank's exit stops them.
        raise _write_failed(e, run_dir, step, tmp, is_writer) from None
    barrier()  # every rank's files are on disk
    final = _publish(run_dir, step, tmp, meta, keep) if is_writer else os.path.join(
        ckpt_root(run_dir), step_dir_name(step))
    barrier()
    return final


class PendingSave:
    """A checkpoint whose files are still being written in the background. It is published (by
    the writer rank) in finish(), once every rank's files are on disk, and never before; a run
    that stops first leaves it an unpublished temporary folder, removed by the next save."""

    def __init__(self, run_dir: str, step: int, tmp: str, handle, meta: dict, keep: int, is_writer: bool):
        self.run_dir, self.step, self.tmp, self.handle = run_dir, step, tmp, handle
        self.meta, self.keep, self.is_writer = meta, keep, is_writer

    def done(self) -> bool:
        """Whether finish() would return at once."""
        return self.handle is None or self.handle.done()

    def finish(self) -> None:
        """Wait for this rank's writes and, on the writer rank, publish. No collective: ranks may
        call it at different steps. The writer's handle completes only after every rank's files
        are written (the save's last collective gathers their results)."""
        try:
            if self.handle is not None:
                self.handle.wait()
        except OSError as e:
            raise _write_failed(e, self.run_dir, self.step, self.tmp, self.is_writer) from None
        if self.is_writer:
            _publish(self.run_dir, self.step, self.tmp, self.meta, self.keep)


def save_async(run_dir: str, step: int, write_files: Callable[[str], Optional[Any]], meta: dict, keep: int,
               is_writer: bool = True, barrier: Callable[[], None] = lambda: None) -> PendingSave:
    """Like save, but `write_files(tmp_dir)` returns once the state is copied, with a handle
    (done(), wait()) on the writes it leaves running; publishing waits for PendingSave.finish."""
    tmp = _begin(run_dir, step, is_writer, barrier)
    try:
        handle = write_files(tmp)
    except OSError as e:
        raise _write_failed(e, run_dir, step, tmp, is_writer) from None
    return PendingSave(run_dir, step, tmp, handle, meta, keep, is_writer)


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


class Checkpointer:
    """A training run's checkpoints, in one place: saving (in the foreground or, train.async_save,
    in the background) with the atomic publish above, resuming, and a rewind's reload. The model
    and optimiser state is one DCP checkpoint the engine writes and reads (save_files /
    load_files: megaloop/parallel/dcp_state.py); the loop's own state goes to trainer.pt, written
    by the writer rank. `hooks.in_save` lets a test harness act mid-save (megaloop.hooks)."""

    TRAINER_STATE = "trainer.pt"

    def __init__(self, run_dir: str, engine, keep: int, meta: dict, hooks):
        self.run_dir, self.engine, self.keep, self.meta, self.hooks = run_dir, engine, keep, meta, hooks
        self.pending: Optional[PendingSave] = None  # a save still being written in the background

    def save(self, step: int, trainer_state: dict, background: bool = False, root: Optional[str] = None) -> None:
        """Checkpoint `step`. background: return once the state is copied; the save is published
        by poll() or finish() when its writes are done. One save at a time. root: another folder
        than the run directory, whose checkpoints are all kept (none is pruned)."""
        self.finish()

        def write(path: str):
            self.hooks.in_save(step, "start")
            handle = self.engine.save_files(path, background=background)
            self.hooks.in_save(step, "written")
            if self.engine.is_main:
                torch_save_synced(trainer_state, os.path.join(path, self.TRAINER_STATE))
            return handle
        how = save_async if background else save
        out = how(root or self.run_dir, step, write, meta=self.meta, keep=self.keep if root is None else 1 << 30,
                  is_writer=self.engine.is_main, barrier=self.engine.barrier)
        self.pending = out if background else None

    def poll(self) -> None:
        """Publish a background save whose writes are complete (no wait, no collective)."""
        if self.pending is not None and self.pending.done():
            self.finish()

    def finish(self) -> None:
        """Wait for a background save and publish it (nothing in flight: nothing to do)."""
        pending, self.pending = self.pending, None
        if pending is not None:
            pending.finish()

    def load(self, path: str) -> dict:
        """Load checkpoint `path` into the engine; returns its trainer state."""
        self.engine.load_files(path)
        return load_file(path, self.TRAINER_STATE)

    def latest(self) -> Optional[str]:
        """The newest complete checkpoint, the same on every rank: a save in flight is finished
        first, and the barrier keeps every rank from reading `latest` before the writer rank
        has published (finish() has no collective)."""
        self.finish()
        self.engine.barrier()
        return latest_path(self.run_dir)

    def rewrite_trainer_state(self, path: str, trainer_state: dict) -> None:
        """Replace the trainer state of the published checkpoint `path` (a rewind's choice)."""
        if self.engine.is_main:
            torch_save_atomic(trainer_state, os.path.join(path, self.TRAINER_STATE))
        self.engine.barrier()
