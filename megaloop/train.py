"""`megaloop train`: the pretraining loop, from a validated config to a finished run directory.

RUN_DIR/config.yaml     the full resolved config
RUN_DIR/metrics.jsonl   one JSON object per log step
RUN_DIR/summary.json    n_once, n_rec, r, tokens, flops, val_loss, val_loss_by_r, ...
RUN_DIR/checkpoints/    complete checkpoints only, plus `latest`
"""
from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from . import checkpoint as ckpt
from . import faults
from . import run_lock
from .accounting import count_params, realised_flops, tokens_for_budget
from .config import Config, ConfigError, load_config, save_config
from .depth import DepthSampler, describe
from .divergence import DivergenceGuard
from .errors import UserError
from .model import LoopedLM
from .optim import lr_factor
from .parallel import Engine, build_engine
from .parallel.parallelize import compile_blocks  # noqa: F401 - the tests and benchmarks import it from here
from .parallel.sharded_optim import optimizer_state_bytes

# Config sections whose change makes a resumed run a different experiment.
# (The batch is checked as tokens per step, so a resume under another data-parallel size can
# rebalance micro_batch_size x grad_accum.)
RESUME_MUST_MATCH = ("model", "optim.name", "train.seed",
                     "data", "parallel.precision")


def resolve_device(cfg: Config) -> torch.device:
    want = cfg.train.device
    if want == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device=cuda but no CUDA device is visible; use train.device=cpu or auto")
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want == "cuda" and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device(want)


