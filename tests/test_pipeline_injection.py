"""One recurrence: the pipeline runs the model's own passes, for every injection mode.

LoopedLM.run_passes runs any contiguous range of passes; run_recurrence is one call over 0..r and
a pipeline stage (megaloop.parallel.pipeline.run_units) makes one call per range it holds.
Contracts:
  - run_recurrence is bitwise the recurrence as first written (a copy of it is kept below), in
    output and in every gradient, for each injection mode and with truncated backprop; linear
    injection's gradients agree to float rounding (1e-5) instead, because its e-half, computed
    once for all passes, sums the passes' gradients before one product (the old code took one
    product per pass);
  - the passes cut anywhere (0..k then k..r) give bitwise the uncut recurrence (linear: outputs
    bitwise, gradients to float rounding): the contract the pipeline stands on;
  - run_units chained stage by stage in one process is bitwise the model's forward (training
    schedule, padded sampled-depth schedule with skipped slots, evaluation at another r), and it
    runs the fused norm_recur + injection kernel between every two passes of a stage's range;
  - PP=2 on 2 real processes (gloo, 1F1B) equals the single process to 1e-5 over 3 steps for
    linear, additive, passthrough and hyperconnect injection at r = 2 and r = 4, for truncated
    backprop at r = 4, and in its validation loss at a test-time r (1, 3, 6) other than the
    trained 4.
"""
from __future__ import annotations

import pytest
import torch

from megaloop import kernels as K
from megaloop.config import load_config
from megaloop.model import LoopedLM
from megaloop.parallel.pipeline import eval_units, plan_stages, run_units
from layouts import check_layouts, token_data

MODES = ["linear", "additive", "passthrough", "hyperconnect"]
# (mode, bptt_k): every mode with full backprop, and truncated backprop where the config allows it
VARIANTS = [(m, None) for m in MODES] + [(m, 2) for m in MODES if m != "hyperconnect"]


def tiny(**model):
    base = dict(d_model=32, n_head=4, n_kv_head=2, vocab_size=101, seq_len=8, n_prelude=1,
                n_recur_block=1, n_coda=1, num_recur=4)
    base.update(model)
    return load_config(raw={"model": base, "train": {"steps": 1}}).model


def perturbed_model(cfg, seed=0):
    """Every parameter moved off its structured init ([I | 0] injection, one-hot lanes), so the
    state and every lane matter."""
    torch.manual_seed(seed)
    model = LoopedLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def old_run_recurrence(model, e, r):
    """The recurrence as LoopedLM wrote it before run_passes (kept verbatim as the reference)."""
    cfg, inj = model.cfg, model.injection
    if inj.mode == "hyperconnect":
        R = inj.alpha.size(0)
        lanes = e.unsqueeze(0).expand(inj.alpha.size(1), *e.shape)
        for i in range(r):
            u = K.hc_combine(lanes, inj.alpha[i % R])
            s = model.norm_recur(model._group(u))
            lanes = K.hc_update(lanes, s, inj.mix[i % R], inj.beta[i % R])
        return lanes.sum(0)
    g = r if cfg.bptt_k is None else min(cfg.bptt_k, r)
    s, u = inj.initial_state(e), None
    for i in range(r):
        detached = i < r - g
        with torch.no_grad() if detached else torch.enable_grad():
            if u is None:
                u = K.inject(e, s, inj.mode, inj.weight)
            h = model._group(u)
            if i + 1 < r and (i + 1 < r - g) == detached:
                s, u = K.recur_norm_inject(h, e, model.norm_recur.weight, model.norm_recur.eps, inj.mode, inj.weight)
            else:
                s, u = model.norm_recur(h), None
    return s


def output_and_grads(model, recurrence, seed=1):
    """The coda input from `recurrence(e)`, and the gradients of a fixed function of it with
    respect to e and every parameter (None where a parameter gets none)."""
    g = torch.Generator().manual_seed(seed)
    e = torch.randn(2, model.cfg.seq_len, model.cfg.d_model, generator=g).requires_grad_()
    w = torch.randn(2, model.cfg.seq_len, model.cfg.d_model, generator=g)
    model.zero_grad(set_to_none=True)
    x = recurrence(e)
    (x * w).sum().backward()
    grads = {n: p.grad for n, p in model.named_parameters()}
    return x.detach(), e.grad, grads


