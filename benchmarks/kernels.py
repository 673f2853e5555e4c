"""Speed and memory of the fused kernels vs PyTorch eager and torch.compile; prints one JSON object.

    python benchmarks/kernels.py --out results.json          # GPU: ~2-3 minutes on an H200

On CUDA: bf16, 16k tokens (8 x 2048), widths 1024 and 4096, vocab 32768 for the fused head +
softcap CE; each op timed with triton.testing.do_bench (median ms) forward and forward+backward,
with the peak extra memory of one forward+backward (torch.cuda.max_memory_allocated minus what
was allocated before). Implementations: "triton" (the ops with backend="triton"), "eager"
(the PyTorch reference of each op) and "compile" (torch.compile of that reference).

Without CUDA the Triton kernels cannot be timed ("triton": "needs a CUDA GPU"); the reference
paths run at reduced shapes (listed under "shapes") in fp32 with a wall-clock timer, and
torch.compile is tried (skipped if it fails). A time budget (--budget seconds) skips what is left
once spent, saying so in the output.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
import traceback

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

try:  # installed as megaloop.kernels; fall back to the folder when not installed
    import megaloop.kernels as K
except Exception:  # pragma: no cover
    import kernels as K  # type: ignore

from emit import emit  # benchmarks/emit.py (scripts run with benchmarks/ on sys.path)


# ----------------------------------------------------------------------------- cases
def _rope(T, D, device):
    inv = 1.0 / 10000 ** (torch.arange(0, D, 2, device=device, dtype=torch.float32) / D)
    ang = torch.arange(T, device=device, dtype=torch.float32)[:, None] * inv[None, :]
    return ang.cos(), ang.sin()


def make_cases(device, dtype, gpu):
    """(op name, shape description, builder) where builder() -> (inputs, fns{impl: callable})."""
    if gpu:
        B, T, widths, V = 8, 2048, (1024, 4096), 32768
    else:
        B, T, widths, V = 2, 512, (1024,), 8192
    N = B * T
    cases = []

    def rnd(*shape, scale=1.0, grad=True, dt=dtype):
        t = torch.randn(*shape, device=device, dtype=torch.float32).mul_(scale).to(dt)
        return t.requires_grad_(grad)

    for d in widths:
        def rms(d=d):
            x, w = rnd(N, d), rnd(d, scale=0.1).detach().add_(1).requires_grad_()
            return (x, w), {"triton": lambda: K.rms_norm(x, w, 1e-6, backend="triton"),
                            "ref": (K.rms_norm_reference, (x, w, 1e-6))}
        cases.append(("rms_norm", {"tokens": N, "d": d}, rms))

        def add_rms(d=d):
            x, r, w = rnd(N, d), rnd(N, d), rnd(d, scale=0.1).detach().add_(1).requires_grad_()
            return (x, r, w), {"triton": lambda: K.add_rms_norm(x, r, w, 1e-6, backend="triton"),
                               "ref": (K.add_rms_norm_reference, (x, r, w, 1e-6))}
        cases.append(("add_rms_norm", {"tokens": N, "d": d}, add_rms))

        def qk(d=d):
            D = 128
            Hq = d // D
            Hk = max(1, Hq // 4)
            qkv = rnd(B, T, (Hq + 2 * Hk) * D)
            q = qkv[..., : Hq * D].view(B, T, Hq, D)
            k = qkv[..., Hq * D: (Hq + Hk) * D].view(B, T, Hk, D)
            cos, sin = _rope(T, D, device)
            return (qkv,), {"triton": lambda: K.qk_norm_rope(q, k, cos, sin, 1e-6, backend="triton"),
                            "ref": (lambda a, b: K.qk_norm_rope_reference(a, b, cos, sin, 1e-6), (q, k))}
        cases.append(("qk_norm_rope", {"B": B, "T": T, "Hq": d // 128, "Hk": max(1, d // 512), "D": 128}, qk))

        def relu2(d=d):
            x = rnd(N, 4 * d)
            return (x,), {"triton": lambda: K.relu_squared(x, backend="triton"),
                          "ref": (K.relu_squared_reference, (x,))}
        cases.append(("relu_squared", {"tokens": N, "width": 4 * d}, relu2))

        for mode in ("additive", "linear"):
            def rec(d=d, mode=mode):
                h, e, w = rnd(N, d), rnd(N, d), rnd(d, scale=0.1).detach().add_(1).requires_grad_()
                W = rnd(d, 2 * d, scale=d ** -0.5) if mode == "linear" else None
                ins = (h, e, w) + ((W,) if W is not None else ())
                return ins, {"triton": lambda: K.recur_norm_inject(h, e, w, 1e-6, mode, W, backend="triton"),
                             "ref": (lambda a, b, c, *Wm: K.recur_norm_inject_reference(a, b, c, 1e-6, mode,
                                                                                         Wm[0] if Wm else None), ins)}
            cases.append((f"recur_norm_inject[{mode}]", {"tokens": N, "d": d}, rec))

        def hc(d=d):
            Nl = 2
            lanes, s = rnd(Nl, N, d), rnd(N, d)
            alpha = torch.tensor([1.0, 0.5], device=device, requires_grad=True)
            M = torch.eye(Nl, device=device).requires_grad_()
            beta = torch.ones(Nl, device=device, requires_grad=True)

            def both_ref(L, s_, a, M_, b):
                return K.hc_combine_reference(L, a), K.hc_update_reference(L, s_, M_, b)
            return (lanes, s, alpha, M, beta), {
                "triton": lambda: (K.hc_combine(lanes, alpha, backend="triton"),
                           K.hc_update(lanes, s, M, beta, backend="triton")),
                "ref": (both_ref, (lanes, s, alpha, M, beta))}
        cases.append(("hc_combine+hc_update", {"lanes": 2, "tokens": N, "d": d}, hc))

        def ce(d=d):
            h = rnd(N, d)
            w = rnd(V, d, scale=0.001 * 30)
            t = torch.randint(0, V, (N,), device=device)
            return (h, w), {"triton": lambda: K.softcap_cross_entropy(h, w, t, 15.0, backend="triton"),
                            "torch_chunked": lambda: K.softcap_cross_entropy(h, w, t, 15.0, backend="torch"),
                            "ref": (lambda a, b: K.softcap_cross_entropy_reference(a, b, t, 15.0), (h, w))}
        cases.append(("softcap_cross_entropy", {"tokens": N, "d": d, "vocab": V}, ce))
    return cases


# ----------------------------------------------------------------------------- timing
def _outputs(y):
    if isinstance(y, torch.Tensor):
        return [y]
    return [t for t in y if isinstance(t, torch.Tensor)]


def _make_step(fn, inputs, backward):
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]

    def step():
        y = _outputs(fn())
        if backward:
            ys = [t for t in y if t.requires_grad]
            torch.autograd.backward(ys, [torch.ones_like(t) for t in ys])
    return step, leaves


def _bench_gpu(step, leaves):
    import triton.testing

    return float(triton.testing.do_bench(step, warmup=10, rep=40, grad_to_none=leaves))


def _bench_cpu(step, leaves, reps=3):
    step()  # warmup (and compile)
    ts = []
    for _ in range(reps):
        for t in leaves:
            t.grad = None
        t0 = time.perf_counter()
        step()
        ts.append((time.perf_counter() - t0) * 1e3)
    return float(statistics.median(ts))


def _peak_mb(step, leaves, device):
    if device.type != "cuda":
        return None
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for t in leaves:
        t.grad = None
    return round(peak / 2 ** 20, 1)


def measure(fn, inputs, device):
    bench = _bench_gpu if device.type == "cuda" else _bench_cpu
    res = {}
    # the forward as in training (inputs require grad, so activations are saved; the fused CE
    # computes its gradients here), which also keeps torch.compile to one graph per case
    step, leaves = _make_step(fn, inputs, backward=False)
    res["fwd_ms"] = round(bench(step, []), 4)
    step, leaves = _make_step(fn, inputs, backward=True)
    res["fwd_bwd_ms"] = round(bench(step, leaves), 4)
    res["peak_mem_mb_fwd_bwd"] = _peak_mb(step, leaves, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--budget", type=float, default=None,
                    help="seconds; what is left is skipped once spent (default 160 on GPU, 100 on CPU)")
    ap.add_argument("--no-compile", action="store_true", help="skip torch.compile")
    ap.add_argument("--ops", default="", help="comma-separated op-name prefixes to run (default: all)")
    args = ap.parse_args(argv)

    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    budget = args.budget if args.budget is not None else (160.0 if gpu else 100.0)
    t_start = time.time()
    triton_ok = gpu and K.triton_available()
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    out = {
        "device": torch.cuda.get_device_name(0) if gpu else f"cpu ({platform.processor() or platform.machine()}, "
                                                              f"{torch.get_num_threads()} threads)",
        "torch": torch.__version__,
        "triton_version": triton_version,
        "dtype": str(dtype).replace("torch.", ""),
        "timer": "triton.testing.do_bench median ms" if gpu else "wall clock, median of 3 after 1 warmup (ms)",
        "fwd": "forward with inputs requiring grad (as in training); fwd_bwd adds backward of ones",
        "peak_mem": "torch.cuda.max_memory_allocated minus allocated before, one fwd+bwd (MiB)"
                    if gpu else "needs CUDA",
        "shapes": ("16k tokens (8 x 2048), d in {1024, 4096}, vocab 32768, head dim 128, GQA 4:1"
                   if gpu else "reduced for CPU: 1k tokens (2 x 512), d 1024, vocab 8192, head dim 128"),
        "results": [],
    }
    if not triton_ok:
        out["triton"] = "needs a CUDA GPU" if not gpu else "triton not importable"
    compile_ok = not args.no_compile
    skipped = []
    wanted = [p for p in args.ops.split(",") if p]
    cases = [c for c in make_cases(device, dtype, gpu) if not wanted or any(c[0].startswith(p) for p in wanted)]
    entries = [{"op": name, "shape": shape, "impl": {}} for name, shape, _ in cases]
    # pass 1: the kernels and eager for every op; pass 2: torch.compile (slow to build) as time allows
    for pass_no in (1, 2):
        if pass_no == 2 and not compile_ok:
            break
        for (name, shape, build), entry in zip(cases, entries):
            if time.time() - t_start > budget:
                skipped.append(f"{name} {shape} ({'compile' if pass_no == 2 else 'all'})")
                continue
            try:
                inputs, fns = build()
            except torch.cuda.OutOfMemoryError:
                entry["error"] = "out of memory building inputs"
                continue
            ref_fn, ref_args = fns["ref"]
            impls = []
            if pass_no == 1:
                if triton_ok:
                    impls.append(("triton", fns["triton"]))
                if "torch_chunked" in fns:
                    impls.append(("torch_chunked", fns["torch_chunked"]))
                impls.append(("eager", lambda: ref_fn(*ref_args)))
            elif compile_ok:
                compiled = torch.compile(ref_fn, dynamic=False)
                impls.append(("compile", lambda: compiled(*ref_args)))
            for impl, fn in impls:
                try:
                    entry["impl"][impl] = measure(fn, inputs, device)
                except Exception as exc:  # report and go on (e.g. compile unavailable, OOM)
                    msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
                    entry["impl"][impl] = {"error": msg}
                    if impl == "compile":
                        compile_ok = False
                        out["compile_error"] = msg
                    if os.environ.get("BENCH_DEBUG"):
                        traceback.print_exc()
                    if gpu:
                        torch.cuda.empty_cache()
            del inputs, fns
            if gpu:
                torch.cuda.empty_cache()
    out["results"] = entries
    if skipped:
        out["skipped_time_budget"] = skipped
    out["elapsed_s"] = round(time.time() - t_start, 1)
    emit(out, args.out)


if __name__ == "__main__":
    main()