def peak_memory_mb(device: torch.device) -> float:
    """This process's peak memory so far: CUDA memory allocated on a GPU, the resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def build_model(cfg: Config, device: torch.device | str = "cpu") -> LoopedLM:
    """Same seed -> same initial weights on every rank and under every layout. On the meta device
    the model has shapes only; megaloop.parallel.parallelize materialises each rank's part of it
    with the values this seed gives on the CPU (parallel/meta_init.py replays it)."""
    from . import kernels
    kernels.set_backend(cfg.kernels)  # MEGALOOP_KERNELS in the environment still wins
    torch.manual_seed(cfg.train.seed)
    with torch.device(device):
        return LoopedLM(cfg.model)


@dataclass
class Budget:
    steps: int
    tokens_per_step: int

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step


def plan_budget(cfg: Config, flops_per_token: float, dp_size: int) -> Budget:
    t = cfg.train
    tps = t.micro_batch_size * t.grad_accum * cfg.model.seq_len * dp_size
    if t.steps is not None:
        return Budget(t.steps, tps)
    # a sampled depth: FLOPs in expectation over its draws (megaloop.depth), curriculum included
    tokens = t.tokens if t.tokens is not None else (
        t.target_flops / flops_per_token if not cfg.model.recur_sampling.sampled
        else tokens_for_budget(cfg.model, t.target_flops, tps))
    steps = int(tokens // tps)
    if steps < 1:
        raise ConfigError(
            f"the budget buys {int(tokens)} tokens, less than one step ({tps} tokens: micro_batch_size x "
            f"grad_accum x seq_len x data-parallel size). Raise the budget or shrink the batch")
    return Budget(steps, tps)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flatten(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def check_resume_compatible(saved: dict, cfg: Config) -> None:
    now, before = _flatten(cfg.to_dict()), _flatten(saved)
    changed = [k for k in now if k.startswith(RESUME_MUST_MATCH) and k in before
               and json.dumps(before[k], default=str) != json.dumps(now[k], default=str)
               and not k.startswith("data.workers")]
    if changed:
        k = changed[0]
        raise UserError(
            f"cannot resume: {k} was {before[k]!r} in the saved run and is {now[k]!r} now. "
            f"Resume with the run's own config (RUN_DIR/config.yaml) or start a new run_dir")


def check_run_dir(cfg: Config, resume: bool) -> Optional[str]:
    """Validate the run directory without writing anything. Returns the checkpoint to resume."""
    run_dir = cfg.train.run_dir
    if os.path.exists(run_dir) and not os.path.isdir(run_dir):
        raise UserError(f"train.run_dir={run_dir} exists and is not a directory; choose another run_dir")
    if resume and not os.path.isdir(run_dir):  # a typo must not start a fresh run
        raise UserError(f"--resume: train.run_dir={run_dir} does not exist, so there is no run to resume. "
                        f"Check the path, or drop --resume to start a new run there")
    latest = ckpt.latest_path(run_dir) if os.path.isdir(run_dir) else None
    has_run = os.path.isfile(os.path.join(run_dir, "config.yaml")) or latest is not None
    if has_run and not resume:
        raise UserError(
            f"{run_dir} already holds a run. Pass --resume to continue it, or set train.run_dir to a new "
            f"folder (nothing was changed)")
    if resume and latest is not None:
        saved = load_config(os.path.join(run_dir, "config.yaml")).to_dict() \
            if os.path.isfile(os.path.join(run_dir, "config.yaml")) else ckpt.read_meta(latest).get("config", {})
        check_resume_compatible(saved, cfg)
    return latest


def create_run_dir(run_dir: str) -> None:
    try:
        os.makedirs(run_dir, exist_ok=True)
        probe = os.path.join(run_dir, f".write_test{os.getpid()}")
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        raise UserError(f"cannot write to train.run_dir={run_dir}: {e.strerror}. Choose a writable folder") from None


class MetricsLog:
    """Append-only JSONL; on resume, lines past the resumed step are dropped so the file
    describes one unbroken run."""

    def __init__(self, path: str, resume_step: int, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled and resume_step >= 0:
            self.truncate(resume_step)
        elif enabled and resume_step < 0 and os.path.isfile(path):
            os.remove(path)

    def truncate(self, step: int) -> None:
        """Drop the lines past `step` (a resume, or a rewind, continues from there)."""
        if self.enabled and os.path.isfile(self.path):
            with open(self.path) as f:
                keep = [ln for ln in f if ln.strip() and json.loads(ln).get("step", 0) <= step]
            ckpt.write_atomic(self.path, "".join(keep).encode())

    def write(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def train(cfg: Config, resume: bool = False, log=print) -> dict:
    from .data.loader import PackedLoader, eval_batches
    from .data.prepare import ensure_prepared
    from .data.preprocess import unigram_entropy
    from .mfu import peak_flops
    from .observe import build_sinks, check_backends, close_sinks

    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg)
    seed_everything(cfg.train.seed)
    # validates the layout before any collective, builds the model, parallelises it (and compiles
    # its blocks when train.compile): a transform of the model goes inside this builder
    engine = build_engine(cfg, lambda where: build_model(cfg, where), device)
    is_main = engine.is_main
    sinks: list = []  # optional live views (TensorBoard, wandb); metrics.jsonl stays the record
    lock = None
    finished = False
    try:
        # Everything that can be wrong is checked before the run directory is touched.
        latest = check_run_dir(cfg, resume)
        check_backends(cfg.logging)
        counts = count_params(cfg.model)
        budget = plan_budget(cfg, counts.flops_per_token, engine.dp_size)
        depth = DepthSampler(cfg.model, cfg.train.seed)  # r of each step: a pure function of (seed, step)
        data = ensure_prepared(cfg.data, cfg.model.vocab_size, log=log if is_main else (lambda *a: None))
        if is_main:
            create_run_dir(cfg.train.run_dir)
        lock = run_lock.hold(cfg.train.run_dir, engine, log)  # one writer per run directory, until the end
        latest = check_run_dir(cfg, resume)  # again under the lock: another run may have saved meanwhile
        engine.barrier()
        loader = PackedLoader([p for p, _ in data.train], [w for _, w in data.train], cfg.model.seq_len,
                              cfg.train.micro_batch_size, cfg.train.seed, engine.dp_rank, engine.dp_size)
        step = 0
        guard = DivergenceGuard(cfg.train)
        if latest is not None:
            engine.load_files(latest)
            state = ckpt.load_file(latest, "trainer.pt")
            step = state["step"]
            saved_tps = state.get("tokens_per_step", budget.tokens_per_step)
            if saved_tps != budget.tokens_per_step:
                raise UserError(
                    f"cannot resume: the run used {saved_tps:,} tokens per step and this launch gives "
                    f"{budget.tokens_per_step:,} (micro_batch_size x grad_accum x seq_len x data-parallel size). "
                    f"Set train.grad_accum or train.micro_batch_size so the global batch is unchanged")
            loader.load_state_dict(state["loader"])
            guard.load_state_dict(state.get("guard"))
            log(f"resumed from {latest} at step {step}")
        if is_main:
            save_config(cfg, os.path.join(cfg.train.run_dir, "config.yaml"))
            log(f"model: N_once={counts.n_once:,} N_rec={counts.n_rec:,} {describe(cfg.model)} "
                f"embedding={counts.embedding:,} head={counts.head:,} FLOPs/token={counts.flops_per_token:.3e}")
            log(f"budget: {budget.steps} steps x {budget.tokens_per_step:,} tokens = {budget.tokens:,} tokens "
                f"({budget.tokens * counts.flops_per_token:.3e} FLOPs) on {device}")
        metrics = MetricsLog(os.path.join(cfg.train.run_dir, "metrics.jsonl"), step if latest else -1, is_main)
        if is_main:
            sinks = build_sinks(cfg.logging, cfg.train.run_dir, cfg.to_dict())
        peak = cfg.logging.peak_flops or peak_flops(device, cfg.parallel.precision)
        valid = lambda: eval_batches(data.valid, cfg.model.seq_len, cfg.train.micro_batch_size,  # noqa: E731
                                     cfg.train.eval_tokens)

        last_time, last_tokens = time.perf_counter(), step * budget.tokens_per_step
        stats, window = None, []  # window: the draws of the steps since the last logged one
        start = time.perf_counter()
        bar = _progress(cfg, budget.steps, step, is_main)
        pending = None  # a checkpoint still being written in the background (train.async_save)
        while step < budget.steps:
            factor = lr_factor(step, budget.steps, cfg.optim.warmup_steps, cfg.optim.final_lr_frac)
            factor *= guard.lr_scale(step)
            batches = [loader.next_batch() for _ in range(cfg.train.grad_accum)]
            window.append(depth.draw(step + 1))
            stats = engine.train_step(batches, factor, inject_nan=faults.armed("nan", step + 1), num_recur=window[-1])
            step += 1
            stats.loss = faults.spiked(stats.loss, step)
            diverged = guard.observe(stats.loss, stats.skipped)
            if stats.skipped:
                log(f"step {step}: non-finite loss or gradient (loss={stats.loss}, grad_norm={stats.grad_norm}); "
                    f"update skipped ({guard.bad_in_a_row} in a row)")
            if pending is not None and pending.done():  # published as soon as its writes are complete
                pending = _finish(pending)
            if diverged:
                pending = _finish(pending)  # the checkpoint to go back to may be the one in flight
                step = rewind(cfg, engine, loader, guard, metrics, step, diverged, budget.tokens_per_step, log)
                last_time, last_tokens = time.perf_counter(), step * budget.tokens_per_step
                window = []  # the rewound steps' draws are not logged (they are drawn again: same r)
                if bar is not None:
                    bar.n = step
                    bar.refresh()
                continue
            tokens = step * budget.tokens_per_step
            if step % cfg.train.log_every == 0 or step == budget.steps:
                now = time.perf_counter()
                tps = (tokens - last_tokens) / max(now - last_time, 1e-9)
                last_time, last_tokens = now, tokens
                rec = dict(step=step, tokens=tokens, loss=stats.loss, lr=factor * cfg.optim.lr,
                           grad_norm=stats.grad_norm, tokens_per_s=tps,
                           mfu=tps * counts.flops_per_token / peak if peak else None,
                           skipped_steps=guard.skipped_total, elapsed_s=now - start, num_recur=window[-1])
                if depth.sampled and len(window) > 1:  # every step's draw, not only the logged one's
                    rec["num_recur_window"] = window
                window = []
                metrics.write(rec)
                for sink in sinks:
                    sink.log(rec, step)
                if bar is not None:
                    bar.set_postfix(loss=f"{stats.loss:.3f}", tok_s=f"{tps:,.0f}")
            if cfg.train.eval_every and step % cfg.train.eval_every == 0 and step < budget.steps:
                vl = engine.eval_loss(valid())
                metrics.write(dict(step=step, tokens=tokens, val_loss=vl))
            if cfg.train.save_every and step % cfg.train.save_every == 0 and step < budget.steps:
                pending = _save(cfg, engine, loader, guard, step, counts, budget.tokens_per_step, pending,
                                background=cfg.train.async_save)
            if bar is not None:
                bar.update(1)
            faults.maybe_kill("step", step)
            faults.maybe_fail("step", step)
        if bar is not None:
            bar.close()
        _save(cfg, engine, loader, guard, step, counts, budget.tokens_per_step, pending)  # the last one in the foreground

        by_r = final_eval(cfg, engine, list(valid()), is_main)  # num_recur and every train.eval_recur
        val_loss = by_r[str(cfg.model.num_recur)]
        draws = depth.draws(1, budget.steps)
        summary = dict(
            run=os.path.basename(os.path.normpath(cfg.train.run_dir)), n_once=counts.n_once, n_rec=counts.n_rec,
            r=cfg.model.num_recur, bptt_k=cfg.model.bptt_k, input_injection=cfg.model.input_injection,
            d_model=cfg.model.d_model, tokens=budget.tokens, steps=budget.steps,
            flops=realised_flops(cfg.model, draws, budget.tokens_per_step), flops_per_token=counts.flops_per_token,
            target_flops=cfg.train.target_flops, recur_sampling=cfg.model.recur_sampling.kind,
            r_expected=depth.mean_over_steps(np.arange(depth.max_r + 1), budget.steps), r_mean=sum(draws) / max(len(draws), 1),
            r_hist={str(r): draws.count(r) for r in sorted(set(draws))},
            n_embedding=counts.embedding, n_head=counts.head, train_loss=stats.loss if stats else None,
            val_loss=val_loss, val_loss_by_r=by_r, skipped_steps=guard.skipped_total, rewinds=guard.rewinds,
            wall_time_s=time.perf_counter() - start, peak_mem_mb=peak_memory_mb(device),
            # per rank: a sharded optimiser (ZeRO) holds each parameter's state on its owner only
            optim_state_bytes=[int(b) for b in engine.per_rank(optimizer_state_bytes(engine.optimizer))],
        )
        if is_main:
            summary["unigram_entropy"] = unigram_entropy(data.valid)
            ckpt.write_atomic(os.path.join(cfg.train.run_dir, "summary.json"), json.dumps(summary, indent=2).encode())
        finished = True
        return summary
    except BaseException as e:
        # No collective after a failure (the other ranks may be inside a different one): the
        # engine records it for them and, when another rank failed first, names that rank.
        peer = engine.abort(e)
        if peer is None:
            raise
        raise peer from None
    finally:
        close_sinks(sinks)
        if finished:
            engine.close()
        if lock is not None:
            lock.release()


def trainer_state(step: int, loader, guard: DivergenceGuard, tokens_per_step: int) -> dict:
    """trainer.pt: everything besides the weights and the optimiser that a resume needs."""
    return {"step": step, "loader": loader.state_dict(), "tokens_per_step": tokens_per_step,
            "guard": guard.state_dict()}


def _save(cfg: Config, engine: Engine, loader, guard: DivergenceGuard, step: int, counts, tokens_per_step: int,
          pending: Optional[ckpt.PendingSave] = None, background: bool = False) -> Optional[ckpt.PendingSave]:
    """Checkpoint `step`. background (train.async_save): return once the state is copied, with
    the PendingSave that publishes it when its writes are done. A save still in flight is
    finished first: one at a time."""
    _finish(pending)

    def write(path: str):
        faults.maybe_fail("save", step)
        handle = engine.save_files(path, background=background)
        faults.maybe_kill("save", step)
        if engine.is_main:
            ckpt.torch_save_synced(trainer_state(step, loader, guard, tokens_per_step), os.path.join(path, "trainer.pt"))
        return handle
    how = ckpt.save_async if background else ckpt.save
    out = how(cfg.train.run_dir, step, write, meta={"config": cfg.to_dict(), "n_once": counts.n_once},
              keep=cfg.train.keep_checkpoints, is_writer=engine.is_main, barrier=engine.barrier)
    return out if background else None


def _finish(pending: Optional[ckpt.PendingSave]) -> None:
    """Wait for a background save and publish it (None: nothing in flight)."""
    if pending is not None:
        pending.finish()


def rewind(cfg: Config, engine: Engine, loader, guard: DivergenceGuard, metrics: MetricsLog, step: int, why: str,
           tokens_per_step: int, log=print) -> int:
    """train.on_divergence at step `step`: stop with an error, or go back to the last complete
    checkpoint with the loader left where it is (the batches since are skipped). Returns the step
    the run continues from. The choice is persisted in that checkpoint's trainer.pt, so a resume
    from it continues exactly like this run."""
    latest = ckpt.latest_path(cfg.train.run_dir)
    if latest is None or not guard.can_rewind():
        if cfg.train.on_divergence == "stop":
            hint = "lower optim.lr or raise optim.warmup_steps and resume, or set train.on_divergence=rewind"
        elif latest is None:
            hint = "there is no checkpoint to rewind to yet: set train.save_every so that a run can rewind"
        else:
            hint = f"it rewound {guard.rewinds} times already (train.max_rewinds); lower optim.lr and resume"
        raise UserError(f"training diverged at step {step}: {why}. The last good checkpoint is intact "
                        f"({latest or 'none yet'}); {hint}")
    engine.load_files(latest)
    saved = ckpt.load_file(latest, "trainer.pt")
    to = saved["step"]
    skipped = loader.global_samples - saved["loader"]["global_samples"]
    guard.rewound(to, saved.get("guard"))
    if engine.is_main:
        ckpt.torch_save_atomic(trainer_state(to, loader, guard, tokens_per_step), os.path.join(latest, "trainer.pt"))
    engine.barrier()
    metrics.truncate(to)
    metrics.write(dict(step=to, tokens=to * tokens_per_step, event="rewind", rewind=guard.rewinds, from_step=step,
                       reason=why, skipped_samples=skipped, lr_scale=cfg.train.rewind_lr_scale,
                       lr_scale_until_step=guard.lr_until))
    log(f"step {step}: training diverged ({why}); rewind {guard.rewinds}/{cfg.train.max_rewinds}: back to step "
        f"{to} ({latest}), skipping the {skipped} samples since")
    return to


def final_eval(cfg: Config, engine: Engine, batches: list, is_main: bool) -> dict:
    """Validation loss at the trained r and at train.eval_recur, with one progress bar over all."""
    rs = [cfg.model.num_recur] + [r for r in cfg.train.eval_recur if r != cfg.model.num_recur]
    rs = list(dict.fromkeys(rs))
    bar = None
    if cfg.train.progress and is_main:
        from tqdm import tqdm
        bar = tqdm(total=len(rs) * len(batches), desc="eval", unit="batch", dynamic_ncols=True, mininterval=1.0)

    def counted(r: int):
        if bar is not None:
            bar.set_postfix(r=r)
        for b in batches:
            yield b
            if bar is not None:
                bar.update(1)

    by_r = {}
    for r in rs:
        by_r[str(r)] = engine.eval_loss(counted(r), num_recur=None if r == cfg.model.num_recur else r)
    if bar is not None:
        bar.close()
    return by_r


def _progress(cfg: Config, total: int, done: int, is_main: bool):
    if not (cfg.train.progress and is_main):
        return None
    from tqdm import tqdm
    return tqdm(total=total, initial=done, desc="train", unit="step", dynamic_ncols=True, mininterval=1.0)


def evaluate_run(path: str, recur: list[int], max_tokens: Optional[int] = None, log=print) -> dict:
    """`megaloop eval`: val loss at several r of a run (its latest checkpoint) or an export folder.
    For a run directory the losses are also merged into its summary.json (val_loss_by_r)."""
    from .data.loader import eval_batches
    from .data.prepare import ensure_prepared
    from .export import load_pretrained
    from .parallel import local_engine

    model, cfg, _ = load_pretrained(path)
    engine = local_engine(cfg, model, resolve_device(cfg))
    data = ensure_prepared(cfg.data, cfg.model.vocab_size, log=log)
    tokens = max_tokens or cfg.train.eval_tokens
    by_r = {}
    for r in recur:
        by_r[str(r)] = engine.eval_loss(eval_batches(data.valid, cfg.model.seq_len, cfg.train.micro_batch_size, tokens), r)
        log(f"r={r}: val_loss={by_r[str(r)]:.4f}")
    if os.path.isdir(ckpt.ckpt_root(path)):
        summary_path = os.path.join(path, "summary.json")
        summary = json.load(open(summary_path)) if os.path.isfile(summary_path) else {}
        summary.setdefault("val_loss_by_r", {}).update(by_r)
        ckpt.write_atomic(summary_path, json.dumps(summary, indent=2).encode())
    return by_r
