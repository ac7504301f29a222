"""The generation side: rollout servers, the controller's admission and batching, weight transfer."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from areal_py.config.agent_endpoint import OpenAIEndpointConfig
from areal_py.config.section import Section


class RolloutConfig(Section):
    num_servers: int = Field(1, ge=1, description="Rollout server processes started by `areal-py run`.")
    server_id: str = Field("rollout-0", description="Identity of a server started with `areal-py serve rollout`.")
    max_running: int = Field(256, ge=1, description="Concurrent sequences per server (KV-cache slots).")
    max_new_tokens: int = Field(5, ge=1, description="Longest response in tokens.")
    temperature: float = Field(1.0, ge=0, description="Sampling temperature (0 = greedy); the trainer uses the same.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling threshold.")
    heartbeat_s: float = Field(0.5, gt=0, description="Seconds between server heartbeats, between the "
                               "controller's pings to the servers, and between the waiting trainer's probes of the "
                               "controller (trainer.controller_timeout_s).")
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
    workflow: str = Field(
        "single_turn", description="How one episode is produced (areal_py/workflow, docs/multi-turn.md): single_turn "
        "(one response per sample, the native grouped dispatch), tool_loop (generate; on <tag>args</tag> from "
        "tool_tags call the tool, append <result>output</result> and generate again, up to max_turns), openai_agent (an agent "
        "function written against the openai client, rollout.agent), or a class of your own as "
        "'package.module:Class' (built with the WorkflowSettings, run(prompt, prompt_ids, env) -> "
        "Episode). Multi-turn episodes run on controller threads; each turn is one Generate to a server.")
    max_turns: int = Field(4, ge=1, description="Workflows: most generations in one episode (tool_loop stops there "
                           "and finishes the episode as length).")
    tool_tags: dict[str, str] = Field(
        default_factory=lambda: {"calc": "calculator"}, description="tool_loop: tag -> tool name; the model calls "
        "tool T on <tag>args</tag>, and what it wrote after the closing tag is discarded.")
    episode_threads: int = Field(32, ge=1, description="Workflows: episodes run at once on controller threads; "
                                 "more wait their turn (a turn waiting for a server blocks only its thread).")
    turn_timeout_s: float = Field(
        300.0, gt=0, description="Workflows: longest wait for one turn's generation (queued, dispatched, "
        "re-dispatched after a server death included); past it the episode fails with an error naming the turn "
        "and its group is dropped as workflow_error.")
    agent: str = Field(
        "", description="workflow openai_agent: your agent as 'package.module:function', called as "
        "agent(client, prompt) -> float | None with an openai.OpenAI client whose calls are this episode's turns "
        "(docs/multi-turn.md, OpenAI-compatible endpoint); None: the reward functions score the episode.")
    openai: OpenAIEndpointConfig = Field(default_factory=OpenAIEndpointConfig,
                                         description="workflow openai_agent: the endpoint the agents call.")


class ControllerConfig(Section):
    batch_size: int = Field(32, ge=1, description="Prompts (groups) per training step.")
    group_size: int = Field(8, ge=1, description="Samples per prompt (GRPO group size n).")
    max_staleness: int = Field(2, ge=0, description="Admission bound (AReaL's rule): prompts are admitted so that "
                               "a sample is trained at most this many versions after it started (0 = on-policy).")
    max_token_staleness: int | None = Field(
        None, ge=0, description="Hard limit on trainer version - oldest token version: older groups are dropped at "
        "batching and aborted on the servers. null = max_staleness. Raise it for long chain-of-thought: a response "
        "that outlives max_staleness updates is then trained (AReaL's behaviour) instead of wasted, its older "
        "tokens corrected by the decoupled behaviour weight.")
    max_concurrent: int | None = Field(
        None, ge=1, description="Most groups in flight at once (admitted, not yet scored), AReaL's "
        "max_concurrent_rollouts: admission takes min(max_concurrent - running, the staleness bound's capacity). "
        "null = unbounded: the staleness bound alone decides.")
    server_timeout_s: float = Field(10.0, gt=0, description="A server silent this long is declared dead; its work is re-dispatched.")
    group_timeout_s: float = Field(
        120.0, gt=0, description="A dispatched group's attempt with no sign of life for this long is generated again "
        "as a new attempt, on another server if one is live (its late results are rejected as stale_result; the "
        "samples it did return are kept): its Generate or a Result was lost on the way. Signs of life: its results, "
        "and every heartbeat (rollout.heartbeat_s) of its server that lists it as held, so a long generation or "
        "queue never runs it out; the bound covers only missing evidence. 120 s is 240 heartbeats at the default "
        "rate: far above a lost heartbeat or a message held up in a queue, and below the minutes a stalled "
        "admission would cost. Lower it on lossy links.")
    weight_sync_timeout_s: float = Field(60.0, gt=0, description="Longest wait for a live server to load a new version "
                                         "once sent it; past it the server is evicted (its work re-dispatched) until it "
                                         "reports that version.")
    startup_timeout_s: float = Field(120.0, gt=0, description="Longest wait for the trainer and the first server to connect.")
    trainer_timeout_s: float = Field(
        120.0, gt=0, description="Once the trainer has said hello: the controller stops with TrainerLost when the "
        "trainer has sent nothing for this long and its link is down (its process died: a kill -9 under `areal-py "
        "serve`, which no launcher watches). A trainer training a long step is silent but connected and is waited "
        "for. The controller exits rather than waits: on a cluster a failed job is seen and restarted, and the "
        "state a resume needs is in the trainer's checkpoints; the rollout servers are not shut down, so they "
        "rejoin a controller restarted with --resume. Same default as trainer.controller_timeout_s.")
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


class WeightsConfig(Section):
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
