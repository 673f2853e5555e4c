"""`megaloop sweep plan`: expand a sweep into resolved run configs and a manifest.

DIR/manifest.json   {"format", "name", "sources", "workdir", "runs": [row, ...]}
DIR/manifest.csv    the same rows, one per run (MANIFEST_COLUMNS)
DIR/sweep.yaml      the merged sweep file(s), for provenance
DIR/runs/NAME/config.yaml   a full megaloop config with train.target_flops = budget

Every run config is built and validated (load_config) before anything is written, so a bad sweep
leaves DIR untouched. Planning again into the same DIR is a no-op for unchanged runs; runs that
already started must keep their config (else their checkpoints would describe another experiment).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Optional

import yaml

from ..accounting import count_params, tokens_for_budget
from ..config import Config, ConfigError, load_config, save_config
from .spec import SweepSpec, merge

MANIFEST_FORMAT = 1
MANIFEST_COLUMNS = ("run", "variant", "r", "size", "d_model", "n_head", "n_recur_block", "bptt_k",
                    "input_injection", "n_once", "n_rec", "flops_per_token", "tokens", "target_flops",
                    "tokens_per_step", "steps", "gpus", "seed", "config",
                    "branch_from", "branch_step", "save_at_steps", "spent_flops")  # the last four: branching
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")
# What makes two run configs the same experiment: the keys a launch may change (run_dir, threads,
# progress, device, logging, ...) are left out, so replanning a started run is not refused for them.
EXPERIMENT_KEYS = ("model", "optim", "data", "kernels", "parallel.precision", "train.target_flops",
                   "train.micro_batch_size", "train.grad_accum", "train.seed")


@dataclass
class PlannedRun:
    run: str
    variant: str
    r: int
    size: int
    seed: int                  # train.seed: initialisation and data order
    d_model: int
    n_head: int
    n_recur_block: int
    bptt_k: Optional[int]
    input_injection: str
    n_once: int
    n_rec: int
    flops_per_token: float
    tokens: int                # budget / FLOPs per token (floored)
    target_flops: float
    tokens_per_step: int       # micro_batch x grad_accum x seq_len x data-parallel size
    steps: int
    gpus: int
    config: str                # runs/NAME/config.yaml, relative to the sweep directory
    cfg: Config = field(repr=False, compare=False, default=None)  # type: ignore[assignment]
    # budget branching (megaloop/sweep/branch.py): the trunk this run decays from and the step it
    # leaves it at; a trunk's kept branch points ("s1;s2"); the FLOPs the run itself spends
    branch_from: Optional[str] = None
    branch_step: Optional[int] = None
    save_at_steps: str = ""
    spent_flops: Optional[float] = None

    def row(self) -> dict:
        d = asdict(self)
        d.pop("cfg")
        return d


def flops_tag(flops: float) -> str:
    """4.64e17 -> '4.64e17', 1e18 -> '1e18': short, and safe in file names."""
    return f"{flops:.3g}".replace("e+", "e").replace("e0", "e")


def width(size: int, multiple: int, round_to: int) -> int:
    return int(math.ceil(multiple * size / round_to) * round_to)


def expand(spec: SweepSpec, out_dir: str) -> list[PlannedRun]:
    """Every run of the sweep, resolved and validated; raises ConfigError before any write."""
    g = spec.grid
    runs: list[PlannedRun] = []
    origin: dict[str, str] = {}
    for variant in spec.variants:
        if not NAME_RE.match(variant.name):
            raise ConfigError(f"variant name {variant.name!r}: use letters, digits, '.', '_', '-' only")
        base = merge(spec.base, variant.overrides)
        for r in g.r:
            if variant.r is not None and r not in variant.r:
                continue
            if r == 1 and variant.r1_from is not None:
                continue  # its r = 1 cells are another variant's runs (sweep collect lists them)
            if g.total_recur_depth % r:
                raise ConfigError(f"grid.total_recur_depth={g.total_recur_depth} is not divisible by r={r}: "
                                  f"every r needs a whole number of recurrent blocks (16 / r)")
            for budget in g.budgets:
                if variant.budgets is not None and budget.flops not in variant.budgets:
                    continue
                for size, seed in ((z, sd) for z in budget.sizes for sd in spec.seeds_for(budget)):
                    run = _plan_one(spec, variant, base, r, budget.flops, size, out_dir, seed)
                    where = f"variant {variant.name}, r={r}, size {size}, budget {budget.flops:g}, seed {run.seed}"
                    if run.run in origin:
                        raise ConfigError(
                            f"duplicate run name {run.run!r}: made by {origin[run.run]} and by {where}. "
                            f"Make name_format ({spec.name_format!r}) tell them apart, e.g. with "
                            f"{{variant}}, {{r}}, {{size}} and {{flops_tag}}")
                    origin[run.run] = where
                    runs.append(run)
    if spec.select is not None:
        runs = select_runs(spec, runs)
    if not runs:
        raise ConfigError(f"{spec.source}: the sweep has no runs (check the variants' r and budgets)")
    if getattr(spec, "branching", False):
        from .branch import assign
        old = read_manifest(out_dir)["runs"] if os.path.isfile(manifest_path(out_dir)) else []
        assign(spec, runs, old)
    if spec.seeds is not None or all(b.seeds for b in g.budgets):
        # Seed-major order (`sweep run` follows the manifest): a sweep stopped part-way leaves whole
        # replicates of the design, first seed first, each from the cheapest budget up.
        budget_index = {b.flops: i for i, b in enumerate(g.budgets)}
        seed_rank = {(b.flops, s): k for b in g.budgets for k, s in enumerate(spec.seeds_for(b))}
        runs.sort(key=lambda run: (seed_rank[(run.target_flops, run.seed)], budget_index[run.target_flops]))
    return runs


def select_runs(spec: SweepSpec, runs: list[PlannedRun]) -> list[PlannedRun]:
    """The runs `select:` names, in the grid's order; a name that matches no grid run is an error."""
    def key(variant, r, size, flops):
        return (variant, int(r), int(size), float(f"{float(flops):.6g}"))
    wanted = {}
    for i, sel in enumerate(spec.select):
        wanted.setdefault(key(sel["variant"], sel["r"], sel["size"], sel["flops"]), []).append((i, sel.get("seed")))
    keep, matched = [], set()
    for run in runs:
        for i, seed in wanted.get(key(run.variant, run.r, run.size, run.target_flops), []):
            if seed is None or seed == run.seed:
                keep.append(run)
                matched.add(i)
                break
    missing = [i for i in range(len(spec.select)) if i not in matched]
    if missing:
        sel = spec.select[missing[0]]
        raise ConfigError(f"{spec.source}: select[{missing[0]}] = {sel} is not a run of the grid (check its variant, "
                          f"r, size and flops against grid: and variants:)")
    return keep


