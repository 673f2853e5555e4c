"""Adaptive per-token exit: batched == one sequence at a time, and the skipped-KV policy."""
import pytest
import torch

from megaloop.inference.decode import Decoder
from megaloop.inference.exit import ExitRule
from megaloop.inference.generate import generate
from test_inference_cache import make, prompt

# Thresholds at which the tiny test model's rows exit at different recurrences (asserted below).
RULES = {"kl": 0.05, "latent": 0.3, "entropy": 2.0, "entropy-diff": 0.05, "argmax": 2}


def sharp(mode):
    """The tiny model with a larger head, so next-token distributions differ in confidence."""
    model = make(mode)
    with torch.no_grad():
        model.head.weight.mul_(20)
    return model


@pytest.mark.parametrize("mode,criterion", [("linear", c) for c in RULES] + [("hyperconnect", "kl"),
                                                                             ("hyperconnect", "latent")])
def test_batched_exit_equals_one_at_a_time(mode, criterion):
    """Contract: in a batch every sequence exits on its own: tokens and recurrences used per
    token equal those of each sequence decoded alone. Tokens really exit at different depths,
    and --max-recur (6) runs past the trained r (3)."""
    model = sharp(mode)
    rule = ExitRule(criterion, RULES[criterion])
    P = prompt(B=3, T=4)
    batched = generate(model, P, 10, num_recur=3, exit_rule=rule, max_recur=6)
    rec = batched.recurrences
    assert rec.unique().numel() > 1, "the test needs tokens that exit at different recurrences"
    assert rec.max() <= 6 and rec.min() >= 1
    for b in range(3):
        alone = generate(model, P[b:b + 1], 10, num_recur=3, exit_rule=rule, max_recur=6)
        assert alone.new_tokens[0] == batched.new_tokens[b]
        assert torch.equal(alone.recurrences[0], rec[b])


def test_max_recur_past_trained_r():
    """Contract: with --max-recur above the trained r, tokens that do not converge run past it."""
    model = sharp("linear")
    out = generate(model, prompt(B=3, T=4), 10, num_recur=3, exit_rule=ExitRule("argmax", 2), max_recur=6)
    assert out.recurrences.max() > 3


def rec_k(dec, i, j, t):
    return dec.cache.k[dec.cache.recur(i, j).index][:, t], dec.cache.v[dec.cache.recur(i, j).index][:, t]


@pytest.mark.parametrize("budget", [6, 4])
def test_skipped_recurrences_repeat_the_last_entries(budget):
    """Contract (the documented fill policy): the KV entries of recurrences a token skips, by
    exiting or because the prompt was prefilled at a lower depth, are copies of its last computed
    recurrence, block by block (slot i mod kv_budget for every skipped i)."""
    model = make("linear")
    P, tok = prompt(B=1, T=4), torch.tensor([[7]])
    full = Decoder(model, 1, 24, max_depth=6)       # the prompt's computed entries of each recurrence
    full.forward(P, depth=3)
    dec, ref = (Decoder(model, 1, 24, max_depth=6, kv_budget=budget) for _ in range(2))
    for d in (dec, ref):
        d.forward(P, depth=3)                        # prompt: 3 recurrences, 6 allowed
    ref.max_depth = 2                                # ref: the token's 2 recurrences, nothing filled
    ref.forward(tok, depth=2)
    out = dec.forward(tok, depth=6, exit_rule=ExitRule("latent", 1e9))  # exits as soon as it can
    assert out.recurrences.tolist() == [2]
    for j in range(model.cfg.n_recur_block):
        for t, last, src in ((3, 2, full), (4, 1, ref)):  # last prompt position: recurrence 2; token: 1
            want = rec_k(src, last, j, t)
            for i in range(last + 1, 6):
                got = rec_k(dec, i, j, t)
                assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]), (budget, t, i)
        if budget == 6:                              # computed recurrences keep their own entries
            assert not torch.equal(rec_k(dec, 0, j, 4)[0], rec_k(dec, 1, j, 4)[0])


def test_exit_that_never_fires_is_fixed_depth():
    """Contract: a threshold no token reaches gives exactly the fixed-depth cached decoding at
    max_recur (so exit changes only where it fires)."""
    model = make("hyperconnect")
    P = prompt(B=2, T=4)
    ref = generate(model, P, 8, num_recur=3, max_recur=5)
    got = generate(model, P, 8, num_recur=3, max_recur=5, exit_rule=ExitRule("latent", 0.0))
    assert got.new_tokens == ref.new_tokens and bool((got.recurrences == 5).all())
