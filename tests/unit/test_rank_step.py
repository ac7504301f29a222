"""World size 2 (gloo, FSDP2) trains exactly like world size 1: same batch, same parameters after one step.

Both ranks run every configuration in one spawned pair of processes (starting ranks is the slow part).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
from dist_ranks import run_ranks
from tiny_models import tiny_model

from areal_py.config import load_config
from areal_py.wire import protocol as P
from trainer import learner as L
from trainer import rank_step
from trainer.algo.offpolicy_stats import OffPolicyTally, staleness_keys
from trainer.distributed import init_dist
from trainer.learner import Learner
from trainer.rollout_batch import collate
from trainer.sharding import full_weights

COST = "trainer.pack_cost=[1e-3,1e-6,1e-8]"
CASES = {  # name: (overrides, groups in the batch, version the tokens were generated at; trained at 3)
    "token_mean": (["algo.loss_agg=token_mean"], 5, 3),
    "seq_mean_stale": (["algo.loss_agg=seq_mean"], 5, 2),  # stale tokens: proximal logprobs from the forward
    "gae_critic_whiten": (["algo.adv_estimator=gae", "algo.whiten_advantages=true", "algo.drop_uniform_groups=false"],
                          5, 3),
    "micro_batches_kl": (["trainer.max_tokens_per_micro_batch=24", "trainer.micro_batch_packing=cost", COST,
                          "algo.kl_coef=0.1", "algo.kl_in=reward", "algo.adv_estimator=rloo"], 5, 2),
    "one_group": (["trainer.micro_batch_size=2"], 1, 3),  # rank 1 gets no rows, joins with zero-weight passes
    "no_signal": ([], 0, 3),  # 2 groups, every reward equal: nothing informative, no update on any rank
    # tokens of versions 0..3 (every staleness bucket) and a lower bound that clamps some weights
    "mixed_stale_bounded": (["algo.offpolicy.lower=0.1"], 5, (0, 1, 2, 3)),
}


def make_batch(groups: int, version: int | tuple[int, ...]):
    """``groups`` groups of 4 with varied lengths and rewards; 0 = two groups whose rewards are all equal.
    ``version``: every token's, or the versions each token's is drawn from."""
    g = torch.Generator().manual_seed(7)
    out, uniform = [], groups == 0
    for gid in range(groups or 2):
        samples = []
        for i in range(4):
            n = int(torch.randint(1, 12, (1,), generator=g))
            ids = torch.randint(4, 32, (n,), generator=g).tolist()
            samples.append(P.Sample(output_ids=ids, logprobs=(-torch.rand(n, generator=g) * 3).tolist(),
                                    versions=_versions(version, n, g), finish_reason="stop",
                                    reward=1.0 if uniform else float((i + gid) % 3 == 0)))
        out.append(P.Group(gid=gid, prompt_index=gid, prompt_ids=[1, 2 + gid, 3] * (1 + gid % 2), samples=samples))
    return collate(out, pad_id=0)


def _versions(version: int | tuple[int, ...], n: int, g: torch.Generator) -> list[int]:
    if isinstance(version, int):
        return [version] * n
    return [version[int(i)] for i in torch.randint(0, len(version), (n,), generator=g)]


def one_step(name: str, model_dir: str, dist=None) -> dict:
    overrides, groups, generated = CASES[name]
    cfg = load_config(None, ["controller.group_size=4", *overrides])  # the default lr: AdamW's first step moves
    # each weight by about lr * sign(grad), so rounding in a near-zero gradient shows up scaled by lr
    learner = Learner(cfg, tiny_model(max_positions=128), model_dir=model_dir, dist=dist)
    main = dist is None or dist.is_main
    stats = learner.train_step(make_batch(groups, generated) if main else None, 3)
    out = {"stats": stats, "model": full_weights(learner.model, learner.dist),
           "critic": full_weights(learner.critic, learner.dist) if learner.critic is not None else None,
           "load": learner.rank_load, "offpolicy": learner.offpolicy}
    return out


def _all_cases(model_dir: str) -> dict:
    d = init_dist(60.0)
    out = {name: one_step(name, model_dir, d) for name in CASES}
    if d.is_main:  # a step whose whole batch was non-finite: rank 0 says SKIP, the others hear it
        rank_step.send_command(d, 9, rank_step.SKIP)
        out["command"] = rank_step.SKIP
    else:
        out["command"] = rank_step.receive_command(d, 9, timeout_s=30.0)
    return out


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny")
    tiny_model(max_positions=128).save_pretrained(d)
    return str(d)


@pytest.fixture(scope="module")
def two_ranks(model_dir):
    return run_ranks(_all_cases, 2, model_dir, timeout_s=300)


@pytest.mark.parametrize("name", list(CASES))
def test_world_size_two_equals_one(two_ranks, model_dir, name):
    r0, r1 = two_ranks
    one = one_step(name, model_dir)
    two = r0[name]
    assert r1[name]["model"] is None  # full weights only on rank 0
    for part in ("model", "critic"):
        if one[part] is None:
            assert two[part] is None
            continue
        assert one[part].keys() == two[part].keys()
        for k, v in one[part].items():
            torch.testing.assert_close(two[part][k], v, atol=1e-5, rtol=0, msg=f"{part}.{k}")
    start = full_weights(tiny_model(max_positions=128), _single())
    moved = max(float((v - start[k]).abs().max()) for k, v in one["model"].items())
    # the step changed the weights (the comparison is not of two untouched models), unless nothing was informative
    assert moved > cfg_lr() / 2 if name != "no_signal" else moved == 0.0
    for k in ("loss", "grad_norm", "informative_samples", "value_loss", "kl_loss"):
        assert two["stats"][k] == pytest.approx(one["stats"][k], abs=1e-5), k
    _same_offpolicy(two["offpolicy"], one["offpolicy"])
    _same_offpolicy(r1[name]["offpolicy"], one["offpolicy"])  # every rank holds the whole batch's numbers
    load = two["load"]
    if name == "no_signal":
        assert load.tokens == [0, 0]
        return
    assert len(load.tokens) == 2 and sum(load.tokens) > 0 and all(b > 0 for b in load.busy_s)
    if name == "one_group":
        assert load.tokens[1] == 0


def _same_offpolicy(two, one) -> None:
    """The off-policy statistics of world size 2 are those of one process on the whole batch."""
    if one is None:  # nothing informative: no step, nothing computed
        assert two is None
        return
    assert two.by_staleness.keys() == one.by_staleness.keys()
    for key, g1, g2 in [("all", one.all, two.all), *((k, one.by_staleness[k], two.by_staleness[k])
                                                        for k in one.by_staleness)]:
        assert g2.tokens == g1.tokens, key
        for f in ("kl_mean", "kl_max", "ess", "bounded_fraction"):
            assert getattr(g2, f) == pytest.approx(getattr(g1, f), abs=1e-6, rel=0), f"{key}.{f}"


def test_offpolicy_statistics_are_of_the_whole_batch(two_ranks):
    """The mixed case fills every staleness bucket, bounds some tokens and is off-policy, so the comparison
    above compares non-trivial numbers; the 2-rank result counts every valid token of the batch."""
    s = two_ranks[0]["mixed_stale_bounded"]["offpolicy"]
    assert list(s.by_staleness) == list(staleness_keys())
    assert s.all.tokens == sum(g.tokens for g in s.by_staleness.values()) > 0
    assert 0.0 < s.all.bounded_fraction < 1.0 and s.all.kl_mean > 0.0 and s.all.ess < 1.0
    on = two_ranks[0]["token_mean"]["offpolicy"]  # every token from the trained version: prox = behav
    assert (on.all.kl_max, on.all.ess, list(on.by_staleness)) == (0.0, 1.0, ["0"])


def test_offpolicy_tally_fields_are_all_combined():
    """`offpolicy_across_ranks` combines every field of a tally's sums: a new one would be left per-rank."""
    names = {f.name for f in dataclasses.fields(OffPolicyTally().total)}
    assert names == {*rank_step.OFFPOLICY_SUMMED, rank_step.OFFPOLICY_MAXED}


def test_skip_command_reaches_the_other_rank(two_ranks):
    assert [r["command"] for r in two_ranks] == [rank_step.SKIP, rank_step.SKIP]
    assert two_ranks[1]["no_signal"]["stats"]["informative_samples"] == 0.0


def cfg_lr() -> float:
    return load_config(None, []).trainer.lr


def _single():
    from trainer.distributed import Dist
    return Dist.single()


def test_stat_keys_agree():
    assert rank_step.STAT_KEYS == L.STAT_KEYS


def test_kl_reward_with_batch_estimators_is_refused_at_world_size_two():
    cfg = load_config(None, ["algo.kl_coef=0.1", "algo.kl_in=reward", "algo.adv_estimator=reinforce_pp"])
    with pytest.raises(ValueError, match="not supported with trainer.world_size > 1"):
        rank_step.check_supported(cfg.algo, 2)
    rank_step.check_supported(cfg.algo, 1)
