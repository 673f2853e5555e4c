"""The looped language model, top to bottom.

    tokens -> embedding -> RMSNorm -> prelude blocks (once)
           -> recurrent group of n_recur_block blocks, run num_recur (r) times,
              with input injection between passes and RMSNorm (norm_recur) after each pass
           -> coda blocks (once) -> RMSNorm -> untied LM head -> logit softcap -> cross-entropy

Per-element work (norms, rotary + QK-norm, ReLU^2, the recurrence step, the fused head loss)
goes through `megaloop.kernels`, with the backend the model is built with (`kernels=`, the
config's `kernels:` entry: auto | triton | torch), which every module that calls a kernel carries.
Parallelism is applied from outside (megaloop.parallel): tensor parallelism swaps the linears and
the head, pipeline parallelism calls the stage methods below one at a time.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import kernels as K
from .config import ModelConfig, recurrences
from .kernels.dispatch import KernelBackend, as_backend

IGNORE_INDEX = -100  # a target that adds nothing to the loss (the cross-entropy's ignore_index)

try:  # optional fast path on CUDA; torch SDPA otherwise
    from flash_attn import flash_attn_func  # type: ignore
except Exception:  # noqa: BLE001 - any import failure means "not available"
    flash_attn_func = None


class RMSNorm(nn.Module):
    """RMSNorm with a learnable scale (initialised to ones)."""

    def __init__(self, dim: int, eps: float, kernels: KernelBackend):
        super().__init__()
        self.eps, self.kernels = eps, kernels
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return K.rms_norm(x, self.weight, self.eps, self.kernels)


def rotary_tables(seq_len: int, head_dim: int, base: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [seq_len, head_dim/2] in fp32 for the half-split rotary convention."""
    inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32, device=device) / head_dim))
    freqs = torch.outer(torch.arange(seq_len, dtype=torch.float32, device=device), inv_freq)
    return freqs.cos(), freqs.sin()


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """q [B, T, Hq, D], k/v [B, T, Hk, D] -> [B, T, Hq, D]. Flash-attn on CUDA when importable."""
    if flash_attn_func is not None and q.is_cuda and q.dtype in (torch.bfloat16, torch.float16):
        return flash_attn_func(q, k, v, causal=True)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=k.size(1) != q.size(1))
    return y.transpose(1, 2)


class Attention(nn.Module):
    """Causal self-attention: RoPE, then parameter-free QK-norm, GQA, no biases.

    Head counts are read from the weight shapes at run time, so a tensor-parallel shard of the
    projections (fewer local heads) runs through the same code.
    """

    def __init__(self, cfg: ModelConfig, kernels: KernelBackend):
        super().__init__()
        d, hd = cfg.d_model, cfg.hdim
        self.head_dim, self.eps, self.kernels = hd, cfg.norm_eps, kernels
        self.wq = nn.Linear(d, cfg.n_head * hd, bias=False)
        self.wk = nn.Linear(d, cfg.kv_heads * hd, bias=False)
        self.wv = nn.Linear(d, cfg.kv_heads * hd, bias=False)
        self.wo = nn.Linear(cfg.n_head * hd, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None) -> torch.Tensor:
        """cache: None (training, full causal attention) or one layer of a decoding KV cache
        (megaloop.inference.cache), called as cache(q, k, v); cos/sin then start at the position
        of x's first token."""
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, -1, self.head_dim)
        k = self.wk(x).view(B, T, -1, self.head_dim)
        v = self.wv(x).view(B, T, -1, self.head_dim)
        q, k = K.qk_norm_rope(q, k, cos[:T], sin[:T], self.eps, self.kernels)
        y = causal_attention(q, k, v.to(q.dtype)) if cache is None else cache(q, k, v.to(q.dtype))
        return self.wo(y.reshape(B, T, -1))


class MLP(nn.Module):
    """ReLU^2 MLP, no biases."""

    def __init__(self, cfg: ModelConfig, kernels: KernelBackend):
        super().__init__()
        self.kernels = kernels
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(K.relu_squared(self.fc(x), self.kernels))


