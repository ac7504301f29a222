"""Dynamic micro-batching: first-fit-decreasing, padded and cost-model packing by a token budget
(hand-worked), and gradient accumulation over the packed micro-batches equal to one big batch to 1e-5."""
import itertools
import math
import random

import pytest
import torch
from torch import nn

from trainer.algo.policy_loss import decoupled_ppo_loss, gspo_loss, policy_loss
from trainer.micro_batching import PackCost, computed_tokens, pack_by_cost, pack_by_padded_tokens, pack_by_tokens

# ----------------------------------------------------------------------------- packing by hand


def test_ffd_by_hand():
    # lengths (5, 3, 8, 1, 9, 2), budget 10. Longest first: 9(#4) 8(#2) 5(#0) 3(#1) 2(#5) 1(#3)
    #   9  -> new bin A {4}: 9
    #   8  -> A 17 > 10            -> new bin B {2}: 8
    #   5  -> A 14, B 13           -> new bin C {0}: 5
    #   3  -> A 12, B 11, C 8 ok   -> C {0, 1}: 8
    #   2  -> A 11, B 10 ok        -> B {2, 5}: 10
    #   1  -> A 10 ok              -> A {4, 3}: 10
    assert pack_by_tokens([5, 3, 8, 1, 9, 2], 10) == [[3, 4], [2, 5], [0, 1]]


def test_oversized_sequence_gets_its_own_micro_batch():
    # 15 > 10 opens bin {0} (total 15, nothing else can join); 4 -> new bin; 3 -> joins it (7)
    assert pack_by_tokens([15, 4, 3], 10) == [[0], [1, 2]]
    assert pack_by_tokens([11, 12], 10) == [[1], [0]]


def test_zero_length_sequences_ties_and_empty_input():
    # zero-length sequences fit in the first bin even when it is full
    assert pack_by_tokens([0, 10, 0], 10) == [[0, 1, 2]]
    # equal lengths keep index order: 4(#0) 4(#1) share, 4(#2) opens a new bin
    assert pack_by_tokens([4, 4, 4], 8) == [[0, 1], [2]]
    assert pack_by_tokens([], 8) == []
    # one-token responses: five of length 1 under a budget of 2 -> pairs
    assert pack_by_tokens([1, 1, 1, 1, 1], 2) == [[0, 1], [2, 3], [4]]


def test_packing_invariants_on_random_lengths():
    rng = random.Random(0)
    for _ in range(50):
        lengths = [rng.randint(0, 30) for _ in range(rng.randint(1, 25))]
        budget = rng.randint(1, 40)
        bins = pack_by_tokens(lengths, budget)
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))     # each index once
        for b in bins:
            assert b == sorted(b)
            assert sum(lengths[i] for i in b) <= budget or len(b) == 1             # over budget only alone


@pytest.mark.parametrize("lengths, max_tokens, name", [
    ([1, 2], 0, "max_tokens"), ([1, 2], 2.5, "max_tokens"), ([1, -2], 4, "lengths"), ([1, 2.0], 4, "lengths"),
])
def test_bad_arguments(lengths, max_tokens, name):
    with pytest.raises(ValueError, match=name):
        pack_by_tokens(lengths, max_tokens)


# ----------------------------------------------------------------------------- gradient equivalence

VOCAB, DIM = 11, 8
# (prompt length, response length): includes a zero-length and two one-token responses
SAMPLES = [(2, 3), (1, 8), (3, 2), (2, 0), (2, 5), (1, 1), (3, 1)]
LENGTHS = [p + r for p, r in SAMPLES]                  # (5, 9, 5, 2, 7, 2, 4): 34 tokens
BUDGET = 10
# FFD by hand: 9(#1) -> A; 7(#4) -> B (A 16); 5(#0) -> C (A 14, B 12); 5(#2) -> C = 10; 4(#6) -> D
# (A 13, B 11, C 14); 2(#3) -> B = 9 (A 11); 2(#5) -> D = 6 (A 11, B 11, C 12)
PACKED = [[1], [3, 4], [0, 2], [5, 6]]
TOTAL_RESPONSE_TOKENS = sum(r for _, r in SAMPLES)     # 20
NONEMPTY_SEQUENCES = sum(r > 0 for _, r in SAMPLES)    # 6


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.embed(ids)))


