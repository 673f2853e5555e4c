"""FP8 training (`parallel.precision: fp8`, megaloop/fp8.py) on a CPU, through torchao's emulation.

Contracts:
- one converted linear's forward and both gradients are float8 tensorwise products: equal to an
  independent by-hand version (operands scaled by fp8_max / amax and rounded to torch's
  float8_e4m3fn / float8_e5m2, multiplied in fp64) to the bf16 rounding of the result;
- and within float8's derived error of the bf16 linear (the bound is below), while clearly
  outside bf16's own error: the conversion is not a no-op;
- the reference's filter picks the blocks' q, k, v, o and MLP linears of at least 128 features;
  the recurrent group's shared blocks convert once; head, injection, embedding and norms stay;
  state-dict keys are unchanged;
- refusals, each one ConfigError naming the fix: a GPU older than sm_89, a missing torchao,
  zero_stage 3, a d_model / MLP / head width (or its TP shard) not a multiple of 16; and the CLI
  turns one into one line on stderr and exit status 2;
- the slow tests (tests/test_fp8_train.py) train the tiny model end to end.

The error bound (elementwise). torchao rounds each operand t, scaled by s = fp8_max / amax(t), to
float8 with round-to-nearest: |q(t) - t| <= u |t| + a, with u the unit roundoff of the format's
normal range (e4m3: 3 mantissa bits, u = 2^-4; e5m2: 2 bits, u = 2^-3) and a = half the
subnormal spacing / s (e4m3: 2^-10 / s, e5m2: 2^-17 / s). So for y = sum_k x_k w_k,
|q(x) q(w) - x w| <= sum_k |x_k| e_w,k + e_x,k |w_k| + e_x,k e_w,k with e = u |t| + a. Both
results are then rounded to bf16 (u = 2^-8 each). Forward: e4m3 x e4m3; input gradient: e5m2
(output gradient) x e4m3 (weight); weight gradient: e5m2 x e4m3 (input).
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torch.nn as nn

from megaloop.config import ConfigError, load_config
from megaloop.config import check_fp8_config
from megaloop.fp8 import convert_for_fp8, require_runtime

pytest.importorskip("torchao")

E4M3, E5M2 = torch.float8_e4m3fn, torch.float8_e5m2
UNIT = {E4M3: 2.0 ** -4, E5M2: 2.0 ** -3}          # unit roundoff of the normal range
HALF_SUBNORMAL = {E4M3: 2.0 ** -10, E5M2: 2.0 ** -17}
BF16_U = 2.0 ** -8
CPU = torch.device("cpu")


def _cfg(*sets):
    return load_config(None, ["train.steps=1", "model.d_model=128", "model.n_head=2", "model.vocab_size=64",
                              "model.seq_len=16", "model.n_prelude=1", "model.n_recur_block=2", "model.n_coda=1",
                              "model.num_recur=3", *sets])


def _scale(t: torch.Tensor, dtype) -> torch.Tensor:
    return (torch.finfo(dtype).max / t.abs().max().double()).float()


def _round(t: torch.Tensor, dtype) -> torch.Tensor:
    """t rounded to float8 under tensorwise scaling, back in t's units (fp64)."""
    s = _scale(t, dtype)
    q = (t.float() * s).clamp(-torch.finfo(dtype).max, torch.finfo(dtype).max).to(dtype)
    return q.double() / s.double()


def _bound(a: torch.Tensor, da, b: torch.Tensor, db) -> torch.Tensor:
    """Elementwise bound on |q(a) @ q(b) - a @ b| (a [m, k], b [k, n]) from the rounding model."""
    a, b = a.double().abs(), b.double().abs()
    ea = UNIT[da] * a + HALF_SUBNORMAL[da] / _scale(a, da).double()
    eb = UNIT[db] * b + HALF_SUBNORMAL[db] / _scale(b, db).double()
    return a @ eb + ea @ b + ea @ eb


