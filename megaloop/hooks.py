"""Points where a harness may act on a training run from outside: the loop calls these, and a
production run gets the no-ops below. The reliability tests' fault injection (megaloop.faults,
switched on by MEGALOOP_FAULT) is one such harness; the loop and the engines know nothing of it.
"""
from __future__ import annotations

import contextlib
import os
from typing import ContextManager

import torch


class TrainHooks:
    """The no-op hooks. Steps are 1-based, as logged in metrics.jsonl."""

    def around_step(self, step: int, model: torch.nn.Module) -> ContextManager:
        """Wraps optimizer step `step` (forward, backward, update)."""
        return contextlib.nullcontext()

    def loss_seen(self, step: int, loss: float) -> float:
        """The loss of step `step` the run reacts to (the divergence guard's input, the log)."""
        return loss

    def after_step(self, step: int) -> None:
        """Step `step` is done: logged, evaluated and saved as configured."""

    def in_save(self, step: int, phase: str) -> None:
        """While the checkpoint of `step` is written: phase "start" (no state file of this rank
        yet) or "written" (this rank's state files are being written, nothing is published)."""


def from_env() -> TrainHooks:
    """The hooks a run gets by default: fault injection where MEGALOOP_FAULT is set, else none."""
    if os.environ.get("MEGALOOP_FAULT"):
        from .faults import FaultHooks
        return FaultHooks()
    return TrainHooks()
