"""The report's charts: which sections the page has, drawn from step records (see ``report_data``).

``chart_sections`` is separate from the page so the live dashboard redraws the same charts from the
same records; ``not_computed`` explains series that are 0 by construction under a run's config.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from areal_py.config import AlgoConfig, TrainerConfig
from areal_py.telemetry.charts import PALETTE, Series, bar_chart, line_chart, timeline_chart
from areal_py.telemetry.report_data import (
    RATE_WINDOW,
    Value,
    busy_fraction,
    cumulative_rate,
    staleness_histogram,
    step_series,
    timeline_lanes,
)
from areal_py.telemetry.step_record import StepRecord

ZOOM_STEPS = 12  # steps in the zoomed-in timeline
PHASE_COLORS = {"wait": "#cfcfcf", "proximal": "#9467bd", "train": "#1f77b4", "publish": "#d62728",
                "generating": "#2ca02c"}
# (field name = chart id, label, the field): the learner's stats, one chart each
TRAIN_STATS: list[tuple[str, str, Value]] = [
    ("loss", "loss", lambda r: r.loss), ("clip_fraction", "clip fraction", lambda r: r.clip_fraction),
    ("grad_norm", "grad norm", lambda r: r.grad_norm), ("approx_kl", "approx KL", lambda r: r.approx_kl),
    ("entropy", "entropy", lambda r: r.entropy), ("value_loss", "value loss", lambda r: r.value_loss)]


@dataclass(frozen=True)
class Section:
    """One chart of the page. ``note`` is a remark on this run's data (e.g. why a series is all
    zero); a section whose plot would say nothing has a note and ``svg == ""``."""
    chart_id: str
    title: str
    caption: str
    svg: str
    wide: bool = False
    note: str = ""


_DEFAULTS = {"algo": AlgoConfig, "trainer": TrainerConfig}


def _setting(config: Mapping[str, Any], section: str, key: str) -> Any:
    """``section.key`` from a run's config.yaml, or the default when the file does not hold it."""
    sec = config.get(section)
    if isinstance(sec, Mapping) and key in sec:
        return sec[key]
    return _DEFAULTS[section].model_fields[key].default


def not_computed(key: str, config: Mapping[str, Any] | None) -> str | None:
    """Why the trainer stat ``key`` is 0 on every step under ``config`` (None: it is computed, or
    there is no config to tell).

    The learner (trainer/learner.py) reports every stat on every step, as 0.0 when nothing computes
    it, so without this a flat zero line reads as a broken chart. The rules mirror the learner:
    entropy is computed only for the entropy bonus; value loss only with the critic that GAE
    trains; and with one update per batch the decoupled and GSPO losses take the proximal policy
    from the training forward itself, so the ratio to it is exactly 1 (no clipping, zero KL) except
    on steps whose every token comes from the trained version, where the behaviour logprobs stand
    in for the proximal ones and trainer/rollout numerics make the ratio differ slightly from 1."""
    if config is None:
        return None
    if key == "value_loss" and (est := _setting(config, "algo", "adv_estimator")) != "gae":
        return (f"Not computed in this run: a value loss needs a critic, which only algo.adv_estimator=gae "
                f"trains (this run: {est}).")
    if key == "entropy" and not _setting(config, "algo", "entropy_coef"):
        return ("Not computed in this run: the policy entropy is computed only for the entropy bonus, "
                "and algo.entropy_coef is 0.")
    if (key in ("clip_fraction", "approx_kl") and _setting(config, "algo", "loss") in ("decoupled", "gspo")
            and _setting(config, "algo", "prox_method") == "recompute"
            and _setting(config, "trainer", "ppo_minibatches") == 1):
        return ("With one update per batch (trainer.ppo_minibatches=1) the proximal policy is the policy being "
                "updated: on steps with stale tokens the ratio to it is exactly 1, so this is 0. Steps trained "
                "only on tokens of the current version (staleness 0; every step in sync mode) use the behaviour "
                "logprobs instead, and their values measure only the trainer's numerical difference from the "
                "rollout engine. A trust-region signal needs trainer.ppo_minibatches > 1.")
    return None


