"""A sweep file: one YAML that describes an iso-depth grid, parsed and validated in one place.

    extends: other.yaml        # optional: start from another sweep file (variants are replaced, the
                               # rest deep-merged), so a probe restates only what differs
    name: iso_depth
    base: {...}                # a partial megaloop config applied to every run
    grid:
      head_dim: 128
      n_prelude: 2
      n_coda: 2
      total_recur_depth: 16    # n_recur_block = total_recur_depth / r: the same depth for every r
      r: [1, 2, 4, 8]
      width_multiple: 64       # d_model = width_multiple * size rounded up to round_to
      round_to: 128
      input_injection: linear
      input_injection_r1: passthrough   # r = 1 is a plain transformer: no adapter
      budgets: [{flops: 4.64e17, sizes: [6, 8, 10, 12], seeds: [1, 2, 3]}, ...]  # seeds: optional,
                               # this budget's seeds (default: the top-level `seeds`)
      test_time_recur: 2       # optional: evaluate every run at r_test = 1 .. 2 r (test-time curves)
    variants:                  # each variant is the grid again with a few changes
      baseline: {}
      truncbptt: {bptt_k: ceil_half, r: [2, 4, 8], budgets: 4}   # budgets: first N, or flops values
      hyperconnect: {input_injection: hyperconnect, num_lanes: 2, overrides: {optim: {...}}}
      randdepth: {recur_sampling: {kind: poisson_lognormal, mean: match_r, sigma: 0.5}}  # E[r] = r
      linear: {input_injection: linear}          # r = 1 with the adapter too: a probe's r = 1 control
      truncbptt2: {bptt_k: ceil_half, r: [2, 4], r1_from: linear}  # its r = 1 cells are linear's runs
      depth1: {r: [1], recur_blocks: 1}          # fixed-width depth control: 1 + 1 + 1 unique blocks
    seeds: [1337, 1338]        # optional: every run once per seed (train.seed: initialisation and
                               # data order); the run name gains _seed{seed} unless name_format has it
    name_format: "{variant}_r{r}_s{size}_c{flops_tag}"
    resources: {gpus: 8}       # GPUs per run: fixes the data-parallel size, so the tokens per step

Every mistake raises ConfigError naming the key, before anything is written.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union

import yaml

from ..config import ConfigError, ModelConfig

# Model keys the grid decides; setting them in `base` or a variant would silently break the design.
GRID_MODEL_KEYS = ("d_model", "n_head", "n_kv_head", "head_dim", "n_prelude", "n_recur_block", "n_coda",
                   "num_recur")
# Train keys the sweep decides per run.
GRID_TRAIN_KEYS = ("steps", "tokens", "target_flops", "run_dir")
TOP_KEYS = ("extends", "name", "description", "base", "grid", "variants", "name_format", "resources", "seeds",
            "select", "branching")
SELECT_KEYS = ("variant", "r", "size", "flops", "seed")
DEFAULT_NAME_FORMAT = "{variant}_r{r}_s{size}_c{flops_tag}"


@dataclass(frozen=True)
class BudgetSpec:
    flops: float
    sizes: tuple[int, ...]
    seeds: Optional[tuple[int, ...]] = None   # None: the sweep's `seeds` (or base train.seed alone)


@dataclass
class GridSpec:
    head_dim: int = 128
    n_prelude: int = 2
    n_coda: int = 2
    total_recur_depth: int = 16
    r: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    width_multiple: int = 64
    round_to: int = 128
    input_injection: str = "linear"
    input_injection_r1: Optional[str] = "passthrough"   # None: r = 1 uses input_injection too
    budgets: list[BudgetSpec] = field(default_factory=list)
    test_time_recur: int = 0    # > 0: evaluate each run at r_test = 1 .. test_time_recur * r


# `bptt_k` in a variant: a fixed k, null (full backprop), or a rule of r.
BpttRule = Union[None, int, str]
BPTT_RULES = {"ceil_half": lambda r: math.ceil(r / 2), "full": lambda r: None}
# `match_r` in a variant's recur_sampling: the value that makes the expected training depth the
# grid's r, so a sampled run pairs with the fixed-r run of the same shape and budget.
#   poisson_lognormal mean: r - 1 (E[r] = mean + 1, less the cap's clamped tail)
#   uniform hi: 2 r - lo (E[r] = (lo + hi) / 2)
MATCH_R = "match_r"
MATCH_R_KEYS = {"mean": lambda r, s: r - 1, "hi": lambda r, s: 2 * r - int(s.get("lo") or 1)}


@dataclass
class VariantSpec:
    name: str
    r: Optional[list[int]] = None            # None = every r of the grid
    budgets: Optional[list[float]] = None    # None = every budget of the grid
    bptt_k: BpttRule = None
    model: dict = field(default_factory=dict)      # other model keys (input_injection, num_lanes, ...)
    overrides: dict = field(default_factory=dict)  # a partial config (any section) for this variant
    # Fixed-width depth control (r = [1] only): this many unique recurrent blocks instead of the
    # grid's total_recur_depth, so a loop's worth can be read in blocks at the same width.
    recur_blocks: Optional[int] = None
    # This variant's r = 1 cells are another variant's r = 1 runs (a probe whose r = 1 model is
    # that variant's, e.g. truncated backprop at r = 1 is the linear-adapter model): not planned
    # again, but `sweep collect` lists them under this variant too, so its fit has an r = 1 level.
    r1_from: Optional[str] = None

    def k_for(self, r: int) -> Optional[int]:
        if isinstance(self.bptt_k, str):
            return BPTT_RULES[self.bptt_k](r)
        return None if self.bptt_k is None else min(self.bptt_k, r)

    def model_for(self, r: int) -> dict:
        """The variant's model keys at grid r, with `match_r` values resolved."""
        out = dict(self.model)
        if isinstance(out.get("recur_sampling"), dict):
            rs = dict(out["recur_sampling"])
            for key, rule in MATCH_R_KEYS.items():
                if rs.get(key) == MATCH_R:
                    rs[key] = rule(r, rs)
            out["recur_sampling"] = rs
        return out


