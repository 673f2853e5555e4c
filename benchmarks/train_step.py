"""Training-step speed and memory of megaloop, printed as one JSON object.

    python benchmarks/train_step.py                       # the issue-8 shape (below), all sections
    python benchmarks/train_step.py --config CONFIG.yaml --set model.num_recur=8 --sections config
    python benchmarks/train_step.py --sections precision --steps 5 --out bench.json

Sections (all measured in ONE process, so their ratios hold on a noisy, shared machine):
  peak       the measured matmul peak (2048^3 products, megaloop.mfu; cached across runs) and,
             interleaved with the steps below, the same product re-measured every round;
  precision  fp32 eager, fp32 compiled, bf16 compiled at the given shape;
  checkpoint r = 8 with and without model.checkpoint_recurrence;
  bptt       bptt_k = r .. 1 at the given r (activation memory must fall with k);
  config     the given config exactly as it is (--config / --set);
  kernels    the given config with the fused kernels on (auto: Triton on CUDA) and off (torch),
             each eager and compiled, with the graph breaks dynamo recorded while compiling;
  fp8        the given config compiled in bf16 and in fp8 (parallel.precision, megaloop/fp8.py),
             side by side; the JSON names the kernel that ran the float8 products (the
             profiler's aten::_scaled_mm calls in one step, or torchao's CPU emulation);
  gemm       every matrix product of one step at its own shape (benchmarks/gemm_shapes.py): the
             FLOP-weighted rate those shapes reach, i.e. the matmul ceiling of this step, at the
             sidebyside r values; the side-by-side steps are also reported against it;
  sidebyside megaloop's fp32 eager and compiled steps against a plain looped GPT of the same shape
             (benchmarks/plain_gpt.py: torch ops, each block compiled, full logits +
             F.cross_entropy, torch.optim.AdamW), at r = 4 and r = 8 (--sidebyside-recur);
             reported as the median of per-round speed ratios, and as the fraction of the fp32
             matmul rate measured in the same rounds.
The default shape is d_model 256, 2 heads, 2 + 4 + 2 blocks, r = 4, seq_len 256, batch 8.

Timing: every variant of a section takes one step per round, round-robin, after a warm-up step
(compilation), so load from other processes hits all variants alike; the reported step time is
the median over rounds. tokens/s = batch tokens / step time; MFU uses the loop-aware FLOPs per
token of megaloop.accounting against (a) the start-up peak and (b) the in-run matmul median.

Memory (the JSON names the method): on CUDA torch.cuda.max_memory_allocated. On CPU, "saved" =
bytes autograd keeps for backward in one forward (saved_tensors_hooks, deduplicated by storage,
parameters excluded; an eager forward of the same model) + parameter, gradient and optimizer
state bytes; "rss" (--memory rss) = ru_maxrss growth of a fresh subprocess per variant over a few
steps (ru_maxrss is a high-water mark, hence one process per measurement).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional

import torch

from megaloop.accounting import count_params, flops_per_token
from megaloop.config import Config, load_config
from megaloop.parallel import Engine, autocast_for, local_engine
from megaloop.mfu import cpu_model, measure_matmul_flops, native_bf16_matmul, peak_flops
from megaloop.fp8 import convert_for_fp8, float8_config, kernel_name
from megaloop.train import build_model, compile_blocks

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gemm_shapes  # noqa: E402
from plain_gpt import PlainLoopedGPT, PlainTrainer  # noqa: E402 - the yardstick lives beside this file

SHAPE = ["model.d_model=256", "model.n_head=2", "model.n_kv_head=2", "model.vocab_size=4096",
         "model.seq_len=256", "model.n_prelude=2", "model.n_recur_block=4", "model.n_coda=2",
         "model.num_recur=4", "model.input_injection=linear", "train.micro_batch_size=8", "train.steps=1",
         "optim.name=adamw", "optim.lr=0.001"]
SECTIONS = ("peak", "precision", "checkpoint", "bptt", "config", "kernels", "fp8", "sidebyside", "gemm")


def base_config(path: Optional[str], overrides: list[str]) -> Config:
    """The benchmark shape, or the user's config; --set applies on top of either."""
    if path:
        return load_config(path, overrides + ["train.steps=1"])
    return load_config(None, SHAPE + overrides)