def _plan_one(spec: SweepSpec, variant, base: dict, r: int, flops: float, size: int, out_dir: str,
              seed: Optional[int] = None) -> PlannedRun:
    g = spec.grid
    d = width(size, g.width_multiple, g.round_to)
    if d % g.head_dim:
        raise ConfigError(
            f"size {size} gives d_model = {g.width_multiple} x {size} rounded up to {g.round_to} = {d}, which "
            f"is not divisible by grid.head_dim={g.head_dim}. Make grid.round_to a multiple of the head dim")
    injection = g.input_injection_r1 if (r == 1 and g.input_injection_r1) else g.input_injection
    model = dict(d_model=d, n_head=d // g.head_dim, n_kv_head=d // g.head_dim, head_dim=None,
                 n_prelude=g.n_prelude, n_recur_block=variant.recur_blocks or g.total_recur_depth // r,
                 n_coda=g.n_coda,
                 num_recur=r, bptt_k=variant.k_for(r), input_injection=injection)
    model.update(variant.model_for(r))
    fields = dict(variant=variant.name, r=r, size=size, d_model=d, flops=flops, flops_tag=flops_tag(flops),
                  k=model["bptt_k"] if model["bptt_k"] is not None else "full", sweep=spec.name, seed=seed)
    try:
        name = spec.name_format.format(**fields)
    except (KeyError, IndexError, ValueError) as e:
        raise ConfigError(f"name_format {spec.name_format!r} is invalid ({e}); it may use "
                          f"{', '.join('{' + k + '}' for k in fields)}") from None
    if not NAME_RE.match(name):
        raise ConfigError(f"run name {name!r} (from name_format) may only hold letters, digits, '.', '_', '+', '-'")
    run_dir = os.path.abspath(os.path.join(out_dir, "runs", name))
    train = {"target_flops": flops, "run_dir": run_dir}
    if seed is not None:
        train["seed"] = seed
    if g.test_time_recur:
        train["eval_recur"] = list(range(1, g.test_time_recur * r + 1))
    raw = merge(base, {"model": model, "train": train})
    cfg = _load_run(name, raw)
    if cfg.model.recur_sampling.sampled:  # the r its fit-table rows are read at (sweep collect)
        from ..depth import law_recurrences
        eval_r = sorted(set(law_recurrences(cfg.model, g.r)) | set(cfg.train.eval_recur))
        cfg = _load_run(name, merge(raw, {"train": {"eval_recur": eval_r}}))
    counts = count_params(cfg.model)
    p = cfg.parallel
    if spec.resources.gpus % (p.tp * p.pp):
        raise ConfigError(f"resources.gpus={spec.resources.gpus} is not divisible by parallel.tp x parallel.pp "
                          f"= {p.tp * p.pp}")
    dp = spec.resources.gpus // (p.tp * p.pp)
    tps = cfg.train.micro_batch_size * cfg.train.grad_accum * cfg.model.seq_len * dp
    tokens = (int(tokens_for_budget(cfg.model, flops, tps)) if cfg.model.recur_sampling.sampled  # in expectation
              else counts.tokens_for(flops))
    if tokens < tps:
        raise ConfigError(
            f"run {name}: budget {flops:g} FLOPs buys {tokens:,} tokens at {counts.flops_per_token:.4g} FLOPs/token, "
            f"less than one step ({tps:,} tokens = micro_batch_size x grad_accum x seq_len x {dp} data-parallel "
            f"ranks). Raise the budget, drop size {size} from it, or shrink the batch")
    return PlannedRun(
        run=name, variant=variant.name, r=r, size=size, seed=cfg.train.seed, d_model=d, n_head=cfg.model.n_head,
        n_recur_block=cfg.model.n_recur_block, bptt_k=cfg.model.bptt_k, input_injection=cfg.model.input_injection,
        n_once=counts.n_once, n_rec=counts.n_rec, flops_per_token=counts.flops_per_token, tokens=tokens,
        target_flops=flops, tokens_per_step=tps, steps=tokens // tps, gpus=spec.resources.gpus,
        config=os.path.join("runs", name, "config.yaml"), cfg=cfg)


