"""`megaloop sweep collect`: every finished run of a sweep into the scaling-law table.

DIR/fit_table.csv holds the DESIGN.md columns n_once, n_rec, r, tokens, loss (validation loss in
nats, at the trained r) plus run, variant, flops, tokens_per_param (tokens / (n_once + n_rec), the
unique non-embedding parameters), vocab_size and skipped_steps (non-finite steps the run skipped),
one row per finished, healthy run, in manifest order. `seed` is the run's train.seed (runs of one
cell that differ only in seed are that cell's repeats: the fit groups them); `n_adapter` is the
injection adapter's share of n_rec (what moves between N_rec and N_once in the fit's counting
sensitivity). A variant planned with `r1_from: OTHER` gets OTHER's r = 1 rows again under its own
name (same run, same loss): its r = 1 level. DIR/test_time.csv has one row per finished
run and evaluated recurrence count r_test (summary.json's val_loss_by_r; see grid.test_time_recur). `tokens` is what the run trained on; `flops` is its budget (the sweep's target FLOPs), not
tokens x FLOPs-per-token, which falls short of the budget by up to one step and would split one
iso-FLOP group into several. Every other run is reported by status, so a researcher sees what the fit is missing:

  finished    summary.json with a finite loss (noted when it is not below the unigram entropy of
              the validation split: undertrained, yet still a measurement)
  diverged    the loss is non-finite or worse than uniform guessing (ln vocab: training went
              backwards), or the run stopped on non-finite steps (its FAILED note says "diverged")
  failed      the training process exited with an error (DIR/runs/NAME/FAILED)
  running     its run directory's lock is held by a live training (any host sharing the folder)
  incomplete  has checkpoints but no summary (interrupted; `sweep run` resumes it)
  missing     never started

A run trained with a sampled depth (model.recur_sampling) has no single r: it enters the law at
the r it is *evaluated* at. It gives one row under its own variant at r = round(E[r]) (its mean
depth: same shape and expected FLOPs as the fixed-r run it is compared with), named like the run,
and one row per evaluated r (its mean, twice its mean and the grid's fixed r, as `sweep plan`
sets train.eval_recur) under the variant `VARIANT_tt` ("test-time"), named `RUN@rR`. Its
test_time.csv rows are its own (name, variant, r = round(E[r])), one per evaluated r_test.
"""
from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass, field
from typing import Optional

import yaml

from ..depth import TEST_TIME_SUFFIX
from ..errors import UserError
from .plan import read_manifest
from ..run_lock import holder

TABLE_COLUMNS = ("n_once", "n_rec", "r", "tokens", "loss", "run", "variant", "flops", "seed", "n_adapter",
                 "tokens_per_param", "vocab_size", "skipped_steps", "tokens_by_dataset")
# One row per finished run and evaluated r_test (summary.json's val_loss_by_r): test-time curves.
TEST_TIME_COLUMNS = ("run", "variant", "r", "r_test", "loss", "n_once", "n_rec", "tokens", "flops")
STATUSES = ("finished", "diverged", "failed", "running", "incomplete", "missing")


@dataclass
class RunStatus:
    run: str
    status: str
    reason: str = ""
    row: Optional[dict] = None     # the fit-table row, for finished runs
    extra_rows: list = field(default_factory=list)  # a sampled-depth run's rows at its evaluated r
    curve_row: Optional[dict] = None  # the run's own row, read for test_time.csv (None: `row`)


@dataclass
class Collection:
    name: str
    table_path: Optional[str]
    runs: list[RunStatus] = field(default_factory=list)
    n_rows: int = 0                # table rows (a sampled-depth run gives several)

    def by_status(self, status: str) -> list[RunStatus]:
        return [r for r in self.runs if r.status == status]

    def counts(self) -> dict[str, int]:
        return {s: len(self.by_status(s)) for s in STATUSES}

    def as_dict(self) -> dict:
        return {"sweep": self.name, "table": self.table_path, "n_runs": len(self.runs), "counts": self.counts(),
                "runs": {s: {r.run: r.reason for r in self.by_status(s)} for s in STATUSES if s != "finished"}}


def _uniform_loss(run_dir: str) -> Optional[float]:
    """ln(vocab_size): the loss of a model that learned nothing; above it, training went backwards."""
    try:
        with open(os.path.join(run_dir, "config.yaml")) as f:
            return math.log(int(yaml.safe_load(f)["model"]["vocab_size"]))
    except (OSError, KeyError, TypeError, ValueError, yaml.YAMLError):
        return None