def with_sets(cfg: Config, sets: list[str]) -> Config:
    raw = cfg.to_dict()
    raw["optim"]["betas"] = list(raw["optim"]["betas"])
    return load_config(None, sets, raw=raw)


@dataclass
class Variant:
    name: str
    cfg: Config
    compiled: bool
    times: list[float] = field(default_factory=list)
    engine: Optional[Engine] = None
    batch: Optional[tuple[torch.Tensor, torch.Tensor]] = None
    warmup_s: float = 0.0
    losses: list[float] = field(default_factory=list)
    fp8_linears: list[str] = field(default_factory=list)

    def build(self, device: torch.device) -> None:
        model = build_model(self.cfg)
        self.fp8_linears = convert_for_fp8(model, self.cfg, device)  # precision fp8 only; before compiling
        if self.compiled:
            compile_blocks(model)
        self.engine = local_engine(self.cfg, model, device)
        self.batch = fixed_batch(self.cfg, device)

    def step(self) -> float:
        sync(self.engine.device)
        t0 = time.perf_counter()
        stats = self.engine.train_step([self.batch], 1.0)  # .item() inside: the step has finished
        sync(self.engine.device)
        self.losses.append(stats.loss)
        return time.perf_counter() - t0

    def release(self) -> None:
        self.engine = self.batch = None


class PlainVariant(Variant):
    """The plain looped GPT of benchmarks/plain_gpt.py at the same shape, optimizer settings and
    batch: the yardstick of the side-by-side section."""

    def build(self, device: torch.device) -> None:
        m, o = self.cfg.model, self.cfg.optim
        torch.manual_seed(self.cfg.train.seed)
        model = PlainLoopedGPT(m.vocab_size, m.d_model, m.n_head, m.seq_len, m.n_prelude, m.n_recur_block,
                               m.n_coda, m.num_recur, m.logit_softcap, m.norm_eps).to(device)
        self.engine = PlainTrainer(model, o.lr, o.betas, o.eps, o.grad_clip, self.compiled)
        self.engine.device = device
        self.batch = fixed_batch(self.cfg, device)

    def step(self) -> float:
        sync(self.engine.device)
        t0 = time.perf_counter()
        self.losses.append(self.engine.step(*self.batch))  # .item() inside: the step has finished
        sync(self.engine.device)
        return time.perf_counter() - t0


def fixed_batch(cfg: Config, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    m, t = cfg.model, cfg.train
    x = torch.randint(0, m.vocab_size, (t.micro_batch_size, m.seq_len), generator=g)
    return x.to(device), torch.roll(x, -1, 1).to(device)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- memory

def saved_activation_bytes(cfg: Config, model: torch.nn.Module, batch, device: torch.device) -> int:
    """Bytes autograd keeps alive for backward in one forward, parameters excluded.

    Storages are deduplicated (views and tensors saved by several ops count once). Under
    non-reentrant checkpointing the inner hooks take precedence, so tensors a checkpointed pass
    would drop are not seen here, which is the point; each pass's input, which checkpointing
    must keep, is saved by the ops around the pass and is seen.
    """
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor):
        st = t.untyped_storage()
        if st.data_ptr() not in params:
            seen[st.data_ptr()] = st.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast_for(cfg, device):
        loss = model(*batch)
    del loss
    return sum(seen.values())


def state_bytes(engine: Engine) -> dict[str, int]:
    params = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    opt = sum(v.numel() * v.element_size() for s in engine.optimizer.state.values()
              for v in s.values() if torch.is_tensor(v))
    return {"params": params, "grads": params, "optimizer_state": opt}


