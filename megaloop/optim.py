"""Optimisers and the learning-rate schedule.

`MuonAdamW` is a single torch optimizer whose param groups are of one of three kinds:
- kind="muonh" (the reference study's matrix optimiser, MuonH): Nesterov momentum, Polar Express
  orthogonalisation, the update rescaled to the matrix's initial Frobenius norm, and the weights
  projected back onto that Frobenius sphere after every step;
- kind="muon" (plain Muon): Newton-Schulz-orthogonalised Nesterov momentum;
- kind="adamw" (embeddings, head, norm scales, hyperconnect lanes; everything under adamw).
Being one optimizer keeps the training loop, checkpoints and DeepSpeed's client-optimizer path
simple.

Muon and MuonH need whole matrices: orthogonalising a shard is a different operation. Under
tensor parallelism each shard (marked `tp_split_dim` by megaloop.parallel) is gathered to its whole
matrix first, and MuonH's Frobenius norms are taken over the whole matrix. DeepSpeed's ZeRO hands
optimisers flat partitions, so Muon never runs there at ZeRO >= 1; megaloop's own ZeRO-1/2
(megaloop/parallel/sharded_optim.py) partitions whole matrices across the data-parallel ranks
instead and runs `update` on each rank's share.
"""
from __future__ import annotations

import math

import torch

from . import param_names as names
from .config import OptimConfig


# Polar Express (Amsel et al. 2025, arXiv 2505.16932): per-iteration (a, b, c) of the odd
# polynomial x -> a x + b x^3 + c x^5, computed for 5 iterations with safety factor 2e-2 and
# cushion 2. These are the coefficients the reference study's MuonH uses.
POLAR_EXPRESS_COEFFS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


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


@torch.no_grad()
def polar_express(g: torch.Tensor, steps: int) -> torch.Tensor:
    """Approximate U V^T of g (a matrix, or a batch [n, rows, cols] of same-shaped matrices) with
    `steps` (<= 5) Polar Express iterations, in fp32.

    The Gram matrix is taken on the short side (X X^T for a wide matrix, X^T X for a tall one), so
    the cost is that of the smaller dimension. The reference runs this in bf16; fp32 is more
    accurate and is what a CPU computes fast."""
    x = g.float()
    x = x / (1.02 * torch.linalg.matrix_norm(x, keepdim=True) + 1e-6)
    tall = x.size(-2) > x.size(-1)
    for a, b, c in POLAR_EXPRESS_COEFFS[:steps]:
        if tall:
            gram = x.mT @ x
            x = a * x + x @ (b * gram + c * gram @ gram)
        else:
            gram = x @ x.mT
            x = a * x + (b * gram + c * gram @ gram) @ x
    return x


def _tp_whole(update: torch.Tensor, p: torch.Tensor, fn) -> torch.Tensor:
    """fn applied to the whole matrix of a tensor-parallel shard (megaloop.parallel marks shards
    with `tp_split_dim`), returning the whole result: orthogonalising a shard is not the shard of
    orthogonalising, so gather the matrix over the TP group first (every TP rank does the same
    work). Unsharded parameters go straight to fn."""
    if getattr(p, "tp_split_dim", None) is None:
        return fn(update)
    import torch.distributed as dist

    n, shard = dist.get_world_size(p.tp_group), update.contiguous()
    if p.tp_split_dim == 0:  # the shards are consecutive rows: gathered straight into the whole matrix
        whole = shard.new_empty((n * shard.size(0), *shard.shape[1:]))
        dist.all_gather_single(whole, shard, group=p.tp_group)
    else:
        parts = [torch.empty_like(shard) for _ in range(n)]
        dist.all_gather(parts, shard, group=p.tp_group)
        whole = torch.cat(parts, p.tp_split_dim)
        del parts  # not kept beside the whole matrix while fn runs
    return fn(whole)