def _linear_pair(in_f=256, out_f=512, tokens=96, seed=0):
    """A torchao-converted linear and the same weights as a plain one, on bf16-exact values, and
    an input and an output gradient with outliers (so the scales matter)."""
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(out_f, in_f, generator=g) * 2 - 1).mul(3 ** 0.5 / in_f ** 0.5).bfloat16().float()
    x = torch.randn(tokens, in_f, generator=g)
    x[3, 7] = 9.0  # one outlier sets the input's scale
    x = x.bfloat16()
    go = (torch.randn(tokens, out_f, generator=g) * 1e-3).bfloat16()
    plain = nn.Linear(in_f, out_f, bias=False)
    plain.weight.data.copy_(w)
    from megaloop.fp8 import _quiet_import, float8_config
    with _quiet_import():
        from torchao.float8 import convert_to_float8_training
    conv = convert_to_float8_training(nn.Sequential(nn.Linear(in_f, out_f, bias=False)),
                                      config=float8_config(CPU))[0]
    conv.weight.data.copy_(w)
    return conv, plain, x, go


def _run(lin, x, go, weight_dtype=None):
    x = x.clone().requires_grad_()
    w = lin.weight if weight_dtype is None else lin.weight.to(weight_dtype)
    y = lin(x) if weight_dtype is None else torch.nn.functional.linear(x, w)
    y.backward(go)
    gw = lin.weight.grad.clone()
    lin.weight.grad = None
    return y.detach().double(), x.grad.double(), gw.double()


def test_converted_linear_is_tensorwise_float8():
    """Forward, input gradient and weight gradient equal the by-hand float8 products (operands
    scaled by fp8_max / amax, cast to torch's float8 dtypes) to the bf16 rounding of the result."""
    conv, _, x, go = _linear_pair()
    assert type(conv).__name__ == "Float8Linear"
    y, gx, gw = _run(conv, x, go)
    w = conv.weight.detach()
    want = {"forward": _round(x, E4M3) @ _round(w, E4M3).t(),
            "input gradient": _round(go, E5M2) @ _round(w, E4M3),
            "weight gradient": _round(go, E5M2).t() @ _round(x, E4M3)}
    for (name, ref), got in zip(want.items(), (y, gx, gw)):
        tol = 2 * BF16_U * ref.abs() + 1e-6 * ref.abs().max()
        assert ((got - ref).abs() <= tol).all(), f"{name}: {float(((got - ref).abs() - tol).max()):.3e} over"


def test_converted_linear_within_float8_error_of_bf16_linear():
    """|fp8 - bf16 linear| <= the float8 rounding bound (module docstring) + both bf16 roundings,
    elementwise, for the forward and both gradients; and the normwise difference is well above
    what bf16 alone gives (the conversion really runs in float8)."""
    conv, plain, x, go = _linear_pair(seed=1)
    got = _run(conv, x, go)
    ref = _run(plain, x, go, weight_dtype=torch.bfloat16)  # the bf16 linear: bf16 operands and result
    w = plain.weight.detach()
    bounds = {"forward": _bound(x, E4M3, w.t(), E4M3),
              "input gradient": _bound(go, E5M2, w, E4M3),
              "weight gradient": _bound(go.t(), E5M2, x, E4M3)}
    exact = {"forward": x.double() @ w.double().t(), "input gradient": go.double() @ w.double(),
             "weight gradient": go.double().t() @ x.double()}
    for (name, bound), g, r in zip(bounds.items(), got, ref):
        tol = bound + 2 * BF16_U * (g.abs() + r.abs())
        assert ((g - r).abs() <= tol).all(), f"{name}: {float(((g - r).abs() - tol).max()):.3e} over the bound"
        e = exact[name]
        fp8_err, bf16_err = float((g - e).norm() / e.norm()), float((r - e).norm() / e.norm())
        assert fp8_err > 4 * bf16_err and fp8_err > 5e-3, f"{name}: fp8 error {fp8_err:.2e}, bf16 {bf16_err:.2e}"