def fwd_bwd_peak_bytes(v: Variant, device: torch.device) -> int:
    """Peak bytes allocated during one forward + backward of the variant's own model, above what
    was allocated before it (so: activations, transients and the gradients; not the parameters
    or optimizer state). CUDA: torch.cuda.max_memory_allocated. CPU: the allocation events of
    torch.profiler(profile_memory=True), summed in time order (slow: ~10-60 s per variant)."""
    model = v.engine.model
    model.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with autocast_for(v.cfg, device):
            loss = model(*v.batch)
        loss.backward()
        del loss
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - base
    else:
        from torch.profiler import ProfilerActivity, profile
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            with autocast_for(v.cfg, device):
                loss = model(*v.batch)
            loss.backward()
            del loss
        events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                        if e.name() == "[memory]")
        live = peak = 0
        for _, n in events:
            live += n
            peak = max(peak, live)
    model.zero_grad(set_to_none=True)
    return peak


def measure_memory(v: Variant, method: str, device: torch.device, alloc: bool = False) -> dict:
    """alloc: also the measured fwd+bwd allocation peak (fwd_bwd_peak_bytes); always on CUDA."""
    if device.type == "cuda":
        peak = fwd_bwd_peak_bytes(v, device)
        states = state_bytes(v.engine)
        return {"method": "torch.cuda.max_memory_allocated over one fwd+bwd, minus what was allocated before",
                "fwd_bwd_peak_bytes": peak, **{f"{k}_bytes": b for k, b in states.items()},
                "peak_bytes": peak + states["params"] + states["optimizer_state"]}
    if method == "rss":
        return rss_in_subprocess(v)
    eager = build_model(v.cfg).to(device)  # compiled graphs would hide their saves from the hooks
    convert_for_fp8(eager, v.cfg, device)
    act = saved_activation_bytes(v.cfg, eager, v.batch, device)
    states = state_bytes(v.engine)
    out = {"method": "saved_tensors_hooks+params+grads+optimizer_state", "activation_bytes": act,
           **{f"{k}_bytes": b for k, b in states.items()}, "peak_bytes": act + sum(states.values())}
    if alloc:
        out["fwd_bwd_peak_bytes"] = fwd_bwd_peak_bytes(v, device)
        out["fwd_bwd_peak_method"] = "torch.profiler allocation events over one fwd+bwd (activations + grads)"
    return out


def rss_in_subprocess(v: Variant) -> dict:
    """ru_maxrss growth of a fresh process over build + 2 steps of this variant."""
    spec = json.dumps({"sets": flat_sets(v.cfg), "compiled": v.compiled})
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", spec],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def flat_sets(cfg: Config) -> list[str]:
    out = []
    for sec, vals in cfg.to_dict().items():
        if isinstance(vals, dict):
            out += [f"{sec}.{k}={json.dumps(list(v) if isinstance(v, tuple) else v)}" for k, v in vals.items()]
        else:
            out.append(f"{sec}={json.dumps(vals)}")
    return out


def child(spec_json: str) -> None:
    spec = json.loads(spec_json)
    cfg = load_config(None, spec["sets"])
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    v = Variant("child", cfg, spec["compiled"])
    v.build(torch.device("cpu"))
    for _ in range(2):
        v.step()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"method": "ru_maxrss delta, fresh subprocess", "peak_bytes": (after - before) * 1024}))


# ----------------------------------------------------------------------------- timing

def run_section(variants: list[Variant], steps: int, device: torch.device, memory: str,
                matmul_rounds: Optional[list[float]] = None, log=print, alloc: bool = False,
                keep_going: bool = False, before_release=None) -> list[dict]:
    """keep_going: a variant that fails to build or warm up is reported with its error and left
    out, instead of ending the run (the GPU suite's kernels section: one broken path must not
    hide the other's figures). before_release(v): extra fields for a variant's row."""
    failed = []
    for v in list(variants):
        try:
            v.build(device)
            t0 = time.perf_counter()
            v.step()  # warm-up: compilation, allocator, optimizer state
            v.warmup_s = time.perf_counter() - t0
        except Exception as exc:  # noqa: BLE001 - reported in the JSON
            if not keep_going:
                raise
            msg = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}"
            failed.append({"name": v.name, "error": msg})
            variants.remove(v)
            v.release()
            log(f"  {v.name}: FAILED {msg}")
            continue
        log(f"  {v.name}: warm-up {v.warmup_s:.1f}s")
    for rnd in range(steps):
        for v in variants:
            v.times.append(v.step())
        if matmul_rounds is not None:
            matmul_rounds.append(measure_matmul_flops(torch.float32, reps=1))
        log(f"  round {rnd + 1}/{steps}: " + ", ".join(f"{v.name} {v.times[-1]:.2f}s" for v in variants))
    out = []
    for v in variants:
        mem = measure_memory(v, memory, device, alloc)
        out.append({**report(v, mem), **(before_release(v) if before_release else {})})
        v.release()
    return out + failed