def run_status(sweep_dir: str, row: dict) -> RunStatus:
    name = row["run"]
    run_dir = os.path.join(sweep_dir, "runs", name)
    summary_path = os.path.join(run_dir, "summary.json")
    if os.path.isfile(summary_path):
        try:
            with open(summary_path) as f:
                s = json.load(f)
            loss = float(s["val_loss"])
        except (OSError, ValueError, KeyError, TypeError) as e:
            return RunStatus(name, "failed", f"unreadable summary.json ({e})")
        if not math.isfinite(loss):
            return RunStatus(name, "diverged", f"val_loss is {loss}")
        uniform = _uniform_loss(run_dir)
        if uniform is not None and loss > uniform:
            return RunStatus(name, "diverged", f"val_loss {loss:.4f} is worse than guessing uniformly "
                                               f"(ln vocab = {uniform:.4f})")
        notes = []
        entropy = s.get("unigram_entropy")
        if entropy is not None and loss >= float(entropy):
            # kept in the table: an undertrained point is still a measurement, but the user should know
            notes.append(f"val_loss {loss:.4f} is not below the unigram entropy {float(entropy):.4f} (undertrained?)")
        n_once, n_rec = float(s.get("n_once", row["n_once"])), float(s.get("n_rec", row["n_rec"]))
        tokens = float(s.get("tokens", row["tokens"]))
        table_row = {"n_once": s.get("n_once", row["n_once"]), "n_rec": s.get("n_rec", row["n_rec"]),
                     "r": s.get("r", row["r"]), "tokens": s.get("tokens", row["tokens"]), "loss": loss,
                     "run": name, "variant": row.get("variant", "baseline"),
                     "flops": row["target_flops"], "seed": _run_seed(run_dir, row),
                     "n_adapter": _adapter_params(run_dir),
                     "tokens_per_param": round(tokens / max(1.0, n_once + n_rec), 3),
                     "vocab_size": round(math.exp(uniform)) if uniform is not None else "",
                     "skipped_steps": int(s.get("skipped_steps") or 0),
                     # the token ledger (summary.json): tokens trained per dataset, summing to `tokens`
                     "tokens_by_dataset": json.dumps(s.get("tokens_by_dataset") or {}, sort_keys=True),
                     "val_loss_by_r": s.get("val_loss_by_r") or {}}
        if s.get("skipped_steps"):
            notes.append(f"{s['skipped_steps']} non-finite step(s) skipped")
        if s.get("recur_sampling", "fixed") != "fixed":
            main, extra, own = _sampled_rows(run_dir, s, table_row, uniform, notes)
            return RunStatus(name, "finished", "; ".join(notes), main, extra, own)
        return RunStatus(name, "finished", "; ".join(notes), table_row)
    live = holder(run_dir)
    if live is not None:
        return RunStatus(name, "running", f"being trained: {live.describe()}")
    failed_path = os.path.join(run_dir, "FAILED")
    if os.path.isfile(failed_path):
        with open(failed_path, errors="replace") as f:
            note = " ".join(ln.strip() for ln in f.readlines()[:2] if ln.strip())
        return RunStatus(name, "diverged" if "diverged" in note else "failed", note)
    if os.path.isdir(os.path.join(run_dir, "checkpoints")):
        return RunStatus(name, "incomplete", "has checkpoints, no summary: `megaloop sweep run` resumes it")
    return RunStatus(name, "missing", "not started")


def _run_config(run_dir: str):
    from ..config import load_config
    return load_config(os.path.join(run_dir, "config.yaml"))


def _run_seed(run_dir: str, row: dict):
    if row.get("seed") not in (None, ""):
        return int(row["seed"])
    try:
        return _run_config(run_dir).train.seed
    except (OSError, UserError):  # no readable config (a run dir copied without it): seed unknown
        return ""


def _adapter_params(run_dir: str):
    from ..accounting import injection_params
    try:
        cfg = _run_config(run_dir).model
    except (OSError, UserError):
        return ""
    return injection_params(cfg) if cfg.input_injection == "linear" else 0


def _with_r1_controls(rows: list[dict], controls: dict) -> list[dict]:
    """Each variant planned with `r1_from: SRC` gets SRC's r = 1 rows under its own name."""
    out = list(rows)
    for variant, src in controls.items():
        out += [dict(row, variant=variant) for row in rows
                if row["variant"] == src and int(row["r"]) == 1]
    return out


