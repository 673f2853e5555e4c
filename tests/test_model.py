"""The looped model against the independent functional reference in reference_forward.py."""
import pytest
import torch

from megaloop.config import load_config
from megaloop.model import LoopedLM
from reference_forward import reference_loss


def tiny(**model):
    base = dict(d_model=48, n_head=4, n_kv_head=2, vocab_size=97, seq_len=16, n_prelude=1,
                n_recur_block=2, n_coda=1, num_recur=3)
    base.update(model)
    return load_config(raw={"model": base, "train": {"steps": 1}}).model


def batch(cfg, B=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, cfg.vocab_size, (B, cfg.seq_len), generator=g)
    return idx, torch.roll(idx, -1, 1)


def perturbed(model, seed=1):
    """Move every parameter off its structured init so each term of the forward matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("mode", ["linear", "additive", "passthrough", "hyperconnect"])
def test_forward_matches_reference(mode):
    """Contract: loss == the plain re-implementation, for every injection mode (with GQA)."""
    cfg = tiny(input_injection=mode)
    torch.manual_seed(0)
    model = perturbed(LoopedLM(cfg))
    idx, tgt = batch(cfg)
    ref = reference_loss(model.state_dict(), cfg, idx, tgt)
    assert torch.allclose(model(idx, tgt), ref, rtol=1e-5, atol=1e-5)


def test_num_recur_override_at_eval():
    """Contract: num_recur can be overridden at evaluation and equals the reference at that r."""
    cfg = tiny()
    model = perturbed(LoopedLM(cfg))
    idx, tgt = batch(cfg)
    for r in (1, 5):
        with torch.no_grad():
            got = model(idx, tgt, num_recur=r)
        assert torch.allclose(got, reference_loss(model.state_dict(), cfg, idx, tgt, num_recur=r), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(model(idx, tgt, num_recur=1), model(idx, tgt, num_recur=5))


def test_logits_are_softcapped():
    cfg = tiny(logit_softcap=2.0)
    model = LoopedLM(cfg)
    with torch.no_grad():
        model.head.weight.normal_(std=10.0)
    logits = model(batch(cfg)[0])
    assert logits.dtype == torch.float32 and logits.abs().max() <= 2.0 and logits.abs().max() > 1.5


def test_init_follows_reference_study():
    """Contract: injection [I | 0], lanes one-hot / identity / ones, norms 1, embed std 1, head std 1e-3."""
    cfg = tiny(d_model=128, n_head=2, n_kv_head=None, vocab_size=512)
    m = LoopedLM(cfg)
    d = cfg.d_model
    assert torch.equal(m.injection.weight[:, :d], torch.eye(d)) and not m.injection.weight[:, d:].any()
    assert abs(m.embed.weight.std().item() - 1.0) < 0.02 and abs(m.head.weight.std().item() - 1e-3) < 1e-4
    assert abs(m.recur[0].attn.wq.weight.std().item() - d ** -0.5) < 0.01 * d ** -0.5 * 10
    assert abs(m.recur[0].mlp.proj.weight.std().item() - (4 * d) ** -0.5) < 0.1 * (4 * d) ** -0.5
    assert all(torch.equal(n.weight, torch.ones(d)) for n in (m.norm_emb, m.norm_recur, m.norm_final))
    hc = LoopedLM(tiny(input_injection="hyperconnect", num_recur=3, num_lanes=2)).injection
    assert torch.equal(hc.alpha, torch.tensor([[1.0, 0], [0, 1], [1, 0]]))
    assert torch.equal(hc.mix, torch.eye(2).expand(3, 2, 2)) and torch.equal(hc.beta, torch.ones(3, 2))


@pytest.mark.parametrize("mode", ["linear", "additive"])
def test_truncated_backprop_gradients(mode):
    """Contract: with bptt_k=k the gradients equal the reference's with the first r-k passes
    under no_grad, the loss equals full backprop's, and the gradients differ from full backprop."""
    cfg_full, cfg_k = tiny(input_injection=mode, num_recur=4), tiny(input_injection=mode, num_recur=4, bptt_k=1)
    torch.manual_seed(0)
    model = perturbed(LoopedLM(cfg_k))
    full = LoopedLM(cfg_full)
    full.load_state_dict(model.state_dict())
    idx, tgt = batch(cfg_k)
    loss_k = model(idx, tgt)
    loss_k.backward()
    sd = {k: v.detach().clone().requires_grad_(True) for k, v in model.state_dict().items()}
    ref = reference_loss(sd, cfg_k, idx, tgt, bptt_k=1)
    ref.backward()
    loss_full = full(idx, tgt)
    loss_full.backward()
    assert torch.allclose(loss_k, loss_full, rtol=1e-6)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, sd[name].grad, rtol=1e-4, atol=1e-6), name
    g_k, g_f = dict(model.named_parameters())["recur.0.mlp.fc.weight"].grad, dict(full.named_parameters())["recur.0.mlp.fc.weight"].grad
    assert not torch.allclose(g_k, g_f, rtol=1e-3)


