"""MuonAdamW's AdamW groups run torch's own AdamW, and stay what they were.

Contracts:
- a model trained a few steps by MuonAdamW (optim.name=adamw: embedding, head, norms and matrices
  in four groups with their own rates, weight decay on the matrices) has exactly the parameters of
  the same model trained by torch.optim.AdamW over the same groups, and the same optimizer state;
- fed the same gradients, it matches the per-parameter loop that megaloop used before (a copy is
  kept below as the reference) to a few ulps, including parameters held in bf16;
- optimizer state written by that loop (keys step, exp_avg, exp_avg_sq; a CPU fp32 step) loads,
  and training goes on as it would have under the loop.
"""
import copy

import pytest
import torch

from megaloop.config import load_config
from megaloop.model import LoopedLM
from megaloop.optim import MuonAdamW, build_optimizer


def _cfg():
    return load_config(raw={"model": dict(d_model=32, n_head=2, vocab_size=64, seq_len=16, n_prelude=1,
                                          n_recur_block=1, n_coda=1, num_recur=2),
                            "optim": {"name": "adamw", "lr": 3e-3, "weight_decay": 0.1},
                            "train": {"steps": 1, "micro_batch_size": 2}})


class LoopAdamW(MuonAdamW):
    """The per-parameter AdamW loop megaloop ran before it called torch's (the reference)."""

    def _adamw(self, group: dict, params: list) -> None:
        b1, b2 = group["betas"]
        for p in params:
            if p.grad is None:
                continue
            st = self.state[p]
            if not st:
                st["step"] = torch.zeros((), dtype=torch.float32)
                st["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                st["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
            st["step"] += 1
            t = st["step"].item()
            g = p.grad.float()
            st["exp_avg"].lerp_(g, 1 - b1)
            st["exp_avg_sq"].mul_(b2).addcmul_(g, g, value=1 - b2)
            denom = (st["exp_avg_sq"] / (1 - b2 ** t)).sqrt_().add_(group["eps"])
            if group["weight_decay"]:
                p.mul_(1 - group["lr"] * group["weight_decay"])
            p.add_((st["exp_avg"] / (1 - b1 ** t) / denom).to(p.dtype), alpha=-group["lr"])


def _model(dtype=torch.float32):
    torch.manual_seed(0)
    return LoopedLM(_cfg().model).to(dtype)


def _batches(n):
    g = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 64, (2, 16), generator=g), torch.randint(0, 64, (2, 16), generator=g))
            for _ in range(n)]


def _train(model, opt, batches):
    for x, y in batches:
        with torch.autocast("cpu", torch.bfloat16, enabled=next(model.parameters()).dtype == torch.bfloat16):
            loss = model(x, y).float()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return model


def _torch_adamw(model):
    """torch.optim.AdamW over megaloop's parameter groups (rates, betas, eps, weight decay)."""
    groups = [dict(params=list(g["params"]), lr=g["lr"], betas=g["betas"], eps=g["eps"],
                   weight_decay=g["weight_decay"]) for g in _groups_for(model)]
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    return torch.optim.AdamW(groups, fused=True)


def test_equals_torch_adamw():
    mine, ref = _model(), _model()
    opt, ref_opt = build_optimizer(mine, _cfg().optim), _torch_adamw(ref)
    assert len(opt.param_groups) == 4 and {g["kind"] for g in opt.param_groups} == {"adamw"}
    assert len({g["lr"] for g in opt.param_groups}) > 1 and any(g["weight_decay"] for g in opt.param_groups)
    batches = _batches(5)
    _train(mine, opt, batches)
    _train(ref, ref_opt, batches)
    for (name, a), b in zip(mine.named_parameters(), ref.parameters()):
        assert torch.equal(a, b), name
    for a, b in zip(mine.parameters(), ref.parameters()):
        sa, sb = opt.state[a], ref_opt.state[b]
        assert sa.keys() == sb.keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert float(sa["step"]) == float(sb["step"]) == 5
        assert torch.equal(sa["exp_avg"], sb["exp_avg"]) and torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert not torch.equal(mine.embed.weight, _model().embed.weight)  # it trained


