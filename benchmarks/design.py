"""How many FLOPs each way of ordering the reference grid needs to pin phi: a simulation (JSON).

    python benchmarks/design.py --truths 24 --out benchmarks/results/design.json

Truths: laws around the reference fit (REFERENCES.md) with phi in {0.2, 0.46, 0.8} (cycled), E and the
exponents within +-10 % / +-15 %, A and B log-normal (SD 0.3 in log). Candidates: the runs of
configs/sweeps/iso_depth.yaml (116). Per truth, every candidate's log loss is drawn once
(truth + Gaussian noise), so all strategies see the same measurements (a paired comparison), under
two noise regimes: `measured` (per-run SD drawn in [0.5 %, 1.5 %], what this machine's seeds show)
and `low` (0.3 %).

Strategies: the full grid at once; random order; cheapest first; `megaloop sweep suggest` (seed
design, then batches of 4 chosen at the current fit); the same with budget branching (a run below
an existing trunk of its (size, r) costs its decay only, decay_frac 0.2). After each batch of 4 the
law is refitted (warm-started Huber polish of the project's objective, analysis/law.py) and phi's
95 % interval is the linearised (Fisher) one at the refit with the known noise and the Huber
efficiency factor; a strategy stops when the width is at most the target. Recorded: FLOPs spent /
full grid's FLOPs, and whether the interval at stopping covers the true phi.

Targets: `abs` = width 0.10 (the issue's); where the full grid itself cannot reach it (its width at
the truth is above 0.10), also `rel` = 1.25 x the full grid's own width, so the strategies can still be
compared at the precision the grid can deliver.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from megaloop.analysis import design  # noqa: E402
from megaloop.analysis.law import N_BASE, LawData, batched_lbfgs, predict_log_loss, search_box, to_centred, to_raw  # noqa: E402
from megaloop.sweep.suggest import _seed_design, candidate_frame, load_candidates  # noqa: E402

DELTA = 1e-3
PHIS = (0.2, 0.46, 0.8)
BATCH = 4
DECAY_FRAC = 0.2
MIN_RUNS = 8
REFIT_PHIS = (0.1, 0.3, 0.6, 1.0)


def draw_truth(k: int, rng: np.random.Generator) -> np.ndarray:
    p = design.REFERENCE_LAW
    E = p["E"] * rng.uniform(0.9, 1.1)
    A = p["A"] * math.exp(rng.normal(0, 0.3))
    B = p["B"] * math.exp(rng.normal(0, 0.3))
    alpha = p["alpha"] * rng.uniform(0.85, 1.15)
    beta = p["beta"] * rng.uniform(0.85, 1.15)
    return np.array([math.log(A), math.log(B), math.log(E), alpha, beta, PHIS[k % len(PHIS)]])


class Sim:
    """One truth, one noise draw: refits and intervals on any subset of the candidates."""

    def __init__(self, cand, truth: np.ndarray, sigma: float, rng: np.random.Generator):
        self.cand, self.truth, self.sigma = cand, truth, sigma
        self.flops = cand["flops"].to_numpy(float)
        self.r = cand["r"].to_numpy(float)
        d = LawData.build(cand.n_once, cand.n_rec, cand.r, cand.tokens, np.ones(len(cand)))
        self.y = predict_log_loss(truth, d) + rng.normal(0, sigma, len(cand))
        self.sigma2 = sigma ** 2 * design.huber_variance_factor(sigma, DELTA)
        self.c = design.contrast(1, 0)
        self.fits = 0

    def jac(self, raw, idx):
        c = self.cand.iloc[idx]
        return design.jacobian(raw, c.n_once, c.n_rec, c.r, c.tokens)

    def refit(self, idx: list[int], start: np.ndarray) -> np.ndarray:
        """The project's Huber objective on the chosen runs, minimised inside its search region by the
        batched L-BFGS of analysis/law.py from the previous estimate and from the reference law at a
        few phis (a cheap refit: the full 4,500-start grid of `megaloop fit` would make the
        simulation hours long)."""
        c = self.cand.iloc[idx]
        data = LawData.build(c.n_once, c.n_rec, c.r, c.tokens, np.exp(self.y[idx]))
        lo, hi = search_box(data, 1)
        ref = design.reference_raw()
        starts = np.concatenate([start[None], np.repeat(ref[None], len(REFIT_PHIS), axis=0)])
        starts[1:, N_BASE] = REFIT_PHIS
        x, f = batched_lbfgs(np.clip(to_centred(starts, data), lo, hi), data, DELTA, max_iter=200, lo=lo, hi=hi)
        self.fits += 1
        return to_raw(x[int(np.nanargmin(np.where(np.isfinite(f), f, np.inf)))], data)

    def width(self, raw, idx) -> float:
        """Linearised 95 % width of phi at `raw` from the chosen runs (no prior: what the fit alone says)."""
        if len(idx) < MIN_RUNS or len(set(self.r[idx])) < 2:
            return math.inf
        J = self.jac(raw, idx)
        info = J.T @ J / self.sigma2
        if np.linalg.cond(info) > 1e15:
            return math.inf
        return 2 * design.Z95 * math.sqrt(max(float(self.c @ np.linalg.solve(info, self.c)), 0.0))


def evaluate(sim: Sim, batches_fn, target: float, cost_mode: str = "plain") -> dict:
    """Run a strategy batch by batch until phi's width at the refit is <= target."""
    chosen: list[int] = []
    est = design.reference_raw()
    spent, trained = 0.0, {}
    group = list(zip(sim.cand["variant"], sim.cand["size"], sim.cand["r"], sim.cand["seed"]))
    gen = batches_fn(sim)
    width = math.inf
    try:
        batch = next(gen)
        while True:
            if cost_mode == "branched":
                add, trained = design.spent_branched(sim.flops, group, DECAY_FRAC, [batch], trained)
            else:
                add = float(sim.flops[batch].sum())
            spent += add
            chosen += batch
            if len(chosen) >= MIN_RUNS and len(set(sim.r[chosen])) >= 2:
                est = sim.refit(chosen, est)
                width = sim.width(est, chosen)
            if width <= target:
                break
            batch = gen.send((chosen, est, trained))
    except StopIteration:
        pass
    phi = float(est[N_BASE])
    reached = width <= target
    return {"reached": reached, "flops": spent, "runs": len(chosen), "width": width if math.isfinite(width) else None,
            "phi_hat": phi, "covered": bool(abs(phi - sim.truth[N_BASE]) <= width / 2) if math.isfinite(width) else None}


