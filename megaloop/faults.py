"""Fault injection for the crash-safety tests: MEGALOOP_FAULT="point:step[,point:step...]".

Points: `step` (SIGKILL right after training step N), `save` (SIGKILL in the middle of writing
the checkpoint of step N, after some files are on disk), `nan` (the loss of step N becomes NaN),
`pause` (stop after step N, its checkpoint and metrics written, until the file named by
MEGALOOP_FAULT_RELEASE exists, at most 10 minutes: holds a run mid-training while a test starts a
second writer or cancels the job). Unset in normal runs, where every call is a dictionary lookup.
"""
from __future__ import annotations

import os
import signal
import time


def _parse() -> dict:
    spec = os.environ.get("MEGALOOP_FAULT", "")
    out: dict = {}
    for item in filter(None, spec.split(",")):
        point, _, step = item.partition(":")
        out.setdefault(point.strip(), set()).add(int(step))
    return out


_FAULTS = _parse()


def armed(point: str, step: int) -> bool:
    return step in _FAULTS.get(point, ())


def maybe_kill(point: str, step: int) -> None:
    if armed(point, step):
        os.kill(os.getpid(), signal.SIGKILL)
    if point == "step" and armed("pause", step):
        release, deadline = os.environ.get("MEGALOOP_FAULT_RELEASE"), time.monotonic() + 600
        while not (release and os.path.exists(release)) and time.monotonic() < deadline:
            time.sleep(0.05)
