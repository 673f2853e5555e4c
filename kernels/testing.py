"""Helpers for the kernel tests (flash-attention style tolerances)."""
from __future__ import annotations

import contextlib
import os

import torch

from .dispatch import KernelBackend


DEVICE_ENV = "MEGALOOP_TEST_DEVICE"  # cpu (default): Triton interpreter; cuda: compiled kernels on the GPU


def test_device() -> str:
    return os.environ.get(DEVICE_ENV, "cpu").strip().lower() or "cpu"


test_device.__test__ = False  # a helper the kernel tests import, not a test for pytest to collect


def select_test_device() -> str:
    """Call at the top of a kernel test module, before anything imports triton.

    cpu (the default): the kernels run under the Triton interpreter (TRITON_INTERPRET=1).
    MEGALOOP_TEST_DEVICE=cuda: the same tests run the compiled kernels on the GPU. New tensors
    default to that device and `generator` hands out generators on it, so the tests' inputs,
    references and tolerances are the ones the CPU run checks.
    """
    device = test_device()
    if device == "cpu":
        os.environ["TRITON_INTERPRET"] = "1"
        return device
    if not device.startswith("cuda") or not torch.cuda.is_available():
        raise RuntimeError(f"{DEVICE_ENV}={device!r}: only cpu or cuda (with a visible GPU) can run the kernel tests")
    os.environ.pop("TRITON_INTERPRET", None)
    torch.set_default_device(device)
    return device


def generator(seed: int) -> torch.Generator:
    """A seeded generator on the test device (CPU and CUDA draw different numbers)."""
    return torch.Generator(device=test_device()).manual_seed(seed)


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_close(name: str, out: torch.Tensor, out_pt: torch.Tensor, out_ref: torch.Tensor,
                rtol_factor: float = 2.0, atol: float = 1e-5) -> None:
    """|out - ref| <= rtol_factor * |out_pt - ref| + atol * max(1, |ref|_max).

    out: the tested result (input dtype); out_pt: the PyTorch result in the same dtype;
    out_ref: a higher-precision reference (fp64 for fp32 inputs, fp32 for bf16 inputs).
    """
    assert out.shape == out_pt.shape == out_ref.shape, (name, out.shape, out_pt.shape, out_ref.shape)
    assert out.dtype == out_pt.dtype, (name, out.dtype, out_pt.dtype)
    assert torch.isfinite(out.double()).all(), f"{name}: non-finite values"
    err = max_err(out, out_ref)
    base = max_err(out_pt, out_ref)
    scale = max(1.0, out_ref.double().abs().max().item() if out_ref.numel() else 1.0)
    bound = rtol_factor * base + atol * scale
    assert err <= bound, f"{name}: error {err:.3e} > {rtol_factor} x torch error {base:.3e} + atol {atol * scale:.3e}"


def ref_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float32 else torch.float32


def atol_for(dtype: torch.dtype) -> float:
    return 1e-5 if dtype == torch.float32 else 2e-3


_PTR = {torch.float32: "*fp32", torch.bfloat16: "*bf16", torch.float16: "*fp16", torch.int64: "*i64",
        torch.int32: "*i32"}


class _CompileTarget(KernelBackend):
    """The Triton kernels on any tensor: under compile_only the launches compile, nothing runs."""

    def use_triton(self, tensor: torch.Tensor) -> bool:
        return True


