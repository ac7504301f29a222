"""One pydantic config tree for every process, loaded from YAML and `key.sub=value` overrides.

Every field has a default and a description; unknown keys and bad values are errors that name
the key and what is allowed, so a typo never silently falls back to a default.
"""
from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SerializeAsAny,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from areal_py.tasks.base import DEFAULT_TASK, RunLimits, TaskConfig, UnknownTask, parse_task_config, task_spec


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class RunConfig(_Section):
    name: str = Field("", description="Run name; empty means a timestamped name chosen at launch.")
    output_dir: str = Field("runs", description="Directory holding one subdirectory per run.")
    seed: int = Field(0, description="Seed for sampling, data order and initialisation.")
    mode: Literal["async", "sync"] = Field(
        "async", description="async: generation and training overlap within max_staleness; "
        "sync: strictly alternate generate-a-batch / train (forces controller.max_staleness=0).")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Logging level of every process.")
    dashboard_port: int = Field(8787, ge=0, le=65535, description="Live dashboard served by the controller on "
                                "http://<net.bind_host>:<port>/ (0 = off).")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics base port: controller on it, "
                              "trainer +1, rollout server i +2+i (0 = off).")
    tensorboard: bool = Field(False, description="Also write every numeric field of each step's metrics record "
                              "as a TensorBoard scalar, in <run.output_dir>/<run.name>/tensorboard/ (runs/<name>/"
                              "tensorboard/ by default); needs `pip install 'areal-py[tensorboard]'`.")
    torch_threads: int = Field(0, ge=0, description="torch threads per process (and for the cold start); 0 = "
                               "the cores free at start (load average and a short CPU sample), shared between "
                               "trainer and servers in async mode, all free cores per phase in sync mode, "
                               "never under 1: more threads than free cores slows torch several-fold.")
    launcher: Literal["local", "ray"] = Field(
        "local", description="How `areal-py run` starts the roles: local processes on this machine, or Ray actors "
        "on a Ray cluster (needs `pip install 'areal-py[ray]'`; the run directory must be on a filesystem every "
        "node shares; docs/operations.md).")
    ray_address: str = Field("", description="ray launcher: empty starts a Ray instance on this machine for the run "
                             "(shut down after it); `auto` or `<host>:<port>` joins a running cluster.")
    ray_num_cpus: int = Field(0, ge=0, description="ray launcher, Ray started for the run only: logical CPUs it "
                              "offers; 0 = exactly what the placement groups ask for.")
    ray_cpus_per_role: float = Field(1.0, gt=0, description="ray launcher: logical CPUs each role's placement "
                                     "bundle reserves (controller, each trainer rank, each rollout server).")
    ray_gpus_per_trainer: float = Field(0.0, ge=0, description="ray launcher: GPUs each trainer rank's bundle "
                                        "reserves; Ray sets CUDA_VISIBLE_DEVICES for it, so LOCAL_RANK is then 0.")
    ray_gpus_per_server: float = Field(0.0, ge=0, description="ray launcher: GPUs each rollout server's bundle "
                                       "reserves.")
    ray_trainer_strategy: Literal["PACK", "STRICT_PACK"] = Field(
        "PACK", description="ray launcher: placement of the trainer ranks' group: PACK (on as few nodes as fit) "
        "or STRICT_PACK (one node or none). Rollout servers are always SPREAD across nodes.")
    ray_timeout_s: float = Field(120.0, gt=0, description="ray launcher: bound on each wait on Ray (placement "
                                 "groups scheduled, actors answering); a wait that runs out names what it waited "
                                 "for and stops the run.")


class EmbeddedModelConfig(_Section):
    hidden_size: int = Field(192, ge=8, description="Hidden size of the tiny Llama model.")
    num_layers: int = Field(4, ge=1, description="Decoder layers of the tiny model.")
    num_heads: int = Field(4, ge=1, description="Attention heads of the tiny model.")
    intermediate_size: int = Field(512, ge=8, description="MLP width of the tiny model.")
    max_position_embeddings: int = Field(64, ge=8, description="Longest sequence the tiny model handles.")


class ModelConfig(_Section):
    path: str = Field("", description="Hugging Face causal LM directory; empty builds the embedded tiny model.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Parameter dtype.")
    cache_dir: str = Field("~/.cache/areal-py", description="Where the embedded model is built and cached.")
    embedded: EmbeddedModelConfig = Field(default_factory=EmbeddedModelConfig, description="Tiny model shape.")