def _tp_shard(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """This rank's slice of a whole matrix computed by `_tp_whole`."""
    if getattr(p, "tp_split_dim", None) is None:
        return full
    import torch.distributed as dist

    n, rank = dist.get_world_size(p.tp_group), dist.get_rank(p.tp_group)
    return full.chunk(n, p.tp_split_dim)[rank]


def _frobenius(p: torch.Tensor) -> torch.Tensor:
    """||W||_F of the whole matrix (summed over the TP shards), as a 0-dim fp32 tensor."""
    sq = p.float().pow(2).sum()
    if getattr(p, "tp_split_dim", None) is not None:
        import torch.distributed as dist

        dist.all_reduce(sq, group=p.tp_group)
    return sq.sqrt()


class MuonAdamW(torch.optim.Optimizer):
    def __init__(self, param_groups: list[dict]):
        for g in param_groups:
            g.setdefault("initial_lr", g["lr"])
        super().__init__(param_groups, defaults={})

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            self.update(group, group["params"])

    @torch.no_grad()
    def update(self, group: dict, params: list) -> None:
        """One step of `group`'s kind over `params` (the group's parameters, or a subset of them:
        the sharded optimizer passes the ones this rank owns). Same-shaped MuonH matrices among
        `params` are orthogonalised as one batch."""
        if group["kind"] == "muonh":
            self._muonh(group, params)
        elif group["kind"] == "muon":
            self._muon(group, params)
        else:
            self._adamw(group, params)

    def _muon(self, group: dict, params: list) -> None:
        for p in params:
            if p.grad is None:
                continue
            buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(p, dtype=torch.float32))
            mom = group["momentum"]
            buf.mul_(mom).add_(p.grad.float())
            update = p.grad.float().add(buf, alpha=mom)  # Nesterov
            full = _tp_whole(update, p, lambda u: newton_schulz(u, group["ns_steps"]))
            o, (rows, cols) = _tp_shard(full, p), full.shape
            # Scale so the update RMS is comparable across shapes (tall matrices get more).
            scale = math.sqrt(max(1.0, rows / cols))
            if group.get("weight_decay", 0.0):
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_(o.to(p.dtype), alpha=-group["lr"] * scale)

    def _muonh(self, group: dict, params: list) -> None:
        """MuonH: the weights live on the Frobenius sphere of radius ||W_0||_F (the norm the
        matrix had at its first step), and each update has that norm too. No weight decay: on the
        sphere it is a first-order no-op. Same-shaped whole matrices are orthogonalised as one
        batch (a looped model has many of them; one batched product beats many small ones)."""
        beta, steps = group["momentum"], group["ns_steps"]
        params = [p for p in params if p.grad is not None]
        if not params:
            return
        for p in params:
            st = self.state[p]
            if not st:
                st["momentum_buffer"] = torch.zeros_like(p, dtype=torch.float32)
                st["w0_norm"] = _frobenius(p)
        bufs = [self.state[p]["momentum_buffer"] for p in params]
        torch._foreach_lerp_(bufs, [p.grad.float() for p in params], 1 - beta)

        def nesterov(i: int, out=None) -> torch.Tensor:
            # made when its matrix is orthogonalised, not for every matrix up front: the step's
            # transient memory is then one batch of matrices, not a copy of every gradient
            return torch.lerp(params[i].grad.float(), bufs[i], beta, out=out)

        def apply(i: int, full: torch.Tensor) -> None:
            p, radius = params[i], self.state[params[i]]["w0_norm"].to(full.device)
            update = _tp_shard(full, p) * (radius / full.norm().clamp_min(1e-10))
            p.sub_(update.to(p.dtype), alpha=group["lr"])
            p.mul_((radius / _frobenius(p).clamp_min(1e-10)).to(p.dtype))
        batches: dict = {}
        for i, p in enumerate(params):
            if getattr(p, "tp_split_dim", None) is None:
                batches.setdefault(tuple(p.shape), []).append(i)
            else:  # a TP shard: orthogonalise its whole matrix, one at a time
                apply(i, _tp_whole(nesterov(i), p, lambda u: polar_express(u, steps)))
        for shape, idx in batches.items():
            stacked = torch.empty((len(idx), *shape), dtype=torch.float32, device=params[idx[0]].device)
            for j, i in enumerate(idx):
                nesterov(i, out=stacked[j])
            for i, o in zip(idx, polar_express(stacked, steps).unbind(0)):
                apply(i, o)
            del stacked

    def _adamw(self, group: dict, params: list) -> None:
        """torch's own AdamW over `params`: the fused kernel where the device has one
        (CPU, CUDA), else the foreach one. State keeps torch.optim.AdamW's keys (step, exp_avg,
        exp_avg_sq) in fp32, so checkpoints of either load. A parameter held in a lower precision
        steps through an fp32 copy (its state stays fp32)."""
        from torch.optim.adamw import adamw

        masters, grads, avgs, sqs, steps, low = [], [], [], [], [], []
        fused = all(p.device.type in ("cpu", "cuda") for p in params)
        for p in params:
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
            masters.append(master)
            grads.append(p.grad if p.grad.dtype == torch.float32 else p.grad.float())
            avgs.append(st["exp_avg"])
            sqs.append(st["exp_avg_sq"])
            steps.append(st["step"])
        if not masters:
            return
        b1, b2 = group["betas"]
        adamw(masters, grads, avgs, sqs, [], steps, foreach=not fused, fused=fused, amsgrad=False, beta1=b1,
              beta2=b2, lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False)
        for p, master in low:
            p.copy_(master)


