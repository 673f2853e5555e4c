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
import shutil
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from . import checkpoint as ckpt
from . import run_lock
from .accounting import count_params, realised_flops, tokens_for_budget
from .config import Config, ConfigError, load_config, save_config
from .data.loader import PackedLoader, eval_batches
from .data.prepare import ensure_prepared
from .data.preprocess import unigram_entropy
from .depth import DepthSampler, describe
from .divergence import DivergenceGuard
from .errors import UserError
from .fp8 import convert_for_fp8
from .hooks import TrainHooks
from .hooks import from_env as hooks_from_env
from .mfu import mfu, peak_flops
from .model import LoopedLM
from .observe import build_sinks, check_backends, close_sinks
from .optim import lr_factor
from .parallel import Engine, StepStats, build_engine
from .parallel.engines import rendezvous_from_env
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
    with the values this seed gives on the CPU (parallel/meta_init.py replays it). The model runs
    its kernels with the backend cfg.kernels names."""
    torch.manual_seed(cfg.train.seed)
    with torch.device(device):
        return LoopedLM(cfg.model, kernels=cfg.kernels)


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


def train(cfg: Config, resume: bool = False, log=print, hooks: Optional[TrainHooks] = None) -> dict:
    """Build the run, step it to its budget, finish it; returns the summary (summary.json)."""
    hooks = hooks if hooks is not None else hooks_from_env()
    device = setup_process(cfg)
    claim = claim_run_dir(cfg, resume, log)  # before anything expensive: a busy run directory stops here
    try:
        built: dict = {}

        def build(where: torch.device) -> LoopedLM:
            """The model on `where` (the CPU, or meta on a parallel rank), its linears in float8
            under precision fp8: every transform of the model happens here, before parallelize()."""
            built["model"] = build_model(cfg, where)
            built["fp8"] = convert_for_fp8(built["model"], cfg, device)
            return built["model"]

        # validates the layout before any collective, then builds, parallelises and compiles the model
        engine = build_engine(cfg, build, device)
        return run(cfg, built["model"], engine, device, claim, log, hooks, built["fp8"])
    finally:
        claim.release()


def run(cfg: Config, model: LoopedLM, engine: Engine, device: torch.device, claim: "RunDirClaim", log,
        hooks: TrainHooks, converted: Optional[list] = None) -> dict:
    """The training loop on a built engine: train_step and after_step to the budget, then finish."""
    trainer, finished = None, False
    try:
        engine.barrier()  # rank 0 holds the lock
        latest = check_run_dir(cfg, claim.resume)  # again under the lock: another run may have saved meanwhile
        engine.barrier()  # every rank has read the run directory before rank 0 writes into it
        trainer = Trainer(cfg, model, engine, device, latest, log, hooks, converted or [])
        while trainer.step < trainer.budget.steps:
            trainer.after_step(trainer.train_step())
        summary = trainer.finish()
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
        if trainer is not None:
            trainer.close()
        if finished:
            engine.close()


def setup_process(cfg: Config) -> torch.device:
    """Threads, device and seeds of this process."""
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = resolve_device(cfg)
    seed_everything(cfg.train.seed)
    return device


@dataclass
class RunDirClaim:
    """The run directory, held by this job: global rank 0 holds its lock (run_lock) for the run's
    whole life; the other ranks hold nothing and write only where rank 0 tells them."""
    run_dir: str
    resume: bool
    lock: Optional[run_lock.RunLock]
    created: bool  # this job created the folder

    def release(self) -> None:
        """Release the lock; a folder this job created and never wrote into goes too, so a run
        that failed before its first write leaves nothing behind."""
        if self.lock is None:
            return
        self.lock.release()
        if self.created and set(os.listdir(self.run_dir)) <= {run_lock.LOCK_NAME}:
            shutil.rmtree(self.run_dir, ignore_errors=True)


def claim_run_dir(cfg: Config, resume: bool, log) -> RunDirClaim:
    """Check the run directory and the logging backends, then, on global rank 0, take the run
    directory's lock: a second training on a busy run directory is refused before the model, the
    engine or the data are built. Rank 0 refuses alone, before any collective; the launcher
    (torchrun, srun --kill-on-bad-exit) stops the other ranks."""
    check_run_dir(cfg, resume)
    check_backends(cfg.logging)
    run_dir = cfg.train.run_dir
    created, lock = not os.path.isdir(run_dir), None
    if rendezvous_from_env().rank == 0:
        create_run_dir(run_dir)
        lock = run_lock.RunLock.acquire(run_dir, log)  # one writer per run directory, until the end
    return RunDirClaim(run_dir, resume, lock, created)


def trainer_state(step: int, loader, guard: DivergenceGuard, tokens_per_step: int) -> dict:
    """trainer.pt: everything besides the weights and the optimiser that a resume needs."""
    return {"step": step, "loader": loader.state_dict(), "tokens_per_step": tokens_per_step,
            "guard": guard.state_dict()}


class Trainer:
    """One training run. Built once (data, loader, checkpoints, logs, resume), then driven by
    train(): train_step() runs one optimizer step, after_step() logs, evaluates, saves and, on
    divergence, rewinds; finish() saves the last checkpoint, evaluates and writes the summary."""

    def __init__(self, cfg: Config, model: LoopedLM, engine: Engine, device: torch.device,
                 latest: Optional[str], log, hooks: TrainHooks, converted: Optional[list] = None):
        self.cfg, self.model, self.engine, self.device, self.log, self.hooks = cfg, model, engine, device, log, hooks
        self.converted = converted or []  # the linears that train in float8 (parallel.precision fp8)
        self.is_main = engine.is_main
        self.counts = count_params(cfg.model)
        self.budget = plan_budget(cfg, self.counts.flops_per_token, engine.dp_size)
        self.depth = DepthSampler(cfg.model, cfg.train.seed)  # r of each step: a pure function of (seed, step)
        self.data = ensure_prepared(cfg.data, cfg.model.vocab_size, log=log if self.is_main else (lambda *a: None))
        self.loader = PackedLoader([p for p, _ in self.data.train], [w for _, w in self.data.train], cfg.model.seq_len,
                                   cfg.train.micro_batch_size, cfg.train.seed, engine.dp_rank, engine.dp_size)
        self.guard = DivergenceGuard(cfg.train)
        self.checkpoints = ckpt.Checkpointer(cfg.train.run_dir, engine, cfg.train.keep_checkpoints,
                                             {"config": cfg.to_dict(), "n_once": self.counts.n_once}, hooks)
        self.step = 0
        if latest is not None:
            self.resume(latest)
        if self.is_main:
            save_config(cfg, os.path.join(cfg.train.run_dir, "config.yaml"))
            self.describe()
        self.metrics = MetricsLog(os.path.join(cfg.train.run_dir, "metrics.jsonl"),
                                  self.step if latest else -1, self.is_main)
        self.sinks = build_sinks(cfg.logging, cfg.train.run_dir, cfg.to_dict()) if self.is_main else []
        self.peak = cfg.logging.peak_flops or peak_flops(device, cfg.parallel.precision)
        self.stats: Optional[StepStats] = None
        self.lr = 0.0
        self.window: list[int] = []  # the draws of the steps since the last logged one
        self.start = time.perf_counter()
        self.last_time, self.last_tokens = self.start, self.step * self.budget.tokens_per_step
        self.bar = _progress(cfg, self.budget.steps, self.step, self.is_main)


    # ------------------------------------------------------------------ build
    def resume(self, latest: str) -> None:
        state = self.checkpoints.load(latest)
        saved_tps = state.get("tokens_per_step", self.budget.tokens_per_step)
        if saved_tps != self.budget.tokens_per_step:
            raise UserError(
                f"cannot resume: the run used {saved_tps:,} tokens per step and this launch gives "
                f"{self.budget.tokens_per_step:,} (micro_batch_size x grad_accum x seq_len x data-parallel size). "
                f"Set train.grad_accum or train.micro_batch_size so the global batch is unchanged")
        self.step = state["step"]
        self.loader.load_state_dict(state["loader"])
        self.guard.load_state_dict(state.get("guard"))
        self.log(f"resumed from {latest} at step {self.step}")

    def describe(self) -> None:
        c, b = self.counts, self.budget
        self.log(f"model: N_once={c.n_once:,} N_rec={c.n_rec:,} {describe(self.cfg.model)} "
                 f"embedding={c.embedding:,} head={c.head:,} FLOPs/token={c.flops_per_token:.3e}")
        self.log(f"budget: {b.steps} steps x {b.tokens_per_step:,} tokens = {b.tokens:,} tokens "
                 f"({b.tokens * c.flops_per_token:.3e} FLOPs) on {self.device}")
        if self.cfg.parallel.precision == "fp8":
            self.log(f"fp8: {len(self.converted)} linears in float8 (tensorwise scaling, "
                     f"{'emulated' if self.device.type != 'cuda' else 'torch._scaled_mm'}); head, injection, "
                     f"embedding and norms in bf16" + ("" if self.converted else
                                                       "; no block linear has both sizes >= 128, so none converts"))

    def trainer_state(self, step: int) -> dict:
        return trainer_state(step, self.loader, self.guard, self.budget.tokens_per_step)

    def valid(self):
        return eval_batches(self.data.valid, self.cfg.model.seq_len, self.cfg.train.micro_batch_size,
                            self.cfg.train.eval_tokens)

    # ------------------------------------------------------------------ the step
    def lr_factor(self, step: int) -> float:
        """The learning rate of step index `step`, as a factor of optim.lr (the schedule, then a
        rewind's temporary scale)."""
        o = self.cfg.optim
        return (lr_factor(step, self.budget.steps, o.warmup_steps, o.final_lr_frac, o.schedule, o.decay_frac)
                * self.guard.lr_scale(step))

    def train_step(self) -> StepStats:
        """One optimizer step at this step's drawn depth; returns its stats."""
        factor = self.lr_factor(self.step)
        batches = [self.loader.next_batch() for _ in range(self.cfg.train.grad_accum)]
        self.window.append(self.depth.draw(self.step + 1))
        with self.hooks.around_step(self.step + 1, self.model):
            stats = self.engine.train_step(batches, factor, num_recur=self.window[-1])
        self.step += 1
        self.lr = factor * self.cfg.optim.lr
        stats.loss = self.hooks.loss_seen(self.step, stats.loss)
        return stats

    def after_step(self, stats: StepStats) -> None:
        """What follows a step: the divergence guard (and a rewind), the log, eval and save."""
        self.stats = stats
        diverged = self.guard.observe(stats.loss, stats.skipped)
        if stats.skipped:
            self.log(f"step {self.step}: non-finite loss or gradient (loss={stats.loss}, grad_norm={stats.grad_norm}); "
                     f"update skipped ({self.guard.bad_in_a_row} in a row)")
        self.checkpoints.poll()  # a background save is published as soon as its writes are complete
        if diverged:
            self.rewind(diverged)
            return
        t, last = self.cfg.train, self.step == self.budget.steps
        if self.step % t.log_every == 0 or last:
            self.log_step(stats)
        if t.eval_every and self.step % t.eval_every == 0 and not last:
            self.metrics.write(dict(step=self.step, tokens=self.tokens, val_loss=self.engine.eval_loss(self.valid())))
        if t.save_every and self.step % t.save_every == 0 and not last:
            self.checkpoints.save(self.step, self.trainer_state(self.step), background=t.async_save)
        if self.step in t.save_at and not last:  # a branch point (budget branching): kept, never pruned
            self.checkpoints.save(self.step, self.trainer_state(self.step), root=ckpt.branch_points(t.run_dir))
        if self.bar is not None:
            self.bar.update(1)
        self.hooks.after_step(self.step)

    @property
    def tokens(self) -> int:
        return self.step * self.budget.tokens_per_step

    def log_step(self, stats: StepStats) -> None:
        now = time.perf_counter()
        tps = (self.tokens - self.last_tokens) / max(now - self.last_time, 1e-9)
        self.last_time, self.last_tokens = now, self.tokens
        rec = dict(step=self.step, tokens=self.tokens, loss=stats.loss, lr=self.lr, grad_norm=stats.grad_norm,
                   tokens_per_s=tps, mfu=mfu(tps, self.counts.flops_per_token, self.peak or 0.0),
                   skipped_steps=self.guard.skipped_total, elapsed_s=now - self.start, num_recur=self.window[-1])
        if self.depth.sampled and len(self.window) > 1:  # every step's draw, not only the logged one's
            rec["num_recur_window"] = self.window
        self.window = []
        self.metrics.write(rec)
        for sink in self.sinks:
            sink.log(rec, self.step)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{stats.loss:.3f}", tok_s=f"{tps:,.0f}")

    def rewind(self, why: str) -> None:
        """train.on_divergence: stop with an error, or go back to the last complete checkpoint with
        the loader left where it is (the batches since are skipped). The choice is persisted in
        that checkpoint's trainer.pt, so a resume from it continues exactly like this run."""
        cfg, guard, step = self.cfg, self.guard, self.step
        latest = self.checkpoints.latest()  # the one in flight may be the one to go back to
        if latest is None or not guard.can_rewind():
            if cfg.train.on_divergence == "stop":
                hint = "lower optim.lr or raise optim.warmup_steps and resume, or set train.on_divergence=rewind"
            elif latest is None:
                hint = "there is no checkpoint to rewind to yet: set train.save_every so that a run can rewind"
            else:
                hint = f"it rewound {guard.rewinds} times already (train.max_rewinds); lower optim.lr and resume"
            raise UserError(f"training diverged at step {step}: {why}. The last good checkpoint is intact "
                            f"({latest or 'none yet'}); {hint}")
        saved = self.checkpoints.load(latest)
        to = saved["step"]
        skipped = self.loader.global_samples - saved["loader"]["global_samples"]
        self.loader.discard_since(saved["loader"])  # the token ledger goes back with the weights
        guard.rewound(to, saved.get("guard"))
        self.checkpoints.rewrite_trainer_state(latest, self.trainer_state(to))
        self.metrics.truncate(to)
        self.metrics.write(dict(step=to, tokens=to * self.budget.tokens_per_step, event="rewind", rewind=guard.rewinds,
                                from_step=step, reason=why, skipped_samples=skipped,
                                lr_scale=cfg.train.rewind_lr_scale, lr_scale_until_step=guard.lr_until))
        self.log(f"step {step}: training diverged ({why}); rewind {guard.rewinds}/{cfg.train.max_rewinds}: back to "
                 f"step {to} ({latest}), skipping the {skipped} samples since")
        self.step = to
        self.last_time, self.last_tokens = time.perf_counter(), self.tokens
        self.window = []  # the rewound steps' draws are not logged (they are drawn again: same r)
        if self.bar is not None:
            self.bar.n = to
            self.bar.refresh()

    # ------------------------------------------------------------------ the end
    def finish(self) -> dict:
        """The last checkpoint (in the foreground), the final evaluation and summary.json."""
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        self.checkpoints.save(self.step, self.trainer_state(self.step))
        by_r = final_eval(self.cfg, self.engine, list(self.valid()), self.is_main)  # num_recur and train.eval_recur
        summary = self.summary(by_r)
        if self.is_main:
            summary["unigram_entropy"] = unigram_entropy(self.data.valid)
            ckpt.write_atomic(os.path.join(self.cfg.train.run_dir, "summary.json"),
                              json.dumps(summary, indent=2).encode())
        return summary

    def summary(self, by_r: dict) -> dict:
        cfg, m, c, b, depth = self.cfg, self.cfg.model, self.counts, self.budget, self.depth
        draws = depth.draws(1, b.steps)
        return dict(
            run=os.path.basename(os.path.normpath(cfg.train.run_dir)), n_once=c.n_once, n_rec=c.n_rec,
            r=m.num_recur, bptt_k=m.bptt_k, input_injection=m.input_injection,
            d_model=m.d_model, tokens=b.tokens, steps=b.steps,
            flops=realised_flops(m, draws, b.tokens_per_step), flops_per_token=c.flops_per_token,
            target_flops=cfg.train.target_flops, recur_sampling=m.recur_sampling.kind,
            r_expected=depth.mean_over_steps(np.arange(depth.max_r + 1), b.steps), r_mean=sum(draws) / max(len(draws), 1),
            r_hist={str(r): draws.count(r) for r in sorted(set(draws))},
            n_embedding=c.embedding, n_head=c.head, train_loss=self.stats.loss if self.stats else None,
            val_loss=by_r[str(m.num_recur)], val_loss_by_r=by_r, skipped_steps=self.guard.skipped_total,
            rewinds=self.guard.rewinds, wall_time_s=time.perf_counter() - self.start,
            peak_mem_mb=peak_memory_mb(self.device),
            # per rank: a sharded optimiser (ZeRO) holds each parameter's state on its owner only
            optim_state_bytes=[int(x) for x in self.engine.per_rank(optimizer_state_bytes(self.engine.optimizer))],
            tokens_by_dataset=self.loader.tokens_by_dataset(),  # the token ledger; sums to `tokens`
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        close_sinks(getattr(self, "sinks", []))


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
