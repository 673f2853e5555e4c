#!/usr/bin/env bash
# The full sweep loop on a CPU: plan -> run -> collect -> fit, timed.
#
#   scripts/run_demo_sweep.sh [OUT_DIR] [SWEEP.yaml]     (defaults: runs/demo_sweep, configs/sweeps/demo.yaml)
#
# JOBS (default: the number of cores) runs that many trainings at once, one torch thread each.
# Rerunning continues where it stopped: finished runs are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-runs/demo_sweep}"
SWEEP="${2:-configs/sweeps/demo.yaml}"
JOBS="${JOBS:-$(nproc 2>/dev/null || echo 2)}"
. scripts/megaloop_env.sh   # PY and megaloop()

start=$(date +%s)
megaloop sweep plan "$SWEEP" --out "$OUT"
rc=0
megaloop sweep run "$OUT" --jobs "$JOBS" || rc=$?   # failed runs are reported; the fit uses the rest
megaloop sweep collect "$OUT"
trained=$(date +%s)
megaloop fit "$OUT/fit_table.csv" --json --plots "$OUT/plots" > "$OUT/fit.json"
end=$(date +%s)
"$PY" - "$OUT/fit.json" <<'PYEOF'
import json, sys
fit = json.load(open(sys.argv[1]))
def show(v, ci):
    return "not identified" if v is None else f"{v:.4g}" + (f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "")
print(f"fitted law on {fit.get('n_runs')} runs (95 % bootstrap intervals):")
for k in ("phi", "E", "A", "alpha", "B", "beta"):
    print(f"  {k:>5} = {show(fit.get(k), fit.get(k + '_ci'))}")
PYEOF
echo "demo sweep: $((trained - start)) s to plan, train and collect, $((end - start)) s in all" \
     "($(( (end - start) / 60 )) min); fit: $OUT/fit.json, plots: $OUT/plots/"
exit "$rc"
