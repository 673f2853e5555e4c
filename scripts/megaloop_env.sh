# Sourced by the study and benchmark scripts: PY is the Python to run (PYTHON, else the repo's
# .venv, else python on PATH) and `megaloop` runs its CLI, so the scripts work before and after
# `./setup.sh` and inside any environment that has megaloop installed.
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python )}"
megaloop() { "$PY" -m megaloop.cli "$@"; }