def param_groups(model, cfg: OptimConfig) -> list[dict]:
    """Split a LoopedLM's parameters the way the reference study trained it.

    muonh / muon: block matrices + injection adapter with MuonH / Muon at `lr`; embeddings, head,
    norms and lanes with AdamW at their own rates, each scaled by (d_model / 512)^-0.5.
    adamw: everything with AdamW at `lr` (matrices) and the same per-group rates.
    """
    d = model.cfg.d_model
    scale = (d / 512) ** -0.5
    norms, matrices, lanes = [], [], []
    for name, p in model.named_parameters():
        if name.startswith(names.VOCAB):
            continue
        ndim = len(getattr(p, "ds_shape", p.shape))  # a ZeRO-3 partition is flat: its parameter's own shape
        if name.startswith(names.INJECTION) and ndim != 2:
            lanes.append(p)
        elif ndim == 2:
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
    if cfg.name == "muonh":
        groups.append(dict(kind="muonh", name="matrices", params=matrices, lr=cfg.lr, momentum=cfg.momentum,
                           ns_steps=cfg.ns_steps))
    elif cfg.name == "muon":
        groups.append(dict(kind="muon", name="matrices", params=matrices, lr=cfg.lr, momentum=cfg.momentum,
                           ns_steps=cfg.ns_steps, weight_decay=cfg.weight_decay))
    else:
        groups.append(dict(adam, name="matrices", params=matrices, lr=cfg.lr, weight_decay=cfg.weight_decay))
    return [g for g in groups if g["params"]]


def build_optimizer(model, cfg: OptimConfig) -> MuonAdamW:
    return MuonAdamW(param_groups(model, cfg))


SCHEDULES = ("linear", "wsd")


def decay_start(total_steps: int, decay_frac: float) -> int:
    """The first step of a warmup-stable-decay run's decay: its last round(decay_frac x total_steps)
    steps decay (at least one). The steps before it are the stable phase, so a checkpoint taken
    after `decay_start` steps of any longer run on the same data is where this run's decay begins
    (what budget branching relies on)."""
    return total_steps - max(1, min(total_steps, int(math.floor(decay_frac * total_steps + 0.5))))


def lr_factor(step: int, total_steps: int, warmup_steps: int, final_lr_frac: float,
              schedule: str = "linear", decay_frac: float = 0.2) -> float:
    """The peak-lr multiplier at `step` (0-based) of a `total_steps` run.

    linear: linear warmup to the peak, then linear decay to final_lr_frac at the last step.
    wsd (warmup-stable-decay, Hägele et al. 2024): linear warmup, the peak until decay_start, then
    linear decay over the last decay_frac of the run, reaching final_lr_frac at the last step. The
    stable phase does not depend on total_steps, so runs of different lengths share it exactly."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "wsd":
        start = max(warmup_steps, decay_start(total_steps, decay_frac))
        if step < start:
            return 1.0
        progress = min(1.0, (step - start + 1) / max(1, total_steps - start))
        return 1.0 - (1.0 - final_lr_frac) * progress
    span = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, (step - warmup_steps) / span)
    return 1.0 - (1.0 - final_lr_frac) * progress


def set_lr(optimizer: torch.optim.Optimizer, factor: float) -> float:
    for g in optimizer.param_groups:
        g["lr"] = g["initial_lr"] * factor
    return factor
