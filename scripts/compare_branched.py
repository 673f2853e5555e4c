"""Loss of each run of the branched CPU grid against the same (size, r, budget) of the unbranched
CPU study, by budget, as JSON: what budget branching with WSD changes per run.

    python scripts/compare_branched.py results/cpu_study_branched/fit_table.csv results/cpu_study/fit_table.csv

A branch equals a straight WSD run of its budget bit for bit (tests/test_branching.py), so the
differences measure the schedule (WSD against the study's linear decay), not branching.
"""
import json
import sys

import pandas as pd


def budget(runs: pd.Series) -> pd.Series:
    return runs.str.extract(r"_c([0-9.e+]+)")[0]


def main(branched_csv: str, unbranched_csv: str) -> None:
    b, u = pd.read_csv(branched_csv), pd.read_csv(unbranched_csv)
    u = u[u.variant == "baseline"] if "variant" in u else u
    b, u = b.assign(budget=budget(b.run)), u.assign(budget=budget(u.run))
    m = b.merge(u, on=["n_once", "n_rec", "r", "budget"], suffixes=("_branched", "_unbranched"))
    m["diff"] = m.loss_branched - m.loss_unbranched
    by = {k: {"runs": int(len(g)), "mean": round(g["diff"].mean(), 5), "sd": round(g["diff"].std(), 5),
              "min": round(g["diff"].min(), 5), "max": round(g["diff"].max(), 5)}
          for k, g in m.groupby("budget")}
    print(json.dumps({"matched_runs": int(len(m)), "loss_branched_minus_unbranched_by_budget": by,
                      "mean": round(m["diff"].mean(), 5)}, indent=1))


if __name__ == "__main__":
    main(*sys.argv[1:3])