def first_reaching(sim: Sim, order: list[int], target: float) -> dict:
    """A fixed order (random, cheapest first): the first prefix of whole batches whose refit width is
    <= target, found by bisection over the prefixes (the width falls as runs are added, up to refit
    noise), each prefix refitted from the reference law (so the search needs ~5 refits, not 29)."""
    n_batches = math.ceil(len(order) / BATCH)

    def at(k):
        idx = list(order[:k * BATCH])
        if len(idx) < MIN_RUNS or len(set(sim.r[idx])) < 2:
            return math.inf, design.reference_raw(), idx
        est = sim.refit(idx, design.reference_raw())
        return sim.width(est, idx), est, idx

    w, est, idx = at(n_batches)
    if not w <= target:
        best = (n_batches, w, est, idx)
        reached = False
    else:
        lo, hi, best = 0, n_batches, (n_batches, w, est, idx)  # hi reaches; lo does not (0 runs)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            wm, em, im = at(mid)
            if wm <= target:
                hi, best = mid, (mid, wm, em, im)
            else:
                lo = mid
        reached = True
    k, w, est, idx = best
    phi = float(est[N_BASE])
    return {"reached": reached, "flops": float(sim.flops[idx].sum()), "runs": len(idx),
            "width": w if math.isfinite(w) else None, "phi_hat": phi,
            "covered": bool(abs(phi - sim.truth[N_BASE]) <= w / 2) if math.isfinite(w) else None}


def fixed_order(order, batch: int = BATCH):
    def gen(sim):
        for i in range(0, len(order), batch):
            yield list(order[i:i + batch])
    return gen