def token_logprobs(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """Logprob of token t+1 at position t: [B, L-1]."""
    logits = model(ids[:, :-1])
    return torch.log_softmax(logits, dim=-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def make_batch():
    gen = torch.Generator().manual_seed(0)
    L = max(LENGTHS)
    ids = torch.zeros(len(SAMPLES), L, dtype=torch.long)
    mask = torch.zeros(len(SAMPLES), L - 1, dtype=torch.bool)
    for i, (p, r) in enumerate(SAMPLES):
        ids[i, : p + r] = torch.randint(1, VOCAB, (p + r,), generator=gen)
        mask[i, p - 1: p - 1 + r] = True
    noise = torch.randn(2, len(SAMPLES), L - 1, generator=gen)
    seq_adv = torch.randn(len(SAMPLES), generator=gen)
    return ids, mask, noise, seq_adv


def loss_fn(kind: str, logp, prox, behav, seq_adv, mask, normalizer):
    adv = seq_adv[:, None] * mask
    if kind == "decoupled":
        return decoupled_ppo_loss(logp, prox, behav, adv, mask, behav_cap=2.0, normalizer=normalizer)[0]
    if kind == "token_mean":
        return policy_loss(logp, prox, behav, adv, mask, dual_clip_c=3.0, normalizer=normalizer)[0]
    if kind == "seq_mean":
        return policy_loss(logp, prox, behav, adv, mask, agg_mode="seq_mean", normalizer=normalizer)[0]
    if kind == "seq_sum_const":
        return policy_loss(logp, prox, behav, adv, mask, agg_mode="seq_sum_const", agg_const=50.0)[0]
    if kind == "gspo":
        return gspo_loss(logp, prox, seq_adv, mask, eps_clip=0.05, normalizer=normalizer)[0]
    raise AssertionError(kind)


GLOBAL_NORMALIZER = {"decoupled": TOTAL_RESPONSE_TOKENS, "token_mean": TOTAL_RESPONSE_TOKENS,
                     "seq_mean": NONEMPTY_SEQUENCES, "seq_sum_const": None, "gspo": NONEMPTY_SEQUENCES}


def gradients(model: nn.Module) -> list[torch.Tensor]:
    return [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("packer", ["ffd", "padded", "cost"])
@pytest.mark.parametrize("kind", list(GLOBAL_NORMALIZER))
def test_micro_batched_gradient_equals_big_batch(kind, packer):
    torch.manual_seed(0)
    model = TinyLM()
    ids, mask, noise, seq_adv = make_batch()
    with torch.no_grad():                   # proximal near the current policy, behaviour further away
        prox = token_logprobs(model, ids) + 0.3 * noise[0]
        behav = prox - 0.5 * noise[1]

    # one big batch, default normaliser (every valid token / sequence of the batch)
    model.zero_grad()
    big_loss = loss_fn(kind, token_logprobs(model, ids), prox, behav, seq_adv, mask, None)
    big_loss.backward()
    big_grads = gradients(model)

    # packed micro-batches, each padded only to its own longest sequence, global normaliser
    if packer == "ffd":
        micro_batches = pack_by_tokens(LENGTHS, BUDGET)
        assert micro_batches == PACKED
    elif packer == "padded":
        micro_batches = pack_by_padded_tokens(LENGTHS, BUDGET)
        assert len(micro_batches) > 1
    else:
        micro_batches = pack_by_cost(LENGTHS, BUDGET, PackCost(1.0, 0.1, 0.01))
        assert len(micro_batches) > 1
    model.zero_grad()
    total = 0.0
    for idx in micro_batches:
        width = max(LENGTHS[i] for i in idx)
        mb_ids, cols = ids[idx, :width], slice(0, width - 1)
        loss = loss_fn(kind, token_logprobs(model, mb_ids), prox[idx, cols], behav[idx, cols], seq_adv[idx],
                       mask[idx, cols], GLOBAL_NORMALIZER[kind])
        loss.backward()                     # accumulates into .grad
        total += float(loss.detach())
    assert total == pytest.approx(float(big_loss.detach()), abs=1e-6)
    for g_micro, g_big in zip(gradients(model), big_grads):
        torch.testing.assert_close(g_micro, g_big, atol=1e-5, rtol=0)
    assert any(g.abs().max() > 1e-3 for g in big_grads)          # the check is not vacuous


def test_per_micro_batch_normaliser_would_be_wrong():
    # the same packing, each micro-batch its own token mean, averaged: not the big-batch gradient
    torch.manual_seed(0)
    model = TinyLM()
    ids, mask, noise, seq_adv = make_batch()
    with torch.no_grad():
        prox = token_logprobs(model, ids) + 0.3 * noise[0]
        behav = prox - 0.5 * noise[1]
    model.zero_grad()
    loss_fn("decoupled", token_logprobs(model, ids), prox, behav, seq_adv, mask, None).backward()
    big_grads = gradients(model)
    model.zero_grad()
    micro_batches = pack_by_tokens(LENGTHS, BUDGET)
    for idx in micro_batches:
        loss = loss_fn("decoupled", token_logprobs(model, ids[idx]), prox[idx], behav[idx], seq_adv[idx], mask[idx],
                       None)
        (loss / len(micro_batches)).backward()
    diff = max(float((a - b).abs().max()) for a, b in zip(gradients(model), big_grads))
    assert diff > 1e-3


def test_padded_packing_by_hand():
    """Sorted shortest first: 1,2,3 (3 rows x 3 = 9 <= 10), then 5 alone would make 4 x 5 = 20 > 10."""
    assert pack_by_padded_tokens([5, 3, 8, 1, 9, 2], 10) == [[1, 3, 5], [0], [2], [4]]
    assert pack_by_padded_tokens([2, 2, 2, 2], 4) == [[0, 1], [2, 3]]
    assert pack_by_padded_tokens([15, 4, 3], 10) == [[1, 2], [0]]  # oversized: alone
    assert pack_by_padded_tokens([0, 0, 7], 7) == [[0, 1], [2]]  # 3 rows x 7 = 21 > 7
    assert pack_by_padded_tokens([], 8) == []


def test_padded_packing_beats_ffd_on_a_long_tail():
    """FFD puts the 500-token sequence with many short ones; padded packing keeps padding small."""
    lengths = [20] * 60 + [500]
    def padded(bins):
        return sum(len(b) * max(lengths[i] for i in b) for b in bins)
    ffd, pad = pack_by_tokens(lengths, 1024), pack_by_padded_tokens(lengths, 1024)
    assert padded(pad) == 60 * 20 + 500
    assert padded(ffd) > 5 * padded(pad)
    for bins in (ffd, pad):
        assert sorted(i for b in bins for i in b) == list(range(len(lengths)))
    assert all(len(b) * max(lengths[i] for i in b) <= 1024 for b in pad)


# ----------------------------------------------------------------------------- packing by a cost model


def test_cost_packing_splits_where_one_more_pass_is_cheaper_than_the_padding():
    """[1,1,1,1,10], budget 50, cost 3 + rows*maxlen: all together 3 + 5*10 = 53; the four short ones,
    then 10 alone: (3 + 4) + (3 + 10) = 20; [1,1][1,1][10]: 23. Greedy padded packing takes all five
    (5 x 10 = 50 fits)."""
    lengths = [1, 1, 1, 1, 10]
    assert pack_by_cost(lengths, 50, PackCost(3.0, 1.0, 0.0)) == [[0, 1, 2, 3], [4]]
    assert pack_by_padded_tokens(lengths, 50) == [[0, 1, 2, 3, 4]]


def test_cost_packing_the_attention_term_decides():
    """[4,4,8], budget 100. With c0=10, c1=1: one batch 10 + 24 = 34 < [4,4][8] 18 + 18 = 36.
    With c0=10, c2=1 (rows x maxlen^2): one batch 10 + 192 = 202; [4,4][8] (10 + 32) + (10 + 64) = 116;
    [4][4][8] 26 + 26 + 74 = 126."""
    assert pack_by_cost([4, 4, 8], 100, PackCost(10.0, 1.0, 0.0)) == [[0, 1, 2]]
    assert pack_by_cost([4, 4, 8], 100, PackCost(10.0, 0.0, 1.0)) == [[0, 1], [2]]
    assert pack_by_cost([8, 4, 4], 100, PackCost(10.0, 0.0, 1.0)) == [[1, 2], [0]]  # indices, shortest first


def test_cost_packing_edge_cases():
    c = PackCost(1.0, 1.0, 0.0)
    assert pack_by_cost([], 8, c) == []
    assert pack_by_cost([7], 8, c) == [[0]]
    assert pack_by_cost([9], 8, c) == [[0]]                                   # over budget: alone
    assert pack_by_cost([20, 2, 2], 10, c) == [[1, 2], [0]]                   # over budget: alone, others share
    assert pack_by_cost([3, 3, 3, 3], 6, c) == [[0, 1], [2, 3]]               # equal lengths: rows <= 6 // 3
    assert pack_by_cost([3, 3, 3, 3], 12, c) == [[0, 1, 2, 3]]                # no padding, one overhead
    assert pack_by_cost([0, 0, 3], 3, c) == [[0, 1], [2]]                     # zero lengths cost only c0
    # no overhead: padding is never worth it, and runs without padding are kept whole (ties: fewer runs)
    assert pack_by_cost([2, 2, 3, 3, 5], 100, PackCost(0.0, 1.0, 0.0)) == [[0, 1], [2, 3], [4]]
    # only overhead: the fewest micro-batches the budget allows
    assert len(pack_by_cost([1] * 10 + [5] * 4, 10, PackCost(1.0, 0.0, 0.0))) == 3  # 10 ones, then 2 + 2 fives


def _cost(lengths, bins, c: PackCost) -> float:
    return sum(c.of(len(b), max(lengths[i] for i in b)) for b in bins)


def _set_partitions(items):
    if not items:
        yield []
        return
    first, rest = items[0], items[1:]
    for part in _set_partitions(rest):
        yield [[first], *part]
        for k in range(len(part)):
            yield [*part[:k], [first, *part[k]], *part[k + 1:]]


def test_cost_packing_is_optimal_over_every_partition():
    """Against brute force over all set partitions (not only contiguous runs) of small random cases."""
    rng = random.Random(0)
    for _ in range(60):
        n = rng.randint(1, 6)
        lengths = [rng.randint(0, 12) for _ in range(n)]
        budget = rng.randint(1, 40)
        c = PackCost(rng.choice([0.0, 1.0, 5.0, 30.0]), rng.choice([0.0, 1.0]), rng.choice([0.0, 0.1]))
        bins = pack_by_cost(lengths, budget, c)
        assert sorted(i for b in bins for i in b) == list(range(n)) and all(b == sorted(b) for b in bins)
        assert all(len(b) * max(lengths[i] for i in b) <= budget or len(b) == 1 for b in bins)
        feasible = [p for p in _set_partitions(list(range(n)))
                    if all(len(b) * max(lengths[i] for i in b) <= budget or len(b) == 1 for b in p)]
        assert math.isclose(_cost(lengths, bins, c), min(_cost(lengths, p, c) for p in feasible), abs_tol=1e-9)


def test_cost_packing_beats_greedy_padding_on_sum_cot_like_lengths():
    """A long tail (most sequences 20-60 tokens, a few up to 494): with a per-pass overhead worth ~200
    tokens the cost packing computes far fewer padded tokens than greedy padded packing at 8192."""
    rng = random.Random(1)
    lengths = [min(494, int(20 / (1 - rng.random()) ** (1 / 1.1))) for _ in range(128)]
    c = PackCost(200.0, 1.0, 0.0)
    cost_bins, greedy = pack_by_cost(lengths, 8192, c), pack_by_padded_tokens(lengths, 8192)
    assert _cost(lengths, cost_bins, c) <= _cost(lengths, greedy, c)
    assert sum(lengths) / computed_tokens(lengths, cost_bins) > sum(lengths) / computed_tokens(lengths, greedy)
    assert sum(lengths) / computed_tokens(lengths, cost_bins) >= 0.85


def test_computed_tokens_by_hand():
    assert computed_tokens([5, 3, 8, 1], [[0, 1], [2], [3]]) == 2 * 5 + 8 + 1
    assert computed_tokens([], []) == 0


@pytest.mark.parametrize("bad", [(-1.0, 0.0, 0.0), (0.0, math.nan, 0.0), (0.0, 0.0, math.inf), (True, 0.0, 0.0)])
def test_pack_cost_rejects_bad_coefficients(bad):
    with pytest.raises(ValueError, match="PackCost"):
        PackCost(*bad)


def test_cost_packing_checks_its_arguments():
    with pytest.raises(ValueError, match="max_tokens"):
        pack_by_cost([1, 2], 0, PackCost(1.0, 1.0, 0.0))
    with pytest.raises(ValueError, match="lengths"):
        pack_by_cost([1, -2], 4, PackCost(1.0, 1.0, 0.0))


def test_contiguous_runs_suffice_even_with_ties_and_zero_lengths():
    """Every ordering of a case with ties gives packings of the same cost (the sort is stable by index)."""
    c = PackCost(2.0, 1.0, 0.05)
    base = [0, 3, 3, 7, 7, 7]
    costs = {round(_cost(list(p), pack_by_cost(list(p), 14, c), c), 9) for p in itertools.permutations(base)}
    assert len(costs) == 1
