"""Run as 2+ ranks (tests/test_parallel_equality.py): the vocab-parallel loss through the kernel
equals the plain softcapped cross-entropy (loss, grad of the hidden states, grad of the local
head shard), with a vocab (101) the world size does not divide. Exits non-zero with the assertion when they differ."""
import torch
import torch.distributed as dist
import torch.nn.functional as F

from megaloop.parallel import tensor_parallel as tpm


def main() -> None:
    dist.init_process_group("gloo")
    try:
        group = dist.new_group(list(range(dist.get_world_size())))
        g = torch.Generator().manual_seed(0)
        h0, w0 = torch.randn(24, 16, generator=g), torch.randn(101, 16, generator=g) * 0.5
        t = torch.randint(0, 101, (24,), generator=g)
        t[3] = -100
        h = h0.clone().requires_grad_()
        ref = F.cross_entropy(15 * torch.tanh(F.linear(h, w0) / 15), t)
        w = w0.clone().requires_grad_()
        ref.backward()
        ref_w = torch.autograd.grad(F.cross_entropy(15 * torch.tanh(F.linear(h0, w) / 15), t), w)[0]
        head = tpm.VocabParallelHead(w0, 15.0, group)
        hh = h0.clone().requires_grad_()
        loss = tpm.vocab_parallel_cross_entropy(hh, head.weight, t, 15.0, group, head.vocab_start, 101)
        loss.backward()
        torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(hh.grad, h.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(head.weight.grad, tpm.shard_of(head.weight, ref_w), rtol=1e-4, atol=1e-6)
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
