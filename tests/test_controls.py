"""Study controls (analysis/controls.py): which rows enter the law, paired control contrasts, and the
depth controls' block equivalents, each against values built into a synthetic table."""
import math

import numpy as np
import pandas as pd
import pytest

from megaloop.analysis import controls as C

BLOCK, ADAPTER = 1000, 200          # one recurrent block's and the linear adapter's parameters
TOTAL = 4                           # the baseline's unique recurrent blocks at r = 1


def _table(k_eq_r4=2.0, plain_gap=0.05, noise=0.0, seeds=(1, 2, 3)):
    """Two widths x two budgets x seeds. The r = 1 depth curve is loss = c - 0.1 ln k; the r = 4 model
    (1 block, 4 passes) lands where k = k_eq_r4 unique blocks would; plain r = 1 is worse by plain_gap."""
    rng = np.random.default_rng(0)
    rows = []
    for n_once in (5000, 9000):
        for budget in (1e11, 3e11):
            for seed in seeds:
                c = 4.0 - 0.1 * math.log(n_once) - 0.05 * math.log(budget / 1e11)

                def add(variant, r, k, loss, adapter=ADAPTER):
                    rows.append(dict(variant=variant, r=r, n_once=n_once, n_rec=k * BLOCK + adapter, n_adapter=adapter,
                                     tokens=int(budget / 1e5), flops=budget, seed=seed, run=f"{variant}_r{r}_{n_once}_{budget:g}_{seed}",
                                     loss=loss + noise * rng.standard_normal()))
                for k in (1, 2, TOTAL):
                    add({1: "depth1", 2: "depth2", TOTAL: "baseline"}[k], 1, k, c - 0.1 * math.log(k))
                add("baseline", 4, 1, c - 0.1 * math.log(k_eq_r4))
                add("baseline", 2, 2, c - 0.1 * math.log(3.0))
                add("plain", 1, TOTAL, c - 0.1 * math.log(TOTAL) + plain_gap, adapter=0)
    return pd.DataFrame(rows)


def test_law_table_folds_and_leaves_out():
    """Contract: folded variants enter the law under their target's name (rows kept), contrast
    variants are left out, and a variant named by neither flag that is missing is an error."""
    df = _table()
    law = C.law_table(df, {"depth1": "baseline", "depth2": "baseline"}, {"plain": "baseline"})
    assert set(law.variant) == {"baseline"}
    assert len(law) == len(df) - (df.variant == "plain").sum()
    with pytest.raises(ValueError, match="'nope' named by --fold/--control is not in the table"):
        C.law_table(df, {"nope": "baseline"}, {})


def test_paired_contrast_recovers_the_built_in_gap():
    """Contract: the paired contrast of plain against the baseline at matched cells (width, r, budget,
    seed) is the built-in gap, and its interval covers it under noise and excludes 0."""
    exact = C.paired_contrasts(_table(plain_gap=0.05), {"plain": "baseline"})[0]
    assert exact["n_pairs"] == 12 and exact["mean"] == pytest.approx(0.05)
    noisy = C.paired_contrasts(_table(plain_gap=0.05, noise=0.01), {"plain": "baseline"})[0]
    assert noisy["ci"][0] < 0.05 < noisy["ci"][1] and noisy["ci"][0] > 0


def test_depth_equivalents_read_back_the_built_in_block_count():
    """Contract: the unique blocks at r = 1 matching a looped model's loss are read back from the
    depth curve (k_eq = 2 for the r = 4 model, 3 for r = 2), so the exponent is
    log(k_eq / k_unique) / log r: log 2 / log 4 = 0.5 at r = 4; the baseline's block count (4) is
    inferred from the parameter counts."""
    depth = C.depth_equivalents(_table(k_eq_r4=2.0), {"depth1": 1, "depth2": 2})
    assert depth["total_blocks"] == TOTAL
    assert depth["by_r"][4]["median_k_eq"] == pytest.approx(2.0)
    assert depth["by_r"][4]["median_exponent"] == pytest.approx(0.5)
    assert depth["by_r"][2]["median_exponent"] == pytest.approx(math.log(3 / 2) / math.log(2))
    lines = "\n".join(C.markdown(C.paired_contrasts(_table(), {"plain": "baseline"}), depth))
    assert "| 4 | 12 | 2.00 | 0.50 |" in lines and "plain - baseline: +0.0500" in lines


def test_parse_pairs_rejects_malformed_flags():
    """Contract: VARIANT=OTHER pairs parse; anything else is one error naming the flag and an example."""
    assert C.parse_pairs(["depth1=baseline"], "--fold") == {"depth1": "baseline"}
    for bad in ("depth1", "=baseline", "a=a"):
        with pytest.raises(ValueError, match="--fold"):
            C.parse_pairs([bad], "--fold")
