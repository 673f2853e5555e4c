"""A megaloop looped language model as a Hugging Face transformers causal LM (plain PyTorch).

    tokens -> embedding -> RMSNorm -> prelude blocks -> recurrent group run num_recur times
           (input injection before each pass, RMSNorm after it) -> coda blocks -> RMSNorm
           -> untied head -> logit softcap

Parameter names are megaloop's, so megaloop's safetensors load unchanged. Decoding recomputes
the sequence for every token (no KV cache here; megaloop's own generate has the loop-aware one).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from transformers import GenerationMixin, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .configuration_megaloop import MegaloopConfig


def rms(x, weight, eps):
    y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)
    y = y.to(x.dtype)
    return y if weight is None else y * weight


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x):
        return rms(x, self.weight, self.eps)


def rotate(x, cos, sin):
    """Half-split rotary: (x1, x2) -> (x1 cos + x2 sin, -x1 sin + x2 cos)."""
    h = x.size(-1) // 2
    x1, x2 = x[..., :h].float(), x[..., h:].float()
    return torch.cat([x1 * cos + x2 * sin, -x1 * sin + x2 * cos], -1).to(x.dtype)


class Attention(nn.Module):
    """Causal attention: RoPE, then parameter-free QK RMSNorm; grouped KV heads; no biases."""

    def __init__(self, cfg):
        super().__init__()
        d, hd = cfg.d_model, cfg.hdim
        self.hd, self.eps = hd, cfg.norm_eps
        self.wq = nn.Linear(d, cfg.n_head * hd, bias=False)
        self.wk = nn.Linear(d, cfg.n_kv_head * hd, bias=False)
        self.wv = nn.Linear(d, cfg.n_kv_head * hd, bias=False)
        self.wo = nn.Linear(cfg.n_head * hd, d, bias=False)

    def forward(self, x, cos, sin, mask):
        B, T, _ = x.shape
        q = self.wq(x).view(B, T, -1, self.hd)
        k = self.wk(x).view(B, T, -1, self.hd)
        v = self.wv(x).view(B, T, -1, self.hd)
        q = rms(rotate(q, cos, sin), None, self.eps)
        k = rms(rotate(k, cos, sin), None, self.eps)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        gqa = k.size(1) != q.size(1)
        if mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.wo(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.fc = nn.Linear(cfg.d_model, cfg.mlp_ratio * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.mlp_ratio * cfg.d_model, cfg.d_model, bias=False)

    def forward(self, x):
        return self.proj(F.relu(self.fc(x)).square())


class Block(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm1, self.attn = RMSNorm(cfg.d_model, cfg.norm_eps), Attention(cfg)
        self.norm2, self.mlp = RMSNorm(cfg.d_model, cfg.norm_eps), MLP(cfg)

    def forward(self, x, cos, sin, mask):
        x = x + self.attn(self.norm1(x), cos, sin, mask)
        return x + self.mlp(self.norm2(x))


class Injection(nn.Module):
    """linear: u = W [e ; s]; additive: u = s + e; passthrough: u = s; hyperconnect: lanes."""

    def __init__(self, cfg):
        super().__init__()
        self.mode, d = cfg.input_injection, cfg.d_model
        if self.mode == "linear":
            self.weight = nn.Parameter(torch.zeros(d, 2 * d))
        if self.mode == "hyperconnect":
            R, N = cfg.trained_num_recur, cfg.num_lanes
            self.alpha = nn.Parameter(torch.zeros(R, N))
            self.mix = nn.Parameter(torch.zeros(R, N, N))
            self.beta = nn.Parameter(torch.zeros(R, N))


class MegaloopPreTrainedModel(PreTrainedModel):
    config_class = MegaloopConfig
    base_model_prefix = "megaloop"
    _no_split_modules = ["Block"]

    def _init_weights(self, module):
        pass  # weights always come from the exported safetensors


class MegaloopForCausalLM(MegaloopPreTrainedModel, GenerationMixin):
    def __init__(self, config: MegaloopConfig):
        super().__init__(config)
        c, d = config, config.d_model
        self.embed = nn.Embedding(c.vocab_size, d)
        self.norm_emb = RMSNorm(d, c.norm_eps)
        self.prelude = nn.ModuleList(Block(c) for _ in range(c.n_prelude))
        self.recur = nn.ModuleList(Block(c) for _ in range(c.n_recur_block))
        self.injection = Injection(c)
        self.norm_recur = RMSNorm(d, c.norm_eps)
        self.coda = nn.ModuleList(Block(c) for _ in range(c.n_coda))
        self.norm_final = RMSNorm(d, c.norm_eps)
        self.head = nn.Linear(d, c.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self):
        return self.embed

    def get_output_embeddings(self):
        return self.head

    def _rope(self, T, device):
        hd = self.config.hdim
        inv = 1.0 / (self.config.rope_base ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
        ang = torch.outer(torch.arange(T, dtype=torch.float32, device=device), inv)
        return ang.cos()[None, :, None, :], ang.sin()[None, :, None, :]

    @staticmethod
    def _mask(attention_mask, T):
        """None (plain causal) or [B, 1, T, T]: causal, no padded keys; a padded query sees itself."""
        if attention_mask is None or bool(attention_mask.all()):
            return None
        causal = torch.ones(T, T, dtype=torch.bool, device=attention_mask.device).tril()
        keys = attention_mask[:, None, None, :].bool()
        return (causal[None, None] & keys) | torch.eye(T, dtype=torch.bool, device=attention_mask.device)

    def _recurrence(self, e, r, run):
        inj = self.injection
        if inj.mode == "hyperconnect":
            R = inj.alpha.size(0)
            lanes = [e] * inj.alpha.size(1)
            for i in range(r):
                a, M, b = inj.alpha[i % R], inj.mix[i % R], inj.beta[i % R]
                s = self.norm_recur(run(self.recur, sum(a[n] * lanes[n] for n in range(len(lanes)))))
                lanes = [sum(M[m, n] * lanes[n] for n in range(len(lanes))) + b[m] * s for m in range(len(lanes))]
            return sum(lanes)
        s = torch.zeros_like(e) if inj.mode == "additive" else e
        for _ in range(r):
            if inj.mode == "linear":
                u = F.linear(torch.cat([e, s], -1), inj.weight)
            else:
                u = s + e if inj.mode == "additive" else s
            s = self.norm_recur(run(self.recur, u))
        return s

    def forward(self, input_ids: torch.LongTensor, attention_mask: Optional[torch.Tensor] = None,
                labels: Optional[torch.LongTensor] = None, num_recur: Optional[int] = None,
                **kwargs) -> CausalLMOutputWithPast:
        """num_recur overrides config.num_recur for this call. labels: the input ids (shifted here)."""
        B, T = input_ids.shape
        cos, sin = self._rope(T, input_ids.device)
        mask = self._mask(attention_mask, T)

        def run(blocks, x):
            for block in blocks:
                x = block(x, cos, sin, mask)
            return x

        e = run(self.prelude, self.norm_emb(self.embed(input_ids)))
        if num_recur is not None and num_recur < 1:  # an explicit 0 is no request for the default
            raise ValueError(f"num_recur must be >= 1 (None for the trained r = {self.config.num_recur}), got {num_recur}")
        x = self._recurrence(e, self.config.num_recur if num_recur is None else num_recur, run)
        logits = self.head(self.norm_final(run(self.coda, x))).float()
        if self.config.logit_softcap:
            logits = self.config.logit_softcap * torch.tanh(logits / self.config.logit_softcap)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1),
                                   ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=logits)

    def prepare_inputs_for_generation(self, input_ids, attention_mask=None, **kwargs):
        # no cache: every step sees the whole sequence, cut to the training length
        L = self.config.seq_len
        return {"input_ids": input_ids[:, -L:],
                "attention_mask": None if attention_mask is None else attention_mask[:, -L:]}
