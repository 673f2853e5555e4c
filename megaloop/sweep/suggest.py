"""`megaloop sweep suggest`: the next runs to train, chosen for what they tell about phi per FLOP.

    megaloop sweep suggest TABLE.csv|RUN_DIRS --candidates SPEC.yaml --flops 2e19 [--target phi|dphi:V]
                           [--json] [--out NEXT.yaml]

The candidates are the runs a sweep file plans (every variant, r, size and budget of its grid);
runs the table already holds are left out. From the table it fits the law (analysis.fit.fit_law),
estimates the per-run noise of the log loss, and picks candidates greedily by the drop in the
target's linearised variance per FLOP (c-optimal design; analysis/design.py has the criterion).
Without a table (`-`) it proposes a seed design instead: every r at the smallest and the largest
size of the two cheapest budgets, enough to fit the law and read phi from r-contrasts.

--out writes a sweep file that plans exactly the suggested runs (the candidate file plus a
`select:` list), for `megaloop sweep plan NEXT.yaml --out SWEEP_DIR --append`.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd
import yaml

from ..analysis import design
from ..config import ConfigError
from ..errors import UserError
from .plan import PlannedRun, expand
from .spec import SweepSpec, load_sweep, read_sweep_yaml

DEFAULT_NOISE = 0.01      # per-run SD of the log loss assumed without a table (0.5-1.5 % measured here)
SEED_BUDGETS = 2          # the seed design uses the cheapest budgets, this many
MATCH_RTOL = 0.02         # a candidate matches a table run when n_once, n_rec and tokens agree this well


@dataclass
class Target:
    kind: str                  # phi | dphi
    variant: Optional[str]     # dphi's variant

    @classmethod
    def parse(cls, text: str) -> "Target":
        if text == "phi":
            return cls("phi", None)
        if text.startswith("dphi:") and len(text) > 5:
            return cls("dphi", text[5:])
        raise UserError(f"--target {text!r}: use phi, or dphi:VARIANT (the phi difference of VARIANT to the "
                        f"baseline)")


def baseline_of(variants: list[str]) -> str:
    """The variant phi is reported for (as in `megaloop fit`): 'baseline', else the first."""
    return "baseline" if "baseline" in variants else variants[0]


def candidate_frame(runs: list[PlannedRun]) -> pd.DataFrame:
    rows = []
    for r in runs:
        rows.append({"run": r.run, "variant": r.variant, "r": r.r, "size": r.size, "seed": r.seed, "budget": r.target_flops,
                     "n_once": r.n_once, "n_rec": r.n_rec, "tokens": r.tokens, "flops": r.target_flops,
                     "d_model": r.d_model, "n_head": r.n_head, "n_recur_block": r.n_recur_block,
                     "bptt_k": r.bptt_k, "input_injection": r.input_injection, "steps": r.steps})
    return pd.DataFrame(rows)


def in_table(cand: pd.DataFrame, df: pd.DataFrame) -> np.ndarray:
    """Which candidates the table already holds (same variant, r, n_once, n_rec, tokens, and seed
    where the table has a seed column)."""
    out = np.zeros(len(cand), bool)
    variants = df["variant"].astype(str).to_numpy() if "variant" in df.columns else np.full(len(df), None)
    for i, c in enumerate(cand.itertuples()):
        same = ((variants == c.variant) | (variants == None)) & (df["r"].to_numpy() == c.r)  # noqa: E711
        if "seed" in df.columns:
            same &= df["seed"].to_numpy(float) == float(c.seed)
        for col in ("n_once", "n_rec", "tokens"):
            v = df[col].to_numpy(float)
            same &= np.abs(v - getattr(c, col)) <= MATCH_RTOL * max(abs(getattr(c, col)), 1.0)
        out[i] = bool(same.any())
    return out


def noise_from_table(df: pd.DataFrame, law_df: pd.DataFrame, n_params: int) -> tuple[float, str]:
    """The per-run SD of the log loss: pooled within-cell SD where the table repeats a cell under
    several seeds, else the fit's residual SD with its degrees of freedom (which also holds misfit,
    so it errs on the large side)."""
    keys = [k for k in ("variant", "n_once", "n_rec", "r", "tokens") if k in df.columns]
    if "seed" in df.columns:
        log_l = np.log(df["loss"].astype(float))
        cells = log_l.groupby([df[k] for k in keys])
        dof = len(df) - cells.ngroups
        if dof >= 3:
            dev = log_l - cells.transform("mean")
            return float(math.sqrt(float((dev ** 2).sum()) / dof)), f"seeds ({dof} degrees of freedom)"
    res = np.asarray(law_df["log_residual"], float)
    dof = max(len(res) - n_params, 1)
    return float(math.sqrt(float(np.sum(res ** 2)) / dof)), f"fit residuals ({dof} degrees of freedom)"


def _seed_design(cand: pd.DataFrame, flops: float) -> list[int]:
    """Every r at the smallest and largest size of the SEED_BUDGETS cheapest budgets, cheapest first,
    as far as the FLOPs reach."""
    budgets = sorted(cand["budget"].unique())[:SEED_BUDGETS]
    picked = []
    for b in budgets:
        at = cand[cand["budget"] == b]
        for s in (at["size"].min(), at["size"].max()):
            picked += list(at.index[at["size"] == s])
    picked = sorted(dict.fromkeys(picked), key=lambda i: (cand.loc[i, "flops"], cand.loc[i, "r"], cand.loc[i, "size"]))
    out, spent = [], 0.0
    for i in picked:
        if spent + cand.loc[i, "flops"] <= flops * (1 + 1e-9):
            out.append(i)
            spent += cand.loc[i, "flops"]
    return out


def suggest(df: Optional[pd.DataFrame], spec: SweepSpec, runs: list[PlannedRun], flops: float,
            target: Target, noise: Optional[float] = None, delta: float = 1e-3) -> dict:
    """The suggestion as a JSON-ready dict: {runs: [...], width_now, width_after, ...}."""
    from ..analysis.fit import fit_law, phi_identifiability

    cand = candidate_frame(runs)
    if not (cand["r"] > 1).any():
        raise UserError(f"{spec.source}: no candidate run has r > 1, so none can tell anything about phi. "
                        f"Give grid.r (or the variants' r) values above 1")
    cheapest = float(cand["flops"].min())
    if not flops >= cheapest:
        raise UserError(f"--flops {flops:.3g} is below the cheapest candidate run ({cheapest:.3g} FLOPs); "
                        f"raise --flops to at least that")
    branching = bool(getattr(spec, "branching", False))
    decay_frac = _decay_frac(spec)
    info = {"target": target.kind if target.kind == "phi" else f"dphi:{target.variant}", "flops_budget": flops,
            "branching": branching, "candidates": spec.source}
    if df is None:
        return _seed(cand, spec, flops, target, noise, delta, info)

    variants = list(pd.unique(df["variant"].astype(str))) if "variant" in df.columns else ["baseline"]
    if "variant" not in df.columns:
        df = df.assign(variant="baseline")
    base = baseline_of(variants)
    if target.kind == "dphi":
        if target.variant not in variants:
            raise UserError(f"--target dphi:{target.variant}: the table has no runs of variant "
                            f"{target.variant!r} (it has: {', '.join(variants)})")
        if target.variant == base:
            raise UserError(f"--target dphi:{base}: {base!r} is the baseline; dphi compares another variant to it")
        names = [base, target.variant]
    else:
        names = [base]
    for v in names:
        ok, why = phi_identifiability(df[df["variant"] == v])
        if not ok:
            raise UserError(f"the table cannot identify phi of variant {v!r} ({why}). Add runs at a second r "
                            f"(a seed design: megaloop sweep suggest - --candidates ...)")
    missing = [v for v in names if v not in set(cand["variant"])]
    if missing:
        raise UserError(f"{spec.source} has no candidate runs of variant {missing[0]!r}; its variants: "
                        f"{', '.join(pd.unique(cand['variant']))}")
    used = df[df["variant"].isin(names)].reset_index(drop=True)
    fit = fit_law(used, delta, n_boot=0, profile=False, holdout=False, joint=len(names) > 1)
    raw = fit.raw
    phi_names = fit.phi_names if len(names) > 1 else [base]
    sigma, source = (noise, "--noise") if noise is not None else noise_from_table(used, fit.df, len(raw))
    sigma2 = sigma ** 2 * design.huber_variance_factor(sigma, delta)
    k = {v: phi_names.index(v) for v in names} if len(names) > 1 else {base: 0}
    c = design.contrast(len(phi_names), k[names[-1]], k[base] if target.kind == "dphi" else None)
    J_tab = design.jacobian(raw, fit.df["n_once"], fit.df["n_rec"], fit.df["r"], fit.df["tokens"],
                            [k[str(v)] for v in fit.df["variant"]] if len(names) > 1 else None, len(phi_names))
    state = design.DesignState.start(J_tab, c, sigma2)
    pool = cand[cand["variant"].isin(names) & ~in_table(cand, used)].reset_index(drop=True)
    if pool.empty:
        raise UserError(f"the table already holds every candidate run of {spec.source} for "
                        f"{', '.join(names)}; give a larger candidate grid")
    J = design.jacobian(raw, pool["n_once"], pool["n_rec"], pool["r"], pool["tokens"],
                        [k[v] for v in pool["variant"]] if len(names) > 1 else None, len(phi_names))
    cost = (design.branched_cost(pool["flops"].to_numpy(), _groups(pool), decay_frac) if branching
            else design.plain_cost(pool["flops"].to_numpy()))
    res = design.greedy(state, J, cost, flops)
    est = float(c @ raw)
    info.update({"baseline": base, "estimate": est, "sigma": sigma, "noise_source": source,
                 "huber_variance_factor": sigma2 / sigma ** 2 if sigma else 1.0, "width_now": res.width_before,
                 "interval_now": [est - res.width_before / 2, est + res.width_before / 2],
                 "width_after": res.picks[-1].width_after if res.picks else res.width_before,
                 "flops_spent": res.spent, "seed_design": False, "n_table_runs": len(used),
                 "law": {**fit.params(), **{f"phi:{n}": float(raw[design.N_BASE + i]) for i, n in enumerate(phi_names)}}})
    info["runs"] = [_row(pool.loc[p.index], spec, p.cost, p.width_after) for p in res.picks]
    return info


def _seed(cand, spec, flops, target, noise, delta, info) -> dict:
    variants = list(pd.unique(cand["variant"]))
    names = [baseline_of(variants)] if target.kind == "phi" else [baseline_of(variants), target.variant]
    if target.kind == "dphi" and target.variant not in variants:
        raise UserError(f"--target dphi:{target.variant}: {spec.source} has no variant {target.variant!r} "
                        f"(it has: {', '.join(variants)})")
    picks: list[int] = []
    for v in names:
        sub = cand[(cand["variant"] == v)]
        picks += _seed_design(sub, (flops - sum(cand.loc[i, "flops"] for i in picks)))
    # the expected widths are nominal: at the reference study's law and an assumed noise
    sigma = noise if noise is not None else DEFAULT_NOISE
    sigma2 = sigma ** 2 * design.huber_variance_factor(sigma, delta)
    n_phi = len(names)
    raw = np.concatenate([design.reference_raw()[:design.N_BASE], [design.REFERENCE_LAW["phi"]] * n_phi])
    c = design.contrast(n_phi, n_phi - 1, 0 if n_phi > 1 else None)
    state = design.DesignState.start(np.zeros((0, len(raw))), c, sigma2)
    out = []
    for i in picks:
        row = cand.loc[i]
        J = design.jacobian(raw, [row["n_once"]], [row["n_rec"]], [row["r"]], [row["tokens"]],
                            [names.index(row["variant"])], n_phi)
        state.add(J)
        out.append(_row(row, spec, float(row["flops"]), state.width()))
    info.update({"baseline": names[0], "seed_design": True, "sigma": sigma,
                 "noise_source": "--noise" if noise is not None else f"assumed ({DEFAULT_NOISE:g})",
                 "width_after_is": "nominal: at the reference study's law (REFERENCES.md), not a fit",
                 "flops_spent": float(sum(cand.loc[i, "flops"] for i in picks)),
                 "width_after": out[-1]["width_after"] if out else None, "runs": out})
    return info


def _groups(pool: pd.DataFrame) -> list:
    return list(zip(pool["variant"], pool["size"], pool["r"], pool["seed"]))


def _decay_frac(spec: SweepSpec) -> float:
    optim = spec.base.get("optim") or {}
    return float(optim.get("decay_frac", 0.2))


def _row(c, spec: SweepSpec, cost: float, width_after: float) -> dict:
    variant = next(v for v in spec.variants if v.name == c["variant"])
    return {"run": c["run"], "variant": c["variant"], "r": int(c["r"]), "size": int(c["size"]), "seed": int(c["seed"]),
            "budget": float(c["budget"]), "n_once": int(c["n_once"]), "n_rec": int(c["n_rec"]),
            "tokens": int(c["tokens"]), "flops": float(c["flops"]), "cost": cost,
            "model": {"d_model": int(c["d_model"]), "n_head": int(c["n_head"]),
                      "n_recur_block": int(c["n_recur_block"]), "num_recur": int(c["r"]),
                      "bptt_k": None if c["bptt_k"] is None or (isinstance(c["bptt_k"], float) and math.isnan(c["bptt_k"]))
                      else int(c["bptt_k"]), "input_injection": c["input_injection"], **variant.model_for(int(c["r"]))},
            "width_after": width_after}


def write_spec(candidates_path: str, picks: list[dict], out: str) -> str:
    """The candidate sweep file with a `select:` list of the suggested runs, written next to nothing
    else: `megaloop sweep plan OUT --out SWEEP_DIR --append` plans exactly those runs."""
    data = read_sweep_yaml(candidates_path)
    data["select"] = [{"variant": p["variant"], "r": p["r"], "size": p["size"], "flops": p["budget"], "seed": p["seed"]}
                      for p in picks]
    text = ("# written by megaloop sweep suggest from " + candidates_path + "\n"
            + yaml.safe_dump(data, sort_keys=False))
    tmp = f"{out}.tmp{os.getpid()}"
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, out)
    return out


def load_candidates(path: str) -> tuple[SweepSpec, list[PlannedRun]]:
    spec = load_sweep(path)
    try:
        runs = expand(spec, os.path.join(os.path.dirname(os.path.abspath(path)), "_suggest_candidates"))
    except ConfigError as e:
        raise ConfigError(f"--candidates {path}: {e}") from None
    return spec, runs


def format_suggestion(s: dict) -> str:
    lines = []
    if s["seed_design"]:
        lines.append(f"no table: a seed design of {len(s['runs'])} runs ({s['flops_spent']:.3g} of {s['flops_budget']:.3g} "
                     f"FLOPs); widths are nominal (reference law, noise {s['sigma']:.3g})")
    else:
        lo, hi = s["interval_now"]
        lines.append(f"{s['target']} = {s['estimate']:.3f}, linearised 95 % interval [{lo:.3f}, {hi:.3f}] "
                     f"(width {s['width_now']:.3f}) from {s['n_table_runs']} runs; noise SD {s['sigma']:.4f} in "
                     f"log loss ({s['noise_source']})")
        lines.append(f"{len(s['runs'])} runs for {s['flops_spent']:.3g} of {s['flops_budget']:.3g} FLOPs"
                     + (" (budget branching)" if s["branching"] else "")
                     + (f": expected width {s['width_after']:.3f}" if s["runs"] else ""))
    lines.append(f"  {'run':<34} {'r':>2} {'size':>4} {'budget':>9} {'tokens':>14} {'cost':>9} {'width after':>11}")
    for r in s["runs"]:
        lines.append(f"  {r['run']:<34} {r['r']:>2} {r['size']:>4} {r['budget']:>9.3g} {r['tokens']:>14,} "
                     f"{r['cost']:>9.3g} {r['width_after']:>11.4f}")
    return "\n".join(lines)
