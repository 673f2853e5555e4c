"""Capacity calculator: what a looped model is worth in unique parameters, and what it costs.

unique-parameter equivalent  N_once + r**phi * N_rec   (what the law says it is worth)
compute equivalent           N_once + r * N_rec        (what it costs per token, roughly)
With a fitted law (the --json output of `megaloop fit`) and a token count, the predicted loss.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .table import FitInputError


@dataclass
class Capacity:
    n_once: float
    n_rec: float
    r: float
    phi: float

    @property
    def unique_equivalent(self) -> float:
        return self.n_once + self.r ** self.phi * self.n_rec

    @property
    def compute_equivalent(self) -> float:
        return self.n_once + self.r * self.n_rec

    def predicted_loss(self, law: dict[str, float], tokens: float) -> float:
        return law["E"] + law["A"] * self.unique_equivalent ** (-law["alpha"]) + law["B"] * tokens ** (-law["beta"])


def load_law(path: str | Path, variant: str | None = None) -> dict[str, Any]:
    """Read the law from a `megaloop fit --json` file (optionally one variant's fit)."""
    try:
        d = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FitInputError(f"{path}: cannot read fitted law ({exc})") from None
    if variant is not None:
        if variant not in d.get("variants", {}):
            raise FitInputError(f"{path}: no variant {variant!r} (have {', '.join(d.get('variants', {})) or 'none'})")
        d = d["variants"][variant]
    missing = [k for k in ("E", "A", "alpha", "B", "beta") if not isinstance(d.get(k), (int, float))]
    if missing:
        raise FitInputError(f"{path}: not a fit result, missing {', '.join(missing)}")
    return d


def from_config(path: str | Path, r: float | None = None) -> tuple[float, float, float]:
    """(n_once, n_rec, r) from a model config, through megaloop's own parameter accounting
    (imported lazily: the calculator's plain mode needs neither the config nor the model code)."""
    try:
        from megaloop.accounting import count_params
        from megaloop.config import load_config
        from megaloop.errors import UserError
    except ImportError as exc:
        raise FitInputError(f"--config needs megaloop.accounting ({exc}); pass --n-once/--n-rec/--r") from None
    try:
        cfg = load_config(str(path))
    except UserError as exc:
        raise FitInputError(f"{path}: {exc}") from None
    counts = count_params(cfg.model, int(r) if r else None)
    return float(counts.n_once), float(counts.n_rec), float(r or counts.r)
