#!/usr/bin/env bash
# The GPU cut of the study on one GPU (an H200: under 8 minutes): plan -> train -> collect -> fit,
# with configs/sweeps/gpu_study.yaml (24 runs of 1e15 to 4.6e15 FLOPs, r in {1, 2, 4}, baseline).
#
#   benchmarks/gpu_study.sh --dry-run           # plan, list the runs and the time estimate; no GPU
#   benchmarks/gpu_study.sh [OUT_DIR]           # default OUT_DIR: runs/gpu_study
#
# The runs are trained one budget at a time (all r and widths of a budget, JOBS at once on the
# GPU), smallest budget first. Before each budget after the first, the time the last one took,
# scaled by the FLOPs, predicts this one; a budget that would end after DEADLINE_S of training is
# left out and said so, and the fit uses the budgets that were trained. Rerunning continues:
# finished runs are skipped.
#
# Environment:
#   JOBS (6)             trainings at once on the GPU (small models: one alone leaves it idle)
#   DEADLINE_S (390)     seconds of training after which no further budget is started
#   CORPUS               a glob of more text (.txt / .jsonl, .gz ok) instead of the bundled corpus;
#                        its tokenizer and dataset are built under OUT_DIR/data
#   AGG_TFLOPS (200)     assumed FLOP/s of all JOBS together, in TFLOP/s, for the estimate only
#   START_S (15) STEP_S (0.008)   assumed start-up seconds per run and overhead seconds per step
#   BOOTSTRAP (300)      bootstrap resamples of the fit's intervals
#   SWEEP                another sweep file; with ON_CPU=1 the script runs without a GPU (to check
#                        it end to end with a tiny sweep)
set -euo pipefail
cd "$(dirname "$0")/.."
SWEEP="${SWEEP:-configs/sweeps/gpu_study.yaml}"
DRY=0
OUT=runs/gpu_study
for arg in "$@"; do
  case "$arg" in
    --dry-run) DRY=1 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    -*) echo "gpu_study: unknown option $arg (use --dry-run or an output folder)" >&2; exit 2 ;;
    *) OUT="$arg" ;;
  esac
done
JOBS="${JOBS:-6}"
DEADLINE_S="${DEADLINE_S:-390}"
BOOTSTRAP="${BOOTSTRAP:-300}"
. scripts/megaloop_env.sh   # PY and megaloop()

# estimate PLAN_DIR: the runs per budget and the predicted time, under the assumptions above
estimate() {
  "$PY" - "$1" "$JOBS" "${AGG_TFLOPS:-200}" "${START_S:-15}" "${STEP_S:-0.008}" <<'PYEOF'
import json, math, sys
runs = json.load(open(f"{sys.argv[1]}/manifest.json"))["runs"]
jobs, agg, start, step = int(sys.argv[2]), float(sys.argv[3]) * 1e12, float(sys.argv[4]), float(sys.argv[5])
total = 0.0
print(f"estimate ({jobs} jobs, {agg / 1e12:g} TFLOP/s together, {start:g} s start-up per run, {step:g} s per step):")
for flops in sorted({r["target_flops"] for r in runs}):
    rows = [r for r in runs if r["target_flops"] == flops]
    s = math.ceil(len(rows) / jobs) * start + len(rows) * flops / agg + sum(r["steps"] for r in rows) / jobs * step
    total += s
    print(f"  budget {flops:.3g}: {len(rows)} runs, {sum(r['steps'] for r in rows):,} steps, "
          f"{max(r['tokens'] for r in rows) / 1e6:.1f}M tokens in the largest run, about {s:.0f} s")
print(f"  training about {total:.0f} s; with data preparation and the fit about {total + 60:.0f} s "
      f"({(total + 60) / 60:.1f} min)")
PYEOF
}

if [ "$DRY" = 1 ]; then
  plan="$(mktemp -d)"
  trap 'rm -rf "$plan"' EXIT
  megaloop sweep plan "$SWEEP" --out "$plan" --list
  megaloop sweep run "$plan" --dry-run --jobs "$JOBS" | sed "s#$plan#OUT_DIR#g"
  estimate "$plan"
  echo "dry run: nothing trained; the real run writes $OUT"
  exit 0
