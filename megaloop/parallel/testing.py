"""Equality harness for parallel layouts: a tiny looped model trained a few steps on a fixed batch.

`python -m megaloop.parallel.testing --out DIR [--set k=v ...] [--steps N] [--save-at S] [--resume CKPT]
[--data PREFIX]` runs on one process (LocalEngine) or under any launcher (one process per rank: RANK, WORLD_SIZE,
MASTER_ADDR, MASTER_PORT). Rank 0 writes DIR/result.json (per-step loss and grad norm) and every
rank its pieces of the checkpoint DIR/final (DCP: parallel/dcp_state.py, which read_weights reads whole). `spawn` starts N such processes on a free port (gloo on CPU) for
the tests and the benchmark. With --data, batches come from a PackedLoader over that token
dataset (sharded over DP by global sample) instead of the fixed batch, and checkpoints carry the
loader state in trainer.pt, so a resume under another DP size must continue from the same sample.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from typing import Optional

import torch

TINY = {
    "model": dict(d_model=32, n_head=4, n_kv_head=2, vocab_size=101, seq_len=16, n_prelude=1, n_recur_block=1,
                  n_coda=1, num_recur=2, input_injection="linear"),
    "optim": dict(name="muon", lr=0.02, grad_clip=1.0, warmup_steps=0, final_lr_frac=0.1),
    "train": dict(steps=5, micro_batch_size=2, grad_accum=2, seed=1234, progress=False, device="cpu"),
}


def fixed_batches(cfg, dp_size: int, seed: int = 7) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The step's global batch: dp_size * grad_accum micro-batches, the same every step."""
    g = torch.Generator().manual_seed(seed)
    n = dp_size * cfg.train.grad_accum
    B, T, V = cfg.train.micro_batch_size, cfg.model.seq_len, cfg.model.vocab_size
    toks = torch.randint(0, V, (n, B, T + 1), generator=g)
    return [(t[:, :-1].contiguous(), t[:, 1:].contiguous()) for t in toks]


def run(out: str, overrides: list[str], steps: Optional[int] = None, save_at: Optional[int] = None,
        resume: Optional[str] = None, threads: int = 1, keep_group: bool = False, device: str = "cpu",
        data: Optional[str] = None, save_async: bool = False) -> dict:
    """Train the tiny model; with save_at, also checkpoint after that step (save_async: in the
    background, while the next steps run); with resume, load the checkpoint and run the remaining steps. keep_group leaves torch.distributed up for another run
    in the same processes (the harness runs several layouts per launch to pay imports once)."""
    from ..config import _merge, config_from_dict, parse_overrides
    from ..depth import DepthSampler
    from ..optim import lr_factor
    from ..train import build_model, seed_everything
    from . import build_engine, state
    from .sharded_optim import optimizer_state_bytes

    torch.set_num_threads(threads)
    os.makedirs(out, exist_ok=True)
    cfg = config_from_dict(_merge(TINY, parse_overrides(overrides)))
    steps = steps or cfg.train.steps
    seed_everything(cfg.train.seed)
    model = build_model(cfg)
    t0 = time.perf_counter()
    dev = torch.device(device)
    if dev.type == "cuda":
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    engine = build_engine(cfg, model, dev)
    start = 0
    if resume:
        engine.load_files(resume)
        start = save_at or 0
    batches = fixed_batches(cfg, engine.dp_size)
    ga = cfg.train.grad_accum
    mine = batches[engine.dp_rank * ga:(engine.dp_rank + 1) * ga]
    loader = None
    if data:
        from ..data.loader import PackedLoader
        loader = PackedLoader([data], None, cfg.model.seq_len, cfg.train.micro_batch_size, cfg.train.seed,
                              engine.dp_rank, engine.dp_size)
        if resume:
            loader.load_state_dict(torch.load(os.path.join(resume, "trainer.pt"), weights_only=False)["loader"])
    depth = DepthSampler(cfg.model, cfg.train.seed)  # the loop's draw: each rank computes it alone
    losses, norms, times, draws = [], [], [], []
    pending = None
    finished = False
    try:
        for step in range(start, steps):
            t = time.perf_counter()
            if loader is not None:
                mine = [loader.next_batch() for _ in range(ga)]
            draws.append(depth.draw(step + 1))
            st = engine.train_step(mine, lr_factor(step, steps, cfg.optim.warmup_steps, cfg.optim.final_lr_frac),
                                   num_recur=draws[-1])
            times.append(time.perf_counter() - t)
            losses.append(st.loss)
            norms.append(st.grad_norm)
            if save_at is not None and step + 1 == save_at and not resume:
                pending = _save(engine, os.path.join(out, f"ckpt_{save_at}"), step + 1, loader, save_async)
        if pending is not None:
            pending.wait()
            engine.barrier()
        eval_loss = engine.eval_loss(batches[:2])
        _save(engine, os.path.join(out, "final"), steps, loader)
        peak = torch.cuda.max_memory_allocated(dev) / 2**20 if dev.type == "cuda" else _peak_rss_mb()
        result = dict(losses=losses, grad_norms=norms, eval_loss=eval_loss, step_times=times,
                      setup_s=time.perf_counter() - t0 - sum(times), peak_rss_mb=peak, num_recur=draws)
        if engine.is_main:
            with open(os.path.join(out, "result.json"), "w") as f:
                json.dump(result, f)
        with open(os.path.join(out, f"rank{getattr(engine, 'rank', 0)}.json"), "w") as f:
            json.dump(dict(step_times=times, peak_rss_mb=peak, num_recur=draws,
                           optim_state_bytes=optimizer_state_bytes(engine.optimizer)), f)
        finished = True
        return result
    except BaseException as e:  # no collective after a failure: the other ranks are stopped instead
        peer = engine.abort(e)
        if peer is None:
            raise
        raise peer from None
    finally:
        if finished and keep_group:
            engine.barrier()
            state.destroy()
        elif finished:
            engine.close()


