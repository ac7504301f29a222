"""Offline post-training commands (`areal-py sft`, `rm`, `dpo`; all share OfflineTrainConfig): data, epochs, optimiser."""
from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator

from areal_py.config.section import Section


class OfflineTrainConfig(Section):
    """What every offline command (epochs over a fixed data set) shares: the data, the batches, the optimiser."""

    train_path: str = Field("", description="JSONL training data (docs/post-training.md has the formats); empty = "
                            "synthetic data of the task section (arith, sum_cot), `synthetic_examples` records.")
    eval_path: str = Field("", description="JSONL held-out data; empty = `eval_examples` held out: synthetic ones "
                           "after the training prompts, or (with train_path) a seeded random share of train_path.")
    synthetic_examples: int = Field(1024, ge=1, description="Training records generated when train_path is empty.")
    eval_examples: int = Field(256, ge=0, description="Held-out records when eval_path is empty (0 = none).")
    epochs: int = Field(2, ge=1, description="Passes over the training data; a checkpoint after each.")
    batch_size: int = Field(32, ge=1, description="Records per optimiser step (the last batch of an epoch may be "
                            "smaller; the loss is their mean).")
    max_tokens_per_micro_batch: int = Field(0, ge=0, description="Split each batch into length-sorted micro-batches "
                                            "of at most this many padded tokens (rows x longest row; gradients "
                                            "accumulate); 0 = the whole batch in one forward.")
    lr: float = Field(1e-4, gt=0, description="AdamW learning rate (after warm-up).")
    final_lr_ratio: float = Field(1.0, ge=0, le=1, description="After warm-up the lr follows a cosine from lr to "
                                  "lr x this at the last step (trainer.cold_start.lr_factor); 1 = constant.")
    warmup_steps: int = Field(10, ge=0, description="Linear learning-rate warm-up, in optimiser steps.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Max global gradient norm.")
    seed: int | None = Field(None, description="Seed of the data order, held-out split and sampling; null = run.seed.")


class PolicyTrainConfig(OfflineTrainConfig):
    """An offline command that trains a policy (sft, dpo): its sampled accuracy on the task is measured too."""

    eval_samples: int = Field(256, ge=0, description="With synthetic data: the policy's sampled accuracy (the task's "
                              "reward, plain HF generate) on this many held-out prompts before training and after "
                              "each epoch; 0 = off. Not measured for a data file (no reward is known for it).")
    eval_temperature: float = Field(1.0, ge=0, description="Sampling temperature of that measurement (0 = greedy).")


class DpoConfig(PolicyTrainConfig):
    """`areal-py dpo`: the policy (model.path or the embedded model) against a frozen copy of itself."""

    loss: Literal["dpo", "ipo"] = Field("dpo", description="dpo: -log σ(β h); ipo: (h - 1/(2β))², with h the "
                                        "chosen-minus-rejected log-ratio margin against the reference "
                                        "(trainer/algo/preference_loss.py).")
    beta: float = Field(0.1, gt=0, allow_inf_nan=False, description="β: the strength of the KL tie to the reference "
                        "(smaller lets the policy move further); the implicit reward is β (log π - log π_ref).")
    label_smoothing: float = Field(0.0, ge=0, lt=0.5, description="loss=dpo: conservative DPO's ε, the assumed "
                                   "probability that a preference label is flipped: -(1-ε) log σ(β h) - ε log σ(-β h); "
                                   "0 = plain DPO.")

    @model_validator(mode="after")
    def _smoothing_needs_dpo(self) -> DpoConfig:
        if self.loss == "ipo" and self.label_smoothing:
            raise ValueError("dpo.label_smoothing applies to dpo.loss=dpo (conservative DPO), not to ipo: set it to 0")
        return self


class SftConfig(PolicyTrainConfig):
    """`areal-py sft`: supervised fine-tuning of model.path (or the embedded model) on prompt/response records;
    the loss is the mean negative log-likelihood over the response tokens (and EOS) of each batch."""


class RewardModelTrainConfig(OfflineTrainConfig):
    """`areal-py rm`: a Bradley-Terry reward model (model.path or the embedded model with a one-output score head)
    on preference pairs; the result is the `reward_model` of reward.functions (reward.reward_model_path)."""

    epochs: int = Field(4, ge=1, description="Passes over the training data; a checkpoint after each.")
    lr: float = Field(1e-3, gt=0, description="AdamW learning rate (after warm-up). Sized for the embedded model "
                      "(a fresh score head on a 2M-parameter model); lower it for a pretrained one.")
    final_lr_ratio: float = Field(0.1, ge=0, le=1, description="After warm-up the lr follows a cosine from lr to "
                                  "lr x this at the last step; 1 = constant. Decaying settles the ranking, which "
                                  "at a constant lr still swings by a few points of accuracy between epochs.")
    max_length: int = Field(512, ge=2, description="Tokens a scored text (prompt + response) keeps, from its end: "
                            "the same cut as the reward function's scorer (areal_py/rewards/reward_model.py).")
