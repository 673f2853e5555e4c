"""The training step behind one small interface, so the loop does not care how it is parallelised.

`LocalEngine` runs on one process (CPU or one GPU). The distributed engines in
megaloop.parallel (tensor/pipeline parallel, DeepSpeed ZeRO) implement the same methods.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterable, Optional

import torch

from .config import Config
from .optim import build_optimizer, set_lr


@dataclass
class StepStats:
    loss: float          # mean micro-batch loss of the step
    grad_norm: float     # before clipping
    skipped: bool        # non-finite loss or gradient: no update was applied


def autocast_for(cfg: Config, device: torch.device):
    if cfg.parallel.precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return nullcontext()


class LocalEngine:
    """Plain single-process training: fp32 master weights, optional bf16 autocast."""

    is_main = True
    dp_rank, dp_size = 0, 1

    def __init__(self, cfg: Config, model: torch.nn.Module, device: torch.device):
        self.cfg, self.model, self.device = cfg, model.to(device), device
        self.optimizer = build_optimizer(model, cfg.optim)

    def train_step(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], lr_factor: float,
                   inject_nan: bool = False, num_recur: Optional[int] = None) -> StepStats:
        """One optimizer step over grad_accum micro-batches at num_recur recurrences (None: the
        model's; the loop passes the step's draw of a sampled depth). A non-finite loss or
        gradient skips the update (counted by the caller). inject_nan poisons the loss
        (fault-injection tests)."""
        set_lr(self.optimizer, lr_factor)
        batches = list(batches)
        total = torch.zeros((), device=self.device)
        for x, y in batches:
            with autocast_for(self.cfg, self.device):
                loss = self.model(x.to(self.device), y.to(self.device), num_recur=num_recur)
            if inject_nan:
                loss = loss * float("nan")
            (loss / len(batches)).backward()
            total += loss.detach()
        loss = (total / len(batches)).item()
        return self._finish(loss)

    def _finish(self, loss: float) -> StepStats:
        params = [p for p in self.model.parameters() if p.grad is not None]
        clip = self.cfg.optim.grad_clip or float("inf")
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip))
        skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if not skipped:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepStats(loss, grad_norm, skipped)

    @torch.no_grad()
    def eval_loss(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], num_recur: Optional[int] = None) -> float:
        self.model.eval()
        tot, n = 0.0, 0
        for x, y in batches:
            with autocast_for(self.cfg, self.device):
                tot += float(self.model(x.to(self.device), y.to(self.device), num_recur=num_recur)) * y.numel()
            n += y.numel()
        self.model.train()
        return tot / max(n, 1)

    # checkpoint state (megaloop/parallel/dcp_state.py): every parameter, whole, by name
    def save_files(self, path: str, background: bool = False):
        from .parallel.dcp_state import save, state_dict
        return save(path, state_dict(self.model.named_parameters(), self.optimizer), background)

    def load_files(self, path: str) -> None:
        from .parallel.dcp_state import load
        named = list(self.model.named_parameters())
        load(path, named, self.optimizer, known=[n for n, _ in named])

    def barrier(self) -> None:
        pass

    def all_reduce_flag(self, flag: bool) -> bool:
        return flag

    def abort(self, exc: BaseException):
        """The run failed with `exc`: nothing to tell other ranks; report exc itself."""
        return None

    def close(self) -> None:
        pass