def run_many(jobs: list[dict], threads: int = 1, device: str = "cpu") -> None:
    """Several runs in one launch: [{out, overrides, save_at?, resume?, data?, save_async?}, ...]."""
    for i, job in enumerate(jobs):
        run(job["out"], job.get("overrides", []), job.get("steps"), job.get("save_at"), job.get("resume"),
            threads, keep_group=i + 1 < len(jobs), device=device, data=job.get("data"),
            save_async=job.get("save_async", False))


def check_vocab_parallel_ce() -> None:
    """Under a launcher: the vocab-parallel loss through the kernel and through the autograd
    fallback both equal the plain softcapped cross-entropy (loss, grad of hidden, grad of the
    local head shard), with a vocab (101) that the world size does not divide."""
    import torch.distributed as dist
    import torch.nn.functional as F

    from . import tensor_parallel as tpm

    dist.init_process_group("gloo")
    try:
        group, rank = dist.new_group(list(range(dist.get_world_size()))), dist.get_rank()
        g = torch.Generator().manual_seed(0)
        h0, w0 = torch.randn(24, 16, generator=g), torch.randn(101, 16, generator=g) * 0.5
        t = torch.randint(0, 101, (24,), generator=g)
        t[3] = -100
        h = h0.clone().requires_grad_()
        ref = F.cross_entropy(15 * torch.tanh(F.linear(h, w0) / 15), t)
        w = w0.clone().requires_grad_()
        ref.backward()
        ref_w = torch.autograd.grad(F.cross_entropy(15 * torch.tanh(F.linear(h0, w) / 15), t), w)[0]
        head = tpm.VocabParallelHead(w0, 15.0, group)
        for path in ("kernel", "fallback"):
            hh = h0.clone().requires_grad_()
            head.weight.grad = None
            if path == "kernel":
                loss = tpm.vocab_parallel_cross_entropy(hh, head.weight, t, 15.0, group, head.vocab_start, 101)
            else:
                loss = tpm._VocabParallelSoftcapCE.apply(tpm.copy_to_tp_region(hh, group), head.weight, t, 15.0,
                                                         group, head.vocab_start, 101, -100)
            loss.backward()
            torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6, msg=path)
            torch.testing.assert_close(hh.grad, h.grad, rtol=1e-4, atol=1e-6, msg=path)
            torch.testing.assert_close(head.weight.grad, tpm.shard_of(head.weight, ref_w), rtol=1e-4, atol=1e-6,
                                       msg=path)
        assert rank >= 0
    finally:
        dist.destroy_process_group()


def _save(engine, path: str, step: int = 0, loader=None, background: bool = False):
    if engine.is_main:
        os.makedirs(path, exist_ok=True)
    engine.barrier()
    pending = engine.save_files(path, background=background)
    if engine.is_main and loader is not None:
        torch.save({"step": step, "loader": loader.state_dict()}, os.path.join(path, "trainer.pt"))
    if pending is None:
        engine.barrier()
    return pending


def _peak_rss_mb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(nproc: int, out: str, overrides: list[str], extra: Optional[list[str]] = None,
          timeout: float = 300, env: Optional[dict] = None) -> list[subprocess.CompletedProcess]:
    """Start `nproc` ranks of this module (torchrun-style env, free port); wait for all."""
    port = free_port()
    procs = []
    os.makedirs(out, exist_ok=True)
    for rank in range(nproc):
        e = dict(os.environ, **(env or {}))
        e.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc),
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1",
                 DS_ACCELERATOR="cpu", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "megaloop.parallel.testing", "--out", out, *(extra or [])]
        for o in overrides:
            cmd += ["--set", o]
        procs.append(subprocess.Popen(cmd, env=e, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    done = []
    deadline = time.time() + timeout
    for p in procs:
        try:
            stdout, _ = p.communicate(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            stdout, _ = p.communicate()
            done.append(subprocess.CompletedProcess(p.args, -9, stdout, ""))
            continue
        done.append(subprocess.CompletedProcess(p.args, p.returncode, stdout, ""))
    return done


def main(argv: Optional[list[str]] = None) -> int:
    from ..errors import UserError

    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", required=True)
    ap.add_argument("--set", action="append", default=[], dest="overrides")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--save-at", type=int)
    ap.add_argument("--resume")
    ap.add_argument("--data", help="token dataset prefix: batches from a PackedLoader instead of the fixed batch")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--jobs", help="JSON file with a list of runs (then --out is only a log folder)")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (one GPU per rank)")
    ap.add_argument("--check-ce", action="store_true", help="check the vocab-parallel loss and exit")
    a = ap.parse_args(argv)
    if a.check_ce:
        check_vocab_parallel_ce()
        return 0
    try:
        if a.jobs:
            with open(a.jobs) as f:
                run_many(json.load(f), a.threads, a.device)
        else:
            run(a.out, a.overrides, a.steps, a.save_at, a.resume, a.threads, device=a.device, data=a.data)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
