"""The GPU scripts in the forms a machine without a GPU can run.

Contracts:
- benchmarks/gpu_suite.py imports, parses its options and stops at its CUDA check with one line
  that names the problem, exit status 2, no traceback and no JSON written; a bad --skip is one line
  and status 2 as well; its kernel summary divides the other implementation's time by the kernel's;
- benchmarks/gpu_suite.py --dry-run (no GPU needed) plans every part, the fp8 section included,
  with time boxes that add up to at most its budget and a budget that leaves at least 30 s of one
  10-minute device call, exit status 0; a budget the boxes overrun is reported and exits 1; its
  fp8-over-bf16 goal reads the speed ratio;
- benchmarks/gpu_study.sh --dry-run plans configs/sweeps/gpu_study.yaml (24 baseline runs, r in
  {1, 2, 4}, budgets 1e15 to 4.6e15 FLOPs), prints every run and a time estimate under the 8
  minutes it is sized for, and leaves nothing behind; without --dry-run and without CUDA it stops
  before planning anything, with status 2.
"""
import importlib.util
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}


def _run(cmd, **kw):
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=NO_GPU, timeout=300, **kw)


def _suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", os.path.join(ROOT, "benchmarks", "gpu_suite.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.slow  # the GPU suite in a subprocess
@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU: run the suite itself")
def test_gpu_suite_stops_at_its_cuda_check(tmp_path):
    out = tmp_path / "suite.json"
    p = _run([sys.executable, "benchmarks/gpu_suite.py", "--out", str(out)])
    assert p.returncode == 2, p.stderr
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0] and "Traceback" not in p.stderr, p.stderr
    assert not out.exists() and not (tmp_path / "suite.json.tmp").exists()
    bad = _run([sys.executable, "benchmarks/gpu_suite.py", "--skip", "kernel_tests,warp_drive"])
    assert bad.returncode == 2 and "'warp_drive'" in bad.stderr and "Traceback" not in bad.stderr


def test_gpu_suite_kernel_summary():
    bench = {"results": [
        {"op": "rms_norm", "shape": {"d": 1024}, "impl": {"triton": {"fwd_bwd_ms": 0.5}, "eager": {"fwd_bwd_ms": 1.5},
                                                         "compile": {"fwd_bwd_ms": 0.6}}},
        {"op": "relu_squared", "shape": {"d": 1024}, "impl": {"triton": {"fwd_bwd_ms": 0.4}, "eager": {"fwd_bwd_ms": 0.5},
                                                             "compile": {"error": "no compiler"}}},
    ]}
    s = _suite().kernel_speedups(bench)
    assert s["fwd_bwd"][0]["speedup_over_eager"] == pytest.approx(3.0)
    assert s["fwd_bwd"][0]["speedup_over_compile"] == pytest.approx(1.2)
    assert s["fwd_bwd"][1]["speedup_over_compile"] is None
    assert s["min_speedup_over_eager"] == pytest.approx(1.25) and s["min_speedup_over_compile"] == pytest.approx(1.2)
    goals = _suite().goals({"kernel_bench": s, "train_step": {"summary": {"kernels_on_compiled": {"mfu": 0.5}}}})
    assert goals["kernels_over_eager_min"]["met"] is False and goals["kernels_over_compile_min"]["met"] is True
    assert goals["train_mfu_kernels_on_compiled"]["met"] is True and goals["kernel_tests_pass"]["met"] is None


def test_gpu_suite_dry_run_fits_one_device_call():
    p = _run([sys.executable, "benchmarks/gpu_suite.py", "--dry-run"])
    assert p.returncode == 0, p.stdout + p.stderr
    parts = re.findall(r"^  (\w+)\s+(\d+) s \.\.\s+(\d+) s", p.stdout, re.M)
    assert [name for name, _, _ in parts] == list(_suite().PARTS) and "fp8" in [n for n, _, _ in parts]
    end = max(int(b) for _, _, b in parts)
    planned, budget, call = map(int, re.search(r"planned (\d+) s of time boxes; budget (\d+) s; one device call "
                                               r"(\d+) s: fits", p.stdout).groups())
    assert end == planned <= budget <= call - 30 and call == 600, p.stdout
    over = _run([sys.executable, "benchmarks/gpu_suite.py", "--dry-run", "--budget", "400"])
    assert over.returncode == 1 and "DOES NOT FIT" in over.stdout and "cut by the budget" in over.stdout
    goals = _suite().goals({"fp8": {"fp8_over_bf16": 1.4}})
    assert goals["fp8_faster_than_bf16"] == {"value": 1.4, "target": 1.0, "met": True}


def test_gpu_study_dry_run():
    before = set(os.listdir(os.path.join(ROOT, "runs"))) if os.path.isdir(os.path.join(ROOT, "runs")) else set()
    p = _run(["bash", "benchmarks/gpu_study.sh", "--dry-run"])
    assert p.returncode == 0, p.stdout + p.stderr
    names = set(re.findall(r"\] (baseline_r\d_s\d_c[\d.e]+):", p.stdout))
    assert len(names) == 24 and {n.split("_")[1] for n in names} == {"r1", "r2", "r4"}
    assert {n.rsplit("_c", 1)[1] for n in names} == {"1e15", "2.2e15", "4.6e15"}
    total = re.search(r"with data preparation and the fit about (\d+) s", p.stdout)
    assert total and 60 < int(total.group(1)) < 480, p.stdout
    after = set(os.listdir(os.path.join(ROOT, "runs"))) if os.path.isdir(os.path.join(ROOT, "runs")) else set()
    assert after == before  # planned into a temporary folder, removed again


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_gpu_study_needs_cuda(tmp_path):
    p = _run(["bash", "benchmarks/gpu_study.sh", str(tmp_path / "study")])
    assert p.returncode == 2 and "needs a CUDA GPU" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "study").exists()
