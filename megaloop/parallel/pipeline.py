"""Pipeline parallelism for the looped model: units, balanced stages, and the stage forward.

The model is cut into *units*: each prelude block, each recurrence pass (the whole recurrent
group run once, with its injection and norm_recur), each coda block. The embedding rides with
the first unit and the final norm + head with the last. Units are split into `pp` contiguous
stages balanced by block count, so the r recurrences are unrolled across stages: at r = 4 with
prelude 2 / group 4 / coda 2 on pp = 4, every stage runs about 5 blocks.

Every stage that runs at least one pass holds a copy of the recurrent group (blocks, injection,
norm_recur): these are tied weights. Their gradients are summed across those stages after each
backward (the job DeepSpeed's TiedLayerSpec does), so the copies receive identical updates.

A stage computes with the model's own code: embed_tokens, run_blocks, and for its contiguous
range of passes LoopedLM.run_passes, the very function the single process runs over 0..r (so
truncated backprop, the fused norm_recur + injection kernel and the hyperconnect lanes are the
model's, written once). Between stages a stage sends a tuple: (x,) in the prelude and coda,
(s, aux) inside the recurrence, the fields of the model's RecurrenceState (aux is the prelude
output e, or the hyperconnect lanes).

Training uses torch.distributed.pipelining's 1F1B schedule over the step's micro-batches;
evaluation (any num_recur) uses a forward-only relay below, with the passes of the requested r
spread over the stages that hold the recurrent group.

A sampled training depth (model.recur_sampling) runs on a fixed, padded schedule: the units
unroll model.max_recur passes (the sampler's cap), every rank computes the step's draw r itself,
and pass slots r..max_recur-1 are skipped (they carry their input through). The recurrence is
left after the last slot, so every stage sends and receives tuples of one shape on every step,
which the schedule's static buffers need; stages whose slots are all skipped only relay.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import groupby
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn

from .. import param_names as names
from ..config import ConfigError, ModelConfig, recurrences
from ..model import RecurrenceState


@dataclass(frozen=True)
class Unit:
    kind: str   # "prelude" | "pass" | "coda"
    index: int  # block index (prelude/coda) or recurrence index (pass)


def units_for(cfg: ModelConfig, num_recur: Optional[int] = None) -> list[Unit]:
    """The training schedule's units (max_recur pass slots), or those of a forward at num_recur."""
    r = recurrences(num_recur, cfg.max_recur)
    return ([Unit("prelude", i) for i in range(cfg.n_prelude)] + [Unit("pass", i) for i in range(r)]
            + [Unit("coda", i) for i in range(cfg.n_coda)])


def _weight(u: Unit, cfg: ModelConfig) -> int:
    return cfg.n_recur_block if u.kind == "pass" else 1


def partition(weights: list[int], parts: int) -> list[tuple[int, int]]:
    """Contiguous split of `weights` into `parts` non-empty ranges minimising the heaviest part
    (exact dynamic programme; unit counts are small)."""
    n = len(weights)
    prefix = [0]
    for w in weights:
        prefix.append(prefix[-1] + w)
    inf = float("inf")
    best = [[inf] * (n + 1) for _ in range(parts + 1)]
    cut = [[0] * (n + 1) for _ in range(parts + 1)]
    best[0][0] = 0
    for k in range(1, parts + 1):
        for j in range(k, n + 1):
            for i in range(k - 1, j):
                cost = max(best[k - 1][i], prefix[j] - prefix[i])
                if cost < best[k][j]:
                    best[k][j], cut[k][j] = cost, i
    bounds, j = [], n
    for k in range(parts, 0, -1):
        i = cut[k][j]
        bounds.append((i, j))
        j = i
    return bounds[::-1]


def check_pipeline(cfg: ModelConfig, pp: int) -> None:
    n = len(units_for(cfg))
    if pp > n:
        raise ConfigError(
            f"parallel.pp={pp} is more pipeline stages than the model has pipeline units ({n}: "
            f"{cfg.n_prelude} prelude blocks + {cfg.max_recur} recurrences + {cfg.n_coda} coda blocks). "
            f"Use parallel.pp <= {n}")


@dataclass
class StagePlan:
    stage: int
    pp: int
    units: list[Unit]
    recur_stages: list[int]   # stages that run passes (and hold the tied recurrent group)

    @property
    def first(self) -> bool:
        return self.stage == 0

    @property
    def last(self) -> bool:
        return self.stage == self.pp - 1

    @property
    def holds_recurrence(self) -> bool:
        return self.stage in self.recur_stages


def plan_stages(cfg: ModelConfig, pp: int) -> list[StagePlan]:
    check_pipeline(cfg, pp)
    units = units_for(cfg)
    bounds = partition([_weight(u, cfg) for u in units], pp)
    per = [units[a:b] for a, b in bounds]
    recur = [s for s, us in enumerate(per) if any(u.kind == "pass" for u in us)]
    return [StagePlan(s, pp, per[s], recur) for s in range(pp)]


