"""Peak FLOP/s for model-FLOPs utilisation: a table for common GPUs, a measurement on CPU.

MFU = tokens/s x FLOPs per token / device peak, where FLOPs per token is the loop-aware count of
megaloop.accounting (the recurrent group charged r times, forward-only passes 2x instead of 6x),
never 6N with the shared weights counted once: that undercounts a looped model ~r times.

Peak, in order of precedence:
1. `logging.peak_flops` in the config (any device; the caller passes it as `override`);
2. on CUDA, the dense (no sparsity) vendor figure of the table below, matched by device name;
3. on CPU, this machine's own matmul throughput, measured once (a few large square products)
   and cached in memory and on disk, keyed by CPU model, thread count, torch version and dtype.
"""
from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass(frozen=True)
class GpuPeak:
    """Dense tensor-core peaks in FLOP/s. `bf16` None: no bf16 tensor cores (use fp32)."""
    bf16: Optional[float]
    tf32: float
    fp32: float


# Matched by substring of torch.cuda.get_device_name, first hit wins: more specific names first
# ("H100 PCIe" before "H100", "A10G" before "A10").
GPU_PEAKS: dict[str, GpuPeak] = {
    "GH200": GpuPeak(989.4e12, 494.7e12, 66.9e12),
    "H200": GpuPeak(989.4e12, 494.7e12, 66.9e12),
    "H100 PCIe": GpuPeak(756.0e12, 378.0e12, 51.2e12),
    "H100 NVL": GpuPeak(835.0e12, 417.5e12, 60.0e12),
    "H100": GpuPeak(989.4e12, 494.7e12, 66.9e12),
    "B200": GpuPeak(2250e12, 1100e12, 80.0e12),
    "A100": GpuPeak(312.0e12, 156.0e12, 19.5e12),
    "A10G": GpuPeak(70.0e12, 35.0e12, 31.2e12),
    "A10": GpuPeak(125.0e12, 62.5e12, 31.2e12),
    "L40S": GpuPeak(362.1e12, 183.0e12, 91.6e12),
    "L40": GpuPeak(181.0e12, 90.5e12, 90.5e12),
    "L4": GpuPeak(121.0e12, 60.0e12, 30.3e12),
    "A6000": GpuPeak(154.8e12, 77.4e12, 38.7e12),
    "4090": GpuPeak(165.2e12, 82.6e12, 82.6e12),
    "3090": GpuPeak(71.0e12, 35.6e12, 35.6e12),
    "V100": GpuPeak(None, 15.7e12, 15.7e12),     # no bf16 tensor cores: bf16 runs at fp32 rate
    "MI300X": GpuPeak(1307.4e12, 653.7e12, 163.4e12),
}

CACHE_ENV = "MEGALOOP_CACHE_DIR"             # where the CPU measurement is cached on disk
_memo: dict[str, float] = {}                 # one measurement per process, whatever the disk says


def cache_path() -> str:
    root = os.environ.get(CACHE_ENV) or os.path.join(os.path.expanduser("~"), ".cache", "megaloop")
    return os.path.join(root, "cpu_peak.json")


def gpu_peak(name: str, precision: str, tf32: bool = False) -> Optional[float]:
    """Table peak for a CUDA device name, or None when the device is not in the table."""
    for key, spec in GPU_PEAKS.items():
        if key in name:
            if precision in ("bf16", "fp8") and spec.bf16 is not None:  # fp8: see peak_flops
                return spec.bf16
            return spec.tf32 if tf32 else spec.fp32
    return None


def cpu_model() -> str:
    """The CPU's model name (part of the cache key: a moved cache must not be trusted)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16_matmul() -> bool:
    """Whether this CPU has bf16 matmul kernels (AVX512-BF16 / AMX through oneDNN).

    Without them eager bf16 matmuls take a scalar fallback that runs ~100x below fp32, so a bf16
    measurement would be meaningless as a peak (see cpu_peak_flops).
    """
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def measure_matmul_flops(dtype: torch.dtype, n: int = 2048, reps: int = 3) -> float:
    """Best achieved FLOP/s of n x n x n matmuls on this CPU: the practical peak for CPU MFU.

    Best-of-reps, not the mean: the peak is what the machine can do, and on a shared machine a
    mean measures the neighbours. 2048^3 is large enough for the BLAS to reach its steady rate.
    """
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(dtype)
    b = torch.randn(n, n, generator=g).to(dtype)
    torch.mm(a, b)  # warm-up: thread pool, BLAS packing buffers
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t)
    return 2.0 * n ** 3 / best


def cpu_peak_flops(precision: str, refresh: bool = False) -> float:
    """This CPU's matmul peak for `precision` (fp32 | bf16): measured once per process, and the
    on-disk cache keeps the best figure ever measured on this machine.

    Why the best: a measurement taken while other jobs share the cores is too low, and a cached
    low figure would make every later MFU too high (even above 1). Each process re-measures once
    (about a second) and the peak only ever moves up towards the machine's real rate.

    bf16 without native kernels: the fp32 figure. Such a CPU converts bf16 to fp32 and multiplies
    on the fp32 units (compiled kernels do exactly that), so fp32 is the honest ceiling.
    """
    bf16 = precision in ("bf16", "fp8") and native_bf16_matmul()  # fp8 is emulated on a CPU
    dtype = torch.bfloat16 if bf16 else torch.float32
    key = f"{cpu_model()}|threads={torch.get_num_threads()}|torch={torch.__version__}|{dtype}"
    if not refresh and key in _memo:
        return _memo[key]
    path = cache_path()
    cached: dict = {}
    try:
        with open(path) as f:
            cached = json.load(f)
    except (OSError, ValueError):
        cached = {}
    before = cached.get(key) if isinstance(cached.get(key), (int, float)) else 0.0
    value = max(float(before), measure_matmul_flops(dtype))
    _memo[key] = value
    if value > before:
        try:  # the cache is an optimisation: an unwritable home must not stop a run
            os.makedirs(os.path.dirname(path), exist_ok=True)
            cached[key] = value
            tmp = f"{path}.tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(cached, f, indent=1)
            os.replace(tmp, path)
        except OSError:
            pass
    return value


def peak_flops(device: torch.device, precision: str, override: Optional[float] = None) -> float:
    """Peak FLOP/s of `device` at `precision`; 0.0 when unknown (MFU is then not reported).

    fp8 is measured against the bf16 peak: only the blocks' linears run in float8 (attention,
    head and the rest stay bf16), and one yardstick makes an fp8 step's MFU directly comparable
    with the bf16 step's (their ratio is the speed-up)."""
    if override:
        return float(override)
    if device.type == "cuda":
        tf32 = torch.backends.cuda.matmul.allow_tf32 or torch.get_float32_matmul_precision() != "highest"
        return gpu_peak(torch.cuda.get_device_name(device), precision, tf32) or 0.0
    if device.type == "cpu":
        return cpu_peak_flops(precision)
    return 0.0


def mfu(tokens_per_s: float, flops_per_token: float, peak: float) -> Optional[float]:
    """Model-FLOPs utilisation, or None without a known peak."""
    return tokens_per_s * flops_per_token / peak if peak > 0 else None
