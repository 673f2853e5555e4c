#!/usr/bin/env bash
# The CPU study end to end: plan -> run (2 jobs) -> collect -> fit -> report, timed.
#
#   scripts/run_cpu_study.sh [SWEEP_DIR] [OUT_DIR]   (defaults: runs/cpu_study, results/cpu_study)
#
# 68 runs of configs/sweeps/cpu_study.yaml (baseline r = 1, 2, 4 at three budgets; truncated
# backprop and hyperconnect probes at the two lower budgets). About 78 min on a 2-core CPU.
# Rerunning continues where it stopped: finished runs are skipped. BOOTSTRAP (default 1000) sets
# the fit's resamples.
set -euo pipefail
cd "$(dirname "$0")/.."
SWEEP_DIR="${1:-runs/cpu_study}"
OUT="${2:-results/cpu_study}"
JOBS="${JOBS:-2}"
. scripts/megaloop_env.sh   # PY and megaloop()

start=$(date +%s)
megaloop sweep plan configs/sweeps/cpu_study.yaml --out "$SWEEP_DIR"
rc=0
megaloop sweep run "$SWEEP_DIR" --jobs "$JOBS" || rc=$?   # failed runs are reported; the fit uses the rest
trained=$(date +%s)
wall="$(( (trained - start) / 60 )) min ($((trained - start)) s) to plan and train, sweep run --jobs $JOBS"
"$PY" -m megaloop.analysis.study_report "$SWEEP_DIR" --out "$OUT" --bootstrap "${BOOTSTRAP:-1000}" --wall "$wall"
end=$(date +%s)
echo "cpu study: $wall; $((end - trained)) s to collect, fit and report -> $OUT/report.md"
exit "$rc"
