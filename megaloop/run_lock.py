"""One writer per run directory: RUN_DIR/.lock, an exclusive flock held for the run's whole life.

Two trainings on one run directory interleave metrics.jsonl and delete each other's checkpoint
temp folders; on a cluster a double submission is all it takes. So `megaloop train` takes this
lock before it builds anything, reads the latest checkpoint or writes anything, and a second process stops at
once with one line naming the holder (host, pid, start time, SLURM job) and what to do.

Design: only global rank 0 takes the lock. Rank 0 is the process that publishes checkpoints,
metrics and the summary; the other ranks write only into the checkpoint temp folder rank 0 opens.
A flock is per process, so the ranks of one job could not all hold it exclusively. Rank 0 takes it
first thing, before the model, the engine or the data are built, so a refusal comes within
seconds; it refuses alone, before any collective, and the launcher (torchrun, srun
--kill-on-bad-exit) stops the other ranks.

The holder's identity is written into the lock file; a clean exit empties it. The kernel drops a
flock when its process dies, so a lock file that still names someone while nobody holds the flock
was left by a process that died (SIGKILL, OOM, a lost node): it is taken over, with a note.
flock is coherent across hosts on local disks, NFSv4, GPFS and Lustre mounted with `flock`; on a
file system without flock the run goes on with a warning and no guard.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import time
from dataclasses import dataclass
from typing import Callable, Optional

from .errors import UserError

LOCK_NAME = ".lock"
# A momentary probe (`holder()`, `sweep collect`, the SLURM task script) holds a shared lock for
# microseconds; retrying this long keeps such a probe from refusing a real start.
ACQUIRE_RETRY_S = 1.0
NO_FLOCK = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunDirBusy(UserError):
    """Another live process holds the run directory. Exit status 75 (EX_TEMPFAIL: retry later), so
    a sweep runner can tell "busy elsewhere" from a failed run."""
    exit_status = 75


@dataclass
class Holder:
    host: str = "?"
    pid: int = 0
    started: str = "?"
    slurm_job: Optional[str] = None

    @classmethod
    def me(cls) -> "Holder":
        job = os.environ.get("SLURM_JOB_ID")
        if job and os.environ.get("SLURM_ARRAY_TASK_ID"):
            job = f"{os.environ.get('SLURM_ARRAY_JOB_ID', job)}_{os.environ['SLURM_ARRAY_TASK_ID']}"
        return cls(socket.gethostname(), os.getpid(), time.strftime("%Y-%m-%d %H:%M:%S %Z"), job)

    @classmethod
    def parse(cls, text: str) -> Optional["Holder"]:
        try:
            d = json.loads(text)
            return cls(str(d["host"]), int(d["pid"]), str(d["started"]), d.get("slurm_job"))
        except (ValueError, KeyError, TypeError):
            return None

    def dump(self) -> str:
        return json.dumps(dict(host=self.host, pid=self.pid, started=self.started, slurm_job=self.slurm_job)) + "\n"

    def describe(self) -> str:
        job = f", SLURM job {self.slurm_job}" if self.slurm_job else ""
        return f"pid {self.pid} on host {self.host}, started {self.started}{job}"

    def alive_here(self) -> Optional[bool]:
        """Whether the process runs on this host; None when it is another host's."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def _read(fd: int) -> str:
    return os.pread(fd, 4096, 0).decode(errors="replace")


def _busy_message(run_dir: str, path: str, h: Optional[Holder]) -> str:
    if h is None:
        who = "another process (it has not written its name yet)"
        stop = "stop that process"
    else:
        who = h.describe()
        stop = f"scancel {h.slurm_job}" if h.slurm_job else f"kill {h.pid} on {h.host}"
        if h.alive_here() is False:  # its flock outlived it: a child it forked still has the file open
            who += f" (no longer running; a process it started still holds the lock: fuser -v {path})"
            stop = "stop that process"
    return (f"{run_dir} is in use by another training ({who}); two writers would corrupt the run. "
            f"Wait for it to finish, or stop it ({stop}) and resume with --resume, or set train.run_dir "
            f"to another folder. Nothing was changed")


class RunLock:
    """The held lock: keep the object alive for the run's whole life, then release()."""

    def __init__(self, path: str, fd: Optional[int]):
        self.path, self.fd = path, fd

    @classmethod
    def acquire(cls, run_dir: str, log: Callable = print) -> "RunLock":
        """Take RUN_DIR/.lock (the folder must exist); RunDirBusy when a live process holds it."""
        path = os.path.join(run_dir, LOCK_NAME)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + ACQUIRE_RETRY_S
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if time.monotonic() > deadline:
                        raise RunDirBusy(_busy_message(run_dir, path, Holder.parse(_read(fd)))) from None
                    time.sleep(0.05)
                except OSError as e:
                    if e.errno not in NO_FLOCK:
                        raise
                    log(f"warning: the file system of {run_dir} does not support flock ({e.strerror}): "
                        f"nothing stops a second training on this run directory; start only one")
                    break
            before = _read(fd).strip()
            if before:  # the last holder never released it: it died
                h = Holder.parse(before)
                if h is None:
                    log(f"note: taking over {path} (unreadable holder: {before[:80]!r})")
                elif h.alive_here() is None:
                    log(f"note: taking over the lock of {run_dir} left by {h.describe()}: that job ended "
                        f"without releasing it")
                else:
                    log(f"note: taking over the stale lock of {run_dir}: {h.describe()} is no longer running")
            os.ftruncate(fd, 0)
            os.pwrite(fd, Holder.me().dump().encode(), 0)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        return cls(path, fd)

    def release(self) -> None:
        """Empty the lock file (a clean end, not a stale lock), then drop the flock."""
        if self.fd is None:
            return
        try:
            os.ftruncate(self.fd, 0)
        except OSError:
            pass
        finally:
            os.close(self.fd)  # closing the only descriptor drops the flock
            self.fd = None


def holder(run_dir: str) -> Optional[Holder]:
    """The live process holding RUN_DIR/.lock, or None when nobody does (a shared probe that never
    blocks and leaves nothing behind). A holder that has not written its name yet reads as '?'."""
    path = os.path.join(run_dir, LOCK_NAME)
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return Holder.parse(_read(fd)) or Holder()
    except OSError:
        return None  # no flock on this file system: nothing to tell
    finally:
        os.close(fd)
    return None