def _sampled_rows(run_dir: str, s: dict, row: dict, uniform: Optional[float], notes: list):
    """A sampled-depth run's rows: (the row at its mean depth or None, the rows at every evaluated r,
    the run's own row at its mean depth for test_time.csv, whether or not that depth is usable)."""
    from ..config import load_config
    from ..depth import mean_test_r
    cfg = load_config(os.path.join(run_dir, "config.yaml"))
    by_r = {int(k): float(v) for k, v in (s.get("val_loss_by_r") or {}).items()}
    planned = sorted({cfg.model.num_recur, *cfg.train.eval_recur})
    usable = {}
    for r in planned:
        loss = by_r.get(r)
        if loss is None:
            notes.append(f"not evaluated at r={r}: megaloop eval {run_dir} --recur {r}")
        elif not math.isfinite(loss) or (uniform is not None and loss > uniform):
            notes.append(f"val_loss at r={r} is {loss:.4g}, worse than uniform guessing: row left out")
        else:
            usable[r] = loss
    m = mean_test_r(cfg.model)
    main = dict(row, r=m, loss=usable[m]) if m in usable else None
    extra = [dict(row, r=r, loss=loss, run=f"{row['run']}@r{r}", variant=row["variant"] + TEST_TIME_SUFFIX)
             for r, loss in usable.items()]
    return main, extra, dict(row, r=m)


def collect(sweep_dir: str, out: Optional[str] = None) -> Collection:
    """Statuses of every run; writes the table of the finished ones (UserError when there are none)."""
    manifest = read_manifest(sweep_dir)
    result = Collection(name=manifest.get("name", ""), table_path=None,
                        runs=[run_status(sweep_dir, row) for row in manifest["runs"]])
    finished = result.by_status("finished")
    rows = [row for r in finished for row in ([r.row] if r.row else []) + r.extra_rows]
    rows = _with_r1_controls(rows, manifest.get("r1_controls") or {})
    if not rows:
        c = result.counts()
        raise UserError(f"{sweep_dir}: none of its {len(result.runs)} runs has finished yet "
                        f"({', '.join(f'{v} {k}' for k, v in c.items() if v)}). "
                        f"Train them first: megaloop sweep run {sweep_dir}")
    path = out or os.path.join(sweep_dir, "fit_table.csv")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    _write_csv(path, TABLE_COLUMNS, rows)
    curves = [{"run": r["run"], "variant": r["variant"], "r": r["r"], "r_test": int(k), "loss": v,
               "n_once": r["n_once"], "n_rec": r["n_rec"], "tokens": r["tokens"], "flops": r["flops"]}
              for r in (s.curve_row or s.row for s in finished) if r is not None
              for k, v in sorted(r["val_loss_by_r"].items(), key=lambda kv: int(kv[0]))]
    if curves:
        _write_csv(os.path.join(os.path.dirname(os.path.abspath(path)), "test_time.csv"), TEST_TIME_COLUMNS, curves)
    result.table_path, result.n_rows = path, len(rows)
    return result


def _write_csv(path: str, columns: tuple, rows: list[dict]) -> None:
    """Write atomically (a temp file renamed into place), so a reader never sees half a table."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(columns), lineterminator="\n", extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)


def format_collection(c: Collection, limit: int = 10) -> str:
    counts = c.counts()
    lines = [f"sweep {c.name}: {len(c.runs)} runs: " + ", ".join(f"{v} {k}" for k, v in counts.items() if v or k == "finished"),
             f"fit table: {c.table_path} ({counts['finished']} runs"
             + (f", {c.n_rows} rows)" if c.n_rows != counts["finished"] else ")")]
    noted = [r for r in c.by_status("finished") if r.reason]
    if noted:
        lines.append("finished, with notes:")
        lines += [f"  {r.run}: {r.reason}" for r in noted[:limit]]
        if len(noted) > limit:
            lines.append(f"  ... and {len(noted) - limit} more")
    for status in STATUSES[1:]:
        runs = c.by_status(status)
        if not runs:
            continue
        lines.append(f"{status}:")
        lines += [f"  {r.run}: {r.reason}" for r in runs[:limit]]
        if len(runs) > limit:
            lines.append(f"  ... and {len(runs) - limit} more")
    return "\n".join(lines)
