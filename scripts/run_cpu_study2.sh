#!/usr/bin/env bash
# Study 2 end to end, resumable across sittings and machines:
#   corpus -> plan -> restore committed runs -> run (2 jobs) -> sync -> collect, fit, report.
#
#   scripts/run_cpu_study2.sh [SWEEP_DIR] [OUT_DIR]   (defaults: runs/cpu_study2, results/cpu_study2)
#
# 273 runs of configs/sweeps/cpu_study2.yaml, 3.47e14 FLOPs. Finished runs are skipped. Each
# finished run's summary.json, config.yaml and metrics.jsonl are copied to OUT_DIR/runs/NAME/
# (scripts/study2_sync.sh), which is what `sweep collect` needs: commit OUT_DIR as runs land, and a
# fresh machine restores them into SWEEP_DIR before running, so only the missing runs train.
# STUDY2_MAX_RUNS=N stops after N new runs (a sitting of bounded length); REPORT=0 skips the report.
set -euo pipefail
cd "$(dirname "$0")/.."
SWEEP_DIR="${1:-runs/cpu_study2}"
OUT="${2:-results/cpu_study2}"
JOBS="${JOBS:-2}"
. scripts/megaloop_env.sh   # PY and megaloop()

[ -f data/study2_corpus/PROVENANCE.json ] || "$PY" data/build_study2_corpus.py --out data/study2_corpus
megaloop sweep plan configs/sweeps/cpu_study2.yaml --out "$SWEEP_DIR"
# restore the runs committed by earlier sittings (their summaries make `sweep run` skip them)
if [ -d "$OUT/runs" ]; then
  for d in "$OUT"/runs/*/; do
    name=$(basename "$d"); dst="$SWEEP_DIR/runs/$name"
    [ -f "$dst/summary.json" ] || { mkdir -p "$dst"; cp "$d"summary.json "$d"metrics.jsonl "$dst"/ 2>/dev/null || true; }
  done
fi
start=$(date +%s)
rc=0
megaloop sweep run "$SWEEP_DIR" --jobs "$JOBS" ${STUDY2_MAX_RUNS:+--max-runs "$STUDY2_MAX_RUNS"} || rc=$?
end=$(date +%s)
scripts/study2_sync.sh "$SWEEP_DIR" "$OUT"
echo "cpu study 2: this sitting trained for $((end - start)) s (sweep run --jobs $JOBS); rc $rc"
if [ "${REPORT:-1}" = 1 ]; then
  "$PY" -m megaloop.analysis.study_report "$SWEEP_DIR" --out "$OUT" --bootstrap "${BOOTSTRAP:-1000}" \
    --wall "$("$PY" scripts/study2_walltime.py "$OUT")"
fi
exit "$rc"
