"""The reference grid's s = 24 model on CPU ranks: meta-device initialisation and per-rank memory
against one process; prints JSON (and writes it with --out).

    python benchmarks/scale.py [--s 24] [--tp 2] [--pp 2] [--steps 3] [--ns-steps 5] [--exact-allocator]
                               [--out benchmarks/results/scale_cpu_2core.json] [--work DIR [--only single|parallel]]

The model is the reference iso-depth grid's (configs/sweeps/iso_depth.yaml) at size s and r = 4:
d_model = 64 s rounded up to a multiple of 128 (1536 at s = 24), heads of 128, prelude 2, a group
of 16 / r = 4 blocks looped r = 4 times, coda 2, linear injection, vocab 32,768, with seq_len cut
to 128. MuonH at the grid's rates, fp32, 2 micro-batches of 1 sequence per step.

Two launches of this file's worker, one after the other:
  - one process: `build_engine` builds the whole model on the CPU, as `megaloop train` does;
  - tp x pp gloo ranks (megaloop.parallel.testing.spawn, as torchrun starts them): each builds
    the model on the meta device and parallelize() materialises only its shards.
Both take `--steps` steps on the same seeded random batches, then evaluate one batch. Reported:
each step's loss and grad norm and the final evaluation loss of both (their relative difference
is the equality check, target 1e-5); per rank, the peak resident set (ru_maxrss) after
start-up (imports and process group), after the torch modules every rank imports (below), after
initialisation and at the end, against the rank's share: the bytes of the parameters it holds,
their gradients and its optimizer state. The model's whole parameter bytes are beside it: a rank
whose growth in peak RSS over initialisation (after those modules) stays below them never held
the whole model.

Where a rank's memory goes beyond its share: the interpreter, torch and gloo at start-up; the
torch modules every parallel rank imports anyway (the meta build's random init runs torch's Python
meta kernels, pipelining imports torch.fx and sympy: ~145 MB), reported apart as `modules_mb`;
the step's transient tensors; and freed memory glibc keeps in its heap (`heap_retained_at_end_mb`:
what malloc_trim gives back after the last step). --exact-allocator runs every process with
MALLOC_MMAP_THRESHOLD_=65536 and MALLOC_TRIM_THRESHOLD_=0, so that freed tensors go back to the
OS and the peak RSS is the live tensors' peak (slower: every tensor of 64 KiB or more is mmapped).

--ns-steps sets MuonH's Polar Express iterations (the grid uses 5). Each iteration on a
1536 x 6144 matrix costs ~65 GFLOP, and under TP every rank orthogonalises the whole matrix, so on
a 2-core machine a step is dominated by it; fewer iterations change neither the memory a rank
holds nor the comparison (both runs use the same count).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from typing import Optional

from emit import emit  # benchmarks/emit.py (scripts run with benchmarks/ on sys.path)

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

MB = 2 ** 20


def model_config(s: int) -> dict:
    d = -(-64 * s // 128) * 128
    r = 4
    return dict(d_model=d, n_head=d // 128, vocab_size=32768, seq_len=128, n_prelude=2, n_recur_block=16 // r,
                n_coda=2, num_recur=r, input_injection="linear", logit_softcap=15.0)


EXACT_ALLOCATOR = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0"}


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def rss_mb() -> Optional[float]:
    """The resident set now (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            return next(int(ln.split()[1]) / 1024 for ln in f if ln.startswith("VmRSS:"))
    except (OSError, StopIteration):
        return None


def heap_retained_mb() -> Optional[float]:
    """The resident memory glibc gives back to the OS on malloc_trim(0): freed memory it kept in
    its heap. None off glibc."""
    import ctypes
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    before = rss_mb()
    trim(0)
    after = rss_mb()
    return None if before is None or after is None else before - after


def batches(vocab: int, seq_len: int, micro: int, step: int) -> list:
    import torch
    g = torch.Generator().manual_seed(1000 + step)
    out = []
    for _ in range(micro):
        t = torch.randint(0, vocab, (1, seq_len + 1), generator=g)
        out.append((t[:, :-1], t[:, 1:]))
    return out


def worker(args) -> None:
    """One rank (or the single process): build, step, evaluate, and write this rank's JSON."""
    import torch

    from megaloop.accounting import count_params
    from megaloop.parallel import build_engine
    from megaloop.parallel.sharded_optim import optimizer_state_bytes
    from megaloop.train import build_model

    if "WORLD_SIZE" in os.environ:  # start the process group before measuring the start-up peak
        import torch.distributed as dist
        dist.init_process_group("gloo")
    else:  # the single process has the machine's cores (a rank has one thread: spawn's OMP_NUM_THREADS)
        torch.set_num_threads(os.cpu_count() or 1)
    start_mb = peak_rss_mb()
    if "WORLD_SIZE" in os.environ:  # what every parallel rank imports anyway, counted apart from the model
        import torch.distributed.pipelining  # noqa: F401  (torch.fx, sympy)
        torch.empty(1, device="meta").normal_()  # torch's Python meta kernels (the meta build's random init)
    modules_mb = peak_rss_mb()
    cfg = run_config(args)
    t0 = time.time()
    engine = build_engine(cfg, lambda where: build_model(cfg, where), torch.device("cpu"))
    init_s, init_mb = time.time() - t0, peak_rss_mb()
    held = [p for p in engine.model.parameters() if p.numel()]
    param_bytes = sum(p.numel() * p.element_size() for p in held)
    grad_bytes = sum(p.numel() * p.element_size() for p in held if p.requires_grad)
    m = cfg.model
    losses, norms, step_s, step_rss = [], [], [], []
    for step in range(args.steps):
        t = time.time()
        st = engine.train_step(batches(m.vocab_size, m.seq_len, 2, step), 1.0)
        losses.append(st.loss)
        norms.append(st.grad_norm)
        step_s.append(time.time() - t)
        step_rss.append(rss_mb())
    eval_loss = engine.eval_loss(batches(m.vocab_size, m.seq_len, 1, 999))
    end_mb = peak_rss_mb()
    state_bytes = optimizer_state_bytes(engine.optimizer)
    share = param_bytes + grad_bytes + state_bytes
    out = {
        "rank": engine.rank, "world": engine.world, "losses": losses, "grad_norms": norms, "eval_loss": eval_loss,
        "init_s": round(init_s, 1), "step_s": [round(x, 1) for x in step_s],
        "model_param_bytes": count_params(m).total * 4,
        "largest_param_bytes": max(n * 4 for n in _full_sizes(m)),
        "share_bytes": {"params": param_bytes, "grads": grad_bytes, "optimizer_state": state_bytes, "total": share},
        "peak_rss_mb": {"start": round(start_mb), "after_modules": round(modules_mb), "after_init": round(init_mb),
                        "end": round(end_mb)},
        "rss_after_step_mb": [None if x is None else round(x) for x in step_rss],
        "heap_retained_at_end_mb": _round(heap_retained_mb()),
    }
    engine.close()
    with open(os.path.join(args.worker_out, f"rank{out['rank']}.json"), "w") as f:
        json.dump(out, f)


def _round(x: Optional[float]) -> Optional[int]:
    return None if x is None else round(x)


def _full_sizes(m) -> list[int]:
    import torch

    from megaloop.model import LoopedLM
    with torch.device("meta"):
        return [p.numel() for p in LoopedLM(m).parameters()]


def launch(args, nproc: int, tp: int, pp: int, folder: str) -> list[dict]:
    from megaloop.parallel.testing import spawn

    os.makedirs(folder, exist_ok=True)
    cmd = [os.path.abspath(__file__), "--worker", "--worker-out", folder, "--s", str(args.s), "--tp", str(tp),
           "--pp", str(pp), "--steps", str(args.steps), "--ns-steps", str(args.ns_steps)]
    results = spawn(nproc, cmd, timeout=args.timeout, module=None, env=EXACT_ALLOCATOR if args.exact_allocator else None)
    for r in results:
        if r.returncode != 0:
            raise SystemExit(f"a worker failed (exit {r.returncode}):\n{r.stdout[-4000:]}")
    return [json.load(open(os.path.join(folder, f"rank{k}.json"))) for k in range(nproc)]


def phase(args, work: str, name: str, nproc: int, tp: int, pp: int):
    """The launch `name`'s per-rank results: read from `work` when a finished launch left them
    there (a launch run on its own with --only), else run now (only the one --only names)."""
    folder = os.path.join(work, name)
    files = [os.path.join(folder, f"rank{k}.json") for k in range(nproc)]
    if all(os.path.isfile(f) for f in files) and args.only != name:
        return [json.load(open(f)) for f in files], None
    if args.only not in (None, name):
        return None, None
    t = time.time()
    return launch(args, nproc, tp, pp, folder), round(time.time() - t)


def rel(a: float, b: float) -> float:
    return abs(a - b) / max(abs(b), 1e-30)


def run_config(args):
    """The benchmark's run: the s-model with MuonH at the reference's settings, two micro-batches of
    one sequence, on the given TP x PP layout."""
    from megaloop.config import load_config

    return load_config(raw={
        "model": model_config(args.s),
        "optim": {"name": "muonh", "lr": 0.014, "embed_lr": 0.2, "head_lr": 0.004, "norm_lr": 0.005,
                  "betas": [0.8, 0.95], "eps": 1e-10, "momentum": 0.95, "ns_steps": args.ns_steps},
        "train": {"steps": args.steps, "seed": 1337, "device": "cpu", "micro_batch_size": 1, "grad_accum": 2},
        "parallel": {"tp": args.tp, "pp": args.pp}})


def layout_arguments(doc: str, s: int, steps: int, ns_steps: int, timeout: float) -> argparse.ArgumentParser:
    """The options this benchmark and scale_phases.py share: the model size, the layout, the steps and
    the hidden worker mode."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--s", type=int, default=s)
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--pp", type=int, default=2)
    ap.add_argument("--steps", type=int, default=steps)
    ap.add_argument("--ns-steps", type=int, default=ns_steps)
    ap.add_argument("--timeout", type=float, default=timeout)
    ap.add_argument("--out", default=None)
    ap.add_argument("--exact-allocator", action="store_true",
                    help="glibc returns every freed tensor of 64 KiB or more to the OS: peak RSS = the live peak")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", default=None, help=argparse.SUPPRESS)
    return ap


def main() -> None:
    ap = layout_arguments(__doc__, s=24, steps=3, ns_steps=5, timeout=5400)
    ap.add_argument("--work", default=None, help="keep the workers' per-rank JSON here (default: a temporary folder)")
    ap.add_argument("--only", choices=["single", "parallel"], default=None,
                    help="run one of the two launches into --work; without --only, the missing ones run, then the report")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    from megaloop.mfu import cpu_model

    load = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or tmp
        single, single_s = phase(args, work, "single", 1, 1, 1)
        ranks, parallel_s = phase(args, work, "parallel", args.tp * args.pp, args.tp, args.pp)
        if args.only:
            return
    single = single[0]
    last = [r for r in ranks if r["losses"] and r["eval_loss"] is not None][-1]
    loss_dev = max(rel(a, b) for a, b in zip(last["losses"], single["losses"]))
    eval_dev = rel(last["eval_loss"], single["eval_loss"])
    whole = single["model_param_bytes"]
    per_rank = []
    for r in ranks:
        share = r["share_bytes"]["total"]
        peak, start, init = (r["peak_rss_mb"][k] for k in ("end", "start", "after_init"))
        modules = r["peak_rss_mb"].get("after_modules", start)
        per_rank.append({
            "rank": r["rank"], "share_mb": round(share / MB), **{f"{k}_mb": round(v / MB) for k, v in r["share_bytes"].items()
                                                                 if k != "total"},
            "peak_rss_mb": peak, "peak_rss_over_share": round(peak * MB / share, 2),
            "peak_rss_above_startup_over_share": round((peak - start) * MB / share, 2),
            "peak_rss_above_startup_and_modules_over_share": round((peak - modules) * MB / share, 2),
            "startup_rss_mb": start, "modules_mb": modules - start, "init_growth_mb": init - modules,
            "init_growth_below_whole_model": (init - modules) * MB < whole,
            "rss_after_step_mb": r.get("rss_after_step_mb"), "heap_retained_at_end_mb": r.get("heap_retained_at_end_mb"),
            "init_s": r["init_s"], "step_s": r["step_s"]})
    report = {
        "benchmark": "scale", "command": "python benchmarks/scale.py " + " ".join(sys.argv[1:]),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "load_average_at_start": [round(x, 1) for x in load]},
        "model": {**model_config(args.s), "s": args.s, "params": whole // 4, "param_mb": round(whole / MB),
                  "largest_param_mb": round(single["largest_param_bytes"] / MB)},
        "layout": {"tp": args.tp, "pp": args.pp, "optim": "muonh", "ns_steps": args.ns_steps, "steps": args.steps,
                   "precision": "fp32", "micro_batches": 2, "micro_batch_size": 1},
        "allocator": ("glibc, MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0 (peak RSS = live tensors)"
                      if args.exact_allocator else "glibc defaults"),
        "equality": {"single_losses": single["losses"], "parallel_losses": last["losses"],
                     "single_grad_norms": single["grad_norms"], "parallel_grad_norms": last["grad_norms"],
                     "max_rel_loss_diff": loss_dev, "single_eval_loss": single["eval_loss"],
                     "parallel_eval_loss": last["eval_loss"], "eval_rel_diff": eval_dev,
                     "target": 1e-5, "holds": max(loss_dev, eval_dev) <= 1e-5},
        "single": {"share_mb": round(single["share_bytes"]["total"] / MB), "peak_rss_mb": single["peak_rss_mb"]["end"],
                   "startup_rss_mb": single["peak_rss_mb"]["start"], "after_init_rss_mb": single["peak_rss_mb"]["after_init"],
                   "heap_retained_at_end_mb": single.get("heap_retained_at_end_mb"),
                   "init_s": single["init_s"], "step_s": single["step_s"], "wall_s": single_s},
        "ranks": per_rank, "parallel_wall_s": parallel_s,
        "targets": {"peak_rss_at_most_1.5x_share": all(r["peak_rss_over_share"] <= 1.5 for r in per_rank),
                    "no_rank_held_the_whole_model": all(r["init_growth_below_whole_model"] for r in per_rank)},
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