class Block(nn.Module):
    """Pre-norm transformer block; the residual add before the MLP norm is fused."""

    def __init__(self, cfg: ModelConfig, kernels: KernelBackend):
        super().__init__()
        self.kernels = kernels
        self.norm1 = RMSNorm(cfg.d_model, cfg.norm_eps, kernels)
        self.attn = Attention(cfg, kernels)
        self.norm2 = RMSNorm(cfg.d_model, cfg.norm_eps, kernels)
        self.mlp = MLP(cfg, kernels)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache=None) -> torch.Tensor:
        a = self.attn(self.norm1(x), cos, sin, cache)
        y, h = K.add_rms_norm(a, x, self.norm2.weight, self.norm2.eps, self.kernels)
        return h + self.mlp(y)


class Injection(nn.Module):
    """How the prelude output e enters each pass through the recurrent group.

    linear: u = W [e ; s], W (d x 2d) initialised to [I | 0], s starts as e
    additive: u = s + e, s starts at 0;  passthrough: u = s, s starts as e
    hyperconnect: N lanes start as e; pass i reads u = alpha_i . lanes and writes
                  lanes <- M_i lanes + beta_i s; lanes are summed before the coda.
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.mode = cfg.input_injection
        d = cfg.d_model
        self.weight = nn.Parameter(torch.empty(d, 2 * d)) if self.mode == "linear" else None
        if self.mode == "hyperconnect":
            R, N = cfg.max_recur, cfg.num_lanes  # one set per training recurrence (a sampled depth: its cap)
            self.alpha = nn.Parameter(torch.empty(R, N))
            self.mix = nn.Parameter(torch.empty(R, N, N))
            self.beta = nn.Parameter(torch.empty(R, N))

    def init_plan(self, prefix: str) -> list[tuple[str, Callable[[torch.Tensor], object]]]:
        """The adapter's initialisers (deterministic): linear [I | 0]; hyperconnect lane i reads
        and writes lane i mod N, lanes mix as the identity, beta 1."""
        def eye_left(w):  # [I | 0]
            w.zero_()
            w[:, : w.size(0)].copy_(torch.eye(w.size(0)))

        def one_hot(a):
            R, N = a.shape
            a.copy_(F.one_hot(torch.arange(R) % N, N).float())

        def eye_mix(m):
            m.copy_(torch.eye(m.size(-1)).expand_as(m))
        plan = [(prefix + "weight", eye_left)] if self.weight is not None else []
        if self.mode == "hyperconnect":
            plan += [(prefix + "alpha", one_hot), (prefix + "mix", eye_mix),
                     (prefix + "beta", lambda b: b.fill_(1.0))]
        return plan

    def initial_state(self, e: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(e) if self.mode == "additive" else e


class LMHead(nn.Module):
    """Untied head + logit softcap + cross-entropy (fused and chunked in megaloop.kernels)."""

    def __init__(self, cfg: ModelConfig, kernels: KernelBackend):
        super().__init__()
        self.kernels = kernels
        self.softcap = cfg.logit_softcap
        self.vocab_size = cfg.vocab_size
        self.weight = nn.Parameter(torch.empty(cfg.vocab_size, cfg.d_model))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        logits = F.linear(h, self.weight).float()
        if self.softcap is not None:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits

    def loss(self, h: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over targets != IGNORE_INDEX."""
        return K.softcap_cross_entropy(h.reshape(-1, h.size(-1)), self.weight, targets.reshape(-1), self.softcap,
                                       backend=self.kernels)


@dataclass
class RecurrenceState:
    """The recurrence between two passes: what the next pass reads.

    s:   the state, norm_recur's output of the last pass (before pass 0: the injection's start)
    aux: the prelude output e, or for hyperconnect the N lanes [N, *e.shape]
    """
    s: torch.Tensor
    aux: torch.Tensor


