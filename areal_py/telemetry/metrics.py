"""Metrics shared by every role: Prometheus counters and the per-step JSONL log."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from prometheus_client import Counter, Histogram

REJECTED_MESSAGES = Counter(
    "areal_rejected_messages_total",
    "Messages rejected as malformed, unknown or unexpected, by receiving role and reason.",
    ["role", "reason"],
)

REWARD_TIMEOUTS = Counter("areal_reward_timeouts_total", "Samples whose reward computation ran past its timeout (scored 0).")
REWARD_ERRORS = Counter("areal_reward_errors_total", "Reward functions that raised or returned a value not finite in float32 "
                        "(that term scored 0), or reward workers that died mid-sample (sample scored 0).")

TOOL_CALLS = Counter("areal_tool_calls_total", "Tool calls by tool (\"unknown\" for a name no tool has) and outcome "
                     "(areal_py.tools.result.Reason: ok, output_truncated, error, bad_args, unknown_tool, refused, "
                     "timeout, memory, cpu, crash, busy).", ["tool", "outcome"])
TOOL_DURATION = Histogram("areal_tool_call_duration_seconds", "Wall time of a tool call as its caller saw it "
                          "(queue wait included), by tool.", ["tool"],
                          buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
                                   60.0, float("inf")))
OPENAI_REQUESTS = Counter("areal_openai_requests_total", "Requests to the OpenAI-compatible agent endpoint "
                          "(workflow openai_agent), by endpoint (chat, completions, models, other) and outcome (ok, "
                          "or the error code answered: bad_json, too_large, invalid_api_key, episode_ended, "
                          "model_not_found, history_not_extended, ...).", ["endpoint", "outcome"])
OPENAI_EPISODES = Counter("areal_openai_agent_episodes_total", "Agent episodes (workflow openai_agent) by outcome: "
                          "ok, broken (a call did not continue the trajectory), failed (a generation or the agent "
                          "raised), aborted (a turn refused by its server), empty (no call).", ["outcome"])


def rejected_count(role: str, reason: str | None = None) -> float:
    """Current rejected-message count for a role (all reasons when reason is None)."""
    total = 0.0
    for metric in REJECTED_MESSAGES.collect():
        for s in metric.samples:
            if s.name.endswith("_total") and s.labels.get("role") == role and reason in (None, s.labels.get("reason")):
                total += s.value
    return total


class JsonlWriter:
    """Appends one JSON object per line and flushes, so a crash loses at most the current line."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._f = path.open("a", buffering=1)

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self._f.close()


def truncate_after_step(path: Path, step: int) -> Path | None:
    """Make the step log at `path` hold only its complete records with `"step"` <= `step`: the state of
    a resume from the checkpoint at `step`, so that every step appears once and `wall_time_s` never goes
    back. The rest (rows the crashed run wrote past the checkpoint, which the resumed run writes again,
    a partial last line, a line that does not parse) is appended to `<name>.dropped-<UTC time>` beside
    it, so nothing is lost. The rewrite is atomic (temp + rename). Returns the dropped-rows file, or None
    when nothing had to go (the file is then left untouched)."""
    if not path.exists():
        return None
    keep, drop = [], []
    for line in path.read_text().splitlines(keepends=True):
        try:
            rec = json.loads(line) if line.endswith("\n") else None
        except json.JSONDecodeError:
            rec = None
        ok = isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] <= step
        (keep if ok else drop).append(line)
    if not drop:
        return None
    dropped = path.with_name(f"{path.name}.dropped-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    text = "".join(drop)
    for target, mode, content in ((dropped, "a", text if text.endswith("\n") else text + "\n"),
                                  (tmp, "w", "".join(keep))):
        with target.open(mode) as f:
            f.write(content)
            f.flush()
            os.fsync(f.fileno())
    os.replace(tmp, path)
    return dropped


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:  # a line being written right now
                break
    return out