def _grads(model, n, seed=2):
    """n steps of fixed gradients for model's parameters: varied scales, some exact zeros (an
    embedding row no batch touched), so eps and the bias corrections all matter."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        step = []
        for p in model.parameters():
            gr = torch.randn(p.shape, generator=g) * 10.0 ** torch.randint(-6, 1, (), generator=g).item()
            if p.ndim == 2:
                gr[: p.size(0) // 4] = 0.0
            step.append(gr.to(p.dtype))
        out.append(step)
    return out


def _apply(model, opt, grads):
    """The optimizer as a function of a gradient sequence: no model in the loop, so rounding
    differences between two implementations are not amplified by training."""
    for step in grads:
        for p, gr in zip(model.parameters(), step):
            p.grad = gr.clone()
        opt.step()
        opt.zero_grad(set_to_none=True)


def _loop_optimizer(model):
    return LoopAdamW([dict(g, params=list(g["params"])) for g in _groups_for(model)])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matches_the_old_loop(dtype):
    new, old = _model(dtype), _model(dtype)
    opt_new, opt_old = build_optimizer(new, _cfg().optim), _loop_optimizer(old)
    grads = _grads(new, 6)
    _apply(new, opt_new, grads)
    _apply(old, opt_old, grads)
    # Compared: how far each parameter moved. fp32: equal to a few ulps of the update (the two
    # use different but equivalent formulas, e.g. sqrt(v / bc2) against sqrt(v) / sqrt(bc2));
    # Allowed besides: a few ulps of the tensor's largest value (parameters are stored rounded, and
    # an element may have been larger on its way to where it is now). A bf16
    # parameter is rounded once per step here and twice per step by the loop (update, then sum),
    # so up to ~2 bf16 ulps a step apart: 12 over 6 steps.
    rtol, ulps = (1e-5, 4 * torch.finfo(torch.float32).eps) if dtype == torch.float32 else (1e-2, 12 * 2 ** -8)
    init = _model(dtype).state_dict()
    for (name, a), b in zip(new.named_parameters(), old.parameters()):
        assert a.dtype == dtype
        da, db = a.float() - init[name].float(), b.float() - init[name].float()
        bound = rtol * db.abs() + ulps * b.float().abs().max()
        assert ((da - db).abs() <= bound).all(), (name, (da - db).abs().max())
        assert not torch.equal(a, init[name]), name  # every parameter moved
    for a, b in zip(new.parameters(), old.parameters()):
        sa, sb = opt_new.state[a], opt_old.state[b]
        assert sa["exp_avg"].dtype == torch.float32  # fp32 state, also for bf16 parameters
        assert torch.allclose(sa["exp_avg"], sb["exp_avg"], rtol=1e-6, atol=0)
        assert torch.allclose(sa["exp_avg_sq"], sb["exp_avg_sq"], rtol=1e-6, atol=0)


def _groups_for(model):
    return build_optimizer(model, _cfg().optim).param_groups


def test_old_state_loads_and_continues():
    """State written by the loop (CPU fp32 step) loads into the new optimizer; the next steps are
    those the loop would have taken."""
    model = _model()
    old_opt = _loop_optimizer(model)
    grads = _grads(model, 6)
    _apply(model, old_opt, grads[:3])
    saved_model, saved_state = copy.deepcopy(model.state_dict()), copy.deepcopy(old_opt.state_dict())
    assert {k for s in saved_state["state"].values() for k in s} == {"step", "exp_avg", "exp_avg_sq"}
    _apply(model, old_opt, grads[3:])  # the loop goes on

    resumed = _model()
    resumed.load_state_dict(saved_model)
    opt = build_optimizer(resumed, _cfg().optim)
    opt.load_state_dict(saved_state)
    _apply(resumed, opt, grads[3:])
    for (name, a), b in zip(resumed.named_parameters(), model.parameters()):
        assert torch.allclose(a, b, rtol=2e-6, atol=1e-7), name
    assert all(float(opt.state[p]["step"]) == 6 for p in resumed.parameters())
