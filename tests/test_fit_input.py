"""Fit input: CSV validation errors name the rows; run/sweep directories load from summary.json."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from megaloop.analysis.cli import fit_main
from megaloop.analysis.table import FitInputError, load_table, validate

GOOD = pd.DataFrame({"run": ["a", "b", "c"], "n_once": [1e6, 2e6, 4e6], "n_rec": [1e6, 0, 2e6],
                     "r": [2, 1, 4], "tokens": [1e9, 1e9, 2e9], "loss": [3.0, 2.9, 2.8]})


def _err(df: pd.DataFrame) -> str:
    with pytest.raises(FitInputError) as ei:
        validate(df, "t.csv")
    return str(ei.value)


def test_valid_table_passes_and_is_float():
    """A correct table validates unchanged, numeric columns become floats."""
    out = validate(GOOD)
    assert list(out["run"]) == ["a", "b", "c"] and out["r"].dtype == float


def test_missing_column_is_named():
    """A missing required column is one error naming the column."""
    msg = _err(GOOD.drop(columns=["tokens"]))
    assert "missing column" in msg and "tokens" in msg


@pytest.mark.parametrize("col,value,needle", [
    ("loss", "abc", "row 2 (run 'b'): loss is not a number"),
    ("loss", float("nan"), "row 2 (run 'b'): loss is missing/NaN"),
    ("tokens", -5.0, "row 2 (run 'b'): tokens must be positive"),
    ("n_once", 0.0, "row 2 (run 'b'): n_once must be positive"),
    ("n_rec", -1.0, "row 2 (run 'b'): n_rec must be >= 0"),
    ("r", 0.5, "row 2 (run 'b'): r must be >= 1"),
])
def test_bad_values_name_the_row(col, value, needle):
    """Non-numeric, NaN and non-positive values give one error naming row and run."""
    df = GOOD.copy().astype({col: object})
    df.loc[1, col] = value
    assert needle in _err(df)


def test_duplicate_run_and_all_problems_listed_at_once():
    """Duplicate run names are reported with their rows, together with every other problem."""
    df = GOOD.copy()
    df.loc[2, "run"] = "a"
    df.loc[1, "loss"] = -1.0
    msg = _err(df)
    assert "rows 1, 3: duplicate run 'a'" in msg and "row 2 (run 'b'): loss must be positive" in msg
    assert msg.count("\n") == 2  # header + two problems


def test_cli_bad_input_exits_2_without_traceback(tmp_path, capsys):
    """The CLI prints the error (no traceback) and returns 2, for a bad table and a missing file."""
    p = tmp_path / "bad.csv"
    df = GOOD.copy()
    df.loc[0, "loss"] = float("nan")
    df.to_csv(p, index=False)
    assert fit_main([str(p)]) == 2
    err = capsys.readouterr().err
    assert "row 1 (run 'a'): loss is missing/NaN" in err and "Traceback" not in err
    assert fit_main([str(tmp_path / "nope.csv")]) == 2
    assert "no such file" in capsys.readouterr().err


def test_sweep_directory_loads_nested_summaries_and_manifest_variants(tmp_path):
    """A sweep directory is searched recursively for summary.json (val_loss -> loss, run name
    from the summary or the folder); variants come from the summary or DIR/manifest.json."""
    rows = GOOD.to_dict("records")
    for i, row in enumerate(rows):
        d = tmp_path / "runs" / f"dir{i}" if i else tmp_path / f"top{i}"
        d.mkdir(parents=True)
        s = {k: row[k] for k in ("n_once", "n_rec", "r", "tokens")} | {"val_loss": row["loss"], "flops": 1e18}
        if i != 2:
            s["run"] = row["run"]
        if i == 1:
            s["variant"] = "truncbptt"
        (d / "summary.json").write_text(json.dumps(s))
    (tmp_path / "manifest.json").write_text(json.dumps([{"run": "a", "variant": "hyperconnect"}]))
    df = load_table([tmp_path])
    assert sorted(df["run"]) == ["a", "b", "dir2"]
    v = dict(zip(df["run"], df["variant"]))
    assert v == {"a": "hyperconnect", "b": "truncbptt", "dir2": "baseline"}
    assert sorted(df["loss"]) == [2.8, 2.9, 3.0]
    # a list of run directories works too
    df2 = load_table([tmp_path / "top0", tmp_path / "runs" / "dir1"])
    assert len(df2) == 2


def test_run_directory_summary_missing_field_is_reported(tmp_path):
    """A summary.json without val_loss is a named error, not a crash."""
    d = tmp_path / "run1"
    d.mkdir()
    (d / "summary.json").write_text(json.dumps({"run": "x", "n_once": 1, "n_rec": 0, "r": 1, "tokens": 5}))
    with pytest.raises(FitInputError, match="run1/summary.json: summary.json lacks val_loss"):
        load_table([d])


def test_too_few_runs_and_joint_without_variants_exit_2(tmp_path, capsys):
    """Fewer runs than parameters is a clear error; --joint without a variant column too."""
    p = tmp_path / "small.csv"
    GOOD.to_csv(p, index=False)
    assert fit_main([str(p), "--bootstrap", "0"]) == 2
    assert "needs at least" in capsys.readouterr().err
    assert fit_main([str(p), "--joint"]) == 2
    assert "--joint needs a variant column" in capsys.readouterr().err


def test_run_dirs_use_the_budget_as_flops(tmp_path):
    """Contract: a summary.json with target_flops (a budget-trained run) enters the table with
    flops = its budget, so runs of one budget share one iso-FLOP group whatever their rounding."""
    import json as _json
    from megaloop.analysis.table import load_table
    for i, (tok, actual) in enumerate([(1e9, 0.998e18), (2e9, 0.991e18)]):
        d = tmp_path / f"run{i}"
        d.mkdir()
        (d / "summary.json").write_text(_json.dumps(dict(run=f"run{i}", n_once=1e6, n_rec=2e6, r=2, tokens=tok,
                                                         flops=actual, target_flops=1e18, val_loss=3.0)))
    df = load_table([str(tmp_path)])
    assert list(df["flops"]) == [1e18, 1e18]


def test_run_dirs_carry_their_health_record(tmp_path):
    """Contract: from run directories the table takes skipped_steps from summary.json and
    vocab_size from the summary or else the run's config.yaml (model.vocab_size); a CSV may give
    both as optional columns, where an empty cell means "not recorded" and a bad value is named."""
    for i, (skipped, cfg) in enumerate([(0, True), (3, False)]):
        d = tmp_path / f"run{i}"
        d.mkdir()
        (d / "summary.json").write_text(json.dumps(dict(run=f"run{i}", n_once=1e6, n_rec=0, r=1, tokens=1e9 * (i + 1),
                                                        val_loss=3.0, skipped_steps=skipped)))
        if cfg:
            (d / "config.yaml").write_text("model:\n  vocab_size: 512\n")
    df = load_table([tmp_path]).set_index("run")
    assert df.loc["run0", "vocab_size"] == 512 and df.loc["run1", "skipped_steps"] == 3
    assert pd.isna(df.loc["run1", "vocab_size"])
    bad = GOOD.assign(vocab_size=[100, "x", None], skipped_steps=[0, 1, -1])
    msg = _err(bad)
    assert "row 2 (run 'b'): vocab_size is not a number ('x')" in msg
    assert "row 3 (run 'c'): skipped_steps must be >= 0" in msg and "row 3 (run 'c'): vocab_size" not in msg
