"""One typed config tree, loaded from YAML, overridden with `--set a.b=c`, validated once.

Everything downstream receives a validated `Config`; nothing inward re-checks user input.
Every user mistake raises `ConfigError` with a message that names the key and the fix.
"""
from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional, Union, get_args, get_origin, get_type_hints

import yaml

from .errors import UserError


class ConfigError(UserError, ValueError):
    """A user-facing configuration mistake: printed without a traceback by the CLI."""


def recurrences(num_recur: Optional[int], default: int) -> int:
    """The recurrences a call runs: num_recur as asked, `default` (the trained r) when it is None.
    An explicit 0 (or less) is an error, never "the default"."""
    if num_recur is None:
        return default
    if num_recur < 1:
        raise ConfigError(f"num_recur must be >= 1 (None for the trained r = {default}), got {num_recur}")
    return num_recur


INJECTION_MODES = ("linear", "additive", "passthrough", "hyperconnect")
RECUR_SAMPLING_KINDS = ("fixed", "poisson_lognormal", "uniform")


@dataclass
class RecurSampling:
    """How many recurrences each training step runs (megaloop.depth draws and accounts them).

    fixed: every step runs model.num_recur (the default).
    poisson_lognormal: tau ~ LogNormal(log(mean) - sigma^2/2, sigma), r = Poisson(tau) + 1, as
        Huginn draws it, so E[r] = mean + 1 before the cap; sigma defaults to 0.5; draws above
        `cap` (default ceil(3 (mean + 1))) are clamped to it.
    uniform: r uniform on the integers lo..hi.
    curriculum_steps: ramp the distribution up over the first N optimizer steps (see depth.py).
    """
    kind: str = "fixed"
    mean: Optional[float] = None
    sigma: Optional[float] = None
    lo: Optional[int] = None
    hi: Optional[int] = None
    cap: Optional[int] = None
    curriculum_steps: Optional[int] = None

    @property
    def sampled(self) -> bool:
        return self.kind != "fixed"

    def max_draw(self, num_recur: int) -> int:
        """The deepest recurrence a training step can run."""
        if self.kind == "poisson_lognormal":
            return self.cap if self.cap is not None else math.ceil(3 * (self.mean + 1))
        if self.kind == "uniform":
            return self.hi
        return num_recur

    def min_draw(self, num_recur: int) -> int:
        """The shallowest recurrence a training step can run."""
        return {"poisson_lognormal": 1, "uniform": self.lo}.get(self.kind, num_recur)


@dataclass
class ModelConfig:
    d_model: int = 256
    n_head: int = 2
    n_kv_head: Optional[int] = None          # None = n_head (no GQA)
    head_dim: Optional[int] = None           # None = d_model // n_head
    vocab_size: int = 4096
    seq_len: int = 256
    n_prelude: int = 2
    n_recur_block: int = 2
    n_coda: int = 2
    num_recur: int = 4
    bptt_k: Optional[int] = None             # None = full backprop through all recurrences
    input_injection: str = "linear"
    num_lanes: int = 2
    logit_softcap: Optional[float] = 15.0
    mlp_ratio: int = 4
    norm_eps: float = 1e-6
    rope_base: float = 10000.0
    checkpoint_recurrence: bool = False      # recompute each pass through the group in backward
    recur_sampling: RecurSampling = field(default_factory=RecurSampling)  # training-time depth

    @property
    def kv_heads(self) -> int:
        return self.n_kv_head or self.n_head

    @property
    def hdim(self) -> int:
        return self.head_dim or self.d_model // self.n_head

    @property
    def max_recur(self) -> int:
        """The deepest training recurrence: num_recur, or the sampler's largest draw. It sizes
        what is per recurrence (hyperconnect parameters, the pipeline's unrolled passes)."""
        return self.recur_sampling.max_draw(self.num_recur)


@dataclass
class ParallelConfig:
    tp: int = 1
    pp: int = 1
    zero_stage: int = 0
    precision: str = "fp32"                  # fp32 | bf16 | fp8 (torchao float8 linears, megaloop/fp8.py)
    # auto: DeepSpeed for AdamW with ZeRO >= 1 and pp = 1 on several processes, the torch engine
    # otherwise (megaloop/parallel/engines.py choose_engine); zero_stage 0 always runs the torch engine
    engine: str = "auto"                     # auto | torch | deepspeed