def rank_sections(records: Sequence[StepRecord]) -> list[Section]:
    """Per-rank learner time and tokens, for runs with several trainer ranks (none otherwise)."""
    ranks = max((len(r.rank_busy_s or []) for r in records), default=0)
    if ranks < 2:
        return []

    def per_rank(field: str, k: int) -> list[tuple[float, float]]:
        return step_series(records, lambda r: (getattr(r, field) or [])[k] if len(getattr(r, field) or []) > k
                           else None)

    busy = [Series(f"rank {k}", per_rank("rank_busy_s", k), PALETTE[k % len(PALETTE)]) for k in range(ranks)]
    tokens = [Series(f"rank {k}", per_rank("rank_tokens", k), PALETTE[k % len(PALETTE)]) for k in range(ranks)]
    return [Section("rank_busy", "Trainer ranks: learner step time", (
        "rank_busy_s: seconds each trainer rank spent in its learner step (a rank far above the others holds "
        "the step back: every rank waits for it at the gradient reduction)."),
        line_chart(busy, chart_id="rank_busy", title="learner step per rank", x_label="step", y_label="seconds",
                   y_min=0.0)),
        Section("rank_tokens", "Trainer ranks: tokens", (
            "rank_tokens: real tokens (prompt + response) each rank trained; the split balances them by whole "
            "groups, so they differ by at most about one group's tokens."),
            line_chart(tokens, chart_id="rank_tokens", title="tokens per rank", x_label="step", y_label="tokens",
                       y_min=0.0))]


def offpolicy_sections(records: Sequence[StepRecord]) -> list[Section]:
    """Off-policyness over steps (the ``offpolicy_*`` fields): KL(behaviour || proximal) and ESS/N, for all
    response tokens and per staleness bucket (none when the run did not record them)."""
    kl = step_series(records, lambda r: r.offpolicy_kl_mean)
    if not kl:
        return []
    keys = sorted({k for r in records for k in (r.offpolicy_by_staleness or {})}, key=lambda k: int(k.rstrip("+")))

    def bucket(k: str, attr: str) -> list[tuple[float, float]]:
        return step_series(records, lambda r: getattr(b, attr) if (b := (r.offpolicy_by_staleness or {}).get(k))
                           else None)

    kl_series = [Series("mean, all tokens", kl, PALETTE[0]),
                 Series("max, all tokens", step_series(records, lambda r: r.offpolicy_kl_max), PALETTE[0], dash="5 3")]
    kl_series += [Series(f"mean, staleness {k}", bucket(k, "kl_mean"), PALETTE[(i + 1) % len(PALETTE)])
                  for i, k in enumerate(keys)]
    ess_series = [Series("ESS/N, all tokens", step_series(records, lambda r: r.offpolicy_ess), PALETTE[0]),
                  Series("bounded fraction", step_series(records, lambda r: r.offpolicy_bounded_fraction),
                         PALETTE[3], dash="5 3")]
    ess_series += [Series(f"ESS/N, staleness {k}", bucket(k, "ess"), PALETTE[(i + 1) % len(PALETTE)])
                   for i, k in enumerate(keys)]
    return [Section("offpolicy_kl", "Off-policy KL (behaviour vs proximal)", (
        "k3 estimate of KL(behaviour || proximal) per response token: mean and max over each step's tokens, and "
        "the mean over the tokens of each staleness (trainer version - token version; 3+ = three or more). 0 "
        "on-policy; it grows with staleness and with the learning rate."),
        line_chart(kl_series, chart_id="offpolicy_kl", title="KL(behaviour || proximal)", x_label="step",
                   y_label="nats", y_min=0.0)),
        Section("offpolicy_ess", "Importance-weight ESS and bounded tokens", (
            "ESS/N = (sum w)^2 / (N sum w^2) of the weights w = pi_prox / pi_behav: 1 when every weight is equal "
            "(on-policy), small when a few tokens dominate the correction; and the fraction of tokens whose "
            "weight the bound in use clamped or masked (dashed)."),
            line_chart(ess_series, chart_id="offpolicy_ess", title="ESS/N and bounded fraction", x_label="step",
                       y_label="fraction", y_min=0.0, y_max=1.0))]