def same(a, b, exact: bool = True) -> bool:
    """Bitwise equal tensors (or, not exact, equal to float rounding), or both None (no gradient
    reached it)."""
    if a is None or b is None:
        return a is None and b is None
    return torch.equal(a, b) if exact else torch.allclose(a, b, rtol=1e-5, atol=1e-6)


def assert_bitwise(a, b, label, exact_grads: bool = True):
    xa, ea, ga = a
    xb, eb, gb = b
    assert torch.equal(xa, xb), f"{label}: outputs differ"
    assert same(ea, eb, exact_grads), f"{label}: gradients of e differ"
    for n in ga:
        assert same(ga[n], gb[n], exact_grads), f"{label}: gradient of {n} differs"


@pytest.mark.parametrize("mode,bptt_k", VARIANTS)
def test_run_recurrence_is_the_old_recurrence_and_cuts_anywhere(mode, bptt_k):
    """run_recurrence(e, 4) == the old recurrence bitwise (output, grad of e, every parameter
    gradient), and so does start -> run_passes(0, k) -> run_passes(k, 4) -> end for k = 0..4."""
    r = 4
    model = perturbed_model(tiny(input_injection=mode, bptt_k=bptt_k))
    ref = output_and_grads(model, lambda e: old_run_recurrence(model, e, r))
    exact = mode != "linear"  # see the module docstring: the e-half sums the passes' gradients first
    assert_bitwise(output_and_grads(model, lambda e: model.run_recurrence(e, r)), ref, f"{mode} bptt_k={bptt_k}", exact)

    def cut_at(k):
        def recurrence(e):
            state = model.run_passes(model.start_recurrence(e), 0, k, r)
            return model.end_recurrence(model.run_passes(state, k, r, r))
        return recurrence
    for k in range(r + 1):
        assert_bitwise(output_and_grads(model, cut_at(k)), ref, f"{mode} bptt_k={bptt_k} cut at {k}", exact)


def chained_stages(model, stage_units, idx, num_recur, last_pass=None):
    """run_units stage after stage in one process, handing each stage's tuple to the next."""
    carry = (idx,)
    for s, units in enumerate(stage_units):
        carry = run_units(model, units, carry, s == 0, s == len(stage_units) - 1, num_recur, last_pass)
    return carry[0]


@pytest.mark.parametrize("mode,bptt_k", VARIANTS)
def test_stages_chained_equal_the_model_with_fused_kernels(mode, bptt_k, monkeypatch):
    """Stage forwards chained in one process equal model.final_hidden bitwise (and in the
    gradients of the loss): the training schedule at r = 4 on 1, 2 and 3 stages, the padded
    schedule of a sampled depth (4 slots) at every draw, and evaluation at r = 1, 3, 6 over the
    trained stages. Every stage range of n passes runs n - 1 fused recur_norm_inject calls (per
    autograd mode), as the single process does over its one range."""
    calls = []
    fused = K.recur_norm_inject
    monkeypatch.setattr(K, "recur_norm_inject", lambda *a, **k: calls.append(1) or fused(*a, **k))
    idx = torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(3))
    tgt = torch.roll(idx, -1, 1)

    def forward_backward(model, hidden):
        """(hidden, fused calls in the forward, parameter gradients of the loss or None in no_grad)."""
        model.zero_grad(set_to_none=True)
        calls.clear()
        h = hidden()
        n_fused = len(calls)
        if not torch.is_grad_enabled():
            return h, n_fused, None
        model.head.loss(h, tgt).backward()
        # zero where no gradient arrives: a stage sends zeros back for a tensor its step left unused
        return h.detach(), n_fused, {n: torch.zeros_like(p) if p.grad is None else p.grad
                                     for n, p in model.named_parameters()}

    def check(model, r, stage_units, last_pass=None, label=""):
        ref_h, ref_fused, ref_g = forward_backward(model, lambda: model.final_hidden(idx, r))
        h, n_fused, g = forward_backward(model, lambda: chained_stages(model, stage_units, idx, r, last_pass))
        assert torch.equal(h, ref_h), f"{label}: hidden states differ"
        for n in ref_g or {}:
            assert same(ref_g[n], g[n], mode != "linear"), f"{label}: gradient of {n} differs"
        if mode != "hyperconnect":  # the lanes have no fused norm kernel, in the model either
            # a stage cut between passes c - 1 and c costs one fusion, unless the autograd mode
            # changes there anyway (truncated backprop) or pass c is a skipped slot
            detached = 0 if bptt_k is None else max(r - bptt_k, 0)
            firsts = {next((u.index for u in units if u.kind == "pass"), None) for units in stage_units[1:]}
            cuts = sum(1 for c in firsts if c is not None and 0 < c < r and c != detached)
            assert n_fused == ref_fused - cuts, f"{label}: {n_fused} fused norm+inject calls, model {ref_fused}"

    fixed = tiny(input_injection=mode, bptt_k=bptt_k)
    model = perturbed_model(fixed)
    for pp in (1, 2, 3):
        check(model, 4, [p.units for p in plan_stages(fixed, pp)], label=f"{mode} train pp={pp}")
    with torch.no_grad():  # as the engines evaluate
        for r_eval in (1, 3, 6):
            for pp in (2, 3):
                check(model, r_eval, [eval_units(p, fixed, r_eval) for p in plan_stages(fixed, pp)],
                      label=f"{mode} eval r={r_eval} pp={pp}")
    sampling = dict(kind="uniform", lo=2 if bptt_k else 1, hi=4)
    sampled = tiny(input_injection=mode, bptt_k=bptt_k, recur_sampling=sampling)
    model = perturbed_model(sampled)
    for r in range(sampling["lo"], 5):
        for pp in (2, 3):
            check(model, r, [p.units for p in plan_stages(sampled, pp)], last_pass=sampled.max_recur - 1,
                  label=f"{mode} padded draw r={r} pp={pp}")


