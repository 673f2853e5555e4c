"""Where a rank's resident memory goes, phase by phase: benchmarks/scale.py's model and layout,
with the resident set (VmRSS) after each phase of initialisation and of each step, and each
phase's own peak (VmHWM, reset between phases through /proc/self/clear_refs). Linux only; prints
JSON (one object per rank).

    python benchmarks/scale_phases.py [--s 12] [--tp 2] [--pp 2] [--steps 2] [--ns-steps 1]
                                      [--exact-allocator] [--trim]

Phases: `modules` (the torch modules every parallel rank imports: pipelining, the meta build's
Python meta kernels), `build` (the meta model and its recipe), `materialise` (meta_init: this
rank's shards with the single process's values), then per step `backward` (every micro-batch's
forward and backward), `sync` (gradient all-reduces), `clip` (the global norm), `optimizer`
(the update) and `zero_grad` (the gradients freed). --exact-allocator runs the ranks with
MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0, so the resident set follows the live
tensors; the default glibc allocator also keeps freed memory, and --trim reports after
initialisation and after each step how much of it malloc_trim(0) gives back. The phases are
timed by wrapping the engine's step hooks (megaloop/parallel/base.py) and parallelize()'s steps:
a diagnostic, not part of any contract.
"""
from __future__ import annotations

import ctypes
import importlib
import json
import os
import sys
import tempfile

from emit import emit  # benchmarks/emit.py (scripts run with benchmarks/ on sys.path)
from scale import EXACT_ALLOCATOR, batches, layout_arguments, model_config, run_config

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)


class Phases:
    """The resident set after each phase and the phase's own peak, in MiB."""

    def __init__(self, trim: bool):
        self.rows: list[dict] = []
        self.trim = ctypes.CDLL("libc.so.6").malloc_trim if trim else None
        self._reset()

    @staticmethod
    def _status() -> dict:
        with open("/proc/self/status") as f:
            return {k: int(v.split()[0]) // 1024 for k, v in (ln.split(":", 1) for ln in f) if k in ("VmRSS", "VmHWM")}

    @staticmethod
    def _reset() -> None:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM back to the current resident set

    def mark(self, phase: str, trim: bool = False) -> None:
        s = self._status()
        row = {"phase": phase, "rss_mb": s["VmRSS"], "peak_mb": s["VmHWM"]}
        if trim and self.trim is not None:
            self.trim(0)
            row["returned_by_malloc_trim_mb"] = s["VmRSS"] - self._status()["VmRSS"]
        self.rows.append(row)
        self._reset()


def wrap(owner, name: str, after) -> None:
    """Call after() once owner.name(...) returns."""
    fn = getattr(owner, name)

    def wrapped(*a, **k):
        out = fn(*a, **k)
        after()
        return out
    setattr(owner, name, wrapped)


def worker(args) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo")
    ph = Phases(args.trim)
    ph.mark("startup")
    import torch.distributed.pipelining  # noqa: F401
    torch.empty(1, device="meta").normal_()
    ph.mark("modules")

    from megaloop.parallel import build_engine
    pz = importlib.import_module("megaloop.parallel.parallelize")  # the module (the package exports its function)
    from megaloop.parallel.sharded_optim import optimizer_state_bytes
    from megaloop.train import build_model

    cfg = run_config(args)
    wrap(pz, "apply_tensor_parallel", lambda: ph.mark("build"))  # the meta model and its recipe are built by then
    wrap(pz, "materialise", lambda: ph.mark("materialise", trim=True))
    engine = build_engine(cfg, lambda where: build_model(cfg, where), torch.device("cpu"))
    for hook, phase in (("_accumulate", "backward"), ("_sync_grads", "sync"), ("_clip_grads", "clip")):
        wrap(engine, hook, lambda phase=phase: ph.mark(phase))
    wrap(engine.optimizer, "step", lambda: ph.mark("optimizer"))
    wrap(engine.optimizer, "zero_grad", lambda: ph.mark("zero_grad", trim=True))
    m = cfg.model
    for step in range(args.steps):
        ph.rows.append({"phase": f"step {step + 1}"})
        engine.train_step(batches(m.vocab_size, m.seq_len, 2, step), 1.0)
    held = [p for p in engine.model.parameters() if p.numel()]
    params = sum(p.numel() * p.element_size() for p in held)
    share = {"params_mb": params / 2 ** 20, "grads_mb": params / 2 ** 20,
             "optimizer_state_mb": optimizer_state_bytes(engine.optimizer) / 2 ** 20}
    out = {"rank": engine.rank, "share_mb": {k: round(v) for k, v in share.items()},
           "share_total_mb": round(sum(share.values())), "phases": ph.rows}
    engine.close()
    with open(os.path.join(args.worker_out, f"rank{out['rank']}.json"), "w") as f:
        json.dump(out, f)


def main() -> None:
    ap = layout_arguments(__doc__, s=12, steps=2, ns_steps=1, timeout=3600)
    ap.add_argument("--trim", action="store_true")
    args = ap.parse_args()
    if args.worker:
        return worker(args)
    if not os.path.exists("/proc/self/clear_refs"):
        raise SystemExit("benchmarks/scale_phases.py reads Linux's /proc/self/status and clear_refs")
    from megaloop.parallel.testing import spawn

    nproc = args.tp * args.pp
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [os.path.abspath(__file__), "--worker", "--worker-out", tmp, "--s", str(args.s), "--tp", str(args.tp),
               "--pp", str(args.pp), "--steps", str(args.steps), "--ns-steps", str(args.ns_steps),
               *(["--trim"] if args.trim else [])]
        for r in spawn(nproc, cmd, timeout=args.timeout, module=None,
                       env=EXACT_ALLOCATOR if args.exact_allocator else None):
            if r.returncode != 0:
                raise SystemExit(f"a worker failed (exit {r.returncode}):\n{r.stdout[-4000:]}")
        ranks = [json.load(open(os.path.join(tmp, f"rank{k}.json"))) for k in range(nproc)]
    emit({"benchmark": "scale_phases", "command": "python benchmarks/scale_phases.py " + " ".join(sys.argv[1:]),
          "model": {**model_config(args.s), "s": args.s}, "layout": {"tp": args.tp, "pp": args.pp},
          "allocator": ("glibc, MALLOC_MMAP_THRESHOLD_=65536 MALLOC_TRIM_THRESHOLD_=0" if args.exact_allocator
                        else "glibc defaults"), "ranks": ranks}, args.out)


if __name__ == "__main__":
    main()
