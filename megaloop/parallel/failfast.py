"""One failed rank ends every rank within seconds, with one message that names it.

Ranks meet in collectives. A rank that fails between two of them (a bug, a full disk, running out
of memory) leaves the others waiting in the next one until the process-group timeout, and if it
then runs the usual clean-up (a final barrier) it waits forever too. So:
  - a failing rank does no further collective. It writes one record, {rank, error, exit code},
    into the job's rendezvous store (the TCP key-value store that torchrun, or rank 0, hosts; the
    first record wins, so it names the root cause), waits a moment for the others to read it,
    and exits;
  - every rank runs a watchdog thread that polls that record every POLL_S on its own store
    connection. When another rank's record appears it prints, on one rank,
    `rank K failed: ERROR`, and ends its process at once with rank K's exit code (os._exit: the
    main thread may be blocked inside a collective, which no Python exception interrupts);
  - a rank whose collective fails because a peer vanished without a record (SIGKILL, a lost
    node) waits up to GRACE_S for that peer's own record; meanwhile it calls the roll (every
    live rank's watchdog answers), so when none comes it names the ranks that did not answer;
  - if the store itself is gone (its host stopped, or the network to it is cut), the watchdog
    ends its process too;
  - every watchdog beats (a counter in the store, every POLL_S); rank 0's also watches the
    beats, and a rank whose beat stops for HEARTBEAT_S is recorded as failed: this is how a
    host cut off from the network (its TCP connections neither close nor answer, so the
    collectives would wait for the full process-group timeout) ends the job in seconds.
Every rank registers its host name in the store, so each message names the rank and its host.
A stopped rank never exits between renaming a checkpoint into place and updating `latest`
(checkpoint.PUBLISH_LOCK), and the checkpoint of a save that any rank failed is never published
(checkpoint.save publishes only after every rank has written its files).
"""
from __future__ import annotations

import datetime
import json
import os
import socket
import sys
import threading
import time
from typing import Optional

import torch.distributed as dist

from ..errors import UserError

# Held while a checkpoint is renamed into place (megaloop.checkpoint): a rank that must exit because
# another failed waits for it, so a publication in progress is never cut in half.
PUBLISH_LOCK = threading.Lock()

POLL_S = 0.5        # how often every rank looks for a failure record
ACK_WAIT_S = 2.0    # how long a failing rank waits for the others to read its record
GRACE_S = 2.0       # how long a rank that lost a peer waits for that peer's own record
STORE_TIMEOUT_S = 20
HEARTBEAT_S = 20.0  # a rank silent this long is taken for lost (its host down or cut off)
_DONE = 1 << 40     # added to a rank's beat counter when it stops its watchdog on purpose


class PeerFailure(UserError):
    """Raised on a rank whose work was cut short by another rank's failure."""

    def __init__(self, message: str, exit_status: int):
        super().__init__(message)
        self.exit_status = exit_status


def describe(exc: BaseException) -> tuple[str, int]:
    """(one-line message, exit status) of a rank's failure, as the CLI would report it."""
    if isinstance(exc, UserError):
        return " ".join(str(exc).split()), getattr(exc, "exit_status", 2)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", 130
    first = (str(exc).strip().splitlines() or [""])[0]
    return f"{type(exc).__name__}: {first}"[:500], 1


def _lost_peer(exc: BaseException) -> bool:
    """A collective failed because another rank went away (gloo and NCCL phrase it so)."""
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "remote process exit",
                            "NCCL communicator was aborted", "Broken pipe"))


def _others(ranks: list[int]) -> str:
    if len(ranks) < 2:
        return ""
    return f" (so did rank{'s' if len(ranks) > 2 else ''} {', '.join(map(str, ranks[1:9]))})"


def _summary(rec: dict) -> str:
    # a lost rank's error names its host itself; a failed rank's host is added here
    on = f" on host {rec['host']}" if rec.get("host") else ""
    what = rec["error"] if rec.get("lost") else f"failed{on}: {rec['error']}"
    return (f"rank {rec['rank']} {what}. Every rank stopped; the last complete checkpoint is intact: "
            f"fix the cause and resume with --resume")


