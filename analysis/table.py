"""Loading and validating the scaling-law table (CSV, run directories, sweep directories)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import pandas as pd

from megaloop.depth import TEST_TIME_SUFFIX  # noqa: F401 - the table's test-time rows, named where sweeps write them
from megaloop.errors import UserError

REQUIRED = ("n_once", "n_rec", "r", "tokens", "loss")
OPTIONAL_NUMERIC = ("flops", "n_adapter")
# A cell is one design point: runs that differ only in their seed. Rows with equal cell keys and
# different seeds are replicates of one cell (DESIGN.md, contracts of 2026-12-07).
CELL_COLUMNS = ("variant", "n_once", "n_rec", "r")
# what a run's own record says about its health; an empty cell means "not recorded"
RECORD_COLUMNS = ("vocab_size", "skipped_steps")


class FitInputError(ValueError, UserError):
    """Bad fit input; the message names the offending rows. The CLI prints it and exits 2."""


def _row_label(df: pd.DataFrame, i: int) -> str:
    run = f" (run {df['run'].iloc[i]!r})" if "run" in df.columns else ""
    return f"row {i + 1}{run}"


def validate(df: pd.DataFrame, source: str = "table") -> pd.DataFrame:
    """Check columns and values; return a clean copy with float columns. Raises FitInputError
    listing every problem (all rows at once, so a user fixes the table in one pass)."""
    df = df.copy()
    df.columns = [str(c).strip() for c in df.columns]
    if "val_loss" in df.columns and "loss" not in df.columns:
        df = df.rename(columns={"val_loss": "loss"})
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise FitInputError(f"{source}: missing column(s) {', '.join(missing)}; "
                            f"need {', '.join(REQUIRED)} (optional: run, variant, flops, "
                            f"{', '.join(RECORD_COLUMNS)})")
    if len(df) == 0:
        raise FitInputError(f"{source}: no runs")
    problems: list[str] = []
    for col in REQUIRED + tuple(c for c in OPTIONAL_NUMERIC if c in df.columns):
        num = pd.to_numeric(df[col], errors="coerce")
        raw = df[col]
        for i in range(len(df)):
            v = num.iloc[i]
            if pd.isna(v):
                what = "is missing/NaN" if pd.isna(raw.iloc[i]) or str(raw.iloc[i]).strip().lower() in (
                    "nan", "") else f"is not a number ({raw.iloc[i]!r})"
                problems.append(f"{_row_label(df, i)}: {col} {what}")
            elif not np.isfinite(v):
                problems.append(f"{_row_label(df, i)}: {col} is not finite ({v})")
            elif col == "n_rec" and v < 0:
                problems.append(f"{_row_label(df, i)}: n_rec must be >= 0, got {v:g}")
            elif col == "r" and v < 1:
                problems.append(f"{_row_label(df, i)}: r must be >= 1, got {v:g}")
            elif col == "n_adapter" and not 0 <= v <= df["n_rec"].iloc[i]:
                problems.append(f"{_row_label(df, i)}: n_adapter must be in [0, n_rec], got {v:g}")
            elif col not in ("n_rec", "r", "n_adapter") and v <= 0:
                problems.append(f"{_row_label(df, i)}: {col} must be positive, got {v:g}")
        df[col] = num.astype(float)
    for col in (c for c in RECORD_COLUMNS if c in df.columns):
        num = pd.to_numeric(df[col], errors="coerce")
        for i in range(len(df)):
            v, raw = num.iloc[i], df[col].iloc[i]
            if pd.isna(v) and not (pd.isna(raw) or str(raw).strip().lower() in ("nan", "")):
                problems.append(f"{_row_label(df, i)}: {col} is not a number ({raw!r})")
            elif col == "vocab_size" and not (pd.isna(v) or v >= 2):
                problems.append(f"{_row_label(df, i)}: vocab_size must be >= 2, got {v:g}")
            elif col == "skipped_steps" and not (pd.isna(v) or v >= 0):
                problems.append(f"{_row_label(df, i)}: skipped_steps must be >= 0, got {v:g}")
        df[col] = num.astype(float)
    if "run" in df.columns:
        df["run"] = df["run"].astype(str)
        dup = df["run"].duplicated(keep=False)
        for name in pd.unique(df.loc[dup, "run"]):
            rows = ", ".join(str(i + 1) for i in np.flatnonzero(df["run"].to_numpy() == name))
            problems.append(f"rows {rows}: duplicate run {name!r}")
    else:
        dup = df.duplicated(keep=False)
        if dup.any():
            problems.append(f"rows {', '.join(str(i + 1) for i in np.flatnonzero(dup))}: duplicate runs "
                            "(identical rows)")
        df.insert(0, "run", [f"row{i + 1}" for i in range(len(df))])
    if "variant" in df.columns:
        bad = df["variant"].isna()
        for i in np.flatnonzero(bad):
            problems.append(f"{_row_label(df, i)}: variant is empty")
        df["variant"] = df["variant"].astype(str)
    if "seed" in df.columns:
        for i in np.flatnonzero(df["seed"].isna().to_numpy()):
            problems.append(f"{_row_label(df, i)}: seed is empty")
        df["seed"] = df["seed"].map(lambda v: str(int(v)) if isinstance(v, float) and v.is_integer() else str(v))
    if not problems:
        problems += _repeated_cells(df)
    if problems:
        head = f"{source}: {len(problems)} problem(s) in the table:\n  "
        raise FitInputError(head + "\n  ".join(problems))
    return df.reset_index(drop=True)


def budget_of(df: pd.DataFrame) -> pd.Series:
    """A run's compute budget, to 3 significant digits: the flops column (the sweep's target),
    else 6 (n_once + r n_rec) tokens. Runs of one budget share an iso-FLOP group and a cell."""
    if "flops" in df.columns:
        c = df["flops"].astype(float)
    else:
        c = 6.0 * (df["n_once"] + df["r"] * df["n_rec"]) * df["tokens"]
    return c.map(lambda v: float(f"{v:.3g}"))


def cell_keys(df: pd.DataFrame) -> np.ndarray:
    """(R,) int: the cell (variant, n_once, n_rec, r, budget) of every run; seeds of one cell share it."""
    cols = [df[c] if c in df.columns else pd.Series("", index=df.index) for c in CELL_COLUMNS]
    key = pd.MultiIndex.from_arrays([c.astype(str) for c in cols] + [budget_of(df).astype(str)])
    return pd.factorize(key)[0]


def match_keys(df: pd.DataFrame) -> np.ndarray:
    """(R,) int: the design point (n_once, r, budget) across variants. n_once (prelude, coda and
    norms) is the same for every variant at one width, while n_rec differs by the probe's own
    parameters (hyperconnect lanes), so it is the width's fingerprint; a paired bootstrap draws
    the cells of all variants at one design point together."""
    key = pd.MultiIndex.from_arrays([df["n_once"].astype(str), df["r"].astype(str), budget_of(df).astype(str)])
    return pd.factorize(key)[0]


def _repeated_cells(df: pd.DataFrame) -> list[str]:
    """Repeated design points that would silently merge: without a seed column, two runs of one
    cell (same variant, n_once, n_rec, r, tokens); with one, a cell with a seed twice."""
    cols = [c for c in CELL_COLUMNS if c in df.columns] + ["tokens"] + (["seed"] if "seed" in df.columns else [])
    dup = df.duplicated(subset=cols, keep=False).to_numpy()
    out = []
    for _, g in df[dup].groupby(cols, sort=False):
        rows = ", ".join(f"{i + 1} ({df['run'].iloc[i]!r})" for i in g.index)
        if "seed" in df.columns:
            out.append(f"rows {rows}: the same cell with the same seed {g['seed'].iloc[0]!r} twice")
        else:
            out.append(f"rows {rows}: the same cell ({', '.join(cols)}) repeated and no seed column; "
                       "if these are runs with different seeds, add a `seed` column (megaloop sweep "
                       "collect writes it) so they are fitted as one cell, not merged silently")
    return out


def record_divergence(df: pd.DataFrame) -> list[str]:
    """Per run, why its own record says it diverged ('' when it does not): non-finite steps
    skipped during training, or a loss above ln(vocab_size), the loss of a uniform guess."""
    out = []
    for i in range(len(df)):
        why = []
        skipped = df["skipped_steps"].iloc[i] if "skipped_steps" in df.columns else np.nan
        if skipped > 0:
            why.append(f"{skipped:g} non-finite step(s) skipped during training")
        vocab = df["vocab_size"].iloc[i] if "vocab_size" in df.columns else np.nan
        if vocab > 0 and df["loss"].iloc[i] > np.log(vocab):
            why.append(f"loss {df['loss'].iloc[i]:.4g} above ln(vocab_size) = {np.log(vocab):.4g}, "
                       "the loss of a uniform guess")
        out.append("; ".join(why))
    return out


def _vocab_from_config(run_dir: Path):
    """model.vocab_size from the run's resolved config.yaml (None when unreadable)."""
    try:
        import yaml

        return int(yaml.safe_load((run_dir / "config.yaml").read_text())["model"]["vocab_size"])
    except Exception:  # no config, no yaml, or no such key: the record is simply absent
        return None


