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

    # checkpoint state: written by the only rank. optim.pt is the exact native state;
    # optim_full.pt the same state keyed by parameter name, which any layout can load.
    def save_files(self, path: str) -> None:
        from .checkpoint import torch_save_synced
        from .reshard import FULL_OPTIM, local_full_state
        torch_save_synced(self.model.state_dict(), f"{path}/model.pt")
        torch_save_synced(self.optimizer.state_dict(), f"{path}/optim.pt")
        layout = dict(engine="local", tp=1, pp=1, dp=1, zero_stage=0)
        torch_save_synced(local_full_state(self.model, self.optimizer, layout), f"{path}/{FULL_OPTIM}")

    def load_files(self, path: str) -> None:
        import os

        from .checkpoint import CheckpointError, load_file
        from .reshard import FULL_OPTIM, apply_full_state
        try:
            self.model.load_state_dict(load_file(path, "model.pt"))
        except RuntimeError as e:
            raise CheckpointError(
                f"checkpoint {path} does not fit this model ({str(e).splitlines()[0]}); the config's "
                f"model shape differs from the run that wrote it") from None
        if os.path.isfile(os.path.join(path, "optim.pt")):  # written by a single process: exact
            self.optimizer.load_state_dict(load_file(path, "optim.pt"))
        elif os.path.isfile(os.path.join(path, FULL_OPTIM)):  # another layout: whole tensors by name
            apply_full_state(self.model, self.optimizer, [n for n, _ in self.model.named_parameters()],
                             load_file(path, FULL_OPTIM), path)
        else:
            raise CheckpointError(
                f"{path} has neither optim.pt nor {FULL_OPTIM}: it was written under a parallel layout by a "
                f"megaloop without resharding support. Resume it under the layout that wrote it (or "
                f"convert it with `megaloop checkpoint convert`)")

    def barrier(self) -> None:
        pass

    def all_reduce_flag(self, flag: bool) -> bool:
        return flag

    def abort(self, exc: BaseException):
        """The run failed with `exc`: nothing to tell other ranks; report exc itself."""
        return None

    def close(self) -> None:
        pass
