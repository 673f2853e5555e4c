"""Meta-device initialisation: a parallel rank builds the model with shapes only (on the meta
device) and materialises only the parameters its layout keeps, with exactly the values the
single process gives them.

The single process seeds the CPU generator (train.build_model) and builds LoopedLM: the
constructors of torch's own layers (nn.Linear, nn.Embedding) take their default random draws,
then LoopedLM.reset_parameters overwrites every parameter from its `init_plan`, drawing again.
A rank replays that random stream draw for draw:
  - the same seed;
  - the constructors' draws, each into a scratch copy of its layer (values thrown away), as the
    torch.nn class the layer was built as: a layer swapped after the build for a subclass that
    takes over its parameters (torchao's Float8Linear for an nn.Linear under precision fp8,
    megaloop/fp8.py) drew nothing itself, but the nn.Linear it replaced drew in the single process;
  - `init_plan` one parameter at a time, into a whole tensor of the parameter's full shape, of
    which the rank keeps its tensor-parallel shard, or nothing for another pipeline stage's
    parameter (whose draws are still taken, so the stream stays in step).
Every draw is the same op on a tensor of the same shape from the same generator state, so the
values are bitwise the single process's, and the generator ends in the same state. At most one
whole parameter exists at a time (the largest is the embedding or head, vocab x d_model),
beside the rank's own shards: never the whole model.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn

from .tensor_parallel import shard_of


def is_meta(model: nn.Module) -> bool:
    return any(p.is_meta for p in model.parameters())


def _torch_layer(m: nn.Module) -> Optional[type]:
    """The torch.nn layer class `m` is or derives from that defines the default init its
    constructor draws (nn.Linear for torchao's Float8Linear too); None for megaloop's modules."""
    for cls in type(m).__mro__:
        if cls.__module__.startswith("torch.nn.") and "reset_parameters" in vars(cls):
            return cls
    return None


def _draws_in_constructor(m: nn.Module) -> bool:
    """torch's own layers draw their default init in their constructor (kaiming-uniform,
    N(0, 1)); megaloop's modules draw nothing there. A subclass standing in for such a layer
    after the build (Float8Linear) counts as the layer it replaced: the single process built
    that layer, drawing, before converting it. Matching by type(m).__module__ alone missed
    every float8 linear and shifted the whole random stream of an fp8 rank (issue 27)."""
    return _torch_layer(m) is not None


@dataclass
class MetaRecipe:
    """What materialising needs from the model as built, before parallelism reshapes it."""

    full_shapes: dict[str, torch.Size]   # every parameter's whole, unsharded shape
    constructor_draws: list[nn.Module]   # meta copies of the layers whose constructors draw

    @classmethod
    def of(cls, model: nn.Module) -> "MetaRecipe":
        # modules() lists them in construction order (each is built, then assigned)
        return cls({n: p.shape for n, p in model.named_parameters()},
                   [copy.deepcopy(m) for m in model.modules() if _draws_in_constructor(m)])


@torch.no_grad()
def materialise(model: nn.Module, recipe: MetaRecipe, seed: int, device: torch.device,
                partition: Optional[Callable[[nn.Parameter], None]] = None) -> None:
    """Give a meta model's parameters (already cut to this rank's layout) their storage on
    `device` and the single process's values; rebuild its computed buffers. `partition`, when
    given, takes each parameter as soon as it holds its values (ZeRO-3 keeps a slice of it and
    frees the rest), so the rank never holds more than one whole parameter beyond its share."""
    torch.manual_seed(seed)  # as train.build_model, before the constructors
    for layer in recipe.constructor_draws:
        _torch_layer(layer).reset_parameters(layer.to_empty(device="cpu"))  # advances the generator; values discarded
        layer.to_empty(device="meta")
    params = dict(model.named_parameters())
    planned = set()
    for name, init in model.init_plan():
        whole = torch.empty(recipe.full_shapes[name])  # on the CPU generator, as the single process
        init(whole)
        p = params[name]  # this rank's shard, or an empty tensor for another stage's parameter
        new = _replace(model, name, shard_of(p, whole).to(device) if p.numel() else torch.empty(0, device=device))
        if partition is not None and new.numel():
            partition(new)
        planned.add(name)
        del whole
    missing = set(params) - planned
    if missing:
        raise RuntimeError(f"LoopedLM.init_plan does not initialise {sorted(missing)}: a meta-device build "
                           f"would leave them uninitialised")
    model.reset_buffers()
    model.to(device)


def _replace(model: nn.Module, name: str, value: torch.Tensor) -> nn.Parameter:
    """Swap the meta parameter `name` for one holding `value`, keeping its attributes (the TP
    shard's split dimension and group) and whether it trains."""
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    old = getattr(module, leaf)
    new = nn.Parameter(value.to(old.dtype), requires_grad=old.requires_grad)
    new.__dict__.update(old.__dict__)
    setattr(module, leaf, new)
    return new