def suggest_order(branching: bool):
    def gen(sim):
        cand = sim.cand
        seed = list(_seed_design(cand, float(cand["flops"].sum())))
        avail = [i for i in range(len(cand)) if i not in seed]
        chosen, est, trained = yield seed
        group = list(zip(cand["variant"], cand["size"], cand["r"], cand["seed"]))
        while avail:
            st = design.DesignState.start(sim.jac(est, chosen), sim.c, sim.sigma2)
            cost = (design.branched_cost(sim.flops, group, DECAY_FRAC, trained) if branching
                    else design.plain_cost(sim.flops))
            res = design.greedy(st, sim.jac(est, list(range(len(cand)))), cost, math.inf, available=avail,
                                max_runs=BATCH)
            batch = [p.index for p in res.picks]
            if not batch:  # nothing adds information at this fit: the rest, cheapest first
                batch = sorted(avail, key=lambda i: sim.flops[i])[:BATCH]
            avail = [i for i in avail if i not in batch]
            chosen, est, trained = yield batch
    return gen


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--truths", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--target", type=float, default=0.10)
    ap.add_argument("--rel", type=float, default=1.25, help="relative target: this x the full grid's width")
    ap.add_argument("--regimes", default="low,measured")
    ap.add_argument("--candidates", default=os.path.join(ROOT, "configs", "sweeps", "iso_depth.yaml"))
    ap.add_argument("--out", default=None)
    ap.add_argument("--partial", action="store_true", help="rewrite --out after every truth (partial: true)")
    ap.add_argument("--merge", nargs="+", default=None,
                    help="combine the JSON files of several runs (e.g. one per regime) into --out")
    args = ap.parse_args()
    if args.merge:
        return merge(args.merge, args.out)
    t0 = time.perf_counter()
    _, runs = load_candidates(args.candidates)
    cand = candidate_frame(runs)
    total = float(cand["flops"].sum())
    cheapest = sorted(range(len(cand)), key=lambda i: (cand["flops"].iloc[i], cand["size"].iloc[i], cand["r"].iloc[i]))
    rng = np.random.default_rng(args.seed)
    strategies = ["full_grid", "random", "cheapest_first", "suggest", "suggest_branching"]
    rows = []
    for k in range(args.truths):
        truth = draw_truth(k, rng)
        for regime in args.regimes.split(","):
            sigma = 0.003 if regime == "low" else float(np.random.default_rng([args.seed, k, 99]).uniform(0.005, 0.015))
            sim = Sim(cand, truth, sigma, np.random.default_rng([args.seed, k, 0 if regime == "low" else 1]))
            all_idx = list(range(len(cand)))
            full_width_truth = sim.width(truth, all_idx)
            targets = {"abs": args.target}
            if full_width_truth > args.target:
                targets["rel"] = args.rel * full_width_truth
            perm = list(np.random.default_rng([args.seed, k, 7]).permutation(len(cand)))
            gens = {"full_grid": fixed_order(all_idx, len(all_idx)), "random": fixed_order(perm),
                    "cheapest_first": fixed_order(cheapest), "suggest": suggest_order(False),
                    "suggest_branching": suggest_order(True)}
            row = {"truth": k, "regime": regime, "sigma": sigma, "phi": float(truth[N_BASE]),
                   "law": dict(zip(["a", "b", "e", "alpha", "beta", "phi"], map(float, truth))),
                   "full_grid_width_at_truth": full_width_truth, "results": {}}
            for tname, tw in targets.items():
                if tname == "abs" and "rel" in targets:
                    # the full grid cannot reach it: no strategy can (every one is a subset of the grid)
                    row["results"]["abs"] = {s: {"reached": False, "why": f"the full grid's width is "
                                                 f"{full_width_truth:.3f} > {tw}"} for s in strategies}
                    continue
                row["results"][tname] = {"target_width": tw}
                for s in strategies:
                    if s in ("random", "cheapest_first"):
                        res = first_reaching(sim, perm if s == "random" else cheapest, tw)
                    else:
                        res = evaluate(sim, gens[s], tw, "branched" if s == "suggest_branching" else "plain")
                    res["flops_frac"] = res["flops"] / total
                    row["results"][tname][s] = res
            rows.append(row)
            if args.out and args.partial:  # a long run leaves a usable file behind at every truth
                write(args, rows, strategies, cand, total, t0, partial=True)
            print(f"truth {k} {regime} sigma={sigma:.4f} phi={truth[N_BASE]:.2f} full width {full_width_truth:.3f}: "
                  + "; ".join(f"{t}: " + ", ".join(f"{s} {row['results'][t][s].get('flops_frac', float('nan')):.3f}"
                                                    f"{'' if row['results'][t][s]['reached'] else '(x)'}"
                                                    for s in strategies)
                              for t in row["results"] if "target_width" in row["results"][t]),
                  file=sys.stderr, flush=True)
    write(args, rows, strategies, cand, total, t0)
    return 0