# ----------------------------------------------------------------------------- two processes
# AdamW moves every weight by about lr whatever its gradient's size, so a state that matters
# little at init (linear injection starts as [I | 0]: u = e) still shows in the parameters
STEPS = ["train.steps=3", "optim.name=adamw", "optim.lr=0.01"]
# Every step draws r = 4 (uniform on 4..4); under a sampled depth model.num_recur is the
# validation depth, so these runs train at r = 4 on the 4-slot schedule and validate at R_EVAL.
TRAIN_AT_4 = ["model.recur_sampling.kind=uniform", "model.recur_sampling.lo=4", "model.recur_sampling.hi=4"]
# r = 1 leaves the first stage no pass; r = 6 reuses the hyperconnect parameters cyclically
# (i % 4) on the second stage's passes 3..5
R_EVAL = {"linear": 3, "additive": 1, "passthrough": 3, "hyperconnect": 6}


def _cases() -> dict[str, list[str]]:
    cases = {}
    for mode in MODES:
        inj = f"model.input_injection={mode}"
        cases[f"{mode}_r2"] = [inj, "model.num_recur=2", *STEPS]
        cases[f"{mode}_r4_eval{R_EVAL[mode]}"] = [inj, *TRAIN_AT_4, f"model.num_recur={R_EVAL[mode]}", *STEPS]
    cases["additive_r4_bptt2"] = ["model.input_injection=additive", "model.num_recur=4", "model.bptt_k=2", *STEPS]
    # each pass recomputed in backward: the stage calls the model's pass code, which applies it
    cases["linear_r4_checkpointed"] = ["model.num_recur=4", "model.checkpoint_recurrence=true", *STEPS]
    return cases


@pytest.mark.slow  # two gloo processes per injection mode
def test_pipeline_pp2_every_injection_mode(tmp_path):
    """PP=2 (2 processes, 1F1B over 2 micro-batches, `megaloop train` itself: tests/layouts.py)
    equals the single process (losses to 1e-5 per step, final weights to 5e-5 (5e-3 embedding and
    head), validation loss to 1e-5) for every injection mode at r = 2 and r = 4, for additive
    injection with bptt_k = 2 at r = 4, with checkpoint_recurrence at r = 4, and validating at
    r = 1, 3 or 6 after training at r = 4."""
    root = str(tmp_path)
    data = token_data(str(tmp_path / "tokens"))
    cases = _cases()
    runs = check_layouts(2, root, {name: (["parallel.pp=2", *ov], ov) for name, ov in cases.items()}, data,
                         timeout=600)
    for name, (_, ref) in runs.items():
        draws = ref.num_recur
        assert draws == [2 if name.endswith("_r2") else 4] * 3, f"{name}: trained at r = {draws}"