def _read_summary(path: Path) -> dict:
    try:
        s = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FitInputError(f"{path}: cannot read summary.json ({exc})") from None
    if not isinstance(s, dict):
        raise FitInputError(f"{path}: summary.json is not a JSON object")
    row = {k: s.get(k) for k in ("run", "n_once", "n_rec", "r", "tokens", "flops", "variant",
                                 "vocab_size", "skipped_steps", "seed", "n_adapter") if s.get(k) is not None}
    if "vocab_size" not in row and (vocab := _vocab_from_config(path.parent)) is not None:
        row["vocab_size"] = vocab
    row["loss"] = s.get("val_loss", s.get("loss"))
    if s.get("target_flops"):  # the run's compute budget: runs of one budget share an iso-FLOP group
        row["flops"] = s["target_flops"]
    row.setdefault("run", path.parent.name)
    lacking = [k for k in ("n_once", "n_rec", "r", "tokens") if k not in row]
    lacking += ["val_loss"] if row["loss"] is None else []
    if lacking:
        row["_problem"] = f"{path}: summary.json lacks {', '.join(lacking)}"
    return row


def _manifest_variants(root: Path) -> dict[str, str]:
    """Optional DIR/manifest.json: a list of {run, variant} (or {"runs": [...]})."""
    mf = root / "manifest.json"
    if not mf.is_file():
        return {}
    try:
        m = json.loads(mf.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FitInputError(f"{mf}: cannot read manifest ({exc})") from None
    runs = m.get("runs", []) if isinstance(m, dict) else m
    return {str(x["run"]): str(x["variant"]) for x in runs
            if isinstance(x, dict) and "run" in x and "variant" in x}


def load_table(sources: Sequence[str | Path]) -> pd.DataFrame:
    """One CSV, or any mix of run directories / sweep directories (searched recursively for
    summary.json). Returns a validated DataFrame."""
    paths = [Path(s) for s in sources]
    if not paths:
        raise FitInputError("no input given: pass a CSV table or run directories")
    for p in paths:
        if not p.exists():
            raise FitInputError(f"{p}: no such file or directory")
    if len(paths) == 1 and paths[0].is_file():
        p = paths[0]
        try:
            df = pd.read_csv(p, skipinitialspace=True)
        except Exception as exc:  # pandas raises many types for malformed CSVs
            raise FitInputError(f"{p}: cannot parse as CSV ({exc})") from None
        return validate(df, str(p))
    rows = []
    for p in paths:
        if p.is_file():
            if p.name != "summary.json":
                raise FitInputError(f"{p}: give one CSV table, or run/sweep directories")
            rows.append(_read_summary(p))
            continue
        variants = _manifest_variants(p)
        found = sorted(p.rglob("summary.json"))
        if not found:
            raise FitInputError(f"{p}: no summary.json found under this directory")
        for f in found:
            row = _read_summary(f)
            if "variant" not in row and row["run"] in variants:
                row["variant"] = variants[row["run"]]
            rows.append(row)
    problems = [r["_problem"] for r in rows if "_problem" in r]
    if problems:
        raise FitInputError(f"{len(problems)} run(s) cannot be used:\n  " + "\n  ".join(problems))
    df = pd.DataFrame(rows)
    if "variant" in df.columns:
        df["variant"] = df["variant"].fillna("baseline")
    return validate(df, "run directories")