class FailFast:
    def __init__(self, rank: int, world: int, host: str, port: int):
        self.rank, self.world = rank, world
        self.where = f"{host}:{port}"
        prefix = f"megaloop/failfast/{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}/"
        self.key, self.acks, self.rollcall = prefix + "failed", prefix + "acks", prefix + "rollcall"
        self.alive, self.beat, self.hosts = prefix + "alive/", prefix + "beat/", prefix + "host/"
        self.host = socket.gethostname()
        self._host_of: dict[int, str] = {}
        # A connection of our own: the process group's one may be busy in the main thread.
        self.store = dist.TCPStore(host, port, is_master=False, wait_for_workers=False,
                                   timeout=datetime.timedelta(seconds=STORE_TIMEOUT_S))
        self.store.set(f"{self.hosts}{rank}", self.host)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._failing = threading.Event()
        self._thread = threading.Thread(target=self._watch, name="megaloop-failfast", daemon=True)
        self._last_ok = time.monotonic()
        self._thread.start()
        # A store call to a host cut off from the network may never return (no reset, no timeout):
        # this thread ends the process when the watchdog has not reached the store for too long.
        threading.Thread(target=self._deadline, name="megaloop-failfast-deadline", daemon=True).start()

    # ------------------------------------------------------------------ the store
    def _record(self) -> Optional[dict]:
        with self._lock:
            if not self.store.check([self.key]):
                return None
            return json.loads(self.store.get(self.key))

    def _ack(self) -> None:
        try:
            with self._lock:
                self.store.add(self.acks, 1)
        except Exception:  # noqa: BLE001 - the store may be gone; acks only shorten a wait
            pass

    def host_of(self, rank: int) -> str:
        """The host name rank `rank` registered ("?" when it never did)."""
        if rank not in self._host_of:
            with self._lock:
                key = f"{self.hosts}{rank}"
                if not self.store.check([key]):
                    return "?"
                self._host_of[rank] = self.store.get(key).decode()
        return self._host_of[rank]

    def _hosts_of(self, ranks: list[int]) -> str:
        try:
            return ", ".join(sorted({self.host_of(r) for r in ranks}))
        except Exception:  # noqa: BLE001 - the store may be gone: the message then names ranks only
            return "?"

    # ------------------------------------------------------------------ the watchdog
    def _check_beats(self, seen: dict) -> None:
        """Rank 0: record the ranks whose beat has not moved for HEARTBEAT_S (`seen`: rank ->
        (last count, when it last moved))."""
        keys = [f"{self.beat}{r}" for r in range(self.world)]
        with self._lock:
            present = keys if self.store.check(keys) else [k for k in keys if self.store.check([k])]
            counts = dict(zip(present, self.store.multi_get(present))) if present else {}
        now, silent = time.monotonic(), []
        for r, k in enumerate(keys):
            c = int(counts[k]) if k in counts else -1
            if c >= _DONE:
                continue
            last, since = seen.get(r, (None, now))
            if c != last:
                seen[r] = (c, now)
            elif now - since > HEARTBEAT_S:
                silent.append(r)
        if not silent or self._failing.is_set():
            return
        others = _others(silent)
        rec = dict(rank=silent[0], code=1, lost=True, host=self._hosts_of(silent),
                   error=f"stopped answering on host {self._hosts_of(silent)}{others} for {HEARTBEAT_S:.0f} s: "
                         f"that host is down or cut off from "
                         f"the network (rank {self.rank} on {self.host} still reaches the job's store)")
        with self._lock:
            self.store.compare_set(self.key, "", json.dumps(rec))

    def _watch(self) -> None:
        answered = False
        seen: dict = {}
        while not self._stop.wait(POLL_S):
            try:
                with self._lock:
                    self.store.add(f"{self.beat}{self.rank}", 1)
                if 0 not in self._host_of:  # named in the message should the store be lost later
                    self.host_of(0)
                if self.rank == 0:
                    self._check_beats(seen)
                rec = self._record()
                self._last_ok = time.monotonic()
                if not answered:
                    with self._lock:
                        if self.store.check([self.rollcall]):
                            self.store.set(f"{self.alive}{self.rank}", "1")
                            answered = True
            except Exception as e:  # noqa: BLE001 - any store error: its host is gone
                if self._stop.is_set() or self._failing.is_set():
                    return
                self._lost_store(type(e).__name__)
                return
            if rec is not None and rec["rank"] != self.rank and not self._failing.is_set():
                self._ack()
                self._exit(rec)
                return

    def _deadline(self) -> None:
        while not self._stop.wait(POLL_S):
            silent = time.monotonic() - self._last_ok
            if silent > STORE_TIMEOUT_S:
                self._lost_store(f"no answer for {silent:.0f} s")
                return

    def _lost_store(self, why: str) -> None:
        self._exit(dict(rank=self.rank, code=1, lost=True,
                        error=f"lost the job's rendezvous store at {self.where} ({why}; rank {self.rank} on host "
                              f"{self.host}): the process that hosts it (rank 0 on host {self._host_of.get(0, '?')}, "
                              f"or the launcher there) stopped, or that host is cut off from the network"),
                   lost_store=True)

    def _exit(self, rec: dict, lost_store: bool = False) -> None:
        PUBLISH_LOCK.acquire(timeout=30)  # let a checkpoint being published finish
        # One line for the job: from rank 0, or from rank 1 when rank 0 is the one that failed; a
        # lost store, from the first rank of each host (the job is then cut in parts).
        local = int(os.environ.get("LOCAL_RANK", self.rank))
        if self.rank == (1 if rec["rank"] == 0 else 0) or (lost_store and local == 0):
            print(f"megaloop: error: {_summary(rec)}", file=sys.stderr, flush=True)
        try:
            sys.stdout.flush()
        finally:
            os._exit(int(rec.get("code", 1)))

    # ------------------------------------------------------------------ the failing rank
    def fail(self, exc: BaseException) -> Optional[PeerFailure]:
        """Called by a rank that caught `exc`, before it exits. Returns None when this rank's own
        error is the one to report, or the PeerFailure to raise instead when another rank failed first."""
        self._failing.set()
        try:
            msg, code = describe(exc)
            mine = self._lost_peer_record(msg) if _lost_peer(exc) else \
                dict(rank=self.rank, code=code, error=msg, host=self.host)
            with self._lock:
                root = json.loads(self.store.compare_set(self.key, "", json.dumps(mine)))
            if root == mine:  # this rank's record is the job's
                deadline = time.monotonic() + ACK_WAIT_S
                expected = self.world - 1 - mine.get("n_missing", 0)  # the vanished ranks never answer
                while time.monotonic() < deadline and self._acked() < expected:
                    time.sleep(0.05)
                return PeerFailure(_summary(mine), mine["code"]) if mine.get("lost") else None
            self._ack()
            if root["error"] == msg:  # the same error on every rank (e.g. a bad config): report it as is
                return None
            return PeerFailure(_summary(root), int(root["code"]))
        except Exception:  # noqa: BLE001 - no store: report this rank's own error
            return None
        finally:
            self.stop()

    def _lost_peer_record(self, msg: str) -> dict:
        """A collective failed under us: wait for the vanished peer's own record, calling the roll
        meanwhile; without a record, name the ranks that did not answer."""
        with self._lock:
            self.store.set(f"{self.alive}{self.rank}", "1")
            self.store.set(self.rollcall, "1")
        deadline = time.monotonic() + GRACE_S
        while time.monotonic() < deadline:
            rec = self._record()
            if rec is not None:
                return rec
            time.sleep(0.1)
        with self._lock:
            missing = [r for r in range(self.world) if not self.store.check([f"{self.alive}{r}"])]
        detail = msg.split(". ")[0][:160]
        if not missing:
            return dict(rank=self.rank, code=1, lost=True,
                        error=f"lost contact with another rank inside a collective ({detail})")
        others = _others(missing)
        return dict(rank=missing[0], code=1, lost=True, n_missing=len(missing), host=self._hosts_of(missing),
                    error=f"stopped without a message on host {self._hosts_of(missing)}{others}: killed by a signal, or out of memory? Rank "
                          f"{self.rank} lost contact with it inside a collective ({detail})")

    def _acked(self) -> int:
        with self._lock:
            return int(self.store.add(self.acks, 0))

    def stop(self) -> None:
        if not self._stop.is_set() and not self._failing.is_set():
            try:  # a rank that stops on purpose is not taken for a lost one
                with self._lock:
                    self.store.add(f"{self.beat}{self.rank}", _DONE)
            except Exception:  # noqa: BLE001 - the store may be gone already
                pass
        self._stop.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=2 * POLL_S + STORE_TIMEOUT_S)
        global _ACTIVE
        if _ACTIVE is self:
            _ACTIVE = None


_ACTIVE: Optional[FailFast] = None


def host_of(rank: int) -> Optional[str]:
    """The host name of rank `rank` of this job (None without a watchdog, or when unknown)."""
    try:
        host = _ACTIVE.host_of(rank) if _ACTIVE is not None else "?"
    except Exception:  # noqa: BLE001 - the store may be gone: messages then name the rank alone
        return None
    return None if host == "?" else host


def start(rank: int, world: int) -> FailFast:
    """The watchdog of this process (one per process; a second call returns the running one)."""
    global _ACTIVE
    if _ACTIVE is None:
        _ACTIVE = FailFast(rank, world, os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]))
    return _ACTIVE
