"""Everything megaloop can only measure on a GPU: one command, one JSON, inside one 10-minute device call.

    python benchmarks/gpu_suite.py                       # -> benchmarks/results/gpu_suite_<gpu>.json
    python benchmarks/gpu_suite.py --out suite.json --budget 420 --skip generate
    python benchmarks/gpu_suite.py --dry-run             # the plan and its time budget; no GPU needed

Parts, in this order, each in its own process with its own time box (a part that fails or runs
out of time is recorded with its error and the rest go on; the deadline of the whole suite is
--budget seconds):
  kernel_tests  the kernel test files under pytest with MEGALOOP_TEST_DEVICE=cuda: the Triton
                kernels compiled for this GPU (not the interpreter), same inputs and tolerances;
  kernel_bench  benchmarks/kernels.py (bf16, 16k tokens, d 1024 and 4096): per op forward and
                forward+backward ms of the Triton kernel, PyTorch eager and torch.compile; goals:
                >= 1.5x eager and no slower than torch.compile, forward+backward, per op;
  train_step    benchmarks/train_step.py --sections kernels at d_model 1280 (the iso-depth width
                s = 20: 10 heads of 128; prelude 2 + a group of 4 looped r = 4 times + coda 2;
                seq 2048, batch 8, vocab 32768), bf16, AdamW: tokens/s and loop-aware MFU with the
                kernels on and off, eager and compiled, and dynamo's graph breaks; goal: >= 45 % MFU;
  fp8           benchmarks/train_step.py --sections fp8 at the same d_model 1280 shape: the compiled
                step in bf16 and in fp8 (parallel.precision: fp8, torchao float8 linears with
                tensorwise scaling) side by side, tokens/s and MFU (both against the bf16 peak),
                and the kernel that ran the float8 products (aten::_scaled_mm seen by the profiler,
                or the emulation);
  flash_attn    flash_attn_func against F.scaled_dot_product_attention (causal, bf16,
                8 x 2048 x 10 heads x 128): largest difference, forward+backward ms;
                "not importable" when flash-attn is not installed;
  generate      benchmarks/generate.py (decoding with and without the KV cache) when the file
                exists, else "not available".
Without CUDA it stops at once: one line on stderr, exit status 2, nothing written.

Time budget: the time boxes add up to the default --budget (540 s), which leaves 60 s of the
10-minute device call for starting Python and writing the JSON; --dry-run prints that plan and
exits 1 if it no longer fits (tests/test_gpu_scripts.py runs it).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PARTS = ("kernel_tests", "kernel_bench", "train_step", "fp8", "flash_attn", "generate")
KERNEL_TESTS = ["tests/test_kernels_rms_norm.py", "tests/test_kernels_relu_squared.py",
                "tests/test_kernels_qk_norm_rope.py", "tests/test_kernels_recurrence.py",
                "tests/test_kernels_softcap_ce.py", "tests/test_kernels_model.py"]
# the d_model 1280 looped step (iso-depth s = 20, r = 4)
TRAIN_SHAPE = ["model.d_model=1280", "model.n_head=10", "model.n_kv_head=10", "model.vocab_size=32768",
               "model.seq_len=2048", "model.n_prelude=2", "model.n_recur_block=4", "model.n_coda=2",
               "model.num_recur=4", "train.micro_batch_size=8", "parallel.precision=bf16",
               "optim.name=adamw", "optim.lr=0.001"]
# seconds each part may take at most (the suite's deadline may cut them shorter); they add up to
# the default budget, which fits one 10-minute device call with DEVICE_CALL_S - BUDGET_S to spare
TIME_BOX = {"kernel_tests": 120, "kernel_bench": 100, "train_step": 160, "fp8": 100, "flash_attn": 30,
            "generate": 30}
BUDGET_S = 540
DEVICE_CALL_S = 600
GOALS = {"kernel_speedup_over_eager": 1.5, "kernel_speedup_over_compile": 1.0, "train_mfu": 0.45}


def fail(msg: str) -> None:
    print(f"gpu_suite: {msg}", file=sys.stderr)
    sys.exit(2)


def run(cmd: list[str], timeout: float, env: dict | None = None) -> dict:
    """A part's process: exit status, seconds, and the end of its output."""
    t0 = time.time()
    try:
        p = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=max(1.0, timeout),
                           env={**os.environ, **(env or {})})
        rc, out, err = p.returncode, p.stdout, p.stderr
    except subprocess.TimeoutExpired as e:
        rc, out, err = "timeout", _text(e.stdout), _text(e.stderr) + f"\n(stopped after {timeout:.0f}s)"
    return {"cmd": " ".join(cmd), "rc": rc, "seconds": round(time.time() - t0, 1),
            "stdout": out, "tail": (out + err)[-3000:]}