@dataclass
class Resources:
    gpus: int = 1          # GPUs per run (one node); data-parallel size = gpus / (tp * pp)


@dataclass
class SweepSpec:
    name: str
    source: str
    base: dict
    grid: GridSpec
    variants: list[VariantSpec]
    name_format: str = DEFAULT_NAME_FORMAT
    resources: Resources = field(default_factory=Resources)
    raw: dict = field(default_factory=dict)   # the merged YAML, kept next to the plan for provenance
    seeds: Optional[tuple[int, ...]] = None   # None: one run per cell at base train.seed
    # only these runs of the grid (what `megaloop sweep suggest --out` writes); None: all of them
    select: Optional[list[dict]] = None
    # budget branching (warmup-stable-decay): one trunk per (variant, size, r, seed), the smaller
    # budgets decay from its checkpoints (megaloop/sweep/branch.py)
    branching: bool = False

    def seeds_for(self, budget: BudgetSpec) -> tuple[Optional[int], ...]:
        """The seeds of one budget's cells (None: base train.seed, no seed in the run name)."""
        return budget.seeds or self.seeds or (None,)


# ----------------------------------------------------------------------------- reading

def merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_sweep_yaml(path: str, _seen: tuple = ()) -> dict:
    """The YAML with `extends` resolved (relative to the file), variants replaced, the rest merged."""
    if not os.path.isfile(path):
        raise ConfigError(f"sweep file not found: {path}. Pass a sweep YAML, e.g. configs/sweeps/demo.yaml")
    real = os.path.realpath(path)
    if real in _seen:
        raise ConfigError(f"{path}: `extends` forms a cycle ({' -> '.join(_seen + (real,))})")
    try:
        with open(path) as f:
            data = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path} is not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a sweep file is a mapping with base:, grid:, variants:")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    parent_path = os.path.join(os.path.dirname(path), str(parent))
    merged = read_sweep_yaml(parent_path, _seen + (real,))
    if "variants" in data:
        merged.pop("variants", None)  # a probe names its own variants; it does not add to the parent's
    return merge(merged, data)


