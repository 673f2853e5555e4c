"""The study report (megaloop.analysis.study_report) regenerated from the committed study files.

Contracts:
  - `--markdown-only` on a copy of results/cpu_study rewrites report.md to exactly the committed
    report (same fit, tables and wall-time line), so the committed report is what the code says;
  - fit.txt is the text form of fit.json (one fit, two views);
  - the test-time figure is written.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from megaloop.analysis.report import format_report
from megaloop.analysis.study_report import main, plot_test_time

import pandas as pd

STUDY = Path(__file__).resolve().parents[1] / "results" / "cpu_study"


def test_markdown_only_reproduces_committed_report(tmp_path):
    out = tmp_path / "cpu_study"
    shutil.copytree(STUDY, out)
    committed = (STUDY / "report.md").read_text()
    wall = committed.splitlines()[2].removeprefix("Wall time: ").removesuffix(".")
    (out / "report.md").unlink()
    assert main(["unused", "--out", str(out), "--markdown-only", "--wall", wall]) == 0
    assert (out / "report.md").read_text() == committed


def test_fit_text_is_the_json_report():
    fit = json.loads((STUDY / "fit.json").read_text())
    assert (STUDY / "fit.txt").read_text().rstrip() == format_report(fit).rstrip()


def test_test_time_plot(tmp_path):
    path = plot_test_time(pd.read_csv(STUDY / "test_time.csv"), str(tmp_path))
    assert Path(path).stat().st_size > 10_000
