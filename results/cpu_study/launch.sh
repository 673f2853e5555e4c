#!/usr/bin/env bash
# The CPU study as launched (frozen code at /work/study, commit in git log there).
set -euo pipefail
# code: commit 23ea688
cd /work/study
OUT=/work/study_out/cpu_study
date +%s > /work/study_out/start_epoch
.venv/bin/megaloop sweep plan configs/sweeps/cpu_study.yaml --out $OUT
.venv/bin/megaloop sweep run $OUT --jobs 2
date +%s > /work/study_out/end_epoch
