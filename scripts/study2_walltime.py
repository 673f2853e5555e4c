"""The wall time a study's runs took, from their summaries: the sum of each run's wall_time_s,
divided by the jobs that ran side by side (2 on this machine), and the run count.

    python scripts/study2_walltime.py results/cpu_study2 [--jobs 2]
"""
import glob
import json
import os
import sys

out = sys.argv[1]
jobs = int(sys.argv[sys.argv.index("--jobs") + 1]) if "--jobs" in sys.argv else 2
total, n = 0.0, 0
for path in glob.glob(os.path.join(out, "runs", "*", "summary.json")):
    with open(path) as f:
        total += float(json.load(f).get("wall_time_s") or 0.0)
    n += 1
print(f"{total / jobs / 3600:.2f} h of {jobs}-job wall time for {n} runs "
      f"(sum of run wall times {total / 3600:.2f} h / {jobs}; the machine was shared while it ran)")
