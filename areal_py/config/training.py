"""The training side: the optimiser and its batches, the RL algorithm, and the reward."""
from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator

from areal_py.config.section import Section
from areal_py.tasks.answer_extraction import AnswerExtraction, AnswerForm

# A cost-model coefficient: finite and >= 0 (trainer.micro_batching.PackCost checks the same).
_Coef = Annotated[float, Field(ge=0, allow_inf_nan=False)]


_MOVED_BEHAV = (
    "trainer.behav_cap and trainer.behav_mode were replaced by algo.offpolicy (docs/algorithms.md, off-policy "
    "correction): behav_mode=cap behav_cap=X -> algo.offpolicy.action=clamp algo.offpolicy.upper=X (the default, "
    "X=5); behav_mode=mask behav_cap=X -> algo.offpolicy.action=mask algo.offpolicy.upper=X; behav_mode=none or "
    "behav_cap=null -> algo.offpolicy.upper=null (the raw weight); no weight at all -> algo.offpolicy.method=none")


class OffPolicyConfig(Section):
    """The behaviour weight w = pi_prox/pi_behav of the decoupled loss (trainer/algo/offpolicy.py has the formulas).

    The default (filter, token, clamp, ratio, upper 5, behav_clip 0.2) is min(w, 5) per token plus the
    behaviour trust region: the combination the staleness ablation on sum_cot chose (docs/benchmarks.md,
    "The default objective"). Only algo.loss=decoupled uses it; a setting that would have no effect is an error.
    """
    method: Literal["filter", "tis", "icepop", "none"] = Field(
        "filter", description="filter: AReaL's rejection-sampling filter (level, action, metric, agg, upper, lower); "
        "tis: truncated importance sampling, w = min(w, upper) per token, or min(prod of the sequence's w, upper) "
        "at level=sequence; icepop: drop tokens whose w leaves [lower (default 1/upper), upper]; none: no "
        "behaviour weight at all (w = 1; AReaL's default when no filter is configured).")
    level: Literal["token", "sequence"] = Field(
        "token", description="filter, tis: judge each token, or each sequence as a whole (filter with "
        "metric=ratio: the sequence's geometric mean of w is both the verdict (agg=mean) and the weight).")
    action: Literal["clamp", "mask"] = Field(
        "clamp", description="filter: clamp w to [lower or 0, upper] where out of bounds (metric=ratio only), or "
        "mask: drop out-of-bounds tokens/sequences from the loss (they stay in the token-mean's denominator).")
    metric: Literal["ratio", "kl_k1", "kl_k2", "kl_k3"] = Field(
        "ratio", description="filter: what the bounds apply to: w itself, or a KL estimate of x = log w: k1 = x, "
        "k2 = x^2/2, k3 = exp(-x) - 1 + x (AReaL's estimators, base = the behaviour logprobs).")
    agg: Literal["mean", "sum", "max"] = Field(
        "mean", description="filter at level=sequence: how the tokens' metric is aggregated (ratio: in log space, "
        "mean = geometric mean, sum = product; KL: arithmetic; max: the largest token value).")
    upper: float | None = Field(
        5.0, allow_inf_nan=False, description="Upper bound (C for tis and icepop; must be > 1 for a ratio); "
        "null = no upper bound (filter only: with lower null too, the raw unbounded weight).")
    lower: float | None = Field(
        None, allow_inf_nan=False, description="Lower bound (filter; icepop: default 1/upper); null = none.")
    behav_clip: float | None = Field(
        0.2, gt=0, lt=1, description="The behaviour trust region (any method): a token whose probability moved "
        "more than this fraction away from the behaviour policy's, in the direction its advantage asks for "
        "(pi_theta/pi_behav > 1 + behav_clip with A > 0, < 1 - behav_clip with A < 0), gets no gradient: naive "
        "PPO's sign-aware clip, centred on pi_behav, on top of the decoupled clip around pi_prox (the default 0.2 is trainer.eps_clip's default). null = off.")

    @model_validator(mode="after")
    def _consistent(self) -> OffPolicyConfig:
        """The rules of AReaL's RejectionSamplingConfig, and no setting that the method ignores."""
        key, m = "algo.offpolicy", self.method
        ignored = {"none": ("level", "action", "metric", "agg", "upper", "lower"),
                   "tis": ("action", "metric", "agg", "lower"), "icepop": ("level", "action", "metric", "agg"),
                   "filter": ("agg",) if self.level == "token" else ()}[m]
        # a value other than the default, not a key present: a dumped config lists every key
        for name in [n for n in ignored if getattr(self, n) != type(self).model_fields[n].default]:
            raise ValueError(f"{key}.{name} has no effect with {key}.method={m}" +
                             (f" at level={self.level}" if m == "filter" else ""))
        if m in ("tis", "icepop") and self.upper is None:
            raise ValueError(f"{key}.method={m} needs {key}.upper (its C), got null")
        ratio = m in ("tis", "icepop") or self.metric == "ratio"
        if ratio and self.upper is not None and self.upper <= 1:
            raise ValueError(f"{key}.upper bounds the ratio pi_prox/pi_behav: it must be > 1 (a bound <= 1 drops or "
                             f"clamps every token the stale policy liked less), got {self.upper}")
        if ratio and self.lower is not None and self.lower <= 0:
            raise ValueError(f"{key}.lower bounds the ratio pi_prox/pi_behav: it must be > 0, got {self.lower}")
        if m == "filter" and self.metric in ("kl_k2", "kl_k3") and self.upper is not None and self.upper <= 0:
            raise ValueError(f"{key}.upper must be > 0 for metric={self.metric} (never negative), got {self.upper}")
        if m == "filter" and self.action == "clamp" and self.metric != "ratio":
            raise ValueError(f"{key}.action=clamp clamps the ratio itself: it needs metric=ratio, got "
                             f"{self.metric} (use action=mask for a KL bound)")
        if m == "icepop" and self.level != "token":
            raise ValueError(f"{key}.method=icepop is a token mask: level must be token")
        lower = self.lower if self.lower is not None or m != "icepop" else 1 / self.upper
        if lower is not None and self.upper is not None and lower > self.upper:
            raise ValueError(f"{key}.lower ({lower}) is above {key}.upper ({self.upper})")
        return self


