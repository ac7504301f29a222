"""trainer/fused_ops.py: the hand-fused RMSNorm, RoPE and SwiGLU against hand values and autograd, and the
reversible, checked patch of a Llama model (outputs and gradients equal the model's own to 1e-5)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from test_learner import batch
from tiny_models import tiny_model
from transformers import LlamaConfig, LlamaForCausalLM

import trainer.fused_ops as fo
from areal_py.config import load_config
from trainer.learner import Learner


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    h = x.shape[-1] // 2
    return torch.cat((-x[..., h:], x[..., :h]), dim=-1)


def test_rms_norm_by_hand_and_gradcheck():
    x = torch.tensor([[3.0, 4.0]])
    rms = math.sqrt((9 + 16) / 2)
    out = fo.rms_norm(x, torch.tensor([1.0, 2.0]), 0.0)
    torch.testing.assert_close(out, torch.tensor([[3 / rms, 8 / rms]]))
    g = torch.Generator().manual_seed(0)
    xd = torch.randn(2, 3, 6, dtype=torch.float64, generator=g, requires_grad=True)
    wd = torch.randn(6, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(lambda a, b: fo.rms_norm(a, b, 1e-6), (xd, wd))


def test_rope_by_hand_and_gradcheck():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    # cos 0, sin 1: the rotation alone, rotate_half(x) = [-3, -4, 1, 2]
    torch.testing.assert_close(fo.rope(x, torch.zeros(4), torch.ones(4)), torch.tensor([-3.0, -4.0, 1.0, 2.0]))
    torch.testing.assert_close(fo.rope(x, torch.ones(4), torch.zeros(4)), x)  # cos 1, sin 0: identity
    g = torch.Generator().manual_seed(1)
    xd = torch.randn(2, 5, 3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    cos, sin = torch.randn(2, 5, 1, 8, dtype=torch.float64, generator=g), torch.randn(2, 5, 1, 8, dtype=torch.float64)
    torch.testing.assert_close(fo.rope(xd, cos, sin), xd * cos + _rotate_half(xd) * sin)
    assert torch.autograd.gradcheck(lambda a: fo.rope(a, cos, sin), (xd,))
    with pytest.raises(ValueError, match="even head dimension"):
        fo.rope(torch.ones(3), torch.ones(3), torch.ones(3))


def test_rope_qkv_matches_rope_and_gradcheck():
    g = torch.Generator().manual_seed(2)
    heads, kv = 4, 2
    qkv = torch.randn(2, 5, heads + 2 * kv, 6, dtype=torch.float64, generator=g, requires_grad=True)
    cos, sin = torch.randn(2, 5, 1, 6, dtype=torch.float64, generator=g), torch.randn(2, 5, 1, 6, dtype=torch.float64)
    q, k, v = fo.rope_qkv(qkv, cos, sin, heads, kv)
    torch.testing.assert_close(q, fo.rope(qkv[:, :, :heads], cos, sin))
    torch.testing.assert_close(k, fo.rope(qkv[:, :, heads:heads + kv], cos, sin))
    torch.testing.assert_close(v, qkv[:, :, heads + kv:])
    assert torch.autograd.gradcheck(lambda a: fo.rope_qkv(a, cos, sin, heads, kv), (qkv,))
    with pytest.raises(ValueError, match="rope_qkv needs"):
        fo.rope_qkv(qkv[:, :, :7], cos, sin, heads, kv)


def test_swiglu_by_hand_and_gradcheck():
    # gate 0 -> silu 0; gate 1 -> 1 * sigmoid(1); up = 2
    out = fo.swiglu(torch.tensor([0.0, 1.0, 2.0, 2.0]))
    torch.testing.assert_close(out, torch.tensor([0.0, 2 / (1 + math.exp(-1))]))
    gu = torch.randn(3, 4, 10, dtype=torch.float64, generator=torch.Generator().manual_seed(3), requires_grad=True)
    assert torch.autograd.gradcheck(fo.swiglu, (gu,))
    with pytest.raises(ValueError, match="even last dimension"):
        fo.swiglu(torch.ones(3))


def _gqa_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def _fwd_bwd(model, ids):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=ids, use_cache=False).logits
    (logits * torch.linspace(-1, 1, logits.shape[-1])).sum().backward()
    return logits.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("make", [tiny_model, _gqa_model])
def test_patched_model_equals_its_own_modules_and_undoes(make):
    model = make()
    ref = copy.deepcopy(model)
    patch = fo.fuse_llama(model)
    layers = model.config.num_hidden_layers
    assert patch.active and patch.patched == {"norm": 2 * layers + 1, "attention": layers, "mlp": layers}
    ids = torch.randint(0, 32, (3, 11), generator=torch.Generator().manual_seed(4))
    out, grads = _fwd_bwd(model, ids)
    ref_out, ref_grads = _fwd_bwd(ref, ids)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=0)
    for k in ref_grads:
        torch.testing.assert_close(grads[k], ref_grads[k], atol=1e-5, rtol=1e-5, msg=k)
    clone = copy.deepcopy(model)  # a copy's patched forwards use the copy's weights
    layer = clone.model.layers[0]
    assert layer.mlp.forward.__self__ is layer.mlp and layer.self_attn.forward.__self__ is layer.self_attn
    patch.undo()
    assert not patch.active and all("forward" not in vars(m) for m in model.modules())


def test_cache_path_falls_back_to_the_model_forward():
    """Generation (a KV cache) runs the model's own attention: the same tokens as unpatched."""
    model = tiny_model().eval()
    ref = copy.deepcopy(model)
    fo.fuse_llama(model)
    ids = torch.tensor([[1, 5, 7, 9]])
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    assert model.generate(ids, **kw).tolist() == ref.generate(ids, **kw).tolist()


def test_a_wrong_fused_op_is_caught_and_nothing_stays_patched(monkeypatch, caplog):
    monkeypatch.setitem(fo.FORWARDS, "mlp", lambda self, x: 1.001 * fo._mlp_forward(self, x))
    model = tiny_model()
    patch = fo.fuse_llama(model)
    assert not patch.active and "mlp" in patch.reason and "differs" in patch.reason
    assert all("forward" not in vars(m) for m in model.modules())
    assert "fused ops off" in caplog.text


def test_no_llama_modules_is_reported():
    patch = fo.fuse_llama(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    assert not patch.active and "no Llama" in patch.reason


def test_learner_with_fused_ops_trains_like_the_model_modules():
    def step(fused: bool):
        cfg = load_config(None, ["controller.group_size=4", f"trainer.fused_ops={str(fused).lower()}",
                                 "algo.entropy_coef=0.01", "trainer.max_tokens_per_micro_batch=24",
                                 "trainer.micro_batch_packing=padded"])
        learner = Learner(cfg, tiny_model(max_positions=128), model_dir=None)
        learner.optimizer.step = lambda: None
        stats = learner.train_step(batch(), 3)
        return learner, stats, {k: p.grad.clone() for k, p in learner.model.named_parameters()}

    on, on_stats, on_grads = step(True)
    off, off_stats, off_grads = step(False)
    assert on.fused is not None and on.fused.active and off.fused is None
    assert on_stats["loss"] == pytest.approx(off_stats["loss"], abs=1e-6)
    assert on_stats["entropy"] == pytest.approx(off_stats["entropy"], abs=1e-6)
    for k in off_grads:
        torch.testing.assert_close(on_grads[k], off_grads[k], atol=1e-6, rtol=1e-5, msg=k)