def run_side_by_side(cfg: Config, steps: int, recurs: list[int], device: torch.device, log=print) -> dict:
    """megaloop's fp32 eager and compiled steps against the plain looped GPT, at each r.

    All four variants of one r live in one process and step round-robin, the order rotated every
    round so that none always runs right after the matmul probe; a 2048^3 fp32 matmul is timed
    after every round. A ratio is formed per round (plain step time / megaloop step time, so
    > 1 means megaloop is faster) and the median over rounds is reported: load from other
    processes moves both members of a round together, where it would move single timings apart.
    """
    out: dict = {}
    for r in recurs:
        base = with_sets(cfg, [f"model.num_recur={r}", "model.bptt_k=null", "parallel.precision=fp32"])
        vs = [PlainVariant("plain_compiled", base, True), Variant("megaloop_compiled", base, True),
              PlainVariant("plain_eager", base, False), Variant("megaloop_eager", base, False)]
        log(f"sidebyside: r={r}")
        for v in vs:
            v.build(device)
            t0 = time.perf_counter()
            v.step()  # warm-up: compilation, optimizer state
            v.warmup_s = time.perf_counter() - t0
            log(f"  {v.name}: warm-up {v.warmup_s:.1f}s")
        matmul: list[float] = []
        for rnd in range(steps):
            k = rnd % len(vs)
            for v in vs[k:] + vs[:k]:
                v.times.append(v.step())
            matmul.append(measure_matmul_flops(torch.float32, reps=1) if device.type == "cpu" else float("nan"))
            log(f"  round {rnd + 1}/{steps}: " + ", ".join(f"{v.name} {v.times[-1]:.2f}s" for v in vs))
        rows = {v.name: report(v, {"method": "not measured"}) for v in vs}
        for v in vs:
            v.release()
        pc, mc, pe, me = (rows[n]["step_s_all"] for n in ("plain_compiled", "megaloop_compiled",
                                                          "plain_eager", "megaloop_eager"))
        tokens = base.train.micro_batch_size * base.model.seq_len
        fpt = flops_per_token(base.model)
        frac = [tokens * fpt / t / mm for t, mm in zip(mc, matmul)]
        out[f"r{r}"] = {
            "rows": list(rows.values()),
            "compiled_over_plain_compiled": statistics.median(p / m for p, m in zip(pc, mc)),
            "eager_over_plain_eager": statistics.median(p / m for p, m in zip(pe, me)),
            "eager_over_plain_compiled": statistics.median(p / m for p, m in zip(pc, me)),
            "plain_compiled_over_plain_eager": statistics.median(p / m for p, m in zip(pe, pc)),
            "megaloop_compiled_frac_of_in_run_fp32_matmul": statistics.median(frac) if device.type == "cpu" else None,
            "plain_compiled_frac_of_in_run_fp32_matmul": (statistics.median(
                tokens * fpt / t / mm for t, mm in zip(pc, matmul)) if device.type == "cpu" else None),
            "matmul_fp32_per_round": matmul,
        }
        log(f"  r={r}: compiled {out[f'r{r}']['compiled_over_plain_compiled']:.3f}x plain compiled, "
            f"eager {out[f'r{r}']['eager_over_plain_eager']:.3f}x plain eager, "
            f"{out[f'r{r}']['megaloop_compiled_frac_of_in_run_fp32_matmul'] or float('nan'):.3f} of the matmul rate")
    return out