class ColdStartConfig(_Section):
    steps: int = Field(120, ge=0, description="Supervised steps teaching the answer format to the embedded model.")
    batch_size: int = Field(64, ge=1, description="Cold-start batch size.")
    lr: float = Field(2e-3, gt=0, description="Cold-start learning rate.")
    final_lr_ratio: float = Field(1.0, ge=0, le=1, description="Cosine-decay the cold-start lr after warm-up to this "
                                  "fraction of `lr` by the last step; 1 keeps it constant.")
    label_noise: float = Field(0.2, ge=0, le=1, description="Fraction of corrupted labels, so RL has room to improve.")
    seed: int | None = Field(None, description="Seed of the embedded model's init and cold start; null = run.seed. "
                             "Fix it to compare RL runs of several seeds from one starting model.")


class RolloutConfig(_Section):
    num_servers: int = Field(1, ge=1, description="Rollout server processes started by `areal-py run`.")
    server_id: str = Field("rollout-0", description="Identity of a server started with `areal-py serve rollout`.")
    max_running: int = Field(256, ge=1, description="Concurrent sequences per server (KV-cache slots).")
    max_new_tokens: int = Field(5, ge=1, description="Longest response in tokens.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature (0 = greedy); the trainer uses the same.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    heartbeat_s: float = Field(0.5, gt=0, description="Seconds between server heartbeats, and between the "
                               "controller's pings to the servers.")
    controller_timeout_s: float = Field(
        120.0, gt=0, description="A server that hears nothing from the controller (not even a ping, sent every "
        "heartbeat_s from every wait of the controller's) for this long stops with an error. Before the "
        "controller's first word, controller.startup_timeout_s more is allowed (a controller starting on a busy "
        "machine, or later by hand).")
    backend: Literal["torch", "sglang"] = Field(
        "torch", description="torch: the built-in continuous-batching engine (CPU/GPU); sglang: an SGLang server "
        "(GPU, optional extra, not yet run on a GPU).")
    sglang_url: str = Field("", description="sglang backend: URL of a running SGLang server; empty = launch one.")
    interrupt_mode: Literal["recompute", "keep"] = Field(
        "recompute", description="On a weight update: recompute the KV cache of in-flight requests under the new "
        "weights (AReaL), or keep decoding on the old cache (PipelineRL, prime-rl).")
    compile_decode: bool = Field(
        False, description="torch backend, fast runner: run decode steps through torch.compile'd dense layers, "
        "each new batch-size bucket checked against eager first (logits to 1e-4); any error or mismatch falls back "
        "to eager with the reason logged. Off by default: compile time and gain on this CPU are in "
        "docs/benchmarks.md (Rollout engine).")
    decode_attention: Literal["auto", "sdpa", "kernel"] = Field(
        "auto", description="torch backend, fast runner on CPU: decode attention through PyTorch's SDPA per row "
        "bucket (sdpa) or one C++ kernel call over every row at its own length (kernel, built once per machine by "
        "areal-py run/serve before the roles start); auto times both at start-up and keeps the faster (cached "
        "beside the linear kernel choice). The kernel is used only if it builds and agrees with SDPA; otherwise "
        "SDPA, with the reason logged.")


class ControllerConfig(_Section):
    batch_size: int = Field(32, ge=1, description="Prompts (groups) per training step.")
    group_size: int = Field(8, ge=1, description="Samples per prompt (GRPO group size n).")
    max_staleness: int = Field(2, ge=0, description="Admission bound (AReaL's rule): prompts are admitted so that "
                               "a sample is trained at most this many versions after it started (0 = on-policy).")
    max_token_staleness: int | None = Field(
        None, ge=0, description="Hard limit on trainer version - oldest token version: older groups are dropped at "
        "batching and aborted on the servers. null = max_staleness. Raise it for long chain-of-thought: a response "
        "that outlives max_staleness updates is then trained (AReaL's behaviour) instead of wasted, its older "
        "tokens corrected by the decoupled behaviour weight.")
    server_timeout_s: float = Field(10.0, gt=0, description="A server silent this long is declared dead; its work is re-dispatched.")
    weight_sync_timeout_s: float = Field(60.0, gt=0, description="Longest wait for every live server to load a new version.")
    startup_timeout_s: float = Field(120.0, gt=0, description="Longest wait for the trainer and the first server to connect.")
    no_server_timeout_s: float = Field(
        120.0, gt=0, description="Once a server has connected: longest time with no live rollout server (counted "
        "from the last word of any) before the controller stops with an error; a server that comes back in time "
        "is used again.")
    max_consecutive_skipped_prompts: int = Field(
        1000, ge=1, description="Prompts too long for the model's context (no room for one new token) are skipped "
        "at admission and counted (ctrl_skipped_too_long); this many in a row, or this many groups in a row refused "
        "by the servers (ctrl_dropped_aborted), stop the run with an error: nothing admissible is left.")
    dynamic_sampling: bool = Field(False, description="DAPO: drop groups whose rewards are all equal and keep "
                                   "admitting (within the staleness bound) until the batch is full.")