fi

[ "${ON_CPU:-0}" = 1 ] || "$PY" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 2)' || {
  echo "gpu_study: needs a CUDA GPU (torch.cuda.is_available() is False); try --dry-run here" >&2; exit 2; }

start=$(date +%s)
megaloop sweep plan "$SWEEP" --out "$OUT"
estimate "$OUT"
sets=()
if [ -n "${CORPUS:-}" ]; then
  sets+=(--set "data.corpus=[\"$CORPUS\"]" --set "data.cache_dir=$OUT/data")
fi
# the tokenizer and datasets once, before several runs want them at the same time
first="$(ls -d "$OUT"/runs/*/ | head -n 1)config.yaml"
"$PY" - "$first" "${CORPUS:-}" "$OUT" <<'PYEOF'
import sys
from megaloop.config import load_config
from megaloop.data.prepare import ensure_prepared
sets = [f'data.corpus=["{sys.argv[2]}"]', f"data.cache_dir={sys.argv[3]}/data"] if sys.argv[2] else []
cfg = load_config(sys.argv[1], sets)
ensure_prepared(cfg.data, cfg.model.vocab_size)
PYEOF
prepared=$(date +%s)

# one line per budget, smallest first: its name tag (as in the run names) and the FLOPs of all its runs
budgets=$("$PY" - "$OUT/manifest.json" <<'PYEOF'
import json, sys
from megaloop.sweep.plan import flops_tag
runs = json.load(open(sys.argv[1]))["runs"]
for f in sorted({r["target_flops"] for r in runs}):
    print(flops_tag(f), sum(r["target_flops"] for r in runs if r["target_flops"] == f))
PYEOF
)
left_out=()
last_s=0; last_flops=0
while read -r tag flops; do
  used=$(( $(date +%s) - prepared ))
  if [ "$last_s" -gt 0 ]; then
    predicted=$("$PY" -c "print(int($last_s * $flops / $last_flops))")
    if [ $(( used + predicted )) -gt "$DEADLINE_S" ]; then
      echo "gpu_study: budget $tag left out: about ${predicted} s more would end after ${DEADLINE_S} s of training"
      left_out+=("$tag"); continue
    fi
  fi
  t0=$(date +%s)
  megaloop sweep run "$OUT" --jobs "$JOBS" --only "*_c$tag" "${sets[@]}" < /dev/null || true  # collect lists failures
  last_s=$(( $(date +%s) - t0 )); last_flops=$flops
done <<< "$budgets"
trained=$(date +%s)
megaloop sweep collect "$OUT" || true
fit_rc=0
megaloop fit "$OUT/fit_table.csv" --json --bootstrap "$BOOTSTRAP" --plots "$OUT/plots" > "$OUT/fit.json" || fit_rc=$?
end=$(date +%s)
[ "$fit_rc" = 0 ] && "$PY" - "$OUT/fit.json" <<'PYEOF'
import json, sys
fit = json.load(open(sys.argv[1]))
def show(v, ci):
    return "not identified" if v is None else f"{v:.4g}" + (f" [{ci[0]:.4g}, {ci[1]:.4g}]" if ci else "")
print(f"fitted law on {fit.get('n_runs')} runs (95 % bootstrap intervals):")
for k in ("phi", "E", "A", "alpha", "B", "beta"):
    print(f"  {k:>5} = {show(fit.get(k), fit.get(k + '_ci'))}")
PYEOF
[ "$fit_rc" = 0 ] || { echo "gpu_study: no fit (the message above says why)"; rm -f "$OUT/fit.json"; }
echo "gpu_study: $((prepared - start)) s to plan and prepare data, $((trained - prepared)) s to train," \
     "$((end - trained)) s to collect and fit, $((end - start)) s in all; fit: $OUT/fit.json" \
     "${left_out[*]:+(budgets left out for time: ${left_out[*]})}"
exit "$fit_rc"
