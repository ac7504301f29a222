"""Prometheus metric definitions for every role, and the ``/metrics`` HTTP endpoint.

Each metric is defined once, at import, on the default prometheus-client registry, grouped per
role: ``ROLLOUT``, ``CONTROLLER``, ``TRAINER``. Each group is also registered in a registry of its
own, so a process started with ``start_metrics_server(port, role="trainer")`` serves only its
role's metrics (plus the rejected-message counter and the process/platform/GC collectors), not
the other roles' zeros. ``areal_rejected_messages_total`` lives in ``areal_py.telemetry.metrics`` and is
not redefined here, but it is served by the same endpoint and listed in ``ALL_METRIC_NAMES``.

Naming: ``areal_<role>_<what>[_<base unit>]``, ``_total`` for counters (prometheus-client adds
it), ``_seconds`` for durations, ``_ratio`` for 0..1 fractions. Counts of prompt groups (the unit
of the admission rule) end in ``_groups``.

    from areal_py.telemetry import prom
    prom.start_metrics_server(cfg_port, role="rollout")   # 0 = disabled; off loopback, token= is required
    prom.ROLLOUT.generated_tokens.inc(n)
    prom.TRAINER.step_phase_seconds.labels(phase="publish").observe(dt)
"""
from __future__ import annotations

import socket
import threading
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    make_wsgi_app,
)

from areal_py.telemetry.http_auth import CHALLENGE, authorized, count_refusal, is_loopback_address, refuse_open_bind
from areal_py.telemetry.metrics import (
    OPENAI_EPISODES,
    OPENAI_REQUESTS,
    REJECTED_MESSAGES,
    REWARD_ERRORS,
    REWARD_TIMEOUTS,
    TOOL_CALLS,
    TOOL_DURATION,
)

__all__ = [
    "ALL_METRIC_NAMES",
    "CONTROLLER",
    "ROLES",
    "ROLLOUT",
    "TRAINER",
    "TRAINER_PHASES",
    "role_registry",
    "start_metrics_server",
    "stop_metrics_server",
]

TRAINER_PHASES = ("wait", "proximal", "forward_backward", "optimizer", "publish")
# seconds: from a fast in-memory weight swap up to a slow step of a large model
DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
                    120.0, 300.0, float("inf"))
# policy versions; integer staleness s lands in the bucket le=s
STALENESS_BUCKETS = (0, 1, 2, 3, 4, 5, 6, 8, 12, 16, 32, float("inf"))


def _define(cls: type, name: str, doc: str, labels: tuple[str, ...] = (), **kw: Any) -> Any:
    """Define a metric on the default registry, or return the one already registered under that
    name (so re-importing this module, e.g. ``importlib.reload``, does not raise)."""
    try:
        return cls(name, doc, labels, **kw)
    except ValueError:  # "Duplicated timeseries in CollectorRegistry"
        existing = REGISTRY._names_to_collectors.get(name) or REGISTRY._names_to_collectors.get(name + "_total")
        if existing is None or not isinstance(existing, cls):
            raise
        return existing


@dataclass(frozen=True)
class RolloutMetrics:
    generated_tokens: Counter
    active_requests: Gauge
    queued_requests: Gauge
    kv_cache_occupancy: Gauge
    interrupted_requests: Counter
    weight_swap_seconds: Histogram
    version_tokens: Counter
    policy_version: Gauge
    kernel_info: Gauge


@dataclass(frozen=True)
class ControllerMetrics:
    admitted_groups: Gauge
    running_groups: Gauge
    accepted_groups: Gauge
    staleness_capacity_groups: Gauge
    sample_staleness: Histogram
    reward_mean: Gauge
    queue_depth: Gauge
    server_policy_version: Gauge
    policy_version: Gauge
    skipped_prompts: Counter
    dropped_groups: Counter
    evicted_servers: Counter
    redispatched_groups: Counter
    episodes: Counter
    episode_turns: Counter
    episode_tool_calls: Counter
    episode_tool_token_share: Gauge


@dataclass(frozen=True)
class TrainerMetrics:
    step_phase_seconds: Histogram
    busy: Gauge
    trained_tokens: Counter
    steps: Counter
    policy_version: Gauge
    loss: Gauge
    clip: Gauge
    approx_kl: Gauge
    entropy: Gauge
    grad_norm: Gauge
    skipped_updates: Counter
    rejected_groups: Counter
    uninformative_steps: Gauge
    rank_busy: Gauge
    rank_tokens: Gauge
    offpolicy_kl_mean: Gauge
    offpolicy_kl_max: Gauge
    offpolicy_ess: Gauge
    offpolicy_bounded: Gauge
    offpolicy_tokens: Gauge


