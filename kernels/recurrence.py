"""The recurrence step of the looped model: state norm + input injection, and hyperconnect lanes.

    recur_norm_inject(h, e, norm_weight, eps, mode, inject_weight=None) -> (s, u)
        s = rms_norm(h) * norm_weight          (norm_recur after a pass through the group)
        u = input of the next pass:
            'additive'    u = s + e            (fused into the norm kernel: one pass over h, e)
            'passthrough' u = s
            'linear'      u = e @ W[:, :d].T + s @ W[:, d:].T   (W = inject_weight [d, 2d]),
                          two matmuls accumulated into one output; cat([e, s]) never exists.
    inject(e, s, mode, inject_weight=None) -> u      (the same injection without the norm)

    hc_combine(lanes, alpha) -> u                  u = sum_n alpha[n] * lanes[n]
    hc_update(lanes, s, M, beta) -> new_lanes      new[i] = sum_j M[i, j] lanes[j] + beta[i] s
        lanes [N, *, d] (N small: 2-4), alpha/beta [N], M [N, N]. Outputs in lanes.dtype, math
        in fp32; gradients for lanes, s, alpha, M, beta (the small ones reduced from per-program
        partial sums).

``backend`` picks the references below or the Triton kernels (megaloop.kernels.triton: the
RMSNorm kernel fuses the additive injection, recurrence.py there holds the lane kernels). The
linear injection is two matmuls in either backend.
"""
from __future__ import annotations

from typing import Optional, Sequence, Tuple, Union

import torch

from .dispatch import AUTO, Backend, use_triton
from .rms_norm import rms_norm, rms_norm_reference

MODES = ("linear", "additive", "passthrough")


# ----------------------------------------------------------------------------- references
def inject_reference(e, s, mode, inject_weight=None):
    """Plain formulas (the linear one with the concatenation, as written in the paper)."""
    if mode == "additive":
        return s + e
    if mode == "passthrough":
        return s
    if mode == "linear":
        return torch.nn.functional.linear(torch.cat([e, s], dim=-1), inject_weight)
    raise ValueError(f"unknown injection mode {mode!r}; expected one of {MODES}")


def recur_norm_inject_reference(h, e, norm_weight, eps, mode, inject_weight=None):
    s = rms_norm_reference(h, norm_weight, eps)
    return s, inject_reference(e, s, mode, inject_weight)


def _bshape(t, n_extra):
    return t.reshape(t.shape[0], *([1] * n_extra))


def hc_combine_reference(lanes, alpha):
    lanes = _stack(lanes)
    ct = torch.promote_types(lanes.dtype, torch.float32)
    return (_bshape(alpha.to(ct), lanes.dim() - 1) * lanes.to(ct)).sum(0).to(lanes.dtype)


def hc_update_reference(lanes, s, M, beta):
    lanes = _stack(lanes)
    n_extra = lanes.dim() - 1
    ct = torch.promote_types(lanes.dtype, torch.float32)
    mixed = torch.tensordot(M.to(ct), lanes.to(ct), dims=([1], [0]))
    return (mixed + _bshape(beta.to(ct), n_extra) * s.to(ct).unsqueeze(0)).to(lanes.dtype)


def _stack(lanes) -> torch.Tensor:
    if isinstance(lanes, (list, tuple)):
        return torch.stack(list(lanes))
    return lanes


# ----------------------------------------------------------------------------- linear injection
class LinearInjectFn(torch.autograd.Function):
    """u = e @ W1.T + s @ W2.T with W = [W1 | W2]; no concatenated input is ever built."""

    @staticmethod
    def forward(ctx, e, s, W):
        d = e.shape[-1]
        if W.shape[1] != 2 * d or s.shape[-1] != d:
            raise ValueError(f"inject_weight must be [d_out, 2*{d}], got {tuple(W.shape)}")
        dt = e.dtype
        if torch.is_autocast_enabled(e.device.type):
            dt = torch.get_autocast_dtype(e.device.type)
        e2 = e.reshape(-1, d).to(dt)
        s2 = s.reshape(-1, d).to(dt)
        Wc = W.to(dt)
        u = torch.mm(e2, Wc[:, :d].t())
        u.addmm_(s2, Wc[:, d:].t())
        ctx.save_for_backward(e2, s2, Wc)
        ctx.meta = (e.shape, e.dtype, s.dtype, W.dtype)
        return u.view(*e.shape[:-1], W.shape[0])

    @staticmethod
    def backward(ctx, gu):
        e2, s2, Wc = ctx.saved_tensors
        e_shape, e_dtype, s_dtype, w_dtype = ctx.meta
        d = e2.shape[1]
        g2 = gu.reshape(-1, Wc.shape[0]).to(Wc.dtype)
        ge = gs = gW = None
        if ctx.needs_input_grad[0]:
            ge = torch.mm(g2, Wc[:, :d]).view(e_shape).to(e_dtype)
        if ctx.needs_input_grad[1]:
            gs = torch.mm(g2, Wc[:, d:]).view(e_shape).to(s_dtype)
        if ctx.needs_input_grad[2]:
            gW = torch.empty(Wc.shape, device=Wc.device, dtype=w_dtype)
            gW[:, :d] = torch.mm(g2.t(), e2)
            gW[:, d:] = torch.mm(g2.t(), s2)
        return ge, gs, gW


