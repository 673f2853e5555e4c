#!/usr/bin/env bash
# The CPU study's baseline grid with budget branching (configs/sweeps/cpu_study_branched.yaml):
# plan -> run (2 jobs) -> collect -> fit, then phi against the unbranched study's interval and the
# FLOPs spent against the grid unbranched, into OUT_DIR/branched.json.
#
#   scripts/run_cpu_study_branched.sh [SWEEP_DIR] [OUT_DIR] [UNBRANCHED_FIT_JSON]
#   (defaults: runs/cpu_study_branched, results/cpu_study_branched, results/cpu_study/fit.json)
#
# 36 runs, of which 18 are branches (their decay only is trained): 8.82e13 FLOPs spent against
# 1.07e14 unbranched (0.823, from `sweep plan`). Unmeasured so far; over an hour on a 2-core CPU.
# JOBS=N runs N at once (each with cores / N threads); THREADS=T pins every run to T torch threads
# (e.g. JOBS=1 THREADS=1 beside another study). Rerunning continues where it stopped: finished runs are skipped, branches wait for their trunks.
set -euo pipefail
cd "$(dirname "$0")/.."
SWEEP_DIR="${1:-runs/cpu_study_branched}"
OUT="${2:-results/cpu_study_branched}"
UNBRANCHED="${3:-results/cpu_study/fit.json}"
JOBS="${JOBS:-2}"
. scripts/megaloop_env.sh   # PY and megaloop()

start=$(date +%s)
megaloop sweep plan configs/sweeps/cpu_study_branched.yaml --out "$SWEEP_DIR"
rc=0
megaloop sweep run "$SWEEP_DIR" --jobs "$JOBS" ${THREADS:+--set train.threads="$THREADS"} || rc=$?
trained=$(date +%s)
megaloop sweep collect "$SWEEP_DIR"
mkdir -p "$OUT"
megaloop fit "$SWEEP_DIR/fit_table.csv" --json --bootstrap "${BOOTSTRAP:-1000}" > "$OUT/fit.json"
"$PY" - "$SWEEP_DIR" "$OUT" "$UNBRANCHED" "$((trained - start))" <<'PY'
import json, os, sys
from megaloop.sweep.branch import spent_report
from megaloop.sweep.plan import read_manifest
sweep, out, unbranched, wall = sys.argv[1:]
fit = json.load(open(os.path.join(out, "fit.json")))
ref = json.load(open(unbranched)) if os.path.isfile(unbranched) else None
ref_ci = ref.get("phi_ci") if ref else None
res = {"phi": fit.get("phi"), "phi_ci": fit.get("phi_ci"), "unbranched_fit": unbranched,
       "unbranched_phi": ref.get("phi") if ref else None, "unbranched_phi_ci": ref_ci,
       "phi_within_unbranched_ci": (ref_ci[0] <= fit["phi"] <= ref_ci[1]) if ref_ci and fit.get("phi") is not None else None,
       "flops": spent_report(read_manifest(sweep)["runs"]), "train_wall_s": int(wall)}
json.dump(res, open(os.path.join(out, "branched.json"), "w"), indent=1)
print(json.dumps(res, indent=1))
PY
exit "$rc"
