"""Checkpoint size and time on one process; prints JSON.

    python benchmarks/checkpoint.py [--set model.d_model=512 ...] [--repeats 3] [--dir DIR]

A model of the given config takes one AdamW-or-Muon step (so the optimiser state exists), then:
  - dcp_sync:   the DCP save (megaloop/parallel/dcp_state.py) as training would wait for it;
  - dcp_async:  the same save in the background: how long training waits (the copy to host
                memory) and how long until the files are complete;
  - dcp_load:   loading it back into a fresh engine;
  - before:     the format before DCP checkpoints, as its single-process engine wrote it (model.pt,
                optim.pt and optim_full.pt: the optimiser state twice), for comparison.
Each figure is the median over --repeats, with the bytes on disk. The folder (default: a temporary
one) decides the disk that is measured.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))  # the tiny model config the layout tests train


def _bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _old_format(engine, path: str) -> None:
    from megaloop.checkpoint import torch_save_synced

    os.makedirs(path)
    torch_save_synced(engine.model.state_dict(), f"{path}/model.pt")
    torch_save_synced(engine.optimizer.state_dict(), f"{path}/optim.pt")
    state = {n: dict(engine.optimizer.state[p]) for n, p in engine.model.named_parameters() if engine.optimizer.state.get(p)}
    groups = {g["name"]: {k: v for k, v in g.items() if k != "params"} for g in engine.optimizer.param_groups}
    torch_save_synced(dict(format="megaloop-optim-v1", groups=groups, state=state), f"{path}/optim_full.pt")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    a = ap.parse_args()
    from megaloop.config import _merge, config_from_dict, parse_overrides
    from layouts import TINY
    from megaloop.parallel import local_engine
    from megaloop.train import build_model

    base = ["model.d_model=512", "model.n_head=8", "model.n_kv_head=8", "model.vocab_size=8192",
            "model.seq_len=64", "train.micro_batch_size=1", "train.grad_accum=1"]
    cfg = config_from_dict(_merge(TINY, parse_overrides([*base, *a.overrides])))
    engine = local_engine(cfg, build_model(cfg), torch.device("cpu"))
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, cfg.model.vocab_size, (cfg.train.micro_batch_size, cfg.model.seq_len), generator=g)
    engine.train_step([(x, torch.roll(x, -1, 1))], 1.0)
    n_params = sum(p.numel() for p in engine.model.parameters())
    timings: dict = {k: [] for k in ("dcp_sync_s", "dcp_async_blocking_s", "dcp_async_total_s", "dcp_load_s",
                                     "before_s")}
    sizes = {}
    root = a.dir or tempfile.mkdtemp(prefix="ckpt_bench_")
    try:
        for i in range(a.repeats):
            sync, bg, old = (os.path.join(root, f"{k}{i}") for k in ("sync", "async", "old"))
            t = time.perf_counter()
            engine.save_files(sync)
            timings["dcp_sync_s"].append(time.perf_counter() - t)
            t = time.perf_counter()
            handle = engine.save_files(bg, background=True)
            timings["dcp_async_blocking_s"].append(time.perf_counter() - t)
            handle.wait()
            timings["dcp_async_total_s"].append(time.perf_counter() - t)
            fresh = local_engine(cfg, build_model(cfg), torch.device("cpu"))
            t = time.perf_counter()
            fresh.load_files(sync)
            timings["dcp_load_s"].append(time.perf_counter() - t)
            t = time.perf_counter()
            _old_format(engine, old)
            timings["before_s"].append(time.perf_counter() - t)
            sizes = dict(dcp_bytes=_bytes(sync), before_bytes=_bytes(old))
    finally:
        if a.dir is None:
            shutil.rmtree(root, ignore_errors=True)
    print(json.dumps(dict(params=n_params, optimizer=cfg.optim.name, repeats=a.repeats, **sizes,
                          **{k: round(statistics.median(v), 4) for k, v in timings.items()}), indent=2))


if __name__ == "__main__":
    main()
