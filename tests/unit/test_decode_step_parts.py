"""The decode step's cheaper parts compute exactly what they replaced: the K/V write with addresses
computed once per step, RoPE through a roll and a signed sin, and layer weights looked up once (still
the live parameters). End-to-end exactness (greedy tokens, logprobs to 1e-4 against a full Hugging
Face forward) is in tests/unit/test_engine.py."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from rollout_server.torch_engine.kv_cache import SlotKVCache
from rollout_server.torch_engine.model_runner import FastLlamaRunner, _signed_sin


@torch.inference_mode()  # the cache's buffers are inference tensors
def test_flat_write_equals_the_indexed_write() -> None:
    gen = torch.Generator().manual_seed(0)
    caches = [SlotKVCache(num_layers=2, num_kv_heads=3, head_dim=8, max_slots=6, max_seq_len=40,
                          dtype=torch.float32, device=torch.device("cpu")) for _ in range(2)]
    for c in caches:
        c.reserve(6, 33)
    slots, pos = torch.tensor([4, 0, 2, 2, 5]), torch.tensor([7, 0, 3, 4, 32])  # scattered, ragged, one row twice
    k, v = torch.randn(5, 3, 8, generator=gen), torch.randn(5, 3, 8, generator=gen)
    index = caches[1].flat_index(slots, pos)
    for layer in range(2):
        caches[0].write(layer, slots, pos, k + layer, v - layer)
        caches[1].write_flat(layer, index, k + layer, v - layer)
    for layer in range(2):
        assert torch.equal(caches[0].keys[layer], caches[1].keys[layer])
        assert torch.equal(caches[0].values[layer], caches[1].values[layer])
        assert caches[1].keys[layer].abs().sum() > 0


def test_rope_with_a_roll_and_signed_sin_is_bitwise_the_rotate_half_form() -> None:
    gen = torch.Generator().manual_seed(1)
    x, cos, sin = torch.randn(6, 4, 48, generator=gen), torch.randn(6, 1, 48, generator=gen), torch.randn(
        6, 1, 48, generator=gen)
    half = 24
    reference = x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
    assert torch.equal(x * cos + x.roll(half, -1) * _signed_sin(sin), reference)


@torch.inference_mode()
def test_layer_weights_looked_up_once_still_see_in_place_updates() -> None:
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=64)).eval()
    cache = SlotKVCache(num_layers=2, num_kv_heads=2, head_dim=16, max_slots=2, max_seq_len=32,
                        dtype=torch.float32, device=torch.device("cpu"))
    runner = FastLlamaRunner(model, cache, decode_attention="sdpa")
    ids = [5, 9, 1, 30, 2, 7]

    def logits() -> torch.Tensor:
        runner.forward([0], [0], [ids[:-1]])
        return runner.forward([0], [len(ids) - 1], [ids[-1:]])[0]

    before = logits()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.mul_(-0.5)
        model.model.layers[0].self_attn.k_proj.weight.add_(0.1)
    after = logits()
    ref = model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    assert not torch.allclose(before, after, atol=1e-3)
    torch.testing.assert_close(after, ref, atol=1e-4, rtol=0)