ROLLOUT = RolloutMetrics(
    generated_tokens=_define(Counter, "areal_rollout_generated_tokens_total", "Response tokens generated."),
    active_requests=_define(Gauge, "areal_rollout_active_requests", "Requests decoding in the running batch."),
    queued_requests=_define(Gauge, "areal_rollout_queued_requests", "Requests received and waiting for a slot."),
    kv_cache_occupancy=_define(Gauge, "areal_rollout_kv_cache_occupancy_ratio",
                               "Fraction (0..1) of KV-cache capacity in use."),
    interrupted_requests=_define(Counter, "areal_rollout_interrupted_requests_total",
                                 "Requests interrupted by a weight update (and resumed under the new weights)."),
    weight_swap_seconds=_define(Histogram, "areal_rollout_weight_swap_duration_seconds",
                                "Time generation was paused to load new weights.", buckets=DURATION_BUCKETS),
    version_tokens=_define(Counter, "areal_rollout_version_generated_tokens_total",
                           "Response tokens generated, by the policy version that generated them.", ("version",)),
    policy_version=_define(Gauge, "areal_rollout_policy_version", "Policy version of the weights loaded."),
    kernel_info=_define(Gauge, "areal_rollout_kernel_info",
                        "Info (value 1): the kernel each op of the engine runs and how it was chosen (source: "
                        "timed|cache|forced|fallback|only; reason: why a fallback).",
                        ("server", "op", "kernel", "source", "reason")),
)

CONTROLLER = ControllerMetrics(
    admitted_groups=_define(Gauge, "areal_controller_admitted_groups", "Prompt groups admitted so far this run."),
    running_groups=_define(Gauge, "areal_controller_running_groups", "Prompt groups in flight on rollout servers."),
    accepted_groups=_define(Gauge, "areal_controller_accepted_groups",
                            "Prompt groups finished and kept so far (the `accepted` of the admission rule)."),
    staleness_capacity_groups=_define(
        Gauge, "areal_controller_staleness_capacity_groups",
        "Groups that may still be admitted: (version + max_staleness + 1) * batch_size - accepted - running, "
        "or max_concurrent - running when controller.max_concurrent is set and smaller."),
    sample_staleness=_define(Histogram, "areal_controller_sample_staleness_versions",
                             "Staleness of each batched sample (policy versions behind, oldest token).",
                             buckets=STALENESS_BUCKETS),
    reward_mean=_define(Gauge, "areal_controller_reward_mean", "Mean reward of the last batch sent to the trainer."),
    queue_depth=_define(Gauge, "areal_controller_queue_depth", "Items waiting in a controller queue.", ("queue",)),
    server_policy_version=_define(Gauge, "areal_controller_server_policy_version",
                                  "Policy version each rollout server reports loaded.", ("server",)),
    policy_version=_define(Gauge, "areal_controller_policy_version", "Current global policy version."),
    skipped_prompts=_define(Counter, "areal_controller_skipped_prompts_total",
                            "Prompts skipped, never dispatched, by reason: too_long (no room for one new token in "
                            "the model's context), bad_line (a data line the task could not load).", ("reason",)),
    dropped_groups=_define(Counter, "areal_controller_dropped_groups_total",
                           "Generated groups dropped before any batch, by reason: uniform (dynamic sampling: every "
                           "reward equal), stale (too old for any batch to come), aborted (a rollout server refused "
                           "it, finish_reason abort), workflow_error (rollout.workflow raised or returned an episode "
                           "that cannot be trained).", ("reason",)),
    evicted_servers=_define(Counter, "areal_controller_evicted_servers_total",
                            "Rollout servers evicted for not loading the newest weights within "
                            "controller.weight_sync_timeout_s (their work re-dispatched; they rejoin once they do)."),
    redispatched_groups=_define(Counter, "areal_controller_redispatched_groups_total",
                                "Group attempts generated again, by reason: server_dead (its server went silent), "
                                "evicted (its server did not load the newest weights in time), invalid_result (a "
                                "result failed a check), timeout (no result and not held by its server for "
                                "controller.group_timeout_s: a Generate or Result lost on the way).", ("reason",)),
    episodes=_define(Counter, "areal_controller_episodes_total", "Episodes of rollout.workflow (other than "
                     "single_turn) finished and sent for scoring."),
    episode_turns=_define(Counter, "areal_controller_episode_turns_total", "Generations of those episodes (turns per "
                          "episode = its rate over areal_controller_episodes_total's)."),
    episode_tool_calls=_define(Counter, "areal_controller_episode_tool_calls_total", "Tool calls of finished "
                               "episodes, by outcome: ok, error (the tool failed, timed out or crashed: the model saw "
                               "an error observation).", ("outcome",)),
    episode_tool_token_share=_define(Gauge, "areal_controller_episode_tool_token_share", "Share (0..1) of the "
                                     "response tokens of the last settled episode group that the model did not "
                                     "generate (tool output, template scaffolding; masked out of the loss)."),
)

