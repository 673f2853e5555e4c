"""Optimisers and the learning-rate schedule.

`MuonAdamW` is a single torch optimizer whose param groups are either kind="muon" (the 2-D
matrices of the blocks and the injection adapter: Newton-Schulz-orthogonalised Nesterov
momentum) or kind="adamw" (embeddings, head, norm scales, hyperconnect lanes). Being one
optimizer keeps the training loop, checkpoints and DeepSpeed's client-optimizer path simple.

Muon needs whole matrices: Newton-Schulz on a shard is a different operation. It is therefore
correct with plain data parallelism and ZeRO stage 0 (every rank holds full gradients); under
tensor parallelism each shard (marked `tp_split_dim` by megaloop.parallel) is gathered to its
whole matrix first. ZeRO >= 1 hands optimisers flat partitions, so Muon is refused there (see
megaloop/parallel/engines.py).
"""
from __future__ import annotations

import math

import torch

from .config import OptimConfig


@torch.no_grad()
def newton_schulz(g: torch.Tensor, steps: int) -> torch.Tensor:
    """Approximate U V^T of g = U S V^T with the quintic iteration used by Muon."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = g.float()
    transposed = x.size(0) > x.size(1)
    if transposed:
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        m = x @ x.T
        x = a * x + (b * m + c * m @ m) @ x
    return x.T if transposed else x


def _newton_schulz_tp(update: torch.Tensor, dim: int, tp_group, steps: int) -> tuple[torch.Tensor, int, int]:
    """Muon on a tensor-parallel shard (megaloop.parallel marks shards with `tp_split_dim`):
    Newton-Schulz of a shard is not the shard of Newton-Schulz, so gather the whole matrix over
    the TP group, orthogonalise it (every TP rank does the same work) and keep this rank's slice.
    Returns the slice and the whole matrix's shape."""
    import torch.distributed as dist

    n, rank = dist.get_world_size(tp_group), dist.get_rank(tp_group)
    parts = [torch.empty_like(update) for _ in range(n)]
    dist.all_gather(parts, update.contiguous(), group=tp_group)
    full = torch.cat(parts, dim)
    return newton_schulz(full, steps).chunk(n, dim)[rank], full.size(0), full.size(1)


class MuonAdamW(torch.optim.Optimizer):
    def __init__(self, param_groups: list[dict]):
        for g in param_groups:
            g.setdefault("initial_lr", g["lr"])
        super().__init__(param_groups, defaults={})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            if group["kind"] == "muon":
                self._muon(group)
            else:
                self._adamw(group)

    def _muon(self, group: dict) -> None:
        for p in group["params"]:
            if p.grad is None:
                continue
            buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p, dtype=torch.float32))
            mom = group["momentum"]
            buf.mul_(mom).add_(p.grad.float())
            update = p.grad.float().add(buf, alpha=mom)  # Nesterov
            if getattr(p, "tp_split_dim", None) is not None:
                o, rows, cols = _newton_schulz_tp(update, p.tp_split_dim, p.tp_group, group["ns_steps"])
            else:
                o, (rows, cols) = newton_schulz(update, group["ns_steps"]), p.shape
            # Scale so the update RMS is comparable across shapes (tall matrices get more).
            scale = math.sqrt(max(1.0, rows / cols))
            if group.get("weight_decay", 0.0):
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(o.to(p.dtype), alpha=-group["lr"] * scale)

    def _adamw(self, group: dict) -> None:
        """torch's own AdamW over the group's parameters: the fused kernel where the device has one
        (CPU, CUDA), else the foreach one. State keeps torch.optim.AdamW's keys (step, exp_avg,
        exp_avg_sq) in fp32, so checkpoints of either load. A parameter held in a lower precision
        steps through an fp32 copy (its state stays fp32)."""
        from torch.optim.adamw import adamw

        params, grads, avgs, sqs, steps, low = [], [], [], [], [], []
        fused = all(p.device.type in ("cpu", "cuda") for p in group["params"])
        for p in group["params"]:
            if p.grad is None:
                continue
            st = self.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            if fused and st["step"].device != p.device:  # the fused kernel counts steps on the device
                st["step"] = st["step"].to(p.device)
            master = p if p.dtype == torch.float32 else p.detach().float()
            if master is not p:
                low.append((p, master))
            params.append(master)
            grads.append(p.grad if p.grad.dtype == torch.float32 else p.grad.float())
            avgs.append(st["exp_avg"])
            sqs.append(st["exp_avg_sq"])
            steps.append(st["step"])
        if not params:
            return
        b1, b2 = group["betas"]
        adamw(params, grads, avgs, sqs, [], steps, foreach=not fused, fused=fused, amsgrad=False, beta1=b1,
              beta2=b2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
        for p, master in low:
            p.copy_(master)


def param_groups(model, cfg: OptimConfig) -> list[dict]:
    """Split a LoopedLM's parameters the way the reference study trained it.

    muon: block matrices + injection adapter with Muon at `lr`; embeddings, head, norms and lanes
    with AdamW at their own rates, each scaled by (d_model / 512)^-0.5.
    adamw: everything with AdamW at `lr` (matrices) and the same per-group rates.
    """
    d = model.cfg.d_model
    scale = (d / 512) ** -0.5
    norms, matrices, lanes = [], [], []
    for name, p in model.named_parameters():
        if name.startswith(("embed.", "head.")):
            continue
        if name.startswith("injection.") and p.ndim != 2:
            lanes.append(p)
        elif p.ndim == 2:
            matrices.append(p)
        else:
            norms.append(p)
    adam = dict(kind="adamw", betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=0.0)
    groups = [
        dict(adam, name="embed", params=list(model.embed.parameters()), lr=cfg.embed_lr * scale),
        dict(adam, name="head", params=list(model.head.parameters()), lr=cfg.head_lr * scale),
        dict(adam, name="norms", params=norms, lr=cfg.norm_lr * scale),
    ]
    if lanes:
        groups.append(dict(adam, name="lanes", params=lanes, lr=cfg.lane_lr * scale))
    if cfg.name == "muon":
        groups.append(dict(kind="muon", name="matrices", params=matrices, lr=cfg.lr, momentum=cfg.momentum,
                           ns_steps=cfg.ns_steps, weight_decay=cfg.weight_decay))
    else:
        groups.append(dict(adam, name="matrices", params=matrices, lr=cfg.lr, weight_decay=cfg.weight_decay))
    return [g for g in groups if g["params"]]


def build_optimizer(model, cfg: OptimConfig) -> MuonAdamW:
    return MuonAdamW(param_groups(model, cfg))


def lr_factor(step: int, total_steps: int, warmup_steps: int, final_lr_frac: float) -> float:
    """Linear warmup to the peak, then linear decay to final_lr_frac of the peak at the last step."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    span = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / span)
    return 1.0 - (1.0 - final_lr_frac) * progress


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * factor
    return factor