def _saved_bytes(model, idx, tgt):
    """Bytes of tensors autograd keeps alive for backward (what truncated backprop must cut)."""
    total = []

    def pack(t):
        total.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(idx, tgt)
    return sum(total)


def test_detached_recurrences_keep_no_activations():
    """Contract: saved activations fall as bptt_k falls at fixed r (detached passes keep none)."""
    saved = []
    for k in (4, 2, 1):
        cfg = tiny(num_recur=4, bptt_k=k)
        model = LoopedLM(cfg)
        saved.append(_saved_bytes(model, *batch(cfg)))
    assert saved[0] > saved[1] > saved[2]
    per_pass = saved[0] - saved[1]  # two passes' worth
    assert abs((saved[1] - saved[2]) - per_pass / 2) <= 0.05 * per_pass


@pytest.mark.parametrize("mode", ["linear", "hyperconnect"])
def test_checkpoint_recurrence_same_gradients(mode):
    """Contract: recomputing each pass in backward gives the same loss and gradients, and keeps
    fewer activations alive."""
    cfg = tiny(input_injection=mode)
    cfg_ck = tiny(input_injection=mode, checkpoint_recurrence=True)
    torch.manual_seed(0)
    a = perturbed(LoopedLM(cfg))
    b = LoopedLM(cfg_ck)
    b.load_state_dict(a.state_dict())
    idx, tgt = batch(cfg)
    la, lb = a(idx, tgt), b(idx, tgt)
    la.backward()
    lb.backward()
    assert torch.equal(la, lb)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-5, atol=1e-7), n
    assert _saved_bytes(b, idx, tgt) < _saved_bytes(a, idx, tgt)


def test_generate_greedy_is_deterministic_and_respects_recur():
    cfg = tiny()
    model = perturbed(LoopedLM(cfg))
    prompt = batch(cfg, B=1)[0][:, :4]
    a = model.generate(prompt, 5)
    assert a.shape == (1, 9) and torch.equal(a, model.generate(prompt, 5))
    assert torch.equal(a[:, :4], prompt)


def test_an_explicit_zero_recurrences_is_an_error_not_the_default():
    """Contract: num_recur=None means the trained r; an explicit 0 (or less) raises a ConfigError
    naming the value, in the model, the engine (train and eval), the decoder and the accounting,
    instead of silently running the default."""
    from megaloop.accounting import count_params, flops_per_token
    from megaloop.config import ConfigError, load_config
    from megaloop.inference.generate import generate
    from megaloop.parallel import local_engine
    cfg = tiny()
    torch.manual_seed(0)
    model = LoopedLM(cfg)
    x, y = batch(cfg)
    assert torch.equal(model(x, y, num_recur=None), model(x, y, num_recur=cfg.num_recur))
    engine = local_engine(load_config(raw={"model": vars(cfg) | {"recur_sampling": {}}, "train": {"steps": 1}}),
                          model, torch.device("cpu"))
    for call in (lambda: model(x, y, num_recur=0), lambda: model.generate(x[:1, :4], 2, num_recur=0),
                 lambda: generate(model, x[:1, :4], 2, num_recur=0), lambda: generate(model, x[:1, :4], 2, max_recur=0),
                 lambda: engine.eval_loss([(x, y)], num_recur=0), lambda: engine.train_step([(x, y)], 1.0, num_recur=0),
                 lambda: flops_per_token(cfg, 0), lambda: count_params(cfg, 0)):
        with pytest.raises(ConfigError, match="num_recur must be >= 1"):
            call()


def test_eval_loss_weighs_batches_by_their_counted_targets():
    """Contract: the engine's eval_loss is the mean loss per counted target token over all batches:
    a batch whose targets are mostly ignored (-100) weighs by the targets it has, as one long
    cross-entropy over every counted target of every batch (the independent reference) gives."""
    import torch.nn.functional as F

    from megaloop.config import load_config
    from megaloop.model import IGNORE_INDEX
    from megaloop.parallel import local_engine
    cfg = tiny()
    torch.manual_seed(0)
    model = perturbed(LoopedLM(cfg))
    (x1, y1), (x2, y2) = batch(cfg, seed=1), batch(cfg, seed=2)
    y2 = y2.clone()
    y2[:, 3:] = IGNORE_INDEX  # 6 counted targets against 32
    engine = local_engine(load_config(raw={"model": vars(cfg) | {"recur_sampling": {}}, "train": {"steps": 1}}),
                          model, torch.device("cpu"))
    got = engine.eval_loss([(x1, y1), (x2, y2)])
    with torch.no_grad():
        logits = torch.cat([model(x1).reshape(-1, cfg.vocab_size), model(x2).reshape(-1, cfg.vocab_size)])
        ref = F.cross_entropy(logits.double(), torch.cat([y1.reshape(-1), y2.reshape(-1)]), ignore_index=IGNORE_INDEX)
    assert got == pytest.approx(float(ref), rel=1e-5)