def _load_run(name: str, raw: dict) -> Config:
    try:
        return load_config(raw=raw)
    except ConfigError as e:
        raise ConfigError(f"run {name}: {e}") from None


# ----------------------------------------------------------------------------- manifest

def manifest_path(sweep_dir: str) -> str:
    return os.path.join(sweep_dir, "manifest.json")


def read_manifest(sweep_dir: str) -> dict:
    """The manifest of a planned sweep directory; UserError-style ConfigError when it is not one."""
    path = manifest_path(sweep_dir)
    if not os.path.isfile(path):
        raise ConfigError(f"{sweep_dir} is not a planned sweep (no manifest.json). "
                          f"Plan one first: megaloop sweep plan SWEEP.yaml --out {sweep_dir}")
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"{path} is unreadable ({e}); plan the sweep again") from None
    if data.get("format") != MANIFEST_FORMAT or not isinstance(data.get("runs"), list):
        raise ConfigError(f"{path} is not a megaloop sweep manifest (format {MANIFEST_FORMAT}); plan the sweep again")
    return data


def _write_atomic(path: str, text: str) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def manifest_csv(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(MANIFEST_COLUMNS), lineterminator="\n")
    w.writeheader()
    for row in rows:
        w.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in MANIFEST_COLUMNS})
    return buf.getvalue()