TRAINER = TrainerMetrics(
    step_phase_seconds=_define(Histogram, "areal_trainer_step_phase_duration_seconds",
                               "Time per train step in each phase: " + "|".join(TRAINER_PHASES) + ".",
                               ("phase",), buckets=DURATION_BUCKETS),
    busy=_define(Gauge, "areal_trainer_busy_ratio",
                 "Fraction (0..1) of wall time spent training (not waiting for data or publishing)."),
    trained_tokens=_define(Counter, "areal_trainer_trained_tokens_total", "Tokens (prompt + response) trained on."),
    steps=_define(Counter, "areal_trainer_steps_total", "Train steps completed."),
    policy_version=_define(Gauge, "areal_trainer_policy_version", "Policy version after the last step."),
    loss=_define(Gauge, "areal_trainer_loss", "Policy loss of the last step."),
    clip=_define(Gauge, "areal_trainer_clip_ratio", "Fraction (0..1) of tokens clipped in the last step."),
    approx_kl=_define(Gauge, "areal_trainer_approx_kl", "Approximate KL(proximal || current) of the last step."),
    entropy=_define(Gauge, "areal_trainer_entropy", "Mean token entropy (nats) of the last step; NaN when not "
                    "computed (algo.entropy_coef = 0)."),
    grad_norm=_define(Gauge, "areal_trainer_grad_norm", "Gradient norm (before clipping) of the last step."),
    rank_busy=_define(Gauge, "areal_trainer_rank_learner_step_seconds", "Seconds each trainer rank spent in the last "
                      "step's learner step (served by rank 0 for every rank).", ("rank",)),
    rank_tokens=_define(Gauge, "areal_trainer_rank_tokens", "Real tokens (prompt + response) each trainer rank "
                        "trained in the last step (served by rank 0 for every rank).", ("rank",)),
    offpolicy_kl_mean=_define(Gauge, "areal_trainer_offpolicy_kl", "Last step: mean k3 estimate of KL(behaviour || "
                              "proximal) per response token (nats), over all tokens (staleness=all) or those of one "
                              "staleness bucket (0|1|2|3+).", ("staleness",)),
    offpolicy_kl_max=_define(Gauge, "areal_trainer_offpolicy_kl_max", "Last step: largest per-token k3 estimate of "
                             "KL(behaviour || proximal) (nats), by staleness bucket.", ("staleness",)),
    offpolicy_ess=_define(Gauge, "areal_trainer_offpolicy_ess_ratio", "Last step: effective sample size over N of "
                          "the importance weights pi_prox/pi_behav, (sum w)^2 / (N sum w^2), by staleness bucket.",
                          ("staleness",)),
    offpolicy_bounded=_define(Gauge, "areal_trainer_offpolicy_bounded_ratio", "Last step: fraction (0..1) of response "
                              "tokens whose behaviour weight the bound clamped or masked, by staleness bucket.",
                              ("staleness",)),
    offpolicy_tokens=_define(Gauge, "areal_trainer_offpolicy_tokens", "Last step: response tokens counted in the "
                             "off-policy statistics, by staleness bucket.", ("staleness",)),
    skipped_updates=_define(Counter, "areal_trainer_skipped_updates_total",
                            "Optimizer updates skipped because the loss or gradient norm was not finite "
                            "(gradients dropped, weights unchanged)."),
    rejected_groups=_define(Counter, "areal_trainer_rejected_groups_total",
                            "Prompt groups dropped before the loss, by reason: nonfinite_reward or "
                            "nonfinite_logprob (a value not finite in float32).", ("reason",)),
    uninformative_steps=_define(Gauge, "areal_trainer_uninformative_steps",
                                "Steps in a row, the last one included, that trained no informative sample (every "
                                "group's rewards equal); 0 after a step with signal. trainer.warn_uninformative_steps "
                                "of them log a warning."),
)