def _text(b) -> str:
    return b.decode(errors="replace") if isinstance(b, bytes) else (b or "")


def json_part(cmd: list[str], timeout: float, out_path: str, env: dict | None = None) -> dict:
    res = run(cmd + ["--out", out_path], timeout, env)
    res.pop("stdout")
    if os.path.isfile(out_path):
        with open(out_path) as f:
            res["result"] = json.load(f)
    else:
        res["error"] = "no JSON written"
    return res


# ----------------------------------------------------------------------------- parts
def kernel_tests(timeout: float, tmp: str) -> dict:
    import importlib.util
    junit = os.path.join(tmp, "kernels.xml")
    # several workers: compiling the kernels' specialisations is CPU work
    workers = ["-n", "8"] if importlib.util.find_spec("xdist") else []
    res = run([sys.executable, "-m", "pytest", "-q", *workers, "-p", "no:cacheprovider", f"--junitxml={junit}",
               *KERNEL_TESTS], timeout, env={"MEGALOOP_TEST_DEVICE": "cuda", "TRITON_INTERPRET": "0"})
    res.pop("stdout")
    if os.path.isfile(junit):
        import xml.etree.ElementTree as ET
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
        res["counts"] = counts
        res["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                         if c.find("failure") is not None or c.find("error") is not None]
    res["compiled"] = "Triton compiled for this GPU (MEGALOOP_TEST_DEVICE=cuda, TRITON_INTERPRET unset)"
    return res


def kernel_bench(timeout: float, tmp: str) -> dict:
    res = json_part([sys.executable, "benchmarks/kernels.py", "--budget", str(int(max(10, timeout - 30)))],
                    timeout, os.path.join(tmp, "kernels.json"))
    res.update(kernel_speedups(res.get("result", {})))
    return res


def kernel_speedups(bench: dict) -> dict:
    """Per op of benchmarks/kernels.py's JSON: forward+backward speed-up of the Triton kernel over
    eager and over torch.compile (time of the other / time of the kernel), and the smallest ones."""
    rows = []
    for entry in bench.get("results", []):
        impl = entry.get("impl", {})
        tri, eager, comp = (impl.get(k, {}).get("fwd_bwd_ms") for k in ("triton", "eager", "compile"))
        row = {"op": entry["op"], "shape": entry["shape"], "triton_ms": tri, "eager_ms": eager, "compile_ms": comp,
               "speedup_over_eager": eager / tri if tri and eager else None,
               "speedup_over_compile": comp / tri if tri and comp else None}
        rows.append(row)
    over_eager = [r["speedup_over_eager"] for r in rows if r["speedup_over_eager"]]
    over_comp = [r["speedup_over_compile"] for r in rows if r["speedup_over_compile"]]
    return {"fwd_bwd": rows, "min_speedup_over_eager": min(over_eager) if over_eager else None,
            "min_speedup_over_compile": min(over_comp) if over_comp else None}


def train_step(timeout: float, tmp: str, steps: int) -> dict:
    cmd = [sys.executable, "benchmarks/train_step.py", "--sections", "kernels", "--steps", str(steps)]
    for s in TRAIN_SHAPE:
        cmd += ["--set", s]
    res = json_part(cmd, timeout, os.path.join(tmp, "train_step.json"))
    r = res.get("result", {})
    res["summary"] = {row["name"]: ({"error": row["error"]} if "error" in row else
                                    {"tokens_per_s": row["tokens_per_s"], "mfu": row.get("mfu"),
                                     "fwd_bwd_peak_gib": row["memory"].get("fwd_bwd_peak_bytes", 0) / 2 ** 30})
                      for row in r.get("kernels", [])}
    res["graph_breaks"] = r.get("kernels_graph_breaks")
    return res


def fp8(timeout: float, tmp: str, steps: int) -> dict:
    cmd = [sys.executable, "benchmarks/train_step.py", "--sections", "fp8", "--steps", str(steps)]
    for s in TRAIN_SHAPE:
        cmd += ["--set", s]
    res = json_part(cmd, timeout, os.path.join(tmp, "fp8.json"))
    r = res.get("result", {})
    res["summary"] = {row["name"]: ({"error": row["error"]} if "error" in row else
                                    {"tokens_per_s": row["tokens_per_s"], "mfu": row.get("mfu"),
                                     "kernel": row.get("fp8_kernel", "bf16 (no float8)"),
                                     "fp8_linears": row.get("fp8_linears", 0)})
                      for row in r.get("fp8", [])}
    res["fp8_over_bf16"] = r.get("ratios", {}).get("fp8_over_bf16_compiled")
    return res


def flash_attn(timeout: float, tmp: str) -> dict:
    code = r'''
import json, sys, torch, torch.nn.functional as F
try:
    from flash_attn import flash_attn_func
except Exception as e:
    print(json.dumps({"status": "not importable", "error": f"{type(e).__name__}: {e}"[:300]})); sys.exit(0)
import triton.testing
B, T, H, D = 8, 2048, 10, 128
g = torch.Generator(device="cuda").manual_seed(0)
q, k, v = (torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_() for _ in range(3))
def fa(): return flash_attn_func(q, k, v, causal=True)
def sd(): return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True).transpose(1, 2)
out = {"status": "measured", "shape": [B, T, H, D], "dtype": "bf16"}
do = torch.randn(B, T, H, D, device="cuda", dtype=torch.bfloat16, generator=g)
ref = {}
for name, fn in (("flash_attn", fa), ("sdpa", sd)):
    y = fn(); y.backward(do)
    ref[name] = (y.detach().float(), q.grad.float(), k.grad.float(), v.grad.float())
    q.grad = k.grad = v.grad = None
    out[name + "_fwd_ms"] = triton.testing.do_bench(fn, warmup=10, rep=50)
    out[name + "_fwd_bwd_ms"] = triton.testing.do_bench(lambda: fn().backward(do), warmup=10, rep=50, grad_to_none=[q, k, v])
for i, n in enumerate(("out", "dq", "dk", "dv")):
    out[f"max_abs_diff_{n}"] = (ref["flash_attn"][i] - ref["sdpa"][i]).abs().max().item()
out["equal_within_bf16"] = all(out[f"max_abs_diff_{n}"] < 2e-2 * max(1.0, ref["sdpa"][i].abs().max().item())
                               for i, n in enumerate(("out", "dq", "dk", "dv")))
out["flash_over_sdpa_fwd_bwd"] = out["sdpa_fwd_bwd_ms"] / out["flash_attn_fwd_bwd_ms"]
print(json.dumps(out))
'''
    res = run([sys.executable, "-c", code], timeout)
    try:
        res["result"] = json.loads(res.pop("stdout").strip().splitlines()[-1])
    except (ValueError, IndexError):
        res["error"] = "no result"
    return res


def generate(timeout: float, tmp: str) -> dict:
    script = os.path.join(HERE, "generate.py")
    if not os.path.isfile(script):
        return {"status": "not available", "why": "benchmarks/generate.py does not exist in this checkout"}
    res = json_part([sys.executable, "benchmarks/generate.py", "--recur", "1,4", "--new-tokens", "256"], timeout,
                    os.path.join(tmp, "generate.json"))
    res["status"] = "measured" if "result" in res else "failed"
    return res


# ----------------------------------------------------------------------------- main
def dry_run(budget: float, skip: set) -> int:
    """The plan: each part's time box (cut by the deadline where the boxes overrun it), the total
    against the budget and the budget against one device call. Exit 1 when it does not fit."""
    at, rows = 0.0, []
    for part in PARTS:
        if part in skip:
            rows.append(f"  {part:<13} skipped")
            continue
        box = max(0.0, min(TIME_BOX[part], budget - at))
        rows.append(f"  {part:<13} {at:5.0f} s .. {at + box:5.0f} s  (time box {TIME_BOX[part]} s"
                    + (", cut by the budget)" if box < TIME_BOX[part] else ")"))
        at += box
    planned = sum(TIME_BOX[p] for p in PARTS if p not in skip)
    fits = planned <= budget <= DEVICE_CALL_S - 30
    print("gpu_suite plan (--dry-run):\n" + "\n".join(rows))
    print(f"planned {planned:.0f} s of time boxes; budget {budget:.0f} s; one device call {DEVICE_CALL_S} s: "
          + ("fits" if fits else "DOES NOT FIT (time boxes over the budget, or the budget within 30 s of the call)"))
    return 0 if fits else 1


def goals(parts: dict) -> dict:
    """Each goal of the suite: measured value, target, met (None when not measured)."""
    def g(value, target):
        return {"value": value, "target": target, "met": None if value is None else value >= target}
    kt = parts.get("kernel_tests", {}).get("counts")
    kb = parts.get("kernel_bench", {})
    tr = parts.get("train_step", {}).get("summary", {})
    mfu = tr.get("kernels_on_compiled", {}).get("mfu")
    f8 = parts.get("fp8", {})
    return {
        "fp8_faster_than_bf16": {"value": f8.get("fp8_over_bf16"), "target": 1.0,
                                 "met": None if f8.get("fp8_over_bf16") is None else f8["fp8_over_bf16"] > 1.0},
        "kernel_tests_pass": {"value": kt, "met": None if not kt else kt["failures"] + kt["errors"] == 0},
        "kernels_over_eager_min": g(kb.get("min_speedup_over_eager"), GOALS["kernel_speedup_over_eager"]),
        "kernels_over_compile_min": g(kb.get("min_speedup_over_compile"), GOALS["kernel_speedup_over_compile"]),
        "train_mfu_kernels_on_compiled": g(mfu, GOALS["train_mfu"]),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", help="JSON path (default: benchmarks/results/gpu_suite_<gpu>.json)")
    ap.add_argument("--budget", type=float, default=BUDGET_S, help=f"seconds for the whole suite (default {BUDGET_S})")
    ap.add_argument("--dry-run", action="store_true", help="print the parts, their time boxes and the budget; no GPU")
    ap.add_argument("--skip", default="", help=f"comma-separated parts to leave out, of {','.join(PARTS)}")
    ap.add_argument("--train-steps", type=int, default=6, help="timed rounds of the training step")
    args = ap.parse_args(argv)
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    if skip - set(PARTS):
        fail(f"unknown part {sorted(skip - set(PARTS))[0]!r} in --skip; choose from {', '.join(PARTS)}")

    if args.dry_run:
        return dry_run(args.budget, skip)
    import torch
    if not torch.cuda.is_available():
        fail("needs a CUDA GPU, and torch.cuda.is_available() is False here "
             f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); run it on a GPU machine")
    name = torch.cuda.get_device_name(0)
    out_path = args.out or os.path.join(HERE, "results", "gpu_suite_" + name.replace("NVIDIA ", "").replace(" ", "_")
                                        .lower() + ".json")
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # noqa: BLE001
        triton_version = None
    t0 = time.time()
    result = {"device": name, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
              "started": time.strftime("%Y-%m-%d %H:%M:%S"), "budget_s": args.budget, "parts": {}}
    runners = {"kernel_tests": kernel_tests, "kernel_bench": kernel_bench,
               "train_step": lambda t, d: train_step(t, d, args.train_steps),
               "fp8": lambda t, d: fp8(t, d, args.train_steps), "flash_attn": flash_attn,
               "generate": generate}
    with tempfile.TemporaryDirectory() as tmp:
        for part in PARTS:
            if part in skip:
                result["parts"][part] = {"status": "skipped (--skip)"}
                continue
            left = args.budget - (time.time() - t0)
            if left < 15:
                result["parts"][part] = {"status": "not run: the suite's time budget was spent"}
                continue
            print(f"gpu_suite: {part} (at most {min(TIME_BOX[part], left):.0f}s)", file=sys.stderr, flush=True)
            result["parts"][part] = runners[part](min(TIME_BOX[part], left), tmp)
    result["goals"] = goals(result["parts"])
    result["elapsed_s"] = round(time.time() - t0, 1)
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    tmp_out = out_path + ".tmp"
    with open(tmp_out, "w") as f:
        json.dump(result, f, indent=1)
    os.replace(tmp_out, out_path)
    print(json.dumps(result["goals"], indent=1))
    print(f"gpu_suite: wrote {out_path} in {result['elapsed_s']:.0f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