@contextlib.contextmanager
def compile_only(arch: int = 90, n_sms: int = 132):
    """Within the block, every Triton kernel launch is compiled for CUDA sm_<arch> (through ptxas,
    no GPU needed) with the GPU launch sizes, instead of being run; run the ops with
    ``backend=COMPILE_TARGET`` on CPU tensors. Outputs are left uninitialised. Yields a list that
    receives (kernel name, constexprs, error or None).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction

    from .triton import common, rms_norm

    if common.INTERPRET:
        raise RuntimeError("compile_only needs the kernels imported without TRITON_INTERPRET")
    target = GPUTarget("cuda", arch, 32)
    results = []
    seen = set()

    def getitem(jf, grid):
        def launch(*args, **kw):
            opts = {k: kw.pop(k) for k in ("num_warps", "num_stages") if k in kw}
            values = dict(zip(jf.arg_names, args))
            values.update(kw)
            sig, consts = {}, {}
            for i, name in enumerate(jf.arg_names):
                v = values[name]
                if jf.params[i].is_constexpr:
                    sig[name], consts[name] = "constexpr", v
                elif isinstance(v, torch.Tensor):
                    sig[name] = _PTR[v.dtype]
                elif isinstance(v, bool):
                    sig[name] = "i1"
                elif isinstance(v, int):
                    sig[name] = "i64" if abs(v) >= 2 ** 31 else "i32"
                elif isinstance(v, float):
                    sig[name] = "fp32"
                else:
                    raise TypeError(f"{jf.fn.__name__}: argument {name} of type {type(v)}")
            key = (jf.fn.__name__, tuple(sorted(sig.items())), tuple(sorted((k, str(v)) for k, v in consts.items())),
                   tuple(sorted(opts.items())))
            if key in seen:
                return
            seen.add(key)
            try:
                triton.compile(ASTSource(jf, sig, consts), target=target, options=opts)
                results.append((jf.fn.__name__, consts, None))
            except Exception as exc:
                results.append((jf.fn.__name__, consts, f"{type(exc).__name__}: {exc}"))

        return launch

    # (JITFunction inherits __getitem__; setting it on the class shadows it for the block)
    saved = [(JITFunction, "__getitem__", JITFunction.__dict__.get("__getitem__")),
             (rms_norm, "num_sms", rms_norm.num_sms)]
    try:
        JITFunction.__getitem__ = getitem
        rms_norm.num_sms = lambda device: n_sms  # the persistent backward's grid, as on an H100
        yield results
    finally:
        for obj, name, val in saved:
            if val is None:
                delattr(obj, name)
            else:
                setattr(obj, name, val)


COMPILE_TARGET = _CompileTarget("triton")


def compile_check(arch: int = 90):
    """Compile every kernel, in the configurations the ops launch on a GPU, for sm_<arch>.

    Needs a process where triton was imported WITHOUT TRITON_INTERPRET (the interpreter replaces
    triton's own library functions at import). Returns [(kernel, constexprs, error or None)].
    Run as ``python -m megaloop.kernels.testing [arch]`` to print the results as JSON.
    """
    # (import the functions: the package re-exports rms_norm etc. under the module names)
    from .qk_norm_rope import qk_norm_rope
    from .recurrence import hc_combine, hc_update, recur_norm_inject
    from .relu_squared import relu_squared
    from .rms_norm import add_rms_norm, rms_norm
    from .triton.softcap_ce import triton_chunk

    dt = torch.bfloat16
    tri = COMPILE_TARGET

    def run(f):
        try:
            f()
        except Exception:
            pass  # the outputs are uninitialised; only the compilations matter

    def ones_like_all(ts):
        return [torch.ones_like(t) for t in ts]

    with compile_only(arch=arch) as results:
        for d in (4096, 130):
            x = torch.randn(64, d, dtype=dt, requires_grad=True)
            r = torch.randn(64, d, dtype=dt, requires_grad=True)
            w = torch.ones(d, dtype=dt, requires_grad=True)
            run(lambda: rms_norm(x, w, 1e-6, backend=tri).sum().backward())
            run(lambda: rms_norm(x, None, 1e-6, backend=tri).sum().backward())
            run(lambda: torch.autograd.backward(list(add_rms_norm(x, r, w, 1e-6, backend=tri)), ones_like_all([x, x])))
            run(lambda: torch.autograd.backward(list(recur_norm_inject(x, r, w, 1e-6, "additive", backend=tri)),
                                                ones_like_all([x, x])))
        x = torch.randn(64, 4096, dtype=dt, requires_grad=True)
        run(lambda: relu_squared(x, backend=tri).sum().backward())
        for n in (2, 3):
            L = torch.randn(n, 64, 1024, dtype=dt, requires_grad=True)
            s = torch.randn(64, 1024, dtype=dt, requires_grad=True)
            a, M, b = (torch.ones(n, requires_grad=True), torch.eye(n, requires_grad=True),
                       torch.ones(n, requires_grad=True))
            run(lambda: hc_combine(L, a, backend=tri).float().sum().backward())
            run(lambda: hc_update(L, s, M, b, backend=tri).float().sum().backward())
        q = torch.randn(2, 16, 8, 128, dtype=dt, requires_grad=True)
        k = torch.randn(2, 16, 2, 128, dtype=dt, requires_grad=True)
        run(lambda: torch.autograd.backward(
            list(qk_norm_rope(q, k, torch.ones(16, 64), torch.zeros(16, 64), backend=tri)), ones_like_all([q, k])))
        for V, cap in ((32768, 15.0), (1001, None)):
            lg, t, sc = torch.randn(64, V, dtype=dt), torch.zeros(64, dtype=torch.int64), torch.ones(1)
            for phase in ("fused", "stats"):
                run(lambda: triton_chunk(lg, t, cap, V - 1, 0, -100, sc, phase))
            run(lambda: triton_chunk(lg, t, cap, V - 1, 0, -100, sc, "grad", lse=torch.zeros(64)))
    return results


if __name__ == "__main__":
    import json
    import sys

    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise SystemExit("run the compile check without TRITON_INTERPRET")
    res = compile_check(int(sys.argv[1]) if len(sys.argv) > 1 else 90)
    print(json.dumps([{"kernel": n, "constexprs": {k: str(v) for k, v in c.items()}, "error": e} for n, c, e in res]))