def _num(value: Any, where: str, kind: type = float) -> Any:
    """YAML 1.1 reads `1e18` as a string; accept it, reject anything that is not a number."""
    if isinstance(value, bool):
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(out):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    if kind is int:
        if not out.is_integer():
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return int(out)
    return out


def _int_list(value: Any, where: str) -> list[int]:
    if not isinstance(value, (list, tuple)) or not value:
        raise ConfigError(f"{where}: expected a non-empty list of integers, got {value!r}")
    return [_num(v, f"{where}[{i}]", int) for i, v in enumerate(value)]


def _seed_list(value: Any, where: str) -> tuple[int, ...]:
    seeds = _int_list(value, where)
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"{where}: a seed is listed twice ({seeds}); each seed makes one run per cell")
    if min(seeds) < 0:
        raise ConfigError(f"{where}: seeds must be >= 0, got {seeds}")
    return tuple(seeds)


def _mapping(value: Any, where: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: expected a mapping, got {value!r}")
    return value


def _parse_grid(g: dict) -> GridSpec:
    known = {f.name for f in fields(GridSpec)}
    unknown = sorted(set(g) - known)
    if unknown:
        raise ConfigError(f"unknown key 'grid.{unknown[0]}'. Valid keys under 'grid': {', '.join(sorted(known))}")
    out = GridSpec()
    for k in ("head_dim", "n_prelude", "n_coda", "total_recur_depth", "width_multiple", "round_to",
              "test_time_recur"):
        if k in g:
            setattr(out, k, _num(g[k], f"grid.{k}", int))
    if out.test_time_recur < 0:
        raise ConfigError(f"grid.test_time_recur must be >= 0 (0: evaluate at the trained r only), "
                          f"got {out.test_time_recur}")
    for k in ("head_dim", "total_recur_depth", "width_multiple", "round_to"):
        if getattr(out, k) < 1:
            raise ConfigError(f"grid.{k} must be >= 1, got {getattr(out, k)}")
    if "r" in g:
        out.r = _int_list(g["r"], "grid.r")
    for k in ("input_injection", "input_injection_r1"):
        if k in g:
            setattr(out, k, None if g[k] is None else str(g[k]))
    budgets = g.get("budgets")
    if not isinstance(budgets, list) or not budgets:
        raise ConfigError("grid.budgets: expected a list like [{flops: 1e18, sizes: [6, 8, 10]}, ...]")
    for i, b in enumerate(budgets):
        if not isinstance(b, dict) or not {"flops", "sizes"} <= set(b) <= {"flops", "sizes", "seeds"}:
            raise ConfigError(f"grid.budgets[{i}]: expected {{flops: F, sizes: [s, ...]}} and optionally "
                              f"seeds: [..], got {b!r}")
        flops = _num(b["flops"], f"grid.budgets[{i}].flops")
        if flops <= 0:
            raise ConfigError(f"grid.budgets[{i}].flops must be positive, got {b['flops']!r}")
        sizes = _int_list(b["sizes"], f"grid.budgets[{i}].sizes")
        if min(sizes) < 1:
            raise ConfigError(f"grid.budgets[{i}].sizes must be >= 1, got {sizes}")
        seeds = _seed_list(b["seeds"], f"grid.budgets[{i}].seeds") if "seeds" in b else None
        out.budgets.append(BudgetSpec(flops, tuple(sizes), seeds))
    return out


def _parse_variant(name: str, v: Any, grid: GridSpec) -> VariantSpec:
    where = f"variants.{name}"
    v = dict(_mapping(v, where))
    out = VariantSpec(name=str(name))
    if "r" in v:
        out.r = _int_list(v.pop("r"), f"{where}.r")
        missing = sorted(set(out.r) - set(grid.r))
        if missing:
            raise ConfigError(f"{where}.r lists r={missing[0]}, which grid.r {grid.r} does not have")
    if "budgets" in v:
        b = v.pop("budgets")
        grid_flops = [x.flops for x in grid.budgets]
        if isinstance(b, (int, float, str)) and not isinstance(b, bool):
            n = _num(b, f"{where}.budgets", int)
            if not 1 <= n <= len(grid_flops):
                raise ConfigError(f"{where}.budgets={n}: means the first N grid budgets; N must be 1..{len(grid_flops)}")
            out.budgets = grid_flops[:n]
        else:
            if not isinstance(b, list) or not b:
                raise ConfigError(f"{where}.budgets: expected N (the first N grid budgets) or a list of grid flops")
            out.budgets = []
            for i, x in enumerate(b):
                f = _num(x, f"{where}.budgets[{i}]")
                match = [g for g in grid_flops if math.isclose(g, f, rel_tol=1e-9)]
                if not match:
                    raise ConfigError(f"{where}.budgets[{i}]={x!r} is not a grid budget ({', '.join(f'{g:g}' for g in grid_flops)})")
                out.budgets.append(match[0])
    if "bptt_k" in v:
        k = v.pop("bptt_k")
        if isinstance(k, str) and k in BPTT_RULES:
            out.bptt_k = k
        elif k is not None:
            out.bptt_k = _num(k, f"{where}.bptt_k", int)
            if out.bptt_k < 1:
                raise ConfigError(f"{where}.bptt_k must be >= 1, null or one of {', '.join(BPTT_RULES)}")
    out.overrides = _mapping(v.pop("overrides", None), f"{where}.overrides")
    if "recur_blocks" in v:
        out.recur_blocks = _num(v.pop("recur_blocks"), f"{where}.recur_blocks", int)
        if out.r != [1]:
            raise ConfigError(f"{where}.recur_blocks: a depth control is an r = 1 model; give it r: [1]")
        if not 1 <= out.recur_blocks < grid.total_recur_depth:
            raise ConfigError(f"{where}.recur_blocks={out.recur_blocks}: a depth control has fewer unique "
                              f"recurrent blocks than the grid (1 .. {grid.total_recur_depth - 1})")
    if "r1_from" in v:
        out.r1_from = str(v.pop("r1_from"))
        if out.r is not None and 1 in out.r:
            raise ConfigError(f"{where}.r1_from: the variant takes its r = 1 cells from "
                              f"{out.r1_from!r}, so its own r must not include 1 (got {out.r})")
    model_keys = {f.name for f in fields(ModelConfig)}
    for k, val in v.items():
        if k in GRID_MODEL_KEYS:
            raise ConfigError(f"{where}.{k}: the grid sets model.{k} for every run; change grid: instead")
        if k not in model_keys:
            raise ConfigError(f"unknown key '{where}.{k}'. A variant takes r, budgets, bptt_k, overrides "
                              f"and model keys ({', '.join(sorted(model_keys - set(GRID_MODEL_KEYS)))})")
        if k == "recur_sampling":
            val = _mapping(val, f"{where}.recur_sampling")
            for key, x in val.items():
                if x == MATCH_R and key not in MATCH_R_KEYS:
                    raise ConfigError(f"{where}.recur_sampling.{key}: {MATCH_R} applies to "
                                      f"{' and '.join(MATCH_R_KEYS)} only")
        out.model[k] = val
    return out


def _check_base(base: dict, where: str) -> None:
    for k in GRID_MODEL_KEYS:
        if k in _mapping(base.get("model"), f"{where}.model"):
            raise ConfigError(f"{where}.model.{k}: the grid sets model.{k} for every run; remove it from {where}")
    for k in GRID_TRAIN_KEYS:
        if k in _mapping(base.get("train"), f"{where}.train"):
            raise ConfigError(f"{where}.train.{k}: the sweep sets train.{k} per run (budget = grid flops, "
                              f"run_dir = DIR/runs/NAME); remove it from {where}")


def parse_sweep(data: dict, source: str = "<dict>") -> SweepSpec:
    """Validate a sweep mapping (extends already resolved) into a SweepSpec."""
    unknown = sorted(set(data) - set(TOP_KEYS))
    if unknown:
        raise ConfigError(f"{source}: unknown top-level key '{unknown[0]}'. Valid keys: {', '.join(TOP_KEYS)}")
    base = _mapping(data.get("base"), "base")
    _check_base(base, "base")
    grid = _parse_grid(_mapping(data.get("grid"), "grid"))
    variants_raw = _mapping(data.get("variants"), "variants") or {"baseline": {}}
    variants = [_parse_variant(str(n), v, grid) for n, v in variants_raw.items()]
    by_name = {v.name: v for v in variants}
    for v in variants:
        _check_base(v.overrides, f"variants.{v.name}.overrides")
        if v.r1_from is not None:
            src = by_name.get(v.r1_from)
            if src is None or v.r1_from == v.name:
                raise ConfigError(f"variants.{v.name}.r1_from: {v.r1_from!r} is not another variant of this "
                                  f"sweep ({', '.join(by_name)})")
            if (src.r is not None and 1 not in src.r) or (src.r is None and 1 not in grid.r):
                raise ConfigError(f"variants.{v.name}.r1_from: variant {v.r1_from!r} has no r = 1 runs")
            all_flops = [b.flops for b in grid.budgets]
            missing = sorted(set(v.budgets or all_flops) - set(src.budgets or all_flops))
            if missing:
                raise ConfigError(f"variants.{v.name}.r1_from: variant {v.r1_from!r} does not run at budget "
                                  f"{missing[0]:g}, where {v.name} runs")
    res = _mapping(data.get("resources"), "resources")
    unknown = sorted(set(res) - {"gpus"})
    if unknown:
        raise ConfigError(f"unknown key 'resources.{unknown[0]}'. Valid keys under 'resources': gpus")
    resources = Resources(gpus=_num(res.get("gpus", 1), "resources.gpus", int))
    if resources.gpus < 1:
        raise ConfigError(f"resources.gpus must be >= 1, got {resources.gpus}")
    seeds = _seed_list(data["seeds"], "seeds") if data.get("seeds") is not None else None
    unseeded = [f"{b.flops:g}" for b in grid.budgets if b.seeds is None]
    if seeds is None and unseeded and len(unseeded) < len(grid.budgets):
        raise ConfigError(f"grid.budgets: some budgets list seeds and budget {unseeded[0]} does not; give it "
                          f"seeds: [..] too, or set the top-level seeds: [..] for the budgets without their own")
    name_format = str(data.get("name_format") or DEFAULT_NAME_FORMAT)
    if (seeds is not None or not unseeded) and "{seed}" not in name_format:
        name_format += "_seed{seed}"   # one run per seed: the names must tell them apart
    name = str(data.get("name") or os.path.splitext(os.path.basename(source))[0])
    branching = data.get("branching", False)
    if not isinstance(branching, bool):
        raise ConfigError(f"{source}: branching must be true or false, got {branching!r}")
    if branching and _mapping(base.get("optim"), "base.optim").get("schedule") != "wsd":
        raise ConfigError(f"{source}: branching: true needs base.optim.schedule: wsd (a branch decays from "
                          f"the trunk's stable phase; a linear schedule has none)")
    return SweepSpec(name=name, source=source, base=base, grid=grid, variants=variants,
                     name_format=name_format, resources=resources, raw=data, seeds=seeds,
                     select=_parse_select(data.get("select"), source), branching=branching)


def _parse_select(value: Any, source: str) -> Optional[list[dict]]:
    """`select: [{variant, r, size, flops[, seed]}, ...]`: plan only these runs of the grid."""
    if value is None:
        return None
    if not isinstance(value, list) or not value:
        raise ConfigError(f"{source}: select: expected a non-empty list of {{variant, r, size, flops}}")
    out = []
    for i, item in enumerate(value):
        where = f"select[{i}]"
        if not isinstance(item, dict) or not {"variant", "r", "size", "flops"} <= set(item) <= set(SELECT_KEYS):
            raise ConfigError(f"{source}: {where}: expected {{variant, r, size, flops}} and optionally seed, "
                              f"got {item!r}")
        sel = {"variant": str(item["variant"]), "r": _num(item["r"], f"{where}.r", int),
               "size": _num(item["size"], f"{where}.size", int), "flops": _num(item["flops"], f"{where}.flops")}
        if item.get("seed") is not None:
            sel["seed"] = _num(item["seed"], f"{where}.seed", int)
        out.append(sel)
    return out


def load_sweep(path: str) -> SweepSpec:
    return parse_sweep(read_sweep_yaml(path), source=path)
