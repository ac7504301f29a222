"""One pydantic config tree for every process, loaded from YAML and `key.sub=value` overrides.

Every field has a default and a description; unknown keys and bad values are errors that name
the key and what is allowed, so a typo never silently falls back to a default.

Sections by side: launch.py (run, net, slurm), model.py (model, cold_start), generation.py (rollout,
controller, weights), training.py (trainer, algo, reward), post_training.py (sft, rm, dpo); tree.py is the root with the checks that span
sections; loading.py reads YAML and overrides. Import from here: ``from areal_py.config import Config``.
"""
from areal_py.config.generation import ControllerConfig, RolloutConfig, WeightsConfig
from areal_py.config.launch import NetConfig, RunConfig, SlurmConfig
from areal_py.config.loading import ConfigError, apply_overrides, dump_config, load_config, with_run_name
from areal_py.config.model import ColdStartConfig, EmbeddedModelConfig, ModelConfig
from areal_py.config.post_training import DpoConfig, OfflineTrainConfig, RewardModelTrainConfig, SftConfig
from areal_py.config.section import Section
from areal_py.config.training import AlgoConfig, OffPolicyConfig, RewardConfig, TrainerConfig
from areal_py.config.tree import Config

__all__ = ["AlgoConfig", "ColdStartConfig", "Config", "ConfigError", "ControllerConfig", "DpoConfig", "EmbeddedModelConfig",
           "ModelConfig", "NetConfig", "OffPolicyConfig", "OfflineTrainConfig", "RewardConfig", "RewardModelTrainConfig", "RolloutConfig", "RunConfig", "Section", "SftConfig", "SlurmConfig",
           "TrainerConfig", "WeightsConfig", "apply_overrides", "dump_config", "load_config", "with_run_name"]