class LoopedLM(nn.Module):
    def __init__(self, cfg: ModelConfig, kernels: KernelBackend | str = "auto"):
        """kernels: the kernel backend every op of the model runs with (megaloop.kernels.dispatch);
        a run builds it from its config's `kernels:` entry (train.build_model, pretrained.load_pretrained)."""
        super().__init__()
        self.cfg = cfg
        self.kernels = kernels = as_backend(kernels)
        d = cfg.d_model
        self.embed = nn.Embedding(cfg.vocab_size, d)
        self.norm_emb = RMSNorm(d, cfg.norm_eps, kernels)
        self.prelude = nn.ModuleList(Block(cfg, kernels) for _ in range(cfg.n_prelude))
        self.recur = nn.ModuleList(Block(cfg, kernels) for _ in range(cfg.n_recur_block))
        self.injection = Injection(cfg)
        self.norm_recur = RMSNorm(d, cfg.norm_eps, kernels)
        self.coda = nn.ModuleList(Block(cfg, kernels) for _ in range(cfg.n_coda))
        self.norm_final = RMSNorm(d, cfg.norm_eps, kernels)
        self.head = LMHead(cfg, kernels)
        self.reset_buffers()
        self.reset_parameters()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """The reference study's init (init_plan), parameter by parameter."""
        for name, init in self.init_plan():
            init(self.get_parameter(name))

    def init_plan(self) -> list[tuple[str, Callable[[torch.Tensor], object]]]:
        """Each parameter's initialiser, in the order its random draws are taken: embeddings
        N(0, 1), head N(0, 1e-3), block matrices uniform with std 1/sqrt(d) (MLP output
        1/sqrt(4d)), norms 1, injection [I | 0]. An initialiser writes a whole tensor of the
        parameter's full (unsharded) shape, so the meta-device build of a parallel rank
        (megaloop.parallel.meta_init) replays this list one tensor at a time and keeps its shard."""
        def uniform(fan_in):
            bound = math.sqrt(3.0 / fan_in)
            return lambda w: nn.init.uniform_(w, -bound, bound)
        d = self.cfg.d_model
        plan = [("embed.weight", lambda w: nn.init.normal_(w, std=1.0)),
                ("head.weight", lambda w: nn.init.normal_(w, std=1e-3))]
        blocks = {id(b): n for n, b in self.named_modules() if isinstance(b, Block)}
        for block in self.blocks():
            at = blocks[id(block)]
            plan += [(f"{at}.{m}.weight", uniform(d)) for m in ("attn.wq", "attn.wk", "attn.wv", "attn.wo", "mlp.fc")]
            plan.append((f"{at}.mlp.proj.weight", uniform(self.cfg.mlp_ratio * d)))
        plan += [(n + ".weight", lambda w: w.fill_(1.0)) for n, m in self.named_modules() if isinstance(m, RMSNorm)]
        return plan + self.injection.init_plan("injection.")

    def reset_buffers(self) -> None:
        """The rotary tables (computed, not learned: rebuilt after a meta-device build)."""
        cos, sin = rotary_tables(self.cfg.seq_len, self.cfg.hdim, self.cfg.rope_base)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def blocks(self):
        return [*self.prelude, *self.recur, *self.coda]

    # ------------------------------------------------------------------ stages
    def rope(self, T: int) -> tuple[torch.Tensor, torch.Tensor]:
        if T > self.rope_cos.size(0):  # generation past the training length
            cos, sin = rotary_tables(T, self.cfg.hdim, self.cfg.rope_base, self.rope_cos.device)
            self.rope_cos, self.rope_sin = cos, sin
        return self.rope_cos, self.rope_sin

    def embed_tokens(self, idx: torch.Tensor) -> torch.Tensor:
        return self.norm_emb(self.embed(idx))

    def run_blocks(self, blocks, x: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rope(x.size(1))
        for block in blocks:
            x = block(x, cos, sin)
        return x

    # ------------------------------------------------------------------ the recurrence
    # start -> run_passes over any contiguous ranges that cover 0..r -> end. A pipeline stage
    # runs its own range of passes through the same three calls (megaloop.parallel.pipeline).
    def run_recurrence(self, e: torch.Tensor, num_recur: Optional[int] = None) -> torch.Tensor:
        """The recurrent group run r times on the prelude output e; returns the coda's input."""
        r = recurrences(num_recur, self.cfg.num_recur)
        return self.end_recurrence(self.run_passes(self.start_recurrence(e), 0, r, r))

    def start_recurrence(self, e: torch.Tensor) -> RecurrenceState:
        """The state before pass 0 (hyperconnect: N lanes, all e; its s is e, read by no pass)."""
        inj = self.injection
        if inj.mode == "hyperconnect":
            return RecurrenceState(e, e.unsqueeze(0).expand(inj.alpha.size(1), *e.shape))
        return RecurrenceState(inj.initial_state(e), e)

    def run_passes(self, state: RecurrenceState, start: int, stop: int, num_recur: int) -> RecurrenceState:
        """Passes start..stop-1 of a recurrence of num_recur passes. Split anywhere, the ranges
        give the same result as one call over 0..num_recur (the pipeline relies on it)."""
        # Truncated backprop: the first r - g passes run without autograd, so they keep no
        # activations alive; only the last g = min(bptt_k, r) passes are differentiated.
        r = num_recur
        g = r if self.cfg.bptt_k is None else min(self.cfg.bptt_k, r)
        s, aux = state.s, state.aux
        if start < min(stop, r - g):
            with torch.no_grad():
                s, aux = self._passes(s, aux, start, min(stop, r - g))
        if max(start, r - g) < stop:
            s, aux = self._passes(s, aux, max(start, r - g), stop)
        return RecurrenceState(s, aux)

    def end_recurrence(self, state: RecurrenceState) -> torch.Tensor:
        """The coda's input: the state, or the sum of the hyperconnect lanes."""
        return state.aux.sum(0) if self.injection.mode == "hyperconnect" else state.s

    def _passes(self, s: torch.Tensor, aux: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Passes start..stop-1 in one autograd mode. Between two of them norm_recur and the next
        pass's injection are one fused kernel; the range's last pass ends on norm_recur alone."""
        inj = self.injection
        if inj.mode == "hyperconnect":
            R = inj.alpha.size(0)  # per-recurrence parameters; reused cyclically if evaluated at r > R
            for i in range(start, stop):
                s = self.norm_recur(self._group(K.hc_combine(aux, inj.alpha[i % R], self.kernels)))
                aux = K.hc_update(aux, s, inj.mix[i % R], inj.beta[i % R], self.kernels)
            return s, aux
        # linear: every pass reads the same e, so its half of u = W [e ; s] is computed once
        e_half = K.inject_e_half(aux, inj.weight) if inj.mode == "linear" else None
        u = K.inject(aux, s, inj.mode, inj.weight, e_half)
        for i in range(start, stop):
            h = self._group(u)
            if i + 1 < stop:
                s, u = K.recur_norm_inject(h, aux, self.norm_recur.weight, self.norm_recur.eps, inj.mode, inj.weight,
                                           e_half, self.kernels)
            else:
                s = self.norm_recur(h)
        return s, aux

    def _group(self, u: torch.Tensor) -> torch.Tensor:
        """One pass through the recurrent group, recomputed in backward if checkpoint_recurrence."""
        if self.cfg.checkpoint_recurrence and torch.is_grad_enabled():
            return checkpoint(self.run_blocks, self.recur, u, use_reentrant=False)
        return self.run_blocks(self.recur, u)

    def final_hidden(self, idx: torch.Tensor, num_recur: Optional[int] = None) -> torch.Tensor:
        e = self.run_blocks(self.prelude, self.embed_tokens(idx))
        x = self.run_recurrence(e, num_recur)
        return self.norm_final(self.run_blocks(self.coda, x))

    # ------------------------------------------------------------------ entry points
    def forward(self, idx: torch.Tensor, targets: Optional[torch.Tensor] = None,
                num_recur: Optional[int] = None) -> torch.Tensor:
        """targets given: the mean loss (fused head); otherwise the softcapped fp32 logits."""
        h = self.final_hidden(idx, num_recur)
        if targets is None:
            return self.head.logits(h)
        return self.head.loss(h, targets)

    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 0.0,
                 top_k: Optional[int] = None, num_recur: Optional[int] = None,
                 generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Greedy (temperature 0) or sampled continuation of idx [B, T], recomputing the window for
        every new token: the plain reference. Decoding over the loop-aware KV cache (kv_budget,
        exit rules, max_recur) is megaloop.inference.generate, which builds on this model."""
        for _ in range(max_new_tokens):
            idx = torch.cat([idx, sample(self.next_logits(idx, num_recur), temperature, top_k, generator)], 1)
        return idx

    @torch.no_grad()
    def next_logits(self, idx: torch.Tensor, num_recur: Optional[int] = None) -> torch.Tensor:
        """[B, V] next-token logits after idx [B, T], recomputing the last seq_len positions
        (no cache); only the last position goes through the head."""
        return self.head.logits(self.final_hidden(idx[:, -self.cfg.seq_len:], num_recur)[:, -1])


def sample(logits: torch.Tensor, temperature: float, top_k: Optional[int], generator=None) -> torch.Tensor:
    """[B, V] -> [B, 1]: argmax at temperature 0, else a draw from the (top-k) softmax."""
    if temperature <= 0:
        return logits.argmax(-1, keepdim=True)
    logits = logits / temperature
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(F.softmax(logits, -1), 1, generator=generator)
