"""A plain, independent re-implementation of one forward pass of the looped LM.

Written from DESIGN.md directly in functional torch (explicit concatenation, explicit repeat of
KV heads, explicit softmax attention, F.cross_entropy), reading weights from a state dict. It
shares no code with megaloop.model or megaloop.kernels, so tests can compare against it.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def _rms(x, w, eps):
    y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    return y * w if w is not None else y


def _rope(x, T, base):
    D = x.size(-1)
    inv = 1.0 / (base ** (torch.arange(0, D, 2).float() / D))
    ang = torch.arange(T).float()[:, None] * inv[None]
    cos, sin = ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]
    x1, x2 = x[..., : D // 2], x[..., D // 2:]
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], -1)


def _block(sd, pre, x, cfg):
    B, T, d = x.shape
    hd = cfg.hdim
    h = _rms(x, sd[f"{pre}.norm1.weight"], cfg.norm_eps)
    q = (h @ sd[f"{pre}.attn.wq.weight"].T).view(B, T, -1, hd)
    k = (h @ sd[f"{pre}.attn.wk.weight"].T).view(B, T, -1, hd)
    v = (h @ sd[f"{pre}.attn.wv.weight"].T).view(B, T, -1, hd)
    q, k = _rms(_rope(q, T, cfg.rope_base), None, cfg.norm_eps), _rms(_rope(k, T, cfg.rope_base), None, cfg.norm_eps)
    rep = q.size(2) // k.size(2)
    k, v = k.repeat_interleave(rep, 2), v.repeat_interleave(rep, 2)
    att = torch.einsum("bthd,bshd->bhts", q, k) / math.sqrt(hd)
    att = att.masked_fill(torch.triu(torch.ones(T, T, dtype=torch.bool), 1), float("-inf")).softmax(-1)
    y = torch.einsum("bhts,bshd->bthd", att, v).reshape(B, T, -1)
    x = x + y @ sd[f"{pre}.attn.wo.weight"].T
    h = _rms(x, sd[f"{pre}.norm2.weight"], cfg.norm_eps)
    return x + (torch.relu(h @ sd[f"{pre}.mlp.fc.weight"].T) ** 2) @ sd[f"{pre}.mlp.proj.weight"].T


def reference_loss(sd: dict, cfg, idx: torch.Tensor, targets: torch.Tensor, num_recur=None,
                   bptt_k=None) -> torch.Tensor:
    """Mean loss. With bptt_k, the first r - bptt_k passes run under no_grad (truncated backprop)."""
    r = num_recur or cfg.num_recur
    x = _rms(sd["embed.weight"][idx], sd["norm_emb.weight"], cfg.norm_eps)
    for i in range(cfg.n_prelude):
        x = _block(sd, f"prelude.{i}", x, cfg)
    e = x
    group = lambda u: [u := _block(sd, f"recur.{j}", u, cfg) for j in range(cfg.n_recur_block)][-1]  # noqa: E731
    norm_recur = lambda h: _rms(h, sd["norm_recur.weight"], cfg.norm_eps)  # noqa: E731
    mode = cfg.input_injection
    if mode == "hyperconnect":
        alpha, mix, beta = sd["injection.alpha"], sd["injection.mix"], sd["injection.beta"]
        lanes = [e for _ in range(alpha.size(1))]
        for i in range(r):
            a, M, b = alpha[i % alpha.size(0)], mix[i % alpha.size(0)], beta[i % alpha.size(0)]
            s = norm_recur(group(sum(a[n] * lanes[n] for n in range(len(lanes)))))
            lanes = [sum(M[m, n] * lanes[n] for n in range(len(lanes))) + b[m] * s for m in range(len(lanes))]
        x = sum(lanes)
    else:
        s = torch.zeros_like(e) if mode == "additive" else e
        for i in range(r):
            if bptt_k is not None and i < r - bptt_k:
                with torch.no_grad():
                    u = torch.cat([e, s], -1) @ sd["injection.weight"].T if mode == "linear" else (
                        s + e if mode == "additive" else s)
                    s = norm_recur(group(u))
                continue
            if mode == "linear":
                u = torch.cat([e, s], -1) @ sd["injection.weight"].T
            elif mode == "additive":
                u = s + e
            else:
                u = s
            s = norm_recur(group(u))
        x = s
    for i in range(cfg.n_coda):
        x = _block(sd, f"coda.{i}", x, cfg)
    x = _rms(x, sd["norm_final.weight"], cfg.norm_eps)
    logits = (x @ sd["head.weight"].T).float()
    if cfg.logit_softcap:
        logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
    return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100)
