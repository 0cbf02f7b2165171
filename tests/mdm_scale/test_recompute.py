"""model.recompute: megatron-core's activation recomputation gives the same loss and gradients as storing."""

from __future__ import annotations

import pytest
import torch

from megatron.core import tensor_parallel

from mdm_scale.config import ModelConfig
from mdm_scale.denoiser import Denoiser


def loss_and_grads(recompute: str):
    torch.manual_seed(0)
    cfg = ModelConfig(num_layers=3, hidden_size=32, num_attention_heads=2, dropout=0.1, recompute=recompute)
    denoiser = Denoiser(cfg, vocab_size=20, max_seq_len=8).train()
    calls = []  # forward runs of the first block's attention core: 2 where it is recomputed in the backward pass
    denoiser.decoder.layers[0].self_attention.core_attention.register_forward_hook(lambda *_: calls.append(1))
    x = torch.randint(0, 21, (2, 8), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(5)  # the dropout masks (hidden: torch's RNG; attention: megatron's tracker) must be replayed
    tensor_parallel.model_parallel_cuda_manual_seed(5)
    hidden = denoiser(x)
    loss = denoiser.weighted_nll(hidden.reshape(-1, 32), x.reshape(-1) % 20, torch.ones(16))[0]
    loss.backward()
    grads = {n: p.grad.clone() for n, p in denoiser.named_parameters() if p.grad is not None}
    return loss.item(), grads, len(calls)


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recompute_gives_the_same_loss_and_gradients(dims, recompute):
    loss, grads, calls = loss_and_grads("none")
    loss_r, grads_r, calls_r = loss_and_grads(recompute)
    assert (calls, calls_r) == (1, 2)  # it did recompute
    assert loss_r == loss
    assert grads_r.keys() == grads.keys()
    for name in grads:
        torch.testing.assert_close(grads_r[name], grads[name], rtol=0, atol=1e-6, msg=name)