@dataclass
class OptimConfig:
    name: str = "muon"                       # muonh | muon | adamw
    lr: float = 0.02                         # matrix lr (muonh, muon; the reference study: muonh 0.014) or the single peak lr (adamw)
    embed_lr: float = 0.2                    # AdamW groups under muon, scaled by (d_model/512)^-0.5
    head_lr: float = 0.004
    norm_lr: float = 0.005
    lane_lr: float = 0.01
    betas: tuple = (0.8, 0.95)
    eps: float = 1e-10
    weight_decay: float = 0.0
    momentum: float = 0.95                   # Muon / MuonH
    ns_steps: int = 5                        # Newton-Schulz (muon) or Polar Express (muonh, at most 5) iterations
    warmup_steps: int = 0
    final_lr_frac: float = 0.1
    schedule: str = "linear"                 # linear | wsd (warmup-stable-decay: megaloop/optim.py lr_factor)
    decay_frac: float = 0.2                  # wsd: the share of the steps that decay (the last ones)
    grad_clip: Optional[float] = 1.0         # None or 0 = no clipping


@dataclass
class TrainConfig:
    steps: Optional[int] = None
    tokens: Optional[int] = None
    target_flops: Optional[float] = None
    micro_batch_size: int = 8
    grad_accum: int = 1
    seed: int = 1337
    run_dir: str = "runs/default"
    log_every: int = 10
    eval_every: int = 0                      # 0 = only at the end
    eval_tokens: int = 65536                 # validation tokens per evaluation
    eval_recur: list = field(default_factory=list)  # extra r values evaluated at the end
    save_every: int = 0                      # 0 = only at the end
    save_at: list = field(default_factory=list)  # steps whose checkpoints are kept in RUN_DIR/branch_points (budget branching)
    keep_checkpoints: int = 2
    async_save: bool = False                 # write checkpoints in the background (published when complete)
    device: str = "auto"                     # auto | cpu | cuda
    compile: bool = False
    max_bad_steps: int = 3                   # consecutive non-finite steps that mean divergence
    on_divergence: str = "rewind"            # rewind | stop (megaloop/divergence.py)
    spike_factor: float = 2.0                # loss above this x the recent median = divergence; 0 = off
    spike_window: int = 50                   # steps in that median; spike checks start once it is full
    max_rewinds: int = 5                     # rewinds before the run stops instead
    rewind_lr_scale: float = 1.0             # lr multiplier after a rewind (1 = the schedule unchanged)
    rewind_lr_steps: int = 100               # for this many steps
    threads: int = 0                         # torch CPU threads, 0 = torch default
    progress: bool = True


@dataclass
class DataConfig:
    corpus: list = field(default_factory=lambda: ["data/corpus/*.txt.gz"])  # .txt/.jsonl(.gz/.zst), .parquet, folders
    text_key: str = "text"                   # JSON-lines field / parquet or datasets column that holds the text
    split: str = "train"                     # split of a datasets save_to_disk folder or hub-layout folder
    cache_dir: str = "data/cache"            # tokenizer and datasets built from `corpus` when missing
    tokenizer: Optional[str] = None          # sentencepiece .model or HF tokenizer.json; None = built from corpus
    tokenizer_type: str = "unigram"          # unigram | bpe
    train: Optional[list] = None             # [{path: PREFIX, weight: W}] of .bin/.idx; None = built from corpus
    valid: Optional[str] = None              # PREFIX of the validation dataset; None = built from corpus
    valid_fraction: float = 0.02             # share of documents held out (deterministic)
    workers: int = 2


@dataclass
class LoggingConfig:
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "megaloop"
    wandb_mode: str = "offline"              # offline works without network
    peak_flops: Optional[float] = None       # device peak FLOP/s for MFU; None = table or measured


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    kernels: str = "auto"                    # auto | triton | torch

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------- building

