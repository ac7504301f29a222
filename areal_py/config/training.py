"""The training side: the optimiser and its batches, the RL algorithm, and the reward."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator

from areal_py.config.section import Section

# A cost-model coefficient: finite and >= 0 (trainer.micro_batching.PackCost checks the same).
_Coef = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class TrainerConfig(Section):
    total_steps: int = Field(200, ge=1, description="Training steps (one optimizer update per batch per minibatch).")
    lr: float = Field(3e-4, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Max global gradient norm.")
    eps_clip: float = Field(0.2, gt=0, description="PPO clip epsilon (lower side, and upper when eps_clip_high is unset).")
    eps_clip_high: float | None = Field(None, description="Upper clip epsilon (DAPO clip-higher); null = eps_clip.")
    behav_cap: float | None = Field(5.0, description="Bound on the behaviour weight pi_prox/pi_behav; null = unbounded.")
    behav_mode: Literal["cap", "mask", "none"] = Field("cap", description="cap: clamp the weight; mask: drop tokens over the bound; none: raw weight.")
    ppo_minibatches: int = Field(1, ge=1, description="Optimizer updates per batch (the proximal policy stays fixed across them).")
    micro_batch_size: int = Field(128, ge=1, description="Sequences per forward pass (gradients accumulate over micro-batches).")
    max_tokens_per_micro_batch: int = Field(0, ge=0, description="Pack micro-batches by a token budget "
                                            "instead of micro_batch_size; 0 = off.")
    micro_batch_packing: Literal["padded", "ffd", "cost"] = Field(
        "cost", description="padded: length-sorted runs with rows x longest <= the budget (padded tensors; "
        "right for long-tailed lengths); ffd: first-fit-decreasing on summed lengths; cost: length-sorted runs "
        "within the same padded budget, cut where a measured cost model (per-micro-batch overhead, linear "
        "layers, attention; trainer.pack_cost or timed at start, cached per machine) says it is cheapest (fewer "
        "padded tokens and a faster step on sum_cot batches: docs/benchmarks.md, Learner step). Only with "
        "max_tokens_per_micro_batch > 0.")
    pack_cost: tuple[_Coef, _Coef, _Coef] | None = Field(
        None, description="micro_batch_packing=cost: the cost model's coefficients (c0, c1, c2) in seconds for "
        "c0 + c1 * rows*maxlen + c2 * rows*maxlen^2; null = time the model at start (cached under "
        "model.cache_dir). Set it for the same packing on every machine.")
    checkpoint_every: int = Field(50, ge=0, description="Checkpoint every N steps (0 = only at the end).")
    keep_checkpoints: int = Field(3, ge=0, description="Checkpoints kept on disk, newest first (older ones are "
                                  "deleted after each save; more than 1 leaves a fallback if the newest is "
                                  "damaged). 0 = keep all.")
    batch_timeout_s: float = Field(300.0, gt=0, description="Longest wait for the controller to deliver a batch.")
    max_consecutive_skipped_steps: int = Field(
        5, ge=0, description="Stop the run with an error after this many steps in a row applied no update because "
        "of non-finite values (a NaN/inf loss or gradient norm, or every group of the batch rejected for a "
        "non-finite reward or logprob): a run that cannot train should fail, not spin. 0 = never stop.")
    world_size: int = Field(1, ge=1, description="Trainer ranks: `areal-py run` starts this many trainer processes "
                            "(RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT, as torchrun sets them); models are "
                            "sharded with FSDP2 per decoder layer, each rank trains a token-balanced share of the batch. "
                            "Rank 0 talks to the controller. 1 = one process, no process group.")
    dist_timeout_s: float = Field(300.0, gt=0, description="Bound on the trainer ranks' rendezvous and on every "
                                  "collective between them; a crashed or stuck rank ends the run with an error "
                                  "naming the collective within this time.")
    activation_checkpointing: bool = Field(False, description="Recompute each decoder layer's activations in the "
                                           "backward pass instead of keeping them (less memory, one more forward).")
    compile: Literal["auto", "off", "on"] = Field(
        "auto", description="torch.compile the training forward + backward (each decoder layer, and the logprob "
        "math on the logits), dynamic shapes, checked: the first micro-batch and any that compiled a new graph "
        "are compared with eager (logprobs, entropy and weight gradients to 1e-4) and trained eager; a compile "
        "error or mismatch logs why and stays eager for the run. on: compile on any device; off: eager; auto: on "
        "for a CUDA model, off on CPU, where it does not pay back within a run (docs/benchmarks.md, Learner step: "
        "compiled). Only at world size 1 without activation checkpointing (otherwise eager, logged).")

    @field_validator("compile", mode="before")
    @classmethod
    def _on_off(cls, v):
        """YAML reads a bare on/off as a boolean: take it as the mode of that name."""
        return {True: "on", False: "off"}.get(v, v) if isinstance(v, bool) else v


class AlgoConfig(Section):
    adv_estimator: Literal["grpo", "rloo", "reinforce", "reinforce_pp", "gae"] = Field(
        "grpo", description="grpo: group mean/std; rloo: leave-one-out; reinforce: batch-mean baseline; "
        "reinforce_pp: batch-normalised returns with KL in the reward; gae: critic + GAE (PPO).")
    std_normalize: bool = Field(True, description="grpo: divide by the group std (false = Dr.GRPO).")
    whiten_advantages: bool = Field(False, description="Normalise advantages over the batch's valid tokens (usual for gae).")
    gamma: float = Field(1.0, ge=0, le=1, description="Discount for gae and reinforce_pp.")
    lam: float = Field(1.0, ge=0, le=1, description="GAE lambda.")
    loss: Literal["decoupled", "ppo", "gspo"] = Field(
        "decoupled", description="decoupled: AReaL's decoupled PPO (proximal + behaviour weight); ppo: naive PPO with "
        "the behaviour policy as the old policy; gspo: sequence-level ratio against the proximal policy.")
    dual_clip_c: float | None = Field(None, description="Dual clip bound c > 1 for negative advantages; null = off.")
    loss_agg: Literal["token_mean", "seq_mean", "seq_sum_const"] = Field(
        "token_mean", description="Loss aggregation; seq_sum_const divides by loss_agg_const (Dr.GRPO).")
    loss_agg_const: float | None = Field(None, description="seq_sum_const divisor; null = samples x rollout.max_new_tokens.")
    prox_method: Literal["recompute", "loglinear"] = Field(
        "recompute", description="Proximal logprobs by an extra forward pass, or AReaL's log-linear interpolation.")
    kl_coef: float = Field(0.0, ge=0, description="KL penalty to the frozen initial policy (0 = no reference model).")
    kl_estimator: Literal["k1", "k2", "k3"] = Field("k3", description="Per-token KL estimator.")
    kl_in: Literal["reward", "loss"] = Field("loss", description="Apply the KL as a reward penalty or as a loss term.")
    kl_target: float | None = Field(None, description="Adaptive KL: target per-token KL; null = fixed coefficient.")
    kl_horizon: float = Field(10000.0, gt=0, description="Adaptive KL horizon in samples.")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus weight.")
    drop_uniform_groups: bool = Field(True, description="Leave groups whose rewards are all equal out of the loss "
                                      "(group estimators give them zero advantage; they only dilute the mean).")
    critic_lr: float = Field(1e-3, gt=0, description="gae: critic learning rate.")
    value_clip: float | None = Field(0.2, description="gae: value clip epsilon; null = unclipped.")


class RewardConfig(Section):
    functions: dict[str, float] = Field(default_factory=lambda: {"accuracy": 1.0},
                                        description="Weighted reward functions: accuracy, math_accuracy, "
                                        "think_answer_format, reward_model, or module:function.")
    reward_model_path: str = Field("", description="Directory of a sequence-classification reward model.")
    workers: int = Field(1, ge=0, description="Reward worker processes (0 = score in the controller's thread, "
                         "no timeout enforcement).")
    timeout_s: float = Field(10.0, gt=0, description="Per-sample verifier timeout (worker processes only).")
    scale: float = Field(1.0, description="Multiply rewards by this.")
    clip_low: float | None = Field(None, description="Lower reward clip; null = none.")
    clip_high: float | None = Field(None, description="Upper reward clip; null = none.")
    normalize: Literal["none", "batch", "group"] = Field("none", description="Reward normalisation before the estimator.")
    overlong_cache_len: int = Field(0, ge=0, description="DAPO overlong penalty window in tokens (0 = off).")
    overlong_factor: float = Field(1.0, ge=0, description="DAPO overlong penalty at the length limit.")
    zero_truncated: bool = Field(False, description="Reward 0 for responses cut at the length limit.")