# A cost-model coefficient: finite and >= 0 (trainer.micro_batching.PackCost checks the same).
_Coef = Annotated[float, Field(ge=0, allow_inf_nan=False)]


class TrainerConfig(_Section):
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


class AlgoConfig(_Section):
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


class RewardConfig(_Section):
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


class WeightsConfig(_Section):
    transfer: Literal["disk", "stream", "dist"] = Field(
        "disk", description="disk: safetensors in a shared directory + ZeroMQ notice; stream: raw tensor frames over "
        "ZeroMQ; dist: trainer rank 0 broadcasts bucketed weights to every rollout server over a torch.distributed "
        "group of its own (gloo on CPU, NCCL on CUDA), the layout and version on ZeroMQ (docs/architecture.md).")
    dist_host: str = Field("127.0.0.1", description="dist: address of trainer rank 0 as the servers reach it; it "
                           "hosts the weight group's TCPStore there and binds gloo to it (each server binds its own "
                           "address on the route to it).")
    dist_port: int = Field(45505, ge=1, le=65535, description="dist: port of the weight group's TCPStore.")
    dist_bucket_mb: float = Field(64.0, gt=0, description="dist: weights are flattened into buckets of at most this "
                                  "many MiB, one collective each (a larger tensor travels alone).")
    dist_timeout_s: float = Field(30.0, gt=0, description="dist: bound on each collective of a broadcast; a server "
                                  "that dies or stalls ends it with DistWeightsError within this time. Must be below "
                                  "controller.weight_sync_timeout_s.")
    dist_join_timeout_s: float = Field(300.0, gt=0, description="dist: bound on forming the weight group at start "
                                       "(trainer rank 0 and every one of rollout.num_servers servers must be up).")
    dist_on_failure: Literal["stream", "stop"] = Field(
        "stream", description="dist: after a failed broadcast (a server died, a timeout) either close the group and "
        "send this and every later version over ZeroMQ frames (stream), or stop the run with the error (stop).")
    dir: str = Field("", description="Shared directory for disk transfer; empty = <run dir>/weights.")
    keep: int = Field(3, ge=1, description="Weight files kept on disk (older ones are deleted).")


class NetConfig(_Section):
    bind_host: str = Field("127.0.0.1", description="Interface the controller binds to.")
    controller_host: str = Field("127.0.0.1", description="Host the trainer and servers connect to.")
    rollout_port: int = Field(45501, ge=1, le=65535, description="Controller ROUTER for rollout servers.")
    weights_port: int = Field(45502, ge=1, le=65535, description="Controller PUB for weight-update broadcasts.")
    trainer_port: int = Field(45503, ge=1, le=65535, description="Controller PULL for trainer messages.")
    batch_port: int = Field(45504, ge=1, le=65535, description="Controller PUSH of ready batches to the trainer.")
    max_message_bytes: int = Field(
        8 * 2**30, ge=1024, description="ZMQ_MAXMSGSIZE of every role's sockets: a larger incoming frame (libzmq "
        "checks each frame of a multipart message, not the sum) is dropped with its connection. Streamed weights "
        "send one tensor per frame, so this must exceed the largest tensor (8 GiB: a 2.1B-element float32 "
        "embedding, Llama-3-405B's).")

    def addr(self, port: int, *, bind: bool = False) -> str:
        return f"tcp://{self.bind_host if bind else self.controller_host}:{port}"