def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert a YAML/CLI value to the annotated type, or raise a ConfigError naming `where`."""
    origin = get_origin(tp)
    if origin is Union:  # Optional[X]
        args = [a for a in get_args(tp) if a is not type(None)]
        if value is None or (isinstance(value, str) and value.lower() in ("null", "none", "~")):
            return None
        return _coerce(value, args[0], where)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{where}: expected true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                f = float(value)
            except ValueError:
                raise ConfigError(f"{where}: expected an integer, got {value!r}") from None
            if f.is_integer():
                return int(f)
        if isinstance(value, int):
            return value
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: expected a number, got {value!r}") from None
        if isinstance(value, bool):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return out
    if tp is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return str(value)
    if tp in (list, tuple) or origin in (list, tuple):
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            value = [value]
        return tuple(value) if tp is tuple else list(value)
    return value


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(
            f"unknown config key '{key}'. Valid keys under '{prefix.rstrip('.') or 'the top level'}': "
            f"{', '.join(sorted(known))}"
        )
    kwargs = {}
    for f in fields(cls):
        if f.name not in data:
            continue
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = _build(tp, data[f.name] or {}, f"{prefix}{f.name}.")
        else:
            kwargs[f.name] = _coerce(data[f.name], tp, f"{prefix}{f.name}")
    return cls(**kwargs)


def parse_overrides(overrides: list[str]) -> dict:
    """['model.d_model=128', 'train.steps=5'] -> nested dict (values parsed as YAML scalars)."""
    out: dict = {}
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        key, raw = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError:
            value = raw
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {item!r} conflicts with another override")
        node[parts[-1]] = value
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None,
                raw: Optional[dict] = None) -> Config:
    """Load YAML (or a dict), apply --set overrides, validate. Raises ConfigError on any mistake."""
    data: dict = {}
    if path is not None:
        if not os.path.isfile(path):
            raise ConfigError(f"config file not found: {path}. Pass the path of a YAML file, e.g. configs/default.yaml")
        try:
            with open(path) as f:
                data = yaml.safe_load(f)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise ConfigError(f"{path} is not valid YAML{where}: {getattr(e, 'problem', None) or e}") from None
        if data is None:  # silently training on the built-in defaults would surprise: they are not configs/default.yaml
            raise ConfigError(f"{path} is empty: a config needs its sections (model:, train:, data:, ...). "
                              f"Start from a copy of configs/default.yaml")
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections (model:, train:, ...)")
    if raw is not None:
        data = _merge(data, raw)
    data = _merge(data, parse_overrides(overrides or []))
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def config_from_dict(data: dict) -> Config:
    cfg = _build(Config, data, "")
    validate(cfg)
    return cfg


def save_config(cfg: Config, path: str) -> None:
    d = cfg.to_dict()
    d["optim"]["betas"] = list(d["optim"]["betas"])
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        yaml.safe_dump(d, f, sort_keys=False)
    os.replace(tmp, path)


# ----------------------------------------------------------------------------- validation

def _need(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _validate_divergence(t: TrainConfig) -> None:
    _need(t.on_divergence in ("rewind", "stop"), f"train.on_divergence must be rewind or stop, got {t.on_divergence!r}")
    _need(t.spike_factor == 0 or (t.spike_factor > 1 and math.isfinite(t.spike_factor)),
          f"train.spike_factor must be above 1 (a loss that many times the recent median), or 0 to turn spike "
          f"detection off, got {t.spike_factor}")
    _need(t.spike_window >= 1, f"train.spike_window must be >= 1 step, got {t.spike_window}")
    _need(t.max_rewinds >= 0, f"train.max_rewinds must be >= 0, got {t.max_rewinds}")
    _need(0 < t.rewind_lr_scale <= 1, f"train.rewind_lr_scale must be in (0, 1], got {t.rewind_lr_scale}")
    _need(t.rewind_lr_steps >= 0, f"train.rewind_lr_steps must be >= 0, got {t.rewind_lr_steps}")


def _validate_recur_sampling(m: ModelConfig) -> None:
    s, where = m.recur_sampling, "model.recur_sampling"
    _need(s.kind in RECUR_SAMPLING_KINDS,
          f"{where}.kind={s.kind!r} is unknown: use one of {', '.join(RECUR_SAMPLING_KINDS)}")
    used = {"fixed": (), "poisson_lognormal": ("mean", "sigma", "cap", "curriculum_steps"),
            "uniform": ("lo", "hi", "curriculum_steps")}[s.kind]
    for key in ("mean", "sigma", "lo", "hi", "cap", "curriculum_steps"):
        _need(getattr(s, key) is None or key in used,
              f"{where}.{key} is set but kind={s.kind} does not use it (it uses "
              f"{', '.join(used) or 'nothing: every step runs model.num_recur'}); remove it or change the kind")
    if s.kind == "poisson_lognormal":
        _need(s.mean is not None, f"{where}.mean is required for kind=poisson_lognormal (E[r] = mean + 1)")
        _need(math.isfinite(s.mean) and s.mean >= 1,
              f"{where}.mean must be >= 1, got {s.mean}: it is the mean of the lognormal rate, and r = "
              f"Poisson(rate) + 1; for a shallower model use kind=fixed or kind=uniform")
        _need(s.sigma is None or (math.isfinite(s.sigma) and s.sigma > 0),
              f"{where}.sigma must be > 0 (Huginn uses 0.5), got {s.sigma}")
        _need(s.cap is None or s.cap >= 2,
              f"{where}.cap must be >= 2 (the deepest draw; draws above it are clamped), got {s.cap}")
    if s.kind == "uniform":
        _need(s.lo is not None and s.hi is not None, f"{where}: kind=uniform needs lo and hi (r uniform on lo..hi)")
        _need(s.lo >= 1, f"{where}.lo must be >= 1, got {s.lo}")
        _need(s.lo <= s.hi, f"{where}.lo={s.lo} is above hi={s.hi}: r is drawn uniformly from lo..hi; swap them")
    if s.curriculum_steps is not None:
        _need(s.curriculum_steps >= 1, f"{where}.curriculum_steps must be >= 1 or null, got {s.curriculum_steps}")
    if not s.sampled or m.bptt_k is None:
        return
    lo, hi = s.min_draw(m.num_recur), s.max_draw(m.num_recur)
    _need(m.bptt_k >= 1, f"model.bptt_k must be >= 1 or null, got {m.bptt_k}")
    _need(m.bptt_k <= hi,
          f"model.bptt_k={m.bptt_k} is above the deepest draw ({hi}), so it would never truncate: "
          f"use model.bptt_k=null for full backprop, or a smaller k")
    if s.kind == "uniform":  # a chosen floor: below it the shallow draws would silently skip truncation
        _need(m.bptt_k <= lo,
              f"model.bptt_k={m.bptt_k} is above the smallest draw lo={lo}: steps that draw r < k would run "
              f"full backprop. Use bptt_k <= {lo} or raise {where}.lo")


def validate(cfg: Config) -> None:
    m, p, o, t, d = cfg.model, cfg.parallel, cfg.optim, cfg.train, cfg.data
    _need(m.d_model > 0, f"model.d_model must be positive, got {m.d_model}")
    _need(m.n_head > 0, f"model.n_head must be positive, got {m.n_head}")
    if m.head_dim is None:
        _need(m.d_model % m.n_head == 0,
              f"model.n_head={m.n_head} does not divide model.d_model={m.d_model}: choose n_head so that "
              f"d_model / n_head is a whole head dimension (or set model.head_dim)")
    _need(m.hdim % 2 == 0, f"head dimension {m.hdim} must be even for rotary embeddings")
    _need(m.kv_heads > 0 and m.n_head % m.kv_heads == 0,
          f"model.n_kv_head={m.n_kv_head} must divide model.n_head={m.n_head} (grouped-query attention)")
    _need(m.vocab_size >= 8, f"model.vocab_size must be at least 8, got {m.vocab_size}")
    _need(m.seq_len > 0, f"model.seq_len must be positive, got {m.seq_len}")
    for k in ("n_prelude", "n_coda"):
        _need(getattr(m, k) >= 0, f"model.{k} must be >= 0, got {getattr(m, k)}")
    _need(m.n_recur_block >= 1, f"model.n_recur_block must be >= 1, got {m.n_recur_block}")
    _need(m.num_recur >= 1, f"model.num_recur (r) must be >= 1, got {m.num_recur}")
    _validate_recur_sampling(m)
    if m.bptt_k is not None and not m.recur_sampling.sampled:
        _need(1 <= m.bptt_k <= m.num_recur,
              f"model.bptt_k={m.bptt_k} must be between 1 and model.num_recur={m.num_recur} "
              f"(or null for full backprop)")
    _need(m.input_injection in INJECTION_MODES,
          f"model.input_injection={m.input_injection!r} is unknown: use one of {', '.join(INJECTION_MODES)}")
    if m.input_injection == "hyperconnect":
        _need(m.num_lanes >= 2, f"model.num_lanes must be >= 2 for hyperconnect, got {m.num_lanes}")
        _need(m.bptt_k is None or (m.bptt_k == m.num_recur and not m.recur_sampling.sampled),
              "hyperconnect needs full backprop (model.bptt_k null): its per-recurrence lane "
              "parameters in detached recurrences would never get gradients")
    if m.logit_softcap is not None:
        _need(m.logit_softcap > 0, f"model.logit_softcap must be positive or null, got {m.logit_softcap}")
    _need(m.mlp_ratio >= 1, f"model.mlp_ratio must be >= 1, got {m.mlp_ratio}")

    _need(p.tp >= 1 and p.pp >= 1, f"parallel.tp and parallel.pp must be >= 1, got tp={p.tp} pp={p.pp}")
    _need(p.zero_stage in (0, 1, 2, 3), f"parallel.zero_stage must be 0, 1, 2 or 3, got {p.zero_stage}")
    _need(p.precision in ("fp32", "bf16", "fp8"), f"parallel.precision must be fp32, bf16 or fp8, got {p.precision!r}")
    _need(p.engine in ("auto", "torch", "deepspeed"),
          f"parallel.engine must be auto, torch or deepspeed, got {p.engine!r}")
    if p.tp > 1:
        _need(m.n_head % p.tp == 0 and m.kv_heads % p.tp == 0,
              f"parallel.tp={p.tp} must divide model.n_head={m.n_head} and the kv heads={m.kv_heads}")
    if p.precision == "fp8":
        check_fp8_config(m, p)

    _need(o.name in ("muonh", "muon", "adamw"), f"optim.name must be muonh, muon or adamw, got {o.name!r}")
    if o.name == "muonh":
        _need(1 <= o.ns_steps <= 5, f"optim.ns_steps must be 1..5 for muonh (Polar Express has 5 published "
                                    f"iterations), got {o.ns_steps}")
        _need(not o.weight_decay, f"optim.weight_decay must be 0 for muonh (the weights stay on a Frobenius "
                                  f"sphere, where decay is a no-op), got {o.weight_decay}")
    _need(o.lr > 0, f"optim.lr must be positive, got {o.lr}")
    _need(0.0 <= o.final_lr_frac <= 1.0, f"optim.final_lr_frac must be in [0, 1], got {o.final_lr_frac}")
    _need(o.warmup_steps >= 0, f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    _need(o.schedule in ("linear", "wsd"), f"optim.schedule must be linear or wsd, got {o.schedule!r}")
    _need(isinstance(o.decay_frac, (int, float)) and not isinstance(o.decay_frac, bool) and 0.0 < o.decay_frac <= 1.0,
          f"optim.decay_frac must be in (0, 1] (the share of the steps that decay under optim.schedule=wsd), "
          f"got {o.decay_frac!r}")
    _need(o.grad_clip is None or o.grad_clip >= 0, f"optim.grad_clip must be >= 0 or null, got {o.grad_clip}")
    _need(len(o.betas) == 2 and all(0 <= b < 1 for b in o.betas), f"optim.betas must be two numbers in [0, 1), got {o.betas}")

    budgets = [k for k in ("steps", "tokens", "target_flops") if getattr(t, k) is not None]
    _need(len(budgets) == 1,
          "set exactly one of train.steps, train.tokens, train.target_flops "
          f"(got {', '.join(budgets) if budgets else 'none'})")
    for k in budgets:
        _need(getattr(t, k) > 0, f"train.{k} must be positive, got {getattr(t, k)}")
    _need(t.micro_batch_size >= 1, f"train.micro_batch_size must be >= 1, got {t.micro_batch_size}")
    _need(t.grad_accum >= 1, f"train.grad_accum must be >= 1, got {t.grad_accum}")
    _need(t.log_every >= 1, f"train.log_every must be >= 1, got {t.log_every}")
    for k in ("eval_every", "save_every"):
        _need(getattr(t, k) >= 0, f"train.{k} must be >= 0, got {getattr(t, k)}")
    _need(t.keep_checkpoints >= 1, f"train.keep_checkpoints must be >= 1, got {t.keep_checkpoints}")
    _need(t.device in ("auto", "cpu", "cuda"), f"train.device must be auto, cpu or cuda, got {t.device!r}")
    try:
        t.eval_recur = [int(r) for r in t.eval_recur]
    except (TypeError, ValueError):
        raise ConfigError(f"train.eval_recur must be a list of integers, got {t.eval_recur!r}") from None
    _need(all(r >= 1 for r in t.eval_recur), f"train.eval_recur values must be >= 1, got {t.eval_recur}")
    try:
        t.save_at = sorted({int(x) for x in t.save_at})
    except (TypeError, ValueError):
        raise ConfigError(f"train.save_at must be a list of step numbers, got {t.save_at!r}") from None
    _need(all(x >= 1 for x in t.save_at), f"train.save_at steps must be >= 1, got {t.save_at}")
    _need(t.max_bad_steps >= 1, f"train.max_bad_steps must be >= 1, got {t.max_bad_steps}")
    _validate_divergence(t)

    _need(d.tokenizer_type in ("unigram", "bpe"), f"data.tokenizer_type must be unigram or bpe, got {d.tokenizer_type!r}")
    _need(0.0 < d.valid_fraction < 1.0, f"data.valid_fraction must be in (0, 1), got {d.valid_fraction}")
    _need(d.workers >= 1, f"data.workers must be >= 1, got {d.workers}")
    if d.train is not None:
        for i, item in enumerate(d.train):
            if isinstance(item, str):
                d.train[i] = item = {"path": item, "weight": 1.0}
            _need(isinstance(item, dict) and "path" in item,
                  f"data.train[{i}] must be {{path: PREFIX, weight: W}}, got {item!r}")
            _need(set(item) <= {"path", "weight"}, f"data.train[{i}] has unknown keys {sorted(set(item) - {'path', 'weight'})}")
            w = item.setdefault("weight", 1.0)
            _need(isinstance(w, (int, float)) and w > 0 and math.isfinite(w),
                  f"data.train[{i}].weight must be a positive number, got {w!r}")
    _need(cfg.kernels in ("auto", "triton", "torch"), f"kernels must be auto, triton or torch, got {cfg.kernels!r}")


# float8 matmuls (torch._scaled_mm) need both sizes of each operand to be multiples of 16
FP8_ALIGN = 16


def check_fp8_config(m, p) -> None:
    """Refuse what precision fp8 cannot run (megaloop/fp8.py trains it).

    m: ModelConfig, p: ParallelConfig."""
    if p.zero_stage == 3:
        raise ConfigError(
            "parallel.precision=fp8 with parallel.zero_stage=3: megaloop's ZeRO-3 is DeepSpeed's, which "
            "partitions every weight into flat slices and gathers them in its own hooks; torchao's float8 "
            "training supports sharded weights only through FSDP2 (DTensor), and no test shows it under "
            "DeepSpeed ZeRO-3. Use parallel.zero_stage=2 (optimiser state and gradients sharded), or "
            "parallel.precision=bf16 for ZeRO-3")
    sizes = {"model.d_model": m.d_model, f"the MLP width (model.mlp_ratio x d_model = {m.mlp_ratio} x {m.d_model})":
             m.mlp_ratio * m.d_model, f"the query width (n_head x head_dim = {m.n_head} x {m.hdim})": m.n_head * m.hdim,
             f"the key/value width (kv heads x head_dim = {m.kv_heads} x {m.hdim})": m.kv_heads * m.hdim}
    for name, size in sizes.items():
        if size % FP8_ALIGN:
            up = -(-size // FP8_ALIGN) * FP8_ALIGN
            raise ConfigError(
                f"parallel.precision=fp8: {name} is {size}, not a multiple of {FP8_ALIGN}, which float8 matmuls "
                f"need. Choose a width that is (e.g. {up}), or use parallel.precision=bf16")
    if p.tp > 1:  # every TP shard of a sharded size is a matmul dimension too
        for name, size in list(sizes.items())[1:]:
            if (size // p.tp) % FP8_ALIGN:
                raise ConfigError(
                    f"parallel.precision=fp8 with parallel.tp={p.tp}: each rank's shard of {name} is "
                    f"{size} / {p.tp} = {size // p.tp}, not a multiple of {FP8_ALIGN}, which float8 matmuls need. "
                    f"Choose a tp that leaves shards of multiples of {FP8_ALIGN}, or wider layers")