def _ratio(num: int | None, den: int | None) -> float | None:
    return num / den if num is not None and den else None


def multi_turn_sections(records: Sequence[StepRecord]) -> list[Section]:
    """Episodes and tool calls over steps, for multi-turn runs (the ``episodes``/``tool_*`` fields; none for a
    single-turn run, whose records have no such field)."""
    if not any(r.episodes is not None for r in records):
        return []
    per_episode = [Series("turns / episode", step_series(records, lambda r: r.turns_per_episode), PALETTE[0]),
                   Series("tool calls / episode", step_series(records, lambda r: _ratio(r.tool_calls, r.episodes)),
                          PALETTE[2])]
    shares = [Series("tool output share of response tokens", step_series(records, lambda r: r.tool_token_share),
                     PALETTE[1]),
              Series("successful episodes that called a tool", step_series(
                  records, lambda r: _ratio(r.episodes_succeeded_with_tool, r.episodes_succeeded)), PALETTE[2]),
              Series("tool calls that failed", step_series(records, lambda r: _ratio(r.tool_errors, r.tool_calls)),
                     PALETTE[3], dash="5 3")]
    faults = [Series("errors", step_series(records, lambda r: r.tool_errors), PALETTE[3]),
              Series("timeouts", step_series(records, lambda r: r.tool_timeouts), PALETTE[1]),
              Series("crashes", step_series(records, lambda r: r.tool_crashes), PALETTE[4])]
    latency = step_series(records, lambda r: r.tool_latency_mean_s)
    return [Section("episode_turns", "Multi-turn: turns and tool calls per episode", (
        "Episodes settled since the previous step: generations (turns) and tool calls per episode."),
        line_chart(per_episode, chart_id="episode_turns", title="per episode", x_label="step", y_label="count",
                   y_min=0.0)),
        Section("tool_shares", "Multi-turn: tool use", (
            "Share of the episodes' response tokens that are tool output or scaffolding (in the context, out of "
            "the loss); share of the successful episodes (reward > 0) that called a tool; share of the tool calls "
            "that failed (dashed)."),
            line_chart(shares, chart_id="tool_shares", title="shares", x_label="step", y_label="fraction",
                       y_min=0.0, y_max=1.0)),
        Section("tool_faults", "Multi-turn: failed tool calls", (
            "Tool calls since the previous step that failed (the model saw an error observation), and among them "
            "those past tools.timeout_s and those whose worker died (tool_timeouts, tool_crashes)."),
            line_chart(faults, chart_id="tool_faults", title="failed calls", x_label="step", y_label="calls",
                       y_min=0.0)),
        Section("tool_latency", "Multi-turn: tool latency", "Mean seconds of a tool call, queue wait included.",
                line_chart([Series("mean latency", latency, PALETTE[0])], chart_id="tool_latency",
                           title="tool call latency", x_label="step", y_label="seconds", y_min=0.0))]


