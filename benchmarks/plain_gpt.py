"""A plain looped GPT, written the way a user would write it, as the yardstick for megaloop's step.

Same architecture and shape as megaloop's model (prelude -> recurrent group run r times with a
linear injection on [e ; s] and RMSNorm after each pass -> coda -> RMSNorm -> head -> softcap),
but nothing fused: torch ops only, each block compiled on its own with torch.compile, full logits
and F.cross_entropy, torch.optim.AdamW with torch's default implementation. It shares no code
with megaloop, so a speed ratio between the two says what megaloop's own code costs or gains.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class PlainBlock(nn.Module):
    def __init__(self, d: int, n_head: int, eps: float):
        super().__init__()
        self.n_head, self.eps = n_head, eps
        self.norm1 = nn.RMSNorm(d, eps=eps)
        self.q = nn.Linear(d, d, bias=False)
        self.k = nn.Linear(d, d, bias=False)
        self.v = nn.Linear(d, d, bias=False)
        self.proj = nn.Linear(d, d, bias=False)
        self.norm2 = nn.RMSNorm(d, eps=eps)
        self.fc = nn.Linear(d, 4 * d, bias=False)
        self.out = nn.Linear(4 * d, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, d = x.shape
        h = self.norm1(x)
        q, k, v = (lin(h).view(B, T, self.n_head, d // self.n_head) for lin in (self.q, self.k, self.v))
        q, k = (F.rms_norm(rotate(t, cos, sin), (t.size(-1),), eps=self.eps) for t in (q, k))
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)
        x = x + self.proj(y.transpose(1, 2).reshape(B, T, d))
        return x + self.out(F.relu(self.fc(self.norm2(x))).square())


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Half-split rotary embedding; x [B, T, H, D], cos/sin [T, D/2]."""
    x1, x2 = x.chunk(2, dim=-1)
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * c + x2 * s, x2 * c - x1 * s], dim=-1)


class PlainLoopedGPT(nn.Module):
    def __init__(self, vocab: int, d: int, n_head: int, seq_len: int, n_prelude: int, n_recur_block: int,
                 n_coda: int, num_recur: int, softcap: float = 15.0, eps: float = 1e-6):
        super().__init__()
        self.num_recur, self.softcap = num_recur, softcap
        self.embed = nn.Embedding(vocab, d)
        self.norm_emb = nn.RMSNorm(d, eps=eps)
        self.prelude = nn.ModuleList(PlainBlock(d, n_head, eps) for _ in range(n_prelude))
        self.recur = nn.ModuleList(PlainBlock(d, n_head, eps) for _ in range(n_recur_block))
        self.coda = nn.ModuleList(PlainBlock(d, n_head, eps) for _ in range(n_coda))
        self.inject = nn.Linear(2 * d, d, bias=False)
        self.norm_recur = nn.RMSNorm(d, eps=eps)
        self.norm_final = nn.RMSNorm(d, eps=eps)
        self.head = nn.Linear(d, vocab, bias=False)
        hd = d // n_head
        inv = 1.0 / 10000 ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd)
        ang = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv)
        self.register_buffer("cos", ang.cos(), persistent=False)
        self.register_buffer("sin", ang.sin(), persistent=False)
        with torch.no_grad():
            nn.init.normal_(self.embed.weight, std=1.0)
            nn.init.normal_(self.head.weight, std=1e-3)
            for b in [*self.prelude, *self.recur, *self.coda]:
                for lin in (b.q, b.k, b.v, b.proj, b.fc):
                    nn.init.uniform_(lin.weight, -math.sqrt(3 / d), math.sqrt(3 / d))
                nn.init.uniform_(b.out.weight, -math.sqrt(3 / (4 * d)), math.sqrt(3 / (4 * d)))
            self.inject.weight.zero_()
            self.inject.weight[:, :d].copy_(torch.eye(d))

    def blocks(self):
        return [*self.prelude, *self.recur, *self.coda]

    def forward(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        T = idx.size(1)
        cos, sin = self.cos[:T], self.sin[:T]
        x = self.norm_emb(self.embed(idx))
        for b in self.prelude:
            x = b(x, cos, sin)
        e, s = x, x
        for _ in range(self.num_recur):
            u = self.inject(torch.cat([e, s], dim=-1))
            for b in self.recur:
                u = b(u, cos, sin)
            s = self.norm_recur(u)
        x = s
        for b in self.coda:
            x = b(x, cos, sin)
        logits = self.head(self.norm_final(x)).float()
        logits = self.softcap * torch.tanh(logits / self.softcap)
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1))


class PlainTrainer:
    """One training step the plain way: forward, backward, clip, torch AdamW, zero_grad."""

    def __init__(self, model: PlainLoopedGPT, lr: float, betas, eps: float, grad_clip, compiled: bool):
        self.model = model
        if compiled:
            for b in model.blocks():
                b.compile(dynamic=False)
        self.opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(betas), eps=eps, weight_decay=0.0)
        self.grad_clip = grad_clip

    def step(self, x: torch.Tensor, y: torch.Tensor) -> float:
        loss = self.model(x, y)
        loss.backward()
        if self.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return loss.item()