class StateInjectFn(torch.autograd.Function):
    """u = e_half + s @ W2.T with W = [W1 | W2], where e_half = e @ W1.T was computed once for all
    passes (inject_e_half): every pass reads the same e, so only the state half is per pass. The
    gradient of W1 then comes from e_half's own backward, once, from the passes' summed gradients."""

    @staticmethod
    def forward(ctx, e_half, s, W):
        d = s.shape[-1]
        if W.shape[1] != 2 * d:
            raise ValueError(f"inject_weight must be [d_out, 2*{d}], got {tuple(W.shape)}")
        dt = s.dtype
        if torch.is_autocast_enabled(s.device.type):
            dt = torch.get_autocast_dtype(s.device.type)
        s2 = s.reshape(-1, d).to(dt)
        W2 = W[:, d:].to(dt)
        u = torch.addmm(e_half.reshape(-1, W.shape[0]).to(dt), s2, W2.t())
        ctx.save_for_backward(s2, W2)
        ctx.meta = (s.shape, e_half.dtype, s.dtype, W.dtype, W.shape)
        return u.view(*s.shape[:-1], W.shape[0])

    @staticmethod
    def backward(ctx, gu):
        s2, W2 = ctx.saved_tensors
        s_shape, eh_dtype, s_dtype, w_dtype, w_shape = ctx.meta
        d = s2.shape[1]
        g2 = gu.reshape(-1, w_shape[0]).to(W2.dtype)
        geh = gs = gW = None
        if ctx.needs_input_grad[0]:
            geh = gu.to(eh_dtype)
        if ctx.needs_input_grad[1]:
            gs = torch.mm(g2, W2).view(s_shape).to(s_dtype)
        if ctx.needs_input_grad[2]:
            gW = torch.zeros(w_shape, device=W2.device, dtype=w_dtype)
            gW[:, d:] = torch.mm(g2.t(), s2)
        return geh, gs, gW


def inject_e_half(e: torch.Tensor, inject_weight: torch.Tensor) -> torch.Tensor:
    """e @ W1.T, the part of linear injection that every pass shares (W = [W1 | W2])."""
    return torch.nn.functional.linear(e, inject_weight[:, : e.shape[-1]])


def inject(e: torch.Tensor, s: torch.Tensor, mode: str, inject_weight: Optional[torch.Tensor] = None,
           e_half: Optional[torch.Tensor] = None):
    """The input of a pass through the recurrent group from the prelude output e and state s.
    Linear injection with e_half (= inject_e_half(e, W), computed once for the passes that read
    the same e) computes only the state half."""
    if mode == "additive":
        return s + e
    if mode == "passthrough":
        return s
    if mode == "linear":
        if inject_weight is None:
            raise ValueError("mode 'linear' needs inject_weight [d, 2d]")
        if e_half is not None:
            return StateInjectFn.apply(e_half, s, inject_weight)
        return LinearInjectFn.apply(e, s, inject_weight)
    raise ValueError(f"unknown injection mode {mode!r}; expected one of {MODES} "
                     "(hyperconnect uses hc_combine / hc_update)")


def recur_norm_inject(h: torch.Tensor, e: torch.Tensor, norm_weight: Optional[torch.Tensor], eps: float,
                      mode: str, inject_weight: Optional[torch.Tensor] = None,
                      e_half: Optional[torch.Tensor] = None,
                      backend: Backend = AUTO) -> Tuple[torch.Tensor, torch.Tensor]:
    """(s, u): s = rms_norm(h) * norm_weight, u = inject(e, s, mode, inject_weight, e_half)."""
    if mode not in MODES:
        raise ValueError(f"unknown injection mode {mode!r}; expected one of {MODES}")
    if mode == "additive":
        if use_triton(backend, h):
            from .triton.rms_norm import FusedRMSNormFn
            s, u = FusedRMSNormFn.apply(h, None, norm_weight, e, eps)
            return s, u
        s = rms_norm_reference(h, norm_weight, eps)
        return s, s + e
    s = rms_norm(h, norm_weight, eps, backend)
    return s, inject(e, s, mode, inject_weight, e_half)


def hc_combine(lanes: Union[torch.Tensor, Sequence[torch.Tensor]], alpha: torch.Tensor,
               backend: Backend = AUTO) -> torch.Tensor:
    """u = sum_n alpha[n] * lanes[n]; lanes [N, *, d] (or a list of N tensors), alpha [N]."""
    lanes = _stack(lanes)
    if use_triton(backend, lanes):
        from .triton.recurrence import HCCombineFn
        return HCCombineFn.apply(lanes, alpha)
    return hc_combine_reference(lanes, alpha)


def hc_update(lanes: Union[torch.Tensor, Sequence[torch.Tensor]], s: torch.Tensor, M: torch.Tensor,
              beta: torch.Tensor, backend: Backend = AUTO) -> torch.Tensor:
    """new_lanes[i] = sum_j M[i, j] * lanes[j] + beta[i] * s."""
    lanes = _stack(lanes)
    if use_triton(backend, lanes):
        from .triton.recurrence import HCUpdateFn
        return HCUpdateFn.apply(lanes, s, M, beta)
    return hc_update_reference(lanes, s, M, beta)
