"""algo.offpolicy: the config's checks, the moved trainer.behav_* keys, and one real learner update per option."""
import math

import pytest
import torch
import yaml
from test_learner import batch
from tiny_models import tiny_model

from areal_py.config import Config, ConfigError, OffPolicyConfig, load_config
from trainer.algo.offpolicy import OffPolicySpec, offpolicy_weight
from trainer.algo.recipe import offpolicy_spec
from trainer.learner import Learner
from trainer.rollout_batch import token_logprobs


def test_default_config_is_min_w_5_with_the_behaviour_trust_region():
    """The config's default is the combination the sum_cot staleness ablation chose (docs/benchmarks.md);
    the pure spec's own default stays "no trust region", so a caller of the loss gets only what it asks for."""
    assert offpolicy_spec(OffPolicyConfig()) == OffPolicySpec(behav_clip=0.2)
    assert OffPolicySpec() == OffPolicySpec(method="filter", level="token", action="clamp", metric="ratio", upper=5.0,
                                            behav_clip=None)
    assert offpolicy_spec(load_config(None, ["algo.offpolicy.behav_clip=null"]).algo.offpolicy) == OffPolicySpec()


@pytest.mark.parametrize("key, new", [("trainer.behav_cap=2", "algo.offpolicy.upper"),
                                      ("trainer.behav_mode=mask", "algo.offpolicy.action=mask")])
def test_moved_keys_name_their_replacement(key, new):
    with pytest.raises(ConfigError, match=new):
        load_config(None, [key])


@pytest.mark.parametrize("overrides, match", [
    (["algo.offpolicy.method=tis", "algo.offpolicy.action=mask"], "action has no effect with algo.offpolicy.method=tis"),
    (["algo.offpolicy.method=none", "algo.offpolicy.upper=2"], "upper has no effect"),
    (["algo.offpolicy.agg=max"], "agg has no effect .* level=token"),
    (["algo.offpolicy.upper=1"], "must be > 1"),
    (["algo.offpolicy.action=mask", "algo.offpolicy.lower=0"], "must be > 0"),
    (["algo.offpolicy.metric=kl_k3"], "action=clamp .* metric=ratio"),
    (["algo.offpolicy.action=mask", "algo.offpolicy.metric=kl_k3", "algo.offpolicy.upper=-1"], "must be > 0"),
    (["algo.offpolicy.method=icepop", "algo.offpolicy.level=sequence"], "level has no effect"),
    (["algo.offpolicy.method=icepop", "algo.offpolicy.upper=null"], "needs algo.offpolicy.upper"),
    (["algo.offpolicy.upper=2", "algo.offpolicy.lower=3"], "above"),
    (["algo.offpolicy.upper=.inf"], "upper"),
    (["algo.loss=ppo", "algo.offpolicy.method=tis"], "no effect with algo.loss=ppo"),
    (["algo.loss=gspo", "algo.offpolicy.upper=2"], "no effect with algo.loss=gspo"),
    (["algo.offpolicy.behav_clip=1"], "behav_clip"),
    (["algo.offpolicy.behav_clip=0"], "behav_clip"),
    (["algo.loss=ppo", "algo.offpolicy.behav_clip=0.3"], "no effect with algo.loss=ppo"),
    (["algo.loss=ppo", "algo.offpolicy.behav_clip=null"], "no effect with algo.loss=ppo"),
])
def test_inconsistent_settings_are_errors_naming_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_config(None, overrides)


@pytest.mark.parametrize("overrides", [["algo.loss=ppo"], ["algo.offpolicy.method=icepop", "algo.offpolicy.upper=2"],
                                       ["algo.offpolicy.level=sequence", "algo.offpolicy.agg=sum"]])
def test_a_dumped_config_loads_back(overrides):
    cfg = load_config(None, overrides)
    assert Config.model_validate(yaml.safe_load(yaml.safe_dump(cfg.model_dump(mode="json")))) == cfg


OPTIONS = {
    "default": [],
    "none": ["algo.offpolicy.method=none", "algo.offpolicy.behav_clip=null"],
    "raw": ["algo.offpolicy.upper=null", "algo.offpolicy.behav_clip=null"],
    "filter_token_mask": ["algo.offpolicy.action=mask", "algo.offpolicy.upper=2", "algo.offpolicy.lower=0.2"],
    "filter_token_kl_k3": ["algo.offpolicy.action=mask", "algo.offpolicy.metric=kl_k3", "algo.offpolicy.upper=1"],
    "filter_seq_mask": ["algo.offpolicy.level=sequence", "algo.offpolicy.action=mask", "algo.offpolicy.upper=2",
                        "algo.offpolicy.lower=0.3"],
    "filter_seq_clamp_max": ["algo.offpolicy.level=sequence", "algo.offpolicy.agg=max", "algo.offpolicy.upper=2",
                             "algo.offpolicy.lower=0.5"],
    "tis_token": ["algo.offpolicy.method=tis", "algo.offpolicy.upper=2"],
    "tis_sequence": ["algo.offpolicy.method=tis", "algo.offpolicy.level=sequence", "algo.offpolicy.upper=2"],
    "icepop": ["algo.offpolicy.method=icepop", "algo.offpolicy.upper=3"],
    "behav_clip": ["algo.offpolicy.method=none", "algo.offpolicy.behav_clip=0.2"],
}


@pytest.mark.parametrize("name", OPTIONS)
def test_each_option_trains_one_learner_step(name):
    """Tokens from version 1 trained at version 3: the weight of the configured option reaches the loss."""
    cfg = load_config(None, ["controller.group_size=4", *OPTIONS[name]])
    torch.manual_seed(0)
    learner = Learner(cfg, tiny_model(max_positions=128), model_dir=None)
    b = batch(version=1)
    b.behav_logprobs = b.behav_logprobs * 2  # in [-6, 0]: the tiny model's ~-3.4 gives weights on both sides of 1
    with torch.no_grad():  # the proximal policy: the weights before the update
        prox = token_logprobs(learner.model, b.input_ids, b.attention_mask, learner.temperature)[0]
    bw = offpolicy_weight(prox, b.behav_logprobs, b.loss_mask, offpolicy_spec(cfg.algo.offpolicy))
    before = {k: p.detach().clone() for k, p in learner.model.named_parameters()}
    stats = learner.train_step(b, version=3)
    assert stats["skipped_updates"] == 0.0 and stats["informative_samples"] == 12
    assert math.isfinite(stats["loss"]) and stats["grad_norm"] > 0
    assert any(not torch.equal(p.detach(), before[k]) for k, p in learner.model.named_parameters())
    valid = b.loss_mask.bool()
    assert stats["behav_weight_mean"] == pytest.approx(float(bw.weight[valid].mean()), rel=1e-4)
    if name not in ("default", "none", "raw", "behav_clip"):  # the option's bound acts on this batch
        assert bw.changed.any() and bw.kept.any()