def _experiment(cfg_dict: dict) -> dict:
    """The part of a config that defines the experiment (EXPERIMENT_KEYS), JSON-normalised."""
    d = json.loads(json.dumps(cfg_dict, default=list))
    out = {}
    for key in EXPERIMENT_KEYS:
        section, _, sub = key.partition(".")
        value = d.get(section)
        out[key] = value.get(sub) if sub and isinstance(value, dict) else value
    out["data"] = {k: v for k, v in (out["data"] or {}).items() if k != "workers"}
    return out


def _started(run_dir: str) -> bool:
    return os.path.isfile(os.path.join(run_dir, "summary.json")) or os.path.isdir(os.path.join(run_dir, "checkpoints"))


def write_plan(spec: SweepSpec, runs: list[PlannedRun], out_dir: str, append: bool = False) -> dict:
    """Write configs and manifest. All conflicts are found before the first write."""
    old_rows: list[dict] = []
    old: dict = {}
    sources, name = [spec.source], spec.name
    if os.path.isfile(manifest_path(out_dir)):
        old = read_manifest(out_dir)
        old_rows, sources = old["runs"], list(dict.fromkeys(old.get("sources", []) + [spec.source]))
        name = old.get("name") or name  # appending a probe keeps the sweep's name
        new_names = {r.run for r in runs}
        stale = [row["run"] for row in old_rows if row["run"] not in new_names]
        if stale and not append:
            raise ConfigError(
                f"{out_dir} already holds a sweep with {len(stale)} run(s) this plan does not have (e.g. {stale[0]}). "
                f"Pass --append to add these runs to it, or plan into a new --out folder")
    for run in runs:
        run_dir = os.path.join(out_dir, "runs", run.run)
        cfg_path = os.path.join(run_dir, "config.yaml")
        if _started(run_dir) and os.path.isfile(cfg_path):
            before = _experiment(load_config(cfg_path).to_dict())
            if before != _experiment(run.cfg.to_dict()):
                raise ConfigError(
                    f"run {run.run} already started in {run_dir} with a different config; its checkpoints would "
                    f"not match. Plan into a new --out folder, or delete that run directory to redo it")
    # -- no error past this point: write
    by_name = {row["run"]: row for row in old_rows}
    for run in runs:
        by_name[run.run] = run.row()
    rows = list(by_name.values())
    os.makedirs(os.path.join(out_dir, "runs"), exist_ok=True)
    for run in runs:
        os.makedirs(os.path.join(out_dir, "runs", run.run), exist_ok=True)
        save_config(run.cfg, os.path.join(out_dir, run.config))
    r1_controls = dict(old.get("r1_controls", {})) if old_rows else {}
    r1_controls.update({v.name: v.r1_from for v in spec.variants if v.r1_from is not None})
    manifest = {"format": MANIFEST_FORMAT, "name": name, "sources": sources, "workdir": os.getcwd(),
                "runs": rows}
    if r1_controls:   # variant -> the variant whose r = 1 runs are its r = 1 cells (sweep collect)
        manifest["r1_controls"] = r1_controls
    _write_atomic(manifest_path(out_dir), json.dumps(manifest, indent=1) + "\n")
    _write_atomic(os.path.join(out_dir, "manifest.csv"), manifest_csv(rows))
    sweep_yaml = os.path.join(out_dir, "sweep.yaml" if not append or not old_rows else f"sweep.{spec.name}.yaml")
    _write_atomic(sweep_yaml, yaml.safe_dump(spec.raw, sort_keys=False))
    return manifest