def eval_units(plan: StagePlan, cfg: ModelConfig, num_recur: int) -> list[Unit]:
    """This stage's units for a forward at any r: prelude/coda as in training, the r passes
    split evenly over the stages that hold the recurrent group."""
    out = [u for u in plan.units if u.kind == "prelude"]
    if plan.holds_recurrence:
        k, n = plan.recur_stages.index(plan.stage), len(plan.recur_stages)
        out += [Unit("pass", i) for i in range(k * num_recur // n, (k + 1) * num_recur // n)]
    return out + [u for u in plan.units if u.kind == "coda"]


def owned_prefixes(plan: StagePlan) -> tuple[str, ...]:
    """State-dict name prefixes of the parameters this stage uses."""
    blocks = {"prelude": names.PRELUDE, "coda": names.CODA}
    out = [f"{blocks[u.kind]}{u.index}." for u in plan.units if u.kind in blocks]
    if plan.first:
        out += [names.EMBED, names.NORM_EMB]
    if plan.holds_recurrence:
        out += list(names.RECURRENT_GROUP)
    if plan.last:
        out += [names.NORM_FINAL, names.HEAD]
    return tuple(out)


# ----------------------------------------------------------------------------- stage compute
def run_units(model: nn.Module, units: list[Unit], carry: tuple, first: bool, last: bool,
              num_recur: int, last_pass: Optional[int] = None) -> tuple:
    """Run `units` of a LoopedLM on the carried tuple with the model's own code: embed_tokens on
    the first stage, run_blocks for prelude and coda blocks, run_passes for each contiguous run of
    passes. Passes i >= num_recur are skipped slots of a padded schedule (the state passes
    through); the recurrence is left after pass `last_pass` (default num_recur - 1, the last pass
    that runs)."""
    last_pass = num_recur - 1 if last_pass is None else last_pass
    received = () if first else carry
    x = model.embed_tokens(carry[0]) if first else carry[0]
    state = RecurrenceState(*received) if len(received) == 2 else None
    for kind, run in groupby(units, key=lambda u: u.kind):
        idx = [u.index for u in run]
        if kind != "pass":
            x = model.run_blocks([getattr(model, kind)[i] for i in idx], x)
            continue
        start, stop = idx[0], idx[-1] + 1
        assert idx == list(range(start, stop)), f"pass units must be contiguous, got {idx}"
        if start == 0:  # x is the prelude output e
            state = model.start_recurrence(x)
        state = model.run_passes(state, start, min(stop, num_recur), num_recur)
        if start <= last_pass < stop:  # leaving the recurrence: only the coda input travels on
            x, state = model.end_recurrence(state), None
    if last:
        return (_tie(model.norm_final(x), received),)
    # Fresh views, so a carried tensor is never the received input buffer itself. The schedule
    # fixes whether each carried tensor needs a gradient at its first step, while a sampled depth
    # detaches or skips different passes on different steps: in training every carried tensor
    # requires grad (a detached one as a fresh leaf, where its gradient simply stops), and every
    # received one gets a gradient to send back (zero where this step did not use it).
    out = (x,) if state is None else (state.s, state.aux)
    grad = torch.is_grad_enabled()
    out = tuple(t.view_as(t) if t.requires_grad or not grad else t.detach().requires_grad_() for t in out)
    return (_tie(out[0], received), *out[1:])


class _ZeroGradTie(torch.autograd.Function):
    """Identity on `out`, with a zero gradient for each of `inputs` (added to any real one)."""

    @staticmethod
    def forward(ctx, out, *inputs):
        ctx.like = [(t.shape, t.dtype, t.device) for t in inputs]
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad):
        return (grad, *(torch.zeros(shape, dtype=dtype, device=dev) for shape, dtype, dev in ctx.like))


def _tie(out: torch.Tensor, received: tuple) -> torch.Tensor:
    inputs = [t for t in received if t.requires_grad]
    if not inputs or not torch.is_grad_enabled():
        return out
    return _ZeroGradTie.apply(out, *inputs)


class StageModule(nn.Module):
    """One pipeline stage as a module for torch.distributed.pipelining."""

    def __init__(self, model: nn.Module, plan: StagePlan, autocast, recur=None):
        super().__init__()
        self.model, self.plan, self.autocast = model, plan, autocast
        self.recur = recur or (lambda: model.cfg.num_recur)  # this step's r (a sampled depth's draw)

    def forward(self, *carry):
        with self.autocast():
            out = run_units(self.model, self.plan.units, carry, self.plan.first, self.plan.last,
                            self.recur(), last_pass=self.model.cfg.max_recur - 1)
        return out[0] if len(out) == 1 else out


# ----------------------------------------------------------------------------- forward-only relay
_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def send_tuple(tensors: tuple, dst: int, device: torch.device, max_header: int = 64) -> None:
    """Blocking send of a short tuple of float tensors; a fixed-size header (count, then dtype,
    ndim and shape of each) goes first so the receiver can allocate."""
    header = [len(tensors)]
    for t in tensors:
        header += [_DTYPES.index(t.dtype), t.dim(), *t.shape]
    buf = torch.zeros(max_header, dtype=torch.long, device=device)
    buf[0] = len(header)
    buf[1: 1 + len(header)] = torch.tensor(header, device=device)
    dist.send(buf, dst)
    for t in tensors:
        dist.send(t.detach().contiguous(), dst)


def recv_tuple(src: int, device: torch.device, max_header: int = 64) -> tuple:
    buf = torch.zeros(max_header, dtype=torch.long, device=device)
    dist.recv(buf, src)
    header = buf[1: 1 + int(buf[0])].tolist()
    n, pos, out = header[0], 1, []
    for _ in range(n):
        dtype, ndim = _DTYPES[header[pos]], header[pos + 1]
        shape = header[pos + 2: pos + 2 + ndim]
        pos += 2 + ndim
        t = torch.empty(shape, dtype=dtype, device=device)
        dist.recv(t, src)
        out.append(t)
    return tuple(out)
