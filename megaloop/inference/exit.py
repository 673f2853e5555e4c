"""Adaptive per-token exit: when a token has run enough recurrences.

After each recurrence the decoder measures one number per row and a row exits once it is below
the threshold (`CRITERION:THRESHOLD`, e.g. `kl:0.005`). Criteria compare successive recurrences
i-1 and i, so they first fire after the second recurrence; `entropy` can fire after the first.

    kl            KL(p_i || p_{i-1}) of the next-token distributions, in nats
    latent        ||x_i - x_{i-1}|| / ||x_i||, the relative change of the coda's input
    entropy       H(p_i), in nats: stop once the model is confident
    entropy-diff  |H(p_i) - H(p_{i-1})|, in nats
    argmax        exit once argmax p has stayed the same for THRESHOLD successive recurrences
                  (an integer >= 1); measured as THRESHOLD - streak, so it fires at <= 0

Criteria on p need the next-token distribution after every recurrence: the decoder then runs the
coda and the head after each pass (a probe); `latent` needs none.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import UserError

CRITERIA = ("kl", "latent", "entropy", "entropy-diff", "argmax")
NEEDS_LOGITS = {"kl", "entropy", "entropy-diff", "argmax"}


@dataclass(frozen=True)
class ExitRule:
    criterion: str
    threshold: float

    @property
    def needs_logits(self) -> bool:
        return self.criterion in NEEDS_LOGITS

    def __str__(self) -> str:
        return f"{self.criterion}:{self.threshold:g}"


def parse_exit(text: str) -> ExitRule:
    """'kl:0.01' -> ExitRule; one clear UserError for every malformed spelling."""
    name, sep, value = str(text).partition(":")
    name = name.strip().lower()
    if name not in CRITERIA:
        raise UserError(f"unknown exit criterion {name!r} in --exit {text!r}; use one of {', '.join(CRITERIA)} "
                        f"as CRITERION:THRESHOLD, e.g. kl:0.01")
    if not sep:
        raise UserError(f"--exit {text!r} has no threshold; write CRITERION:THRESHOLD, e.g. {name}:0.01")
    return ExitRule(name, parse_threshold(value, name))


def parse_threshold(value: str, criterion: str) -> float:
    try:
        t = float(value)
    except ValueError:
        raise UserError(f"exit threshold {value!r} for {criterion} is not a number; e.g. {criterion}:0.01") from None
    if not math.isfinite(t) or t < 0:
        raise UserError(f"exit threshold for {criterion} must be a finite number >= 0, got {value!r}")
    if criterion == "argmax" and (t < 1 or t != int(t)):
        raise UserError(f"the argmax threshold counts recurrences: an integer >= 1, got {value!r}")
    return t


class ExitState:
    """What a criterion remembers between recurrences of one token (one row per sequence)."""

    def __init__(self, rule: ExitRule):
        self.rule = rule
        self.prev_x: Optional[torch.Tensor] = None
        self.prev_logp: Optional[torch.Tensor] = None
        self.prev_argmax: Optional[torch.Tensor] = None
        self.streak: Optional[torch.Tensor] = None

    def measure(self, x: torch.Tensor, logits: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """One value per row ([B]) after a recurrence, or None where the criterion cannot tell yet.
        x [B, 1, d] is the coda's input, logits [B, V] the probe's next-token logits."""
        c = self.rule.criterion
        value = None
        if c == "latent":
            if self.prev_x is not None:
                value = (x - self.prev_x).flatten(1).norm(dim=1) / x.flatten(1).norm(dim=1).clamp_min(1e-12)
            self.prev_x = x
            return value
        logp = F.log_softmax(logits.float(), -1)
        if c == "kl":
            if self.prev_logp is not None:
                value = (logp.exp() * (logp - self.prev_logp)).sum(-1)
        elif c in ("entropy", "entropy-diff"):
            h = -(logp.exp() * logp).sum(-1)
            if c == "entropy":
                value = h
            elif self.prev_logp is not None:
                value = (h - (-(self.prev_logp.exp() * self.prev_logp).sum(-1))).abs()
        elif c == "argmax":
            top = logp.argmax(-1)
            same = torch.zeros_like(top) if self.prev_argmax is None else (top == self.prev_argmax).long()
            self.streak = same if self.streak is None else (self.streak + 1) * same
            self.prev_argmax = top
            value = self.rule.threshold - self.streak.float()
        self.prev_logp = logp
        return value

    def fires(self, value: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if value is None:
            return None
        return value <= 0 if self.rule.criterion == "argmax" else value < self.rule.threshold
