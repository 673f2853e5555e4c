"""Noticing a diverging run, and the state a rewind needs.

A run diverges when `train.max_bad_steps` steps in a row are non-finite (their updates were
skipped), or when one step's loss exceeds `train.spike_factor` times the median of the last
`train.spike_window` good losses (checked once that window is full; the median, not the mean, so
one earlier outlier does not hide the next). Spiking and non-finite losses never enter the window.

What happens then is `train.on_divergence`:
  stop    the run ends with an error; the last complete checkpoint is intact.
  rewind  the loop reloads the last complete checkpoint but keeps the data loader where it is, so
          the batches that led to the divergence are skipped (as PaLM did: restart before the
          spike, skip the batches around it), optionally scales the learning rate by
          `train.rewind_lr_scale` for `train.rewind_lr_steps` steps, and goes on. After
          `train.max_rewinds` rewinds the run stops instead.
The guard's state (the loss window, counts, the lowered-lr horizon) is saved in every checkpoint,
so a resumed run makes the same decisions as an uninterrupted one.
"""
from __future__ import annotations

import statistics
from collections import deque
from typing import Optional


class DivergenceGuard:
    def __init__(self, train_cfg):
        self.t = train_cfg
        self.window: deque = deque(maxlen=train_cfg.spike_window)
        self.bad_in_a_row = 0
        self.skipped_total = 0
        self.rewinds = 0
        self.lr_until = 0  # steps with index < lr_until run at rewind_lr_scale

    def observe(self, loss: float, skipped: bool) -> Optional[str]:
        """Feed one finished step; returns why the run diverged, or None."""
        if skipped:
            self.bad_in_a_row += 1
            self.skipped_total += 1
            if self.bad_in_a_row >= self.t.max_bad_steps:
                return f"{self.bad_in_a_row} non-finite steps in a row"
            return None
        self.bad_in_a_row = 0
        if self.t.spike_factor and len(self.window) == self.window.maxlen:
            median = statistics.median(self.window)
            if loss > self.t.spike_factor * median:
                return (f"loss spike: {loss:.4g} is above {self.t.spike_factor:g} x the median {median:.4g} "
                        f"of the last {len(self.window)} steps")
        self.window.append(loss)
        return None

    def lr_scale(self, step_index: int) -> float:
        """Multiplier of the scheduled lr for the step with 0-based index `step_index`."""
        return self.t.rewind_lr_scale if step_index < self.lr_until else 1.0

    def can_rewind(self) -> bool:
        return self.t.on_divergence == "rewind" and self.rewinds < self.t.max_rewinds

    def rewound(self, to_step: int, saved: Optional[dict]) -> None:
        """Back at checkpoint `to_step`: its loss window, this run's counts, a new lr horizon."""
        self.window = deque((saved or {}).get("window", []), maxlen=self.t.spike_window)
        self.bad_in_a_row = 0
        self.rewinds += 1
        self.lr_until = to_step + self.t.rewind_lr_steps

    def state_dict(self) -> dict:
        return dict(window=list(self.window), bad_in_a_row=self.bad_in_a_row, skipped_total=self.skipped_total,
                    rewinds=self.rewinds, lr_until=self.lr_until)

    def load_state_dict(self, state: Optional[dict]) -> None:
        if not state:  # a checkpoint from before the guard was saved: start it afresh
            return
        self.window = deque(state["window"], maxlen=self.t.spike_window)
        self.bad_in_a_row = state["bad_in_a_row"]
        self.skipped_total = state["skipped_total"]
        self.rewinds = state["rewinds"]
        self.lr_until = state["lr_until"]