def fp8_kernel(v: Variant, device: torch.device) -> dict:
    """Which kernel ran the float8 products of one more step of `v`: aten::_scaled_mm when the
    profiler saw it, else torchao's emulation when the config asked for it."""
    if v.cfg.parallel.precision != "fp8":
        return {}
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        v.step()
    calls = sum(e.count for e in prof.key_averages() if e.key == "aten::_scaled_mm")
    planned = kernel_name(float8_config(device))
    ran = "torch._scaled_mm" if calls else (planned if "emulated" in planned else "none seen")
    return {"fp8_linears": len(v.fp8_linears), "fp8_kernel": ran, "scaled_mm_calls_per_step": calls}


def report(v: Variant, mem: dict) -> dict:
    m, t = v.cfg.model, v.cfg.train
    tokens = t.micro_batch_size * m.seq_len
    step_s = statistics.median(v.times)
    fpt = flops_per_token(m)
    return {"name": v.name, "precision": v.cfg.parallel.precision, "compiled": v.compiled,
            "num_recur": m.num_recur, "bptt_k": m.bptt_k, "checkpoint_recurrence": m.checkpoint_recurrence,
            "step_s_median": step_s, "step_s_all": v.times, "warmup_s": v.warmup_s,
            "tokens_per_s": tokens / step_s, "flops_per_token": fpt,
            "achieved_flops": tokens * fpt / step_s, "loss_last": v.losses[-1], "memory": mem}


def add_mfu(rows: list[dict], peaks: dict[str, float], in_run_fp32: Optional[float]) -> None:
    for row in rows:
        if "error" in row:
            continue
        peak = peaks[row["precision"]]
        row["mfu"] = row["achieved_flops"] / peak if peak else None
        if in_run_fp32:
            row["frac_of_in_run_fp32_matmul"] = row["achieved_flops"] / in_run_fp32


