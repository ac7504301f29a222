"""The root of the config tree: every section, the task, and the checks that span sections."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import Field, SerializeAsAny, ValidationError, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from areal_py.config.generation import ControllerConfig, RolloutConfig, WeightsConfig
from areal_py.config.launch import NetConfig, RunConfig, SlurmConfig
from areal_py.config.model import ColdStartConfig, ModelConfig
from areal_py.config.post_training import DpoConfig, RewardModelTrainConfig, SftConfig
from areal_py.config.section import Section
from areal_py.config.tools import ToolsConfig
from areal_py.config.training import AlgoConfig, RewardConfig, TrainerConfig
from areal_py.tasks.base import RunLimits, TaskConfig, UnknownTask, parse_task_config


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig, description="Run identity and mode.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="Policy model.")
    cold_start: ColdStartConfig = Field(default_factory=ColdStartConfig, description="Supervised warm-up of the embedded model.")
    task: SerializeAsAny[TaskConfig] = Field(
        default_factory=lambda: parse_task_config({}), description="Prompts and reward: `name` picks a registered "
        "task (a module of areal_py.tasks), the other keys are that task's settings.")
    rollout: RolloutConfig = Field(default_factory=RolloutConfig, description="Rollout servers.")
    controller: ControllerConfig = Field(default_factory=ControllerConfig, description="Admission, dispatch, batching.")
    trainer: TrainerConfig = Field(default_factory=TrainerConfig, description="Optimisation and checkpoints.")
    algo: AlgoConfig = Field(default_factory=AlgoConfig, description="Advantage estimator, policy loss, KL, entropy.")
    reward: RewardConfig = Field(default_factory=RewardConfig, description="Reward functions and shaping.")
    tools: ToolsConfig = Field(default_factory=ToolsConfig, description="The tool sandbox: workers and per-call limits.")
    weights: WeightsConfig = Field(default_factory=WeightsConfig, description="Weight transfer trainer -> servers.")
    net: NetConfig = Field(default_factory=NetConfig, description="Socket addresses.")
    slurm: SlurmConfig = Field(default_factory=SlurmConfig, description="`areal-py slurm`: nodes, GPUs and sbatch options of the job.")
    sft: SftConfig = Field(default_factory=SftConfig, description="`areal-py sft`: supervised fine-tuning on "
                           "prompt/response or chat records (docs/post-training.md).")
    rm: RewardModelTrainConfig = Field(default_factory=RewardModelTrainConfig, description="`areal-py rm`: "
                                       "Bradley-Terry reward-model training on preference pairs (docs/post-training.md).")
    dpo: DpoConfig = Field(default_factory=DpoConfig, description="`areal-py dpo`: offline preference optimisation "
                           "(DPO, IPO, conservative DPO) against a frozen reference (docs/post-training.md).")

    @field_validator("task", mode="plain")
    @classmethod
    def _task_by_name(cls, value: Any) -> TaskConfig:
        """The `task` section is validated by the config model its `name` registers (see areal_py.tasks.base)."""
        if not isinstance(value, (dict, TaskConfig)):
            raise PydanticCustomError("task_section", "a mapping: `name` (the task) and that task's keys")
        try:
            return parse_task_config(value)
        except UnknownTask as e:
            name = value.get("name") if isinstance(value, dict) else value
            raise ValidationError.from_exception_data("task", [InitErrorDetails(
                type=PydanticCustomError("unknown_task", str(e)), loc=("name",), input=name)]) from None

    @model_validator(mode="after")
    def _jsonl_default_reward(self) -> Config:
        """A jsonl task's default reward is math_accuracy: strict final-answer extraction configured by
        reward.answer (its own `accuracy` is the same grading with the default extraction). Only an
        unset reward.functions is filled in; one the user wrote is kept."""
        if self.task.name == "jsonl" and "functions" not in self.reward.model_fields_set:
            self.reward.functions = {"math_accuracy": 1.0}
        return self

    @model_validator(mode="after")
    def _check(self) -> Config:
        self.task.check(RunLimits(max_new_tokens=self.rollout.max_new_tokens, model_path=self.model.path,
                                  embedded_context=self.model.embedded.max_position_embeddings))
        c = self.controller
        if c.max_token_staleness is not None and c.max_token_staleness < c.max_staleness:
            raise ValueError(f"controller.max_token_staleness={c.max_token_staleness} is below controller.max_staleness="
                             f"{c.max_staleness}: admitted work would be dropped by design; use a value >= "
                             f"{c.max_staleness}, or null for the same bound")
        w = self.weights
        if w.transfer == "dist" and w.dist_timeout_s >= c.weight_sync_timeout_s:
            raise ValueError(f"weights.dist_timeout_s={w.dist_timeout_s:g} must be below controller.weight_sync_timeout_s="
                             f"{c.weight_sync_timeout_s:g}: a failed broadcast falls back to stream only after its "
                             "timeout, and the controller would give up on the servers first")
        return self

    @property
    def effective_max_staleness(self) -> int:
        """sync mode is the on-policy special case of the same pipeline: no sample may be stale."""
        return 0 if self.run.mode == "sync" else self.controller.max_staleness

    @property
    def effective_max_token_staleness(self) -> int:
        """The hard per-token limit: the admission bound unless raised (never raised in sync mode)."""
        if self.run.mode == "sync" or self.controller.max_token_staleness is None:
            return self.effective_max_staleness
        return self.controller.max_token_staleness

    def run_dir(self) -> Path:
        return Path(self.run.output_dir).expanduser() / self.run.name

    def weights_dir(self) -> Path:
        return Path(self.weights.dir).expanduser() if self.weights.dir else self.run_dir() / "weights"
