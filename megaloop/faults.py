"""Fault injection for the reliability tests: MEGALOOP_FAULT="point:step[@rank][,point:step[@rank]...]".

Points:
  `step`        SIGKILL right after training step N
  `save`        SIGKILL in the middle of writing the checkpoint of step N, after some files are on disk
  `step_error`  raise an error right after training step N (a crash of this rank's Python code)
  `save_error`  raise an error while writing the checkpoint of step N, before this rank's files
                (the other ranks are then inside the save's collectives)
  `nan`         the loss of step N becomes NaN (a real non-finite step: the update is skipped)
  `spike`       the loss reported for step N is multiplied by SPIKE (the divergence guard's input)
  `save_pause`  stop in the middle of writing the checkpoint of step N (this rank's files on disk,
                the checkpoint not yet published), announced on stderr, until the file named by
                MEGALOOP_FAULT_RELEASE exists, at most 10 minutes (a test then cuts the network)
  `pause`       stop after step N, its checkpoint and metrics written, until the file named by
                MEGALOOP_FAULT_RELEASE exists, at most 10 minutes (holds a run mid-training while a
                test starts a second writer or cancels the job)
`@rank` limits a fault to one global rank (default: every rank). Each fault fires once per process,
so a run that rewinds past step N does not meet it again. The loop reaches these through the hooks
of megaloop.hooks (FaultHooks below, installed only where MEGALOOP_FAULT is set).
"""
from __future__ import annotations

import contextlib
import os
import signal
import sys
import time

SPIKE = 100.0


class InjectedFailure(RuntimeError):
    """The error `step_error` / `save_error` raise: stands in for a crash (a bug, an OOM)."""


def _parse() -> dict:
    spec = os.environ.get("MEGALOOP_FAULT", "")
    rank = int(os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) or 0)
    out: dict = {}
    for item in filter(None, spec.split(",")):
        point, _, at = item.partition(":")
        step, _, only = at.partition("@")
        if only.strip() and int(only) != rank:
            continue
        out.setdefault(point.strip(), set()).add(int(step))
    return out


_FAULTS = _parse()


def armed(point: str, step: int) -> bool:
    """True once for each configured (point, step) of this rank."""
    steps = _FAULTS.get(point)
    if not steps or step not in steps:
        return False
    steps.discard(step)
    return True


def maybe_kill(point: str, step: int) -> None:
    if armed(point, step):
        os.kill(os.getpid(), signal.SIGKILL)
    if armed("pause" if point == "step" else f"{point}_pause", step):
        print(f"megaloop fault: {point}_pause at step {step}, time {time.time():.3f}", file=sys.stderr, flush=True)
        release, deadline = os.environ.get("MEGALOOP_FAULT_RELEASE"), time.monotonic() + 600
        while not (release and os.path.exists(release)) and time.monotonic() < deadline:
            time.sleep(0.05)


def maybe_fail(point: str, step: int) -> None:
    if armed(f"{point}_error", step):
        # The time stamp lets the tests measure how long the other ranks take to stop.
        print(f"megaloop fault: {point}_error at step {step}, time {time.time():.3f}", file=sys.stderr, flush=True)
        raise InjectedFailure(f"injected failure ({point}_error at step {step}, MEGALOOP_FAULT)")


def spiked(loss: float, step: int) -> float:
    return loss * SPIKE if armed("spike", step) else loss


class FaultHooks:
    """megaloop.hooks.TrainHooks that inject the configured faults into a run."""

    @contextlib.contextmanager
    def around_step(self, step: int, model):
        # `nan`: the final norm's output turns NaN for this step, so the loss and every gradient
        # are non-finite on every rank (the loss and the grad norm are global): a real skipped step
        handle = model.norm_final.register_forward_hook(lambda m, i, out: out * float("nan")) \
            if armed("nan", step) else None
        try:
            yield
        finally:
            if handle is not None:
                handle.remove()

    def loss_seen(self, step: int, loss: float) -> float:
        return spiked(loss, step)

    def after_step(self, step: int) -> None:
        maybe_kill("step", step)
        maybe_fail("step", step)

    def in_save(self, step: int, phase: str) -> None:
        if phase == "start":
            maybe_fail("save", step)
        else:
            maybe_kill("save", step)
