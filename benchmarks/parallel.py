"""Step time, peak memory and optimiser-state bytes per rank for every parallel layout this machine
can run; prints JSON.

    python benchmarks/parallel.py [--procs 4] [--steps 6] [--device auto] [--layouts single,dp2_zero1_muonh]
                                  [--set model.d_model=64 ...]

Each layout runs `megaloop train` itself (N local ranks, as torchrun starts them) on the tiny model
of tests/layouts.py over a tiny tokenized corpus, and is compared with the single-process run on the
same global batch. Step time is the median over the steps after the first (from metrics.jsonl: the
step's tokens over its tokens/s); peak memory is rank 0's (summary.json). On CPU (gloo) the figures
are a correctness-and-overhead check: loss deviation from one process, and step time relative to
it. On GPUs (NCCL, one per rank) they add tokens/s and MFU against the device peak.
`optim_state_bytes_per_rank` (summary.json) is the optimiser state each rank holds; under the torch
engine's ZeRO 1 / 2 (sharded Muon / MuonH) it falls as 1 / DP, and `optim_state` sums it up per layout.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the tiny model and corpus the layout tests train

from layouts import ADAM, TINY, Run, token_data  # noqa: E402
from layouts import train as train_layout  # noqa: E402


def layouts(procs: int) -> dict[str, tuple[int, list[str], list[str]]]:
    """name -> (processes, overrides, overrides of the single-process reference with the same batch)."""
    muonh = ["optim.name=muonh", "optim.lr=0.014"]
    out = {"single": (1, [], []), "single_muonh": (1, muonh, muonh)}
    if procs >= 2:
        out.update({
            "tp2": (2, ["parallel.tp=2"], []),
            "pp2": (2, ["parallel.pp=2"], []),
            "dp2_torch": (2, [], ["train.grad_accum=4"]),
            "dp2_zero1": (2, ["parallel.zero_stage=1", *ADAM], ["train.grad_accum=4", *ADAM]),
            "dp2_zero2": (2, ["parallel.zero_stage=2", *ADAM], ["train.grad_accum=4", *ADAM]),
            "dp2_zero3": (2, ["parallel.zero_stage=3", *ADAM], ["train.grad_accum=4", *ADAM]),
        })
        for z in (1, 2):  # the torch engine's sharded MuonH
            out[f"dp2_zero{z}_muonh"] = (2, [f"parallel.zero_stage={z}", *muonh], ["train.grad_accum=4", *muonh])
    if procs >= 4:
        out["tp2_pp2"] = (4, ["parallel.tp=2", "parallel.pp=2"], [])
        for z in (1, 2):
            out[f"dp4_zero{z}_muonh"] = (4, [f"parallel.zero_stage={z}", *muonh], ["train.grad_accum=8", *muonh])
    return out


def step_times(run: Run) -> list[float]:
    return [r["tokens"] / r["step"] / r["tokens_per_s"] for r in run.steps]  # log_every = 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--procs", type=int, default=None, help="most processes to start (default: GPUs, or 2 on CPU)")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--layouts", help="comma-separated layout names to run (default: all that fit)")
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    a = ap.parse_args()
    device = ("cuda" if torch.cuda.is_available() else "cpu") if a.device == "auto" else a.device
    procs = a.procs or (torch.cuda.device_count() if device == "cuda" else 2)
    base = ["model.num_recur=4", f"train.steps={a.steps}", f"train.device={device}", "logging.peak_flops=null",
            *a.overrides]

    results, refs = {}, {}
    with tempfile.TemporaryDirectory() as root:
        data = token_data(os.path.join(root, "tokens"))

        def run(name: str, nproc: int, over: list[str]):
            try:  # a subprocess each, also on one process: the same start-up cost for every layout
                return train_layout(nproc, os.path.join(root, name), [*base, *over], data, timeout=600, env={})
            except AssertionError as e:
                return str(e)[-800:]

        chosen = layouts(procs)
        if a.layouts:
            unknown = sorted(set(a.layouts.split(",")) - set(chosen))
            if unknown:
                sys.exit(f"error: unknown layout(s) {unknown} for --procs {procs}; choose among {sorted(chosen)}")
            chosen = {k: v for k, v in chosen.items() if k in a.layouts.split(",")}
        for name, (n, over, ref_over) in chosen.items():
            out = run(name, n, over)
            if isinstance(out, str):
                results[name] = {"error": out}
                continue
            step_s = statistics.median(step_times(out)[1:])
            summary = out.summary
            entry = dict(processes=n, step_time_s=step_s, peak_mem_mb_rank0=round(summary["peak_mem_mb"], 1),
                         peak_mem_kind="cuda max_memory_allocated" if device == "cuda" else "process max RSS",
                         optim_state_bytes_per_rank=summary["optim_state_bytes"],
                         losses=out.losses, tokens_per_s=out.steps[-1]["tokens"] / out.steps[-1]["step"] / step_s)
            if device == "cuda":
                entry["mfu"] = statistics.median(r["mfu"] for r in out.steps[1:]) / n
            key = tuple(ref_over)
            if name == "single":
                refs[key] = out.losses
            if key not in refs:
                ref = run(f"ref_{len(refs)}", 1, ref_over)
                refs[key] = None if isinstance(ref, str) else ref.losses
            if refs[key]:
                entry["max_rel_loss_diff_vs_single"] = max(abs(x - y) / abs(x) for x, y in zip(refs[key], out.losses))
            if "single" in results and "step_time_s" in results["single"]:
                entry["step_time_vs_single"] = step_s / results["single"]["step_time_s"]
            results[name] = entry
    state = {k: dict(max_per_rank=max(v["optim_state_bytes_per_rank"]), total=sum(v["optim_state_bytes_per_rank"]))
             for k, v in results.items() if "optim_state_bytes_per_rank" in v}
    print(json.dumps(dict(device=device, procs=procs, model=TINY["model"], overrides=base, layouts=results,
                          optim_state=state), indent=1))


if __name__ == "__main__":
    main()
