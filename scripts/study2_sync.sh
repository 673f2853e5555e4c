#!/usr/bin/env bash
# Copy what `sweep collect` needs of every finished run of a sweep directory into the results
# folder (summary.json, config.yaml, metrics.jsonl; no checkpoints), plus the manifest, so the
# finished runs can be committed as they land and a later sitting resumes from them.
#   scripts/study2_sync.sh SWEEP_DIR OUT_DIR
set -euo pipefail
SWEEP_DIR="$1"; OUT="$2"
mkdir -p "$OUT/runs"
cp "$SWEEP_DIR/manifest.json" "$SWEEP_DIR/manifest.csv" "$OUT/"
n=0
for s in "$SWEEP_DIR"/runs/*/summary.json; do
  [ -f "$s" ] || continue
  d=$(dirname "$s"); name=$(basename "$d"); dst="$OUT/runs/$name"
  [ -f "$dst/summary.json" ] && continue
  mkdir -p "$dst.tmp"
  cp "$s" "$d/config.yaml" "$dst.tmp/"
  [ -f "$d/metrics.jsonl" ] && cp "$d/metrics.jsonl" "$dst.tmp/"
  rm -rf "$dst"; mv "$dst.tmp" "$dst"; n=$((n + 1))
done
echo "study2_sync: $n new run(s) copied to $OUT/runs ($(ls "$OUT/runs" | wc -l) in all)"