def _sample_names(metric: Any) -> set[str]:
    """Sample names a metric exposes in the text format (``describe`` gives the family name/type)."""
    out: set[str] = set()
    for fam in metric.describe():
        suffixes = {"counter": ("_total", "_created"), "gauge": ("",),
                    "histogram": ("_bucket", "_sum", "_count", "_created")}[fam.type]
        out.update(fam.name + s for s in suffixes)
    return out


ROLES = {"rollout": ROLLOUT, "controller": CONTROLLER, "trainer": TRAINER}
_METRICS = [m for group in ROLES.values() for m in vars(group).values()]
ALL_METRIC_NAMES: frozenset[str] = frozenset().union(*(_sample_names(m) for m in _METRICS + [REJECTED_MESSAGES, REWARD_TIMEOUTS,
                                                                                         REWARD_ERRORS, TOOL_CALLS,
                                                                                         TOOL_DURATION, OPENAI_REQUESTS,
                                                                                         OPENAI_EPISODES]))


def _build_role_registry(group: Any) -> CollectorRegistry:
    reg = CollectorRegistry()
    shared = [REJECTED_MESSAGES, PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR]
    if group is CONTROLLER:  # the controller owns the reward pool and the episode runner's tool sandbox
        shared += [REWARD_TIMEOUTS, REWARD_ERRORS, TOOL_CALLS, TOOL_DURATION, OPENAI_REQUESTS, OPENAI_EPISODES]
    for c in [*vars(group).values(), *shared]:
        reg.register(c)
    return reg


_ROLE_REGISTRIES = {role: _build_role_registry(group) for role, group in ROLES.items()}


def role_registry(role: str | None) -> CollectorRegistry:
    """The registry served for ``role`` (one of ``ROLES``); ``None`` is the default registry (everything)."""
    if role is None:
        return REGISTRY
    try:
        return _ROLE_REGISTRIES[role]
    except KeyError:
        raise ValueError(f"unknown metrics role {role!r}; expected one of {sorted(ROLES)}") from None


_servers: dict[int, Any] = {}
_lock = threading.Lock()


class _Quiet(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        pass


def _guarded(app: Any, token: str, role: str) -> Any:
    """``app`` behind the token (``http_auth``): a request without it gets 401, counted under ``role``."""
    def guarded(environ: dict, start_response: Any) -> Any:
        if authorized(environ.get("HTTP_AUTHORIZATION"), token):
            return app(environ, start_response)
        count_refusal(role, environ.get("REMOTE_ADDR", "?"), environ.get("PATH_INFO", ""))
        body = b"401: /metrics needs its token (net.keys_dir/http_token): Authorization: Bearer <token>\n"
        start_response("401 Unauthorized", [("WWW-Authenticate", CHALLENGE), ("Content-Type", "text/plain"),
                                            ("Content-Length", str(len(body)))])
        return [body]
    return guarded


def start_metrics_server(port: int, host: str = "127.0.0.1", role: str | None = None,
                         token: str | None = None) -> int:
    """Serve ``/metrics`` on ``host:port`` in a daemon thread: ``role``'s metrics, or every metric
    when ``role`` is None. Returns the bound port, or 0 (serving nothing) when ``port`` is 0.
    Starting again on a port this process already serves is a no-op. Off loopback ``token`` is
    required (``HttpAuthError`` without it) and every scrape must carry it (``http_auth``)."""
    if not port:
        return 0
    registry = role_registry(role)
    with _lock:
        if port in _servers:
            return port
        family, _, _, _, where = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]

        class Server(ThreadingMixIn, WSGIServer):
            daemon_threads = True
            address_family = family

        app = make_wsgi_app(registry)
        server = make_server(where[0], port, app, Server, handler_class=_Quiet)
        bound = server.server_address[0]
        try:
            refuse_open_bind(bound, token, f"/metrics of {role or 'every role'}")
        except Exception:
            server.server_close()
            raise
        if token is not None and not is_loopback_address(bound):
            server.set_app(_guarded(app, token, role or "metrics"))
        threading.Thread(target=server.serve_forever, name="areal-metrics", daemon=True).start()
        _servers[server.server_port] = server
        return server.server_port


def stop_metrics_server(port: int) -> None:
    """Shut down a server started by ``start_metrics_server`` (for tests and clean exits)."""
    with _lock:
        server = _servers.pop(port, None)
    if server is not None:
        server.shutdown()
        server.server_close()
