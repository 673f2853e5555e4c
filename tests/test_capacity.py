"""Capacity calculator: unique-parameter and compute equivalents, predicted loss, --config."""
from __future__ import annotations

import json

import pytest

from megaloop.analysis.capacity import Capacity
from megaloop.analysis.cli import capacity_main


def test_reference_worked_example():
    """phi 0.46, N_once 213M, N_rec 197M, r 4: worth ~585M unique params, costs ~1.0B."""
    c = Capacity(213e6, 197e6, 4, 0.46)
    assert 580e6 <= c.unique_equivalent <= 586e6
    assert c.unique_equivalent == pytest.approx(213e6 + 4 ** 0.46 * 197e6)
    assert c.compute_equivalent == pytest.approx(1001e6)
    assert Capacity(213e6, 197e6, 1, 0.46).unique_equivalent == pytest.approx(410e6)


def test_cli_prints_both_equivalents(capsys):
    """The CLI prints the unique-parameter equivalent (585.7M) and the compute equivalent."""
    assert capacity_main(["--phi", "0.46", "--n-once", "213e6", "--n-rec", "197e6", "--r", "4"]) == 0
    out = capsys.readouterr().out
    assert "585.7M" in out and "1,001.0M" in out


def test_predicted_loss_from_fitted_law(tmp_path, capsys):
    """With --law (fit JSON) and --tokens, the predicted loss is the law at N_eff and D, and phi
    defaults to the fitted one."""
    law = {"phi": 0.46, "E": 1.56773, "A": 28.027, "alpha": 0.19924, "B": 915.82, "beta": 0.36863}
    p = tmp_path / "fit.json"
    p.write_text(json.dumps(law))
    assert capacity_main(["--law", str(p), "--n-once", "213e6", "--n-rec", "197e6", "--r", "4",
                          "--tokens", "2e10", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    n_eff = 213e6 + 4 ** 0.46 * 197e6
    expect = 1.56773 + 28.027 * n_eff ** -0.19924 + 915.82 * 2e10 ** -0.36863
    assert out["predicted_loss"] == pytest.approx(expect) and out["phi"] == 0.46


def test_missing_inputs_exit_2(capsys, tmp_path):
    """Without sizes, without phi, or with a law whose phi is null: one error line, exit 2."""
    assert capacity_main(["--phi", "0.4", "--n-once", "1e6"]) == 2
    assert "--n-rec" in capsys.readouterr().err
    assert capacity_main(["--n-once", "1e6", "--n-rec", "1e6", "--r", "2"]) == 2
    p = tmp_path / "fit.json"
    p.write_text(json.dumps({"phi": None, "E": 1.7, "A": 400, "alpha": 0.3, "B": 400, "beta": 0.3}))
    assert capacity_main(["--law", str(p), "--n-once", "1e6", "--n-rec", "1e6", "--r", "2"]) == 2
    assert "did not identify phi" in capsys.readouterr().err


def test_config_uses_model_accounting(capsys):
    """--config takes n_once, n_rec and r from megaloop.accounting.count_params."""
    accounting = pytest.importorskip("megaloop.accounting")
    from megaloop.config import load_config

    cfg = load_config("configs/default.yaml")
    counts = accounting.count_params(cfg.model)
    assert capacity_main(["--config", "configs/default.yaml", "--phi", "0.5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_once"] == counts.n_once and out["n_rec"] == counts.n_rec
    assert out["r"] == cfg.model.num_recur
    assert out["unique_equivalent"] == pytest.approx(counts.n_once + cfg.model.num_recur ** 0.5 * counts.n_rec)