def write(args, rows, strategies, cand, total, t0, partial: bool = False) -> None:
    summary = summarise(rows, strategies)
    out = {"benchmark": "design", "partial": partial, "command": " ".join(sys.argv), "candidates": os.path.relpath(args.candidates, ROOT),
           "n_candidates": len(cand), "full_grid_flops": total, "truths": args.truths, "batch": BATCH,
           "decay_frac": DECAY_FRAC, "target_width": args.target, "rel_factor": args.rel,
           "interval": "linearised (Fisher) 95 % at a warm-started Huber refit, known noise x Huber efficiency",
           "summary": summary, "rows": rows, "seconds": time.perf_counter() - t0,
           "host": {"python": platform.python_version(), "machine": platform.machine()}}
    text = json.dumps(out, indent=1, default=float, allow_nan=False)
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out + ".tmp", "w") as f:
            f.write(text + "\n")
        os.replace(args.out + ".tmp", args.out)
    if not partial:
        print(json.dumps(summary, indent=1))


def merge(paths: list[str], out_path: str) -> int:
    parts = [json.load(open(p)) for p in paths]
    out = dict(parts[0])
    out["rows"] = [r for p in parts for r in p["rows"]]
    out["command"] = [p["command"] for p in parts]
    out["seconds"] = sum(p["seconds"] for p in parts)
    strategies = ["full_grid", "random", "cheapest_first", "suggest", "suggest_branching"]
    out["summary"] = summarise(out["rows"], strategies)
    with open(out_path, "w") as f:
        f.write(json.dumps(out, indent=1, default=float, allow_nan=False) + "\n")
    print(json.dumps(out["summary"], indent=1))
    return 0


def summarise(rows: list[dict], strategies: list[str]) -> dict:
    """Per regime and target: median FLOPs fraction of the full grid (over the truths where the
    target applies; an unreached target counts as infinite, null in the JSON), how many reached
    it, and the coverage of the true phi by the interval at stopping."""
    out = {}
    for regime in sorted({r["regime"] for r in rows}):
        for t in ("abs", "rel"):
            rs = [r for r in rows if r["regime"] == regime and t in r["results"]
                  and "target_width" in r["results"][t]]
            blocked = [r for r in rows if r["regime"] == regime and t in r["results"]
                       and "target_width" not in r["results"][t]]
            key = f"{regime}/{t}"
            if blocked:
                out[f"{regime}/abs_unreachable"] = {
                    "n_truths": len(blocked),
                    "full_grid_width_at_truth": {"min": min(r["full_grid_width_at_truth"] for r in blocked),
                                                 "median": float(np.median([r["full_grid_width_at_truth"] for r in blocked])),
                                                 "max": max(r["full_grid_width_at_truth"] for r in blocked)}}
            if not rs:
                continue
            out[key] = {"n_truths": len(rs)}
            for s in strategies:
                res = [r["results"][t][s] for r in rs]
                fr = [x["flops_frac"] if x["reached"] else math.inf for x in res]
                cov = [x["covered"] for x in res if x["reached"] and x["covered"] is not None]

                def finite(v):  # unreached counts as infinite; JSON gets null there
                    return float(v) if np.isfinite(v) else None
                with np.errstate(invalid="ignore"):
                    q = [finite(np.percentile(fr, 25)), finite(np.percentile(fr, 75))]
                out[key][s] = {"median_flops_frac": finite(np.median(fr)), "quartiles": q,
                               "reached": sum(x["reached"] for x in res),
                               "coverage": (sum(cov) / len(cov)) if cov else None, "n_covered_of": len(cov)}
    return out


if __name__ == "__main__":
    raise SystemExit(main())