class TrainerConfig(Section):
    total_steps: int = Field(200, ge=1, description="Training steps (one optimizer update per batch per minibatch).")
    lr: float = Field(3e-4, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay.")
    grad_clip: float = Field(1.0, gt=0, description="Max global gradient norm.")
    eps_clip: float = Field(0.2, gt=0, description="PPO clip epsilon (lower side, and upper when eps_clip_high is unset).")
    eps_clip_high: float | None = Field(None, description="Upper clip epsilon (DAPO clip-higher); null = eps_clip.")
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
    controller_timeout_s: float = Field(
        120.0, gt=0, description="Trainer rank 0, while waiting for a batch, probes the controller every "
        "rollout.heartbeat_s and stops with a ControllerLost error naming its latest checkpoint once the controller "
        "has answered nothing (no batch, no reply) for this long: it died, hangs or is unreachable. Before the "
        "controller's first word, controller.startup_timeout_s more is allowed. Also bounded by batch_timeout_s.")
    max_consecutive_skipped_steps: int = Field(
        5, ge=0, description="Stop the run with an error after this many steps in a row applied no update because "
        "of non-finite values (a NaN/inf loss or gradient norm, or every group of the batch rejected for a "
        "non-finite reward or logprob): a run that cannot train should fail, not spin. 0 = never stop.")
    warn_uninformative_steps: int = Field(
        10, ge=0, description="Warn (a WARNING log line, the step record's uninformative_steps, the Prometheus gauge "
        "areal_trainer_uninformative_steps and a note in the report) once this many steps in a row trained no "
        "informative sample (every group's rewards equal: no advantage, nothing learned), and again every this many "
        "steps while it lasts; with controller.dynamic_sampling the controller warns once it has dropped this many "
        "batches' worth of uniform groups in a row. The run goes on. 0 = never warn.")
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
    fused_ops: bool = Field(False, description="Run the policy's Llama RMSNorms, attention (q/k/v as one GEMM, RoPE "
                            "without rotate_half's cat) and MLP (gate/up as one GEMM, SiLU x up) through the hand-fused "
                            "autograd functions of trainer/fused_ops.py, each kind checked against the model's own "
                            "forward + backward once (1e-5); any mismatch or error keeps the model's own modules. "
                            "Eager only: ignored when trainer.compile compiles the layers or at world size > 1. Off by "
                            "default: no faster than the model's own modules on the CPU measured (docs/benchmarks.md, "
                            "Learner step: fused training ops).")

    def checkpoints_at(self, version: int) -> bool:
        """Whether the trainer checkpoints on reaching `version`: every `checkpoint_every` versions and at
        `total_steps` (the end). The controller attaches its buffer to exactly the batches trained into such a
        version (batch v-1 for version v), so both sides must use this one rule."""
        return version >= self.total_steps or (self.checkpoint_every > 0 and version % self.checkpoint_every == 0)

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data):
        """trainer.behav_cap/behav_mode moved to algo.offpolicy: say where, never ignore them."""
        if isinstance(data, dict) and ({"behav_cap", "behav_mode"} & data.keys()):
            raise ValueError(_MOVED_BEHAV)
        return data

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
    offpolicy: OffPolicyConfig = Field(
        default_factory=OffPolicyConfig, description="loss=decoupled: the off-policy correction (behaviour weight "
        "pi_prox/pi_behav): AReaL's filter, TIS, IcePop or none.")
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

    @model_validator(mode="after")
    def _offpolicy_needs_decoupled(self) -> AlgoConfig:
        """Only the decoupled loss has a behaviour weight: a correction set for ppo or gspo would be ignored."""
        changed = [n for n, f in OffPolicyConfig.model_fields.items() if getattr(self.offpolicy, n) != f.default]
        if self.loss != "decoupled" and changed:
            raise ValueError(f"algo.offpolicy ({', '.join(changed)}) has no effect with algo.loss={self.loss}: only "
                             "algo.loss=decoupled applies a behaviour weight")
        return self


class AnswerConfig(Section):
    """How `math_accuracy` finds a response's final answer (areal_py.tasks.answer_extraction, docs/rewards.md)."""

    form: AnswerForm = Field("auto", description="Where the final answer is: boxed (\\boxed{...}), answer_tag "
                             "(<answer>...</answer>), gsm8k (#### ...), last_number (the numbers of the last line "
                             "holding one), or auto (the first of answer_tag, boxed, gsm8k present). The think block "
                             "is never graded.")
    strict: bool = Field(True, description="Score 0 unless the form is present and every candidate answer in it is "
                         "right (a hedge such as two different boxes, or '41 or 42', scores 0); false: the last "
                         "candidate counts (auto then falls back to the last number).")

    def extraction(self) -> AnswerExtraction:
        return AnswerExtraction(form=self.form, strict=self.strict)


class RewardConfig(Section):
    functions: dict[str, float] = Field(default_factory=lambda: {"accuracy": 1.0},
                                        description="Weighted reward functions: accuracy, math_accuracy, "
                                        "think_answer_format, reward_model, or module:function. Default "
                                        "{accuracy: 1.0}, but {math_accuracy: 1.0} when task.name=jsonl.")
    answer: AnswerConfig = Field(default_factory=AnswerConfig, description="Final-answer extraction of math_accuracy.")
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