def main(argv: Optional[list[str]] = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--config", help="YAML config (default: the built-in benchmark shape)")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override")
    ap.add_argument("--sections", default="peak,precision,checkpoint,bptt,sidebyside",
                    help=f"comma-separated subset of {','.join(SECTIONS)}")
    ap.add_argument("--steps", type=int, default=3, help="timed rounds per section (after one warm-up)")
    ap.add_argument("--memory", choices=("saved", "rss"), default="saved", help="CPU peak-memory method")
    ap.add_argument("--checkpoint-recur", type=int, default=8, help="r of the checkpoint section")
    ap.add_argument("--bptt-long-recur", type=int, default=8, help="r of the bptt section's full vs k=2 pair")
    ap.add_argument("--sidebyside-recur", default="4,8", help="r values of the sidebyside section")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch default)")
    ap.add_argument("--out", help="also write the JSON here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args.child)
        return {}
    if args.threads:
        torch.set_num_threads(args.threads)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        ap.error(f"unknown section {bad[0]!r}; choose from {', '.join(SECTIONS)}")
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731 - stdout is the JSON
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = base_config(args.config, args.set)
    m = cfg.model
    result: dict = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_model(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "native_bf16_matmul": native_bf16_matmul() if device.type == "cpu" else True,
        "shape": {"d_model": m.d_model, "n_head": m.n_head, "blocks": [m.n_prelude, m.n_recur_block, m.n_coda],
                  "num_recur": m.num_recur, "seq_len": m.seq_len, "batch": cfg.train.micro_batch_size,
                  "vocab_size": m.vocab_size, "optimizer": cfg.optim.name},
        "flops_per_token": flops_per_token(m), "params": count_params(m).as_dict(), "steps": args.steps,
        "timing": "median of interleaved rounds after one warm-up step",
    }
    log("measuring matmul peaks")
    peaks = {p: peak_flops(device, p) for p in ("fp32", "bf16", "fp8")}  # fp8: the bf16 peak (megaloop.mfu)
    result["peak_flops"] = peaks
    in_run: list[float] = []
    if device.type == "cpu" and "peak" in sections:
        result["matmul_2048_fp32_fresh"] = measure_matmul_flops(torch.float32)
    track = in_run if (device.type == "cpu" and "peak" in sections) else None

    if "precision" in sections:
        log("precision: fp32 eager, fp32 compiled, bf16 compiled")
        variants = [Variant("fp32_eager", cfg, False), Variant("fp32_compiled", cfg, True),
                    Variant("bf16_compiled", with_sets(cfg, ["parallel.precision=bf16"]), True)]
        result["precision"] = run_section(variants, args.steps, device, args.memory, track, log)
    if "checkpoint" in sections:
        r = args.checkpoint_recur
        log(f"checkpoint: r={r} with and without checkpoint_recurrence")
        base = with_sets(cfg, [f"model.num_recur={r}", "model.bptt_k=null"])
        variants = [Variant(f"r{r}_plain", base, False),
                    Variant(f"r{r}_checkpointed", with_sets(base, ["model.checkpoint_recurrence=true"]), False)]
        result["checkpoint"] = run_section(variants, args.steps, device, args.memory, track, log)
    if "bptt" in sections:
        log(f"bptt: k = {m.num_recur} .. 1 at r={m.num_recur}")
        variants = [Variant(f"bptt_k{k}", with_sets(cfg, [f"model.bptt_k={k}"]), False)
                    for k in range(m.num_recur, 0, -1)]
        result["bptt"] = run_section(variants, args.steps, device, args.memory, track, log)
        r8 = args.bptt_long_recur
        log(f"bptt: r={r8}, full backprop and bptt_k=2")
        long = with_sets(cfg, [f"model.num_recur={r8}"])
        variants = [Variant(f"r{r8}_full", with_sets(long, ["model.bptt_k=null"]), False),
                    Variant(f"r{r8}_bptt_k2", with_sets(long, ["model.bptt_k=2"]), False)]
        result["bptt_long"] = run_section(variants, args.steps, device, args.memory, track, log, alloc=True)
    if "config" in sections:
        log("config: as given")
        result["config"] = run_section([Variant("config", cfg, cfg.train.compile)], args.steps, device,
                                       args.memory, track, log)

    if "kernels" in sections:
        from torch._dynamo.utils import counters
        log("kernels: on (auto) and off (torch), eager and compiled")
        counters.clear()
        variants = [Variant(f"kernels_{tag}_{'compiled' if c else 'eager'}", with_sets(cfg, [f"kernels={k}"]), c)
                    for c in (True, False) for tag, k in (("on", "auto"), ("off", "torch"))]
        result["kernels"] = run_section(variants, args.steps, device, args.memory, track, log, keep_going=True)
        result["kernels_graph_breaks"] = {k: int(v) for k, v in counters["graph_break"].items()}
    if "fp8" in sections:
        log("fp8: bf16 and fp8, compiled")
        variants = [Variant("bf16_compiled", with_sets(cfg, ["parallel.precision=bf16"]), True),
                    Variant("fp8_compiled", with_sets(cfg, ["parallel.precision=fp8"]), True)]
        result["fp8"] = run_section(variants, args.steps, device, args.memory, track, log, keep_going=True,
                                    before_release=lambda v: fp8_kernel(v, device))
    if "sidebyside" in sections:
        result["sidebyside"] = run_side_by_side(cfg, args.steps, [int(r) for r in args.sidebyside_recur.split(",")],
                                                device, log)

    if "gemm" in sections:
        result["gemm"] = {}
        for r in [int(r) for r in args.sidebyside_recur.split(",")]:
            log(f"gemm: the step's matrix products at their own shapes, r={r}")
            result["gemm"][f"r{r}"] = gemm_shapes.measure(with_sets(cfg, [f"model.num_recur={r}"]), args.steps)

    in_run_median = statistics.median(in_run) if in_run else None
    result["matmul_fp32_in_run"] = {"median": in_run_median, "all": in_run} if in_run else None
    for sec in ("precision", "checkpoint", "bptt", "bptt_long", "config", "kernels", "fp8"):
        if sec in result:
            add_mfu(result[sec], peaks, in_run_median)
    result["ratios"] = ratios(result)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")
    return result


def ratios(result: dict) -> dict:
    """The issue's targets, each a ratio of two figures measured in this one run."""
    out: dict = {}
    prec = {row["name"]: row for row in result.get("precision", [])}
    if "fp32_compiled" in prec:
        fc = prec["fp32_compiled"]
        out["fp32_compiled_over_matmul_peak"] = fc["mfu"]
        out["fp32_compiled_over_in_run_matmul"] = fc.get("frac_of_in_run_fp32_matmul")
        out["fp32_compiled_over_eager"] = fc["tokens_per_s"] / prec["fp32_eager"]["tokens_per_s"]
        if "bf16_compiled" in prec:
            out["bf16_compiled_over_fp32_compiled"] = prec["bf16_compiled"]["tokens_per_s"] / fc["tokens_per_s"]
    ck = result.get("checkpoint", [])
    if len(ck) == 2:
        out["checkpoint_activation_memory_ratio"] = ratio_of(ck[1], ck[0], "activation_bytes")
        out["checkpoint_peak_memory_ratio"] = ratio_of(ck[1], ck[0], "peak_bytes")
        out["checkpoint_time_ratio"] = ck[1]["step_s_median"] / ck[0]["step_s_median"]
    f8 = {row["name"]: row for row in result.get("fp8", []) if "error" not in row}
    if "bf16_compiled" in f8 and "fp8_compiled" in f8:
        out["fp8_over_bf16_compiled"] = f8["fp8_compiled"]["tokens_per_s"] / f8["bf16_compiled"]["tokens_per_s"]
    kern = {row["name"]: row for row in result.get("kernels", []) if "error" not in row}
    for mode in ("compiled", "eager"):
        on, off = kern.get(f"kernels_on_{mode}"), kern.get(f"kernels_off_{mode}")
        if on and off:
            out[f"kernels_on_over_off_{mode}"] = on["tokens_per_s"] / off["tokens_per_s"]
            out[f"kernels_on_{mode}_mfu"] = on["mfu"]
    for key, sb in result.get("sidebyside", {}).items():
        out[f"sidebyside_{key}_compiled_over_plain_compiled"] = sb["compiled_over_plain_compiled"]
        out[f"sidebyside_{key}_eager_over_plain_eager"] = sb["eager_over_plain_eager"]
        out[f"sidebyside_{key}_frac_of_in_run_fp32_matmul"] = sb["megaloop_compiled_frac_of_in_run_fp32_matmul"]
        g = result.get("gemm", {}).get(key)
        if g:  # the step against the ceiling its own product shapes set
            rows = {row["name"]: row for row in sb["rows"]}
            out[f"gemm_{key}_step_products_over_2048"] = g["step_products_over_2048"]
            for name in ("megaloop_compiled", "plain_compiled"):
                out[f"sidebyside_{key}_{name}_frac_of_step_products_rate"] = (
                    rows[name]["achieved_flops"] / g["step_products_rate"])
    bp = result.get("bptt", [])
    if bp:
        mem = [row["memory"].get("activation_bytes", row["memory"]["peak_bytes"]) for row in bp]
        out["bptt_memory_falls_with_k"] = all(a > b for a, b in zip(mem, mem[1:]))
    bl = result.get("bptt_long", [])
    if len(bl) == 2:  # truncated (k = 2) over full backprop at the long r: target <= 0.35
        full, k2 = bl
        r = full["num_recur"]
        out[f"bptt_r{r}_k2_activation_memory_ratio"] = ratio_of(k2, full, "activation_bytes")
        out[f"bptt_r{r}_k2_fwd_bwd_peak_ratio"] = ratio_of(k2, full, "fwd_bwd_peak_bytes")
        g = full["memory"].get("grads_bytes")
        if g is not None and full["memory"].get("fwd_bwd_peak_bytes"):  # the peak less the gradients
            out[f"bptt_r{r}_k2_fwd_bwd_peak_less_grads_ratio"] = (
                (k2["memory"]["fwd_bwd_peak_bytes"] - g) / (full["memory"]["fwd_bwd_peak_bytes"] - g))
        out[f"bptt_r{r}_k2_time_ratio"] = k2["step_s_median"] / full["step_s_median"]
    return out


def ratio_of(a: dict, b: dict, key: str) -> Optional[float]:
    x, y = a["memory"].get(key), b["memory"].get(key)
    return x / y if x is not None and y else None


if __name__ == "__main__":
    with contextlib.suppress(BrokenPipeError):
        main()
