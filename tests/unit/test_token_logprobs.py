"""`token_logprobs`' fast path (right-padded rows without their mask, logit - logsumexp) against the
plain formula (masked forward, full log_softmax): logprobs, entropies and gradients at real positions."""
import pytest
import torch
from tiny_models import tiny_model

from trainer.rollout_batch import right_padded, token_logprobs


def reference(model, ids, mask, temperature, with_entropy=False):
    """The formula as first written: the mask always passed, log_softmax over the whole vocabulary."""
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
    if temperature > 0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, ids[:, 1:, None]).squeeze(-1)
    return logp, (-(logp_all.exp() * logp_all).sum(-1) if with_entropy else None)


def right_padded_batch(lengths, width, vocab=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (len(lengths), width), generator=g)
    mask = (torch.arange(width) < torch.tensor(lengths)[:, None]).long()
    return ids * mask, mask  # pad id 0


def test_right_padded_by_hand():
    assert right_padded(torch.tensor([[1, 1, 0], [1, 0, 0], [1, 1, 1]]))
    assert right_padded(torch.tensor([[0, 0], [1, 1]]))  # an empty row is ones-then-zeros too
    assert not right_padded(torch.tensor([[0, 1, 1], [1, 1, 1]]))  # left padding
    assert not right_padded(torch.tensor([[1, 0, 1]]))  # a hole
    assert right_padded(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="attention_mask"):
        right_padded(torch.ones(4, dtype=torch.long))


def real_positions(mask):
    """Positions t whose logprob scores a real token t+1 (what a loss mask can select)."""
    return mask[:, 1:].bool()


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_fast_path_equals_the_masked_log_softmax(attn, temperature):
    model = tiny_model(max_positions=64)
    model.config._attn_implementation = attn
    ids, mask = right_padded_batch([5, 17, 2, 17, 9], 17)
    valid = real_positions(mask)
    weights = torch.randn(valid.shape, generator=torch.Generator().manual_seed(1))

    def grads(fn):
        model.zero_grad(set_to_none=True)
        logp, ent = fn(model, ids, mask, temperature, with_entropy=True)
        # a loss that reads only real positions, as the policy loss does (masked positions replaced, not multiplied)
        loss = torch.where(valid, logp * weights + 0.1 * ent, 0.0).sum()
        loss.backward()
        return logp.detach(), ent.detach(), {k: p.grad.clone() for k, p in model.named_parameters()}

    fast_lp, fast_ent, fast_g = grads(token_logprobs)
    ref_lp, ref_ent, ref_g = grads(reference)
    assert torch.allclose(fast_lp[valid], ref_lp[valid], atol=1e-5)
    assert torch.allclose(fast_ent[valid], ref_ent[valid], atol=1e-5)
    assert fast_g.keys() == ref_g.keys()
    for k, g in fast_g.items():
        assert torch.allclose(g, ref_g[k], atol=1e-5, rtol=1e-4), k
    assert any(float(g.abs().max()) > 0 for g in fast_g.values())


def test_right_padded_rows_go_without_the_mask_other_masks_with_it():
    model = tiny_model(max_positions=64)
    seen = []
    forward = model.forward
    model.forward = lambda **kw: seen.append(kw["attention_mask"]) or forward(**kw)
    ids, mask = right_padded_batch([4, 7, 7], 7)
    token_logprobs(model, ids, mask, 1.0)
    assert seen[-1] is None
    left = mask.flip(1)  # left padding: a real token would attend to padding without the mask
    lp, _ = token_logprobs(model, ids.flip(1), left, 1.0)
    assert seen[-1] is left
    model.forward = forward
    ref, _ = reference(model, ids.flip(1), left, 1.0)
    assert torch.allclose(lp[real_positions(left)], ref[real_positions(left)], atol=1e-5)


def test_logprobs_are_normalised_log_probabilities():
    """exp(logp) of the first position, tried for every possible second token, sums to 1 (position 0
    sees only token 0, so changing token 1 changes what is scored, not the distribution)."""
    model = tiny_model(max_positions=64, vocab_size=12)
    ids, mask = right_padded_batch([6, 3], 6, vocab=12)
    total = 0.0
    with torch.no_grad():
        for tok in range(12):
            probe = ids.clone()
            probe[0, 1] = tok
            total += float(token_logprobs(model, probe, mask, 1.0)[0][0, 0].exp())
    assert total == pytest.approx(1.0, abs=1e-5)


def test_a_packed_learner_step_has_the_gradient_of_the_masked_formula(monkeypatch):
    """The whole learner step (cost packing of long-tailed lengths, right-padded micro-batches, entropy
    bonus) through the fast path equals the same step through the masked log_softmax formula."""
    from test_learner import COST, assert_same, grads_after_step, long_tailed_batch

    import trainer.learner as learner_module

    overrides = ["trainer.max_tokens_per_micro_batch=120", "trainer.micro_batch_packing=cost", COST,
                 "algo.entropy_coef=0.01"]
    fast_stats, ref_stats = {}, {}
    fast = grads_after_step(overrides, make=long_tailed_batch, samples=16, stats_out=fast_stats)
    monkeypatch.setattr(learner_module, "token_logprobs", reference)
    ref = grads_after_step(overrides, make=long_tailed_batch, samples=16, stats_out=ref_stats)
    assert_same(fast, ref)
    assert fast_stats["loss"] == pytest.approx(ref_stats["loss"], abs=1e-5)
    assert fast_stats["entropy"] == pytest.approx(ref_stats["entropy"], abs=1e-5) and fast_stats["entropy"] > 0
    assert fast_stats["real_token_fraction"] < 1  # micro-batches held padding, so the mask was dropped on them
