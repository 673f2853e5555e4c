"""Step time, peak memory and optimiser-state bytes per rank for every parallel layout this machine
can run; prints JSON.

    python benchmarks/parallel.py [--procs 4] [--steps 6] [--device auto] [--layouts single,dp2_zero1_muonh]
                                  [--set model.d_model=64 ...]

Each layout trains the harness model (megaloop.parallel.testing) for a few steps on a fixed batch
and is compared with the single-process run. On CPU (gloo) the figures are a correctness-and-
overhead check: loss deviation from one process, and step time relative to it. On GPUs (NCCL, one
per rank) they add tokens/s and MFU against the device peak. `optim_state_bytes_per_rank` is the
optimiser state each rank holds; under the torch engine's ZeRO 1 / 2 (sharded Muon / MuonH) it falls
as 1 / DP, and `optim_state` sums it up per layout.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from megaloop.parallel.testing import TINY, spawn  # noqa: E402


def layouts(procs: int) -> dict[str, tuple[int, list[str], list[str]]]:
    """name -> (processes, overrides, overrides of the single-process reference with the same batch)."""
    muonh = ["optim.name=muonh", "optim.lr=0.014"]
    out = {"single": (1, [], []), "single_muonh": (1, muonh, muonh)}
    if procs >= 2:
        adam = ["optim.name=adamw", "optim.lr=0.01"]
        out.update({
            "tp2": (2, ["parallel.tp=2"], []),
            "pp2": (2, ["parallel.pp=2"], []),
            "dp2_torch": (2, ["parallel.engine=torch"], ["train.grad_accum=4"]),
            "dp2_zero1": (2, ["parallel.zero_stage=1", *adam], ["train.grad_accum=4", *adam]),
            "dp2_zero2": (2, ["parallel.zero_stage=2", *adam], ["train.grad_accum=4", *adam]),
            "dp2_zero3": (2, ["parallel.zero_stage=3", *adam], ["train.grad_accum=4", *adam]),
        })
        for z in (1, 2):  # the torch engine's sharded MuonH
            out[f"dp2_zero{z}_muonh"] = (2, [f"parallel.zero_stage={z}", *muonh], ["train.grad_accum=4", *muonh])
    if procs >= 4:
        out["tp2_pp2"] = (4, ["parallel.tp=2", "parallel.pp=2"], [])
        for z in (1, 2):
            out[f"dp4_zero{z}_muonh"] = (4, [f"parallel.zero_stage={z}", *muonh], ["train.grad_accum=8", *muonh])
    return out


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
    base = [f"model.num_recur=4", f"train.steps={a.steps}", *a.overrides]
    if device == "cuda":
        base += ["train.device=cuda"]
    from megaloop.accounting import count_params
    from megaloop.config import _merge, config_from_dict, parse_overrides
    from megaloop.mfu import peak_flops

    results, refs = {}, {}
    with tempfile.TemporaryDirectory() as root:
        chosen = layouts(procs)
        if a.layouts:
            unknown = sorted(set(a.layouts.split(",")) - set(chosen))
            if unknown:
                sys.exit(f"error: unknown layout(s) {unknown} for --procs {procs}; choose among {sorted(chosen)}")
            chosen = {k: v for k, v in chosen.items() if k in a.layouts.split(",")}
        for name, (n, over, ref_over) in chosen.items():
            out = os.path.join(root, name)
            res = spawn(n, out, [*base, *over], extra=["--device", device], timeout=600)
            if any(r.returncode != 0 for r in res):
                results[name] = {"error": next(r.stdout for r in res if r.returncode)[-800:]}
                continue
            main_res = json.load(open(os.path.join(out, "result.json")))
            ranks = [json.load(open(os.path.join(out, f"rank{r}.json"))) for r in range(n)]
            cfg = config_from_dict(_merge(TINY, parse_overrides([*base, *over])))
            step_s = statistics.median(max(r["step_times"][k] for r in ranks) for k in range(1, a.steps))
            dp = n // (cfg.parallel.tp * cfg.parallel.pp)
            tokens = cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.model.seq_len * dp
            entry = dict(processes=n, step_time_s=step_s,
                         step_time_s_per_rank=[statistics.median(r["step_times"][1:]) for r in ranks],
                         peak_mem_mb_per_rank=[round(r["peak_rss_mb"], 1) for r in ranks],
                         peak_mem_kind="cuda max_memory_allocated" if device == "cuda" else "process max RSS",
                         optim_state_bytes_per_rank=[r["optim_state_bytes"] for r in ranks],
                         losses=main_res["losses"])
            key = tuple(ref_over)
            if name == "single":
                refs[()] = main_res["losses"]
            if key not in refs:
                rout = os.path.join(root, f"ref_{len(refs)}")
                rr = spawn(1, rout, [*base, *ref_over], extra=["--device", device], timeout=600)
                refs[key] = json.load(open(os.path.join(rout, "result.json")))["losses"] if rr[0].returncode == 0 else None
            ref = refs[key]
            if ref:
                entry["max_rel_loss_diff_vs_single"] = max(abs(x - y) / abs(x) for x, y in zip(ref, main_res["losses"]))
            entry["tokens_per_s"] = tokens / step_s
            if device == "cuda":
                fpt = count_params(cfg.model).flops_per_token
                entry["mfu"] = entry["tokens_per_s"] * fpt / (peak_flops(torch.device("cuda"), cfg.parallel.precision) * n)
            if "single" in results:
                entry["step_time_vs_single"] = step_s / results["single"]["step_time_s"]
            results[name] = entry
    state = {k: dict(max_per_rank=max(v["optim_state_bytes_per_rank"]), total=sum(v["optim_state_bytes_per_rank"]))
             for k, v in results.items() if "optim_state_bytes_per_rank" in v}
    print(json.dumps(dict(device=device, procs=procs, model=TINY["model"], overrides=base, layouts=results,
                          optim_state=state), indent=1))


if __name__ == "__main__":
    main()