def chart_sections(records: Sequence[StepRecord], config: Mapping[str, Any] | None = None) -> list[Section]:
    """Every chart of the report, drawn from step records (also usable by a live dashboard).

    ``config``: the run's config.yaml as a mapping, used only to explain series that are 0 by
    construction (``not_computed``); such a series gets that note instead of a flat plot."""
    secs: list[Section] = []
    gen = cumulative_rate(records, lambda r: r.generated_tokens)
    trained = cumulative_rate(records, lambda r: r.trained_tokens_total)
    secs.append(Section("throughput", "Generated vs trained tokens/s", (
        f"Rates from the cumulative counters over {RATE_WINDOW} step intervals. Generated counts response "
        "tokens; trained counts every token of a trained batch (prompt + response)."),
        line_chart([Series("generated", gen, PALETTE[2]), Series("trained", trained, PALETTE[0])],
                   chart_id="throughput", title="tokens / s", x_label="wall time (s)", y_label="tokens/s", y_min=0.0)))
    busy = busy_fraction(records)
    secs.append(Section("busy", "Trainer busy fraction", "train_s / time since the previous step.",
                        line_chart([Series("busy", busy)], chart_id="busy", title="trainer busy fraction",
                                   x_label="wall time (s)", y_label="fraction", y_min=0.0, y_max=1.0)))
    secs += rank_sections(records)
    secs.append(Section("timeline", "Timeline: trainer phases and generation", (
        "Trainer lane: each step's wait for data, proximal recompute, training and weight publish, laid back "
        "from its end time. Generation lane: the periods in which any rollout server had requests running, "
        "as the servers measured them (runs recorded before gen_spans existed show tokens generated between "
        "steps instead, at step resolution)."),
        timeline_chart(timeline_lanes(records), PHASE_COLORS, chart_id="timeline", title="whole run"), wide=True))
    if len(records) > 2 * ZOOM_STEPS:
        secs.append(Section("timeline_zoom", f"Timeline: last {ZOOM_STEPS} steps", "The same, zoomed in.",
                            timeline_chart(timeline_lanes(records, last=ZOOM_STEPS), PHASE_COLORS,
                                           chart_id="timeline_zoom", title=f"last {ZOOM_STEPS} steps"), wide=True))
    occ = step_series(records, lambda r: r.rollout_slot_occupancy)
    if occ:
        secs.append(Section("slots", "Rollout slot occupancy", (
            "Fraction of each live server's slots (rollout.max_running) holding a request since the previous "
            "step, averaged over servers; a step with no server heartbeat since the previous one has no point."),
            line_chart([Series("occupancy", occ, PALETTE[2])], chart_id="slots", title="slot occupancy",
                       x_label="step", y_label="fraction", y_min=0.0, y_max=1.0)))
    hist = staleness_histogram(records)
    secs.append(Section("staleness_hist", "Sample staleness distribution",
                        "Samples by staleness (policy versions between a sample's oldest token and the trained "
                        "policy), summed over all steps.",
                        bar_chart(list(hist.items()), chart_id="staleness_hist", title="sample staleness",
                                  x_label="staleness (versions)", y_label="samples", series="samples")))
    secs.append(Section("staleness", "Token staleness over steps", "Mean and max over each batch's trained tokens.",
                        line_chart([Series("mean", step_series(records, lambda r: r.staleness_mean)),
                                    Series("max", step_series(records, lambda r: r.staleness_max))],
                                   chart_id="staleness", title="token staleness", x_label="step",
                                   y_label="versions", y_min=0.0)))
    secs += offpolicy_sections(records)
    rewards = [Series("reward_mean", step_series(records, lambda r: r.reward_mean), PALETTE[0])]
    scored = step_series(records, lambda r: r.scored_reward_mean)
    if scored:  # differs from the batch's reward when dynamic sampling drops all-equal groups
        # often equal to reward_mean: drawn on top, dashed and hollow, so both lines stay visible
        rewards.append(Series("scored_reward_mean", scored, PALETTE[3], dash="5 3"))
    secs.append(Section("reward", "Reward", "Mean reward of each step's batch (`reward_mean`) and of everything "
                        "scored since the previous step, dropped groups included (`scored_reward_mean`, dashed; "
                        "equal to reward_mean when no group is dropped).",
                        line_chart(rewards, chart_id="reward", title="reward mean", x_label="step",
                                   y_label="reward")))
    secs += multi_turn_sections(records)
    for key, label, value in TRAIN_STATS:
        pts = step_series(records, value)
        why = not_computed(key, config)
        if why and all(v == 0 for _, v in pts):  # a flat zero (or no) line says nothing: say why instead
            secs.append(Section(key, label.capitalize(), f"`{key}` per step.", "", note=why))
        elif pts or key in ("loss", "clip_fraction", "grad_norm"):
            partial = why if why and key in ("clip_fraction", "approx_kl") else ""  # see not_computed
            secs.append(Section(key, label.capitalize(), f"`{key}` per step.",
                                line_chart([Series(key, pts)], chart_id=key, title=label, x_label="step",
                                           y_label=label), note=partial))
    secs.append(Section("publish", "Weight publish latency", "publish_s: time for the trainer to publish new weights.",
                        line_chart([Series("publish_s", step_series(records, lambda r: r.publish_s), PALETTE[1])],
                                   chart_id="publish", title="weight publish latency", x_label="step",
                                   y_label="seconds", y_min=0.0)))
    return secs
