"""trainer.sharding: FSDP2 per decoder layer over 2 gloo ranks reproduces the unsharded model."""
from __future__ import annotations

import pytest
import torch
from dist_ranks import run_ranks
from tiny_models import tiny_model

from trainer.distributed import Dist, init_dist
from trainer.sharding import decoder_layers, full_weights, shard_model


def test_world_size_one_is_untouched():
    m = tiny_model()
    assert shard_model(m, Dist.single()) is m
    assert not any(type(p).__name__ == "DTensor" for p in m.parameters())
    w = full_weights(m, Dist.single())
    assert set(w) == {n for n, _ in m.named_parameters()}
    assert len(decoder_layers(m)) == 2


def test_a_model_without_layers_is_refused():
    with pytest.raises(ValueError, match="no non-empty `layers`"):
        decoder_layers(torch.nn.Linear(2, 2))


def _sharded_forward_backward() -> dict:
    d = init_dist(30.0)
    m = shard_model(tiny_model(), d)
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    logits = m(input_ids=ids[d.rank : d.rank + 1]).logits
    logits.sum().backward()  # each rank one row: the summed gradients are the 2-row batch's
    grads = {n: p.grad.full_tensor() for n, p in m.named_parameters()}
    w = full_weights(m, d)
    return {"logits": logits.detach(), "grads": grads, "weights": w, "dtensor": type(next(m.parameters())).__name__}


def test_two_ranks_match_one_process():
    r0, r1 = run_ranks(_sharded_forward_backward, 2)
    ref = tiny_model()
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    logits = ref(input_ids=ids).logits
    logits.sum().backward()
    assert r0["dtensor"] == "DTensor"
    torch.testing.assert_close(r0["logits"][0], logits[0].detach(), atol=1e-5, rtol=0)
    torch.testing.assert_close(r1["logits"][0], logits[1].detach(), atol=1e-5, rtol=0)
    for n, p in ref.named_parameters():
        torch.testing.assert_close(r0["grads"][n], p.grad, atol=1e-5, rtol=0)  # summed, not averaged
        torch.testing.assert_close(r0["weights"][n], p.detach(), atol=0, rtol=0)
    assert r1["weights"] is None


def test_activation_checkpointing_keeps_names_and_gradients():
    plain, ckpt = tiny_model(), tiny_model()
    shard_model(ckpt, Dist.single(), activation_checkpointing=True)
    assert ckpt.model.gradient_checkpointing
    assert [n for n, _ in ckpt.named_parameters()] == [n for n, _ in plain.named_parameters()]
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    for m in (plain, ckpt):
        m.train()
        m(input_ids=ids).logits.square().mean().backward()
    for (n, p), q in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=0, msg=n)
    with pytest.raises(ValueError, match="does not support gradient checkpointing"):
        shard_model(torch.nn.Linear(2, 2), Dist.single(), activation_checkpointing=True)