class SlurmConfig(_Section):
    """Sizing of the job `areal-py slurm` writes (areal_py/app/slurm.py); no other command reads it."""

    trainer_nodes: int = Field(1, ge=1, description="Nodes running trainer ranks (torchrun --nnodes); "
                               "trainer.world_size must be a multiple of it: world_size / trainer_nodes ranks per "
                               "node. The controller and trainer rank 0 run on the first of them.")
    rollout_nodes: int = Field(0, ge=0, description="Nodes running only rollout servers, rollout.num_servers spread "
                               "evenly over them; 0 = the servers share the trainer's nodes (a one-node job).")
    gpus_per_node: int = Field(0, ge=0, description="GPUs of each node (#SBATCH --gpus-per-node; every GPU of a node, "
                               "with exclusive=true); 0 = CPU only. Trainer ranks get GPUs 0..ranks-1 of their node, "
                               "rollout servers share the rest of a trainer node, or all of a rollout node, evenly.")
    cpus_per_task: int = Field(0, ge=0, description="#SBATCH --cpus-per-task: one task per node, so the CPUs each "
                               "node gives the job; 0 = not set (the whole node with exclusive=true).")
    exclusive: bool = Field(True, description="#SBATCH --exclusive: whole nodes for the job, every role's processes "
                            "on a node sharing them.")
    partition: str = Field("", description="#SBATCH --partition; empty = the cluster's default partition.")
    account: str = Field("", description="#SBATCH --account; empty = the user's default account.")
    time: str = Field("", description="#SBATCH --time (e.g. 24:00:00); empty = the partition's default limit. A job "
                      "stopped at its limit resumes from its latest checkpoint with `areal-py slurm ... --resume`.")
    job_name: str = Field("", description="#SBATCH --job-name; empty = areal-py-<run.name>.")
    extra_sbatch: list[str] = Field(default_factory=list, description="More sbatch options, one per #SBATCH line, "
                                    "e.g. ['--mem=0', '--constraint=h100'].")
    setup: list[str] = Field(default_factory=list, description="Shell lines the job runs before any role starts, "
                             "e.g. ['module load cuda/12.4'].")
    python: str = Field("", description="Python interpreter on the nodes (with areal-py installed); empty = the one "
                        "that ran `areal-py slurm` (a virtualenv on a filesystem every node shares).")
    rdzv_port: int = Field(29500, ge=1, le=65535, description="Port on the first node for the trainer ranks' "
                           "rendezvous (torchrun --master-port).")
    stop_grace_s: float = Field(30.0, gt=0, description="When one step fails, seconds the others get after SIGTERM "
                                "before SIGKILL (Slurm's own KillWait default).")


class Config(_Section):
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
    weights: WeightsConfig = Field(default_factory=WeightsConfig, description="Weight transfer trainer -> servers.")
    net: NetConfig = Field(default_factory=NetConfig, description="Socket addresses.")
    slurm: SlurmConfig = Field(default_factory=SlurmConfig, description="`areal-py slurm`: nodes, GPUs and sbatch options of the job.")

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


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


def _format_validation_error(err: ValidationError, data: Any = None) -> str:
    """One line per error, naming the key; `data` (the validated input) tells which task's keys are allowed."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'{_allowed_keys(e['loc'][:-1], data)}")
        elif not e["loc"]:  # a cross-field check: its message names the keys; the input is the whole tree
            lines.append(e["msg"].removeprefix("Value error, "))
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def _allowed_keys(loc: tuple, data: Any) -> str:
    """'; allowed here: a, b' for the section at `loc`; the `task` section's keys are those of its task."""
    if tuple(loc) == ("task",):
        section = data.get("task") if isinstance(data, dict) else None
        named = isinstance(section, dict) and "name" in section
        name = section["name"] if named else DEFAULT_TASK
        try:
            fields = task_spec(name).config.model_fields
        except UnknownTask:
            return ""
        return f" for task.name={name}{'' if named else ' (the default)'}; allowed here: {', '.join(fields)}"
    cls: type[BaseModel] = Config
    for part in loc:
        field = cls.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return "; allowed here: ?"
        cls = field.annotation
    return f"; allowed here: {', '.join(cls.model_fields)}"


def _parse_value(text: str) -> Any:
    """Override values are YAML scalars: `3`, `1e-4`, `true`, `null`, `[1, 2]`, or plain strings."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}': '{p}' is not a section")
        node[parts[-1]] = _parse_value(value)
    return data


def _yaml_error(path: Path, err: yaml.YAMLError) -> str:
    """``path:line:column: invalid YAML: problem (context at line, column)``, 1-based as editors count."""
    mark = getattr(err, "problem_mark", None)
    if not isinstance(err, yaml.MarkedYAMLError) or mark is None:
        return f"{path}: invalid YAML: {err}"
    msg = f"{path}:{mark.line + 1}:{mark.column + 1}: invalid YAML: {err.problem or err}"
    if err.context and err.context_mark:
        msg += f" ({err.context} at line {err.context_mark.line + 1}, column {err.context_mark.column + 1})"
    return msg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- overrides, validated as one tree."""
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not valid UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
        except yaml.YAMLError as e:
            raise ConfigError(_yaml_error(p, e)) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        data = loaded
    apply_overrides(data, overrides or [])
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, data)) from None


def with_run_name(cfg: Config) -> Config:
    """Fill an empty run.name with a timestamp, the launcher's job so all processes agree."""
    if not cfg.run.name:
        cfg.run.name = _dt.datetime.now().strftime("run-%Y%m%d-%H%M%S")
    return cfg


def dump_config(cfg: Config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