def test_reference_filter_shared_blocks_and_state_dict():
    """The blocks' linears of >= 128 features convert, each shared recurrent block once; the head,
    injection, embedding and norms do not; parameters and state-dict keys are unchanged."""
    from megaloop.train import build_model
    cfg = _cfg("parallel.precision=fp8", "model.input_injection=linear")
    model = build_model(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    params = {n: id(p) for n, p in model.named_parameters()}
    names = convert_for_fp8(model, cfg, CPU)
    per_block = ["attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.fc", "mlp.proj"]
    want = [f"{part}.{i}.{lin}" for part, n in (("prelude", 1), ("recur", 2), ("coda", 1))
            for i in range(n) for lin in per_block]
    assert sorted(names) == sorted(want)
    kinds = {n: type(m).__name__ for n, m in model.named_modules()}
    assert all(kinds[n] == "Float8Linear" for n in want)
    assert kinds["head"] == "LMHead" and kinds["injection"] == "Injection" and kinds["embed"] == "Embedding"
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert {n: id(p) for n, p in model.named_parameters()} == params  # the same Parameter objects
    # other precisions: nothing converts; layers under 128 features stay (the reference's cut)
    assert convert_for_fp8(build_model(_cfg()), _cfg(), CPU) == []
    small = _cfg("parallel.precision=fp8", "model.d_model=64", "model.n_head=1")
    assert convert_for_fp8(build_model(small), small, CPU) == []


def test_fp8_refuses_old_gpus_and_a_missing_torchao(monkeypatch):
    """sm_80 (A100) is refused naming the GPU and bf16; sm_89 passes the capability check; a
    missing torchao names the extra to install."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda d=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(ConfigError, match=r"compute capability 8\.9 or newer.*A100-SXM4-80GB is sm_80.*precision=bf16"):
        require_runtime(torch.device("cuda", 0))
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d=None: (8, 9))
    assert require_runtime(torch.device("cuda", 0)).Float8LinearConfig is not None
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # import now raises ImportError
    with pytest.raises(ConfigError, match=r"needs torchao.*pip install -e \.\[fp8\]"):
        require_runtime(CPU)


@pytest.mark.parametrize("sets, match", [
    (["parallel.zero_stage=3", "optim.name=adamw"], r"zero_stage=3.*DeepSpeed.*zero_stage=2"),
    (["model.d_model=136", "model.n_head=1"], r"model\.d_model is 136, not a multiple of 16.*e\.g\. 144"),
    (["model.mlp_ratio=3", "model.d_model=120", "model.n_head=1"], r"d_model is 120"),
    (["model.head_dim=60"], r"query width \(n_head x head_dim = 2 x 60\) is 120"),
    (["parallel.tp=2", "model.d_model=144", "model.n_head=2"], r"tp=2: each rank.s shard of the query width.*144 / 2 = 72"),
])
def test_fp8_bad_input(sets, match):
    """Each unrunnable fp8 config is one ConfigError naming the size (or stage) and the fix."""
    with pytest.raises(ConfigError, match=match):
        _cfg("parallel.precision=fp8", *sets)


def test_fp8_check_is_pure_and_passes_good_shapes():
    """The reference grid's widths (multiples of 128) pass, under TP=2 too."""
    cfg = _cfg("parallel.precision=fp8", "model.d_model=1280", "model.n_head=10", "parallel.tp=2")
    check_fp8_config(cfg.model, cfg.parallel)


def test_cli_reports_an_fp8_refusal_in_one_line(tmp_path):
    """`megaloop train` with an unrunnable fp8 config: one line on stderr, exit status 2."""
    cfg = tmp_path / "c.yaml"
    cfg.write_text("model: {d_model: 72, n_head: 1}\nparallel: {precision: fp8}\ntrain: {steps: 1}\n")
    p = subprocess.run([sys.executable, "-m", "megaloop.cli", "train", str(cfg)],
                       capture_output=True, text=True, timeout=600)
    lines = [ln for ln in p.stderr.strip().splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1 and "72, not a multiple of 16" in lines[0], p.stderr


def test_tp_layers_built_from_a_converted_linear_multiply_in_float8():
    """A column- or row-parallel layer built from a converted linear (here on one rank: the whole
    weight) gives the converted linear's output and gradients bitwise, not the plain product's;
    from a plain linear it stays plain (no float8 config)."""
    from megaloop.fp8 import config_of
    from megaloop.parallel.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    conv, plain, x, go = _linear_pair(seed=2)
    want = _run(conv, x, go)
    for layer in (ColumnParallelLinear, RowParallelLinear):
        tp = layer(conv.weight, None, config_of(conv))
        got = _run(tp, x, go)
        assert all(torch.equal(a, b) for a, b in zip(got, want)), layer.__name__
        assert layer(plain.weight, None, config_of(plain)).float8 is None
    assert not torch.equal(_run(plain, x.float(), go.float())[0], want[0])
