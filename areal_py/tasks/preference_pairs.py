"""Preference pairs: the ``{"prompt", "chosen", "rejected"}`` JSONL records that DPO and reward-model training
read, and the synthetic pairs of the embedded default's tasks.

A record's ``prompt`` is a string or a list of chat messages (the same rule as the jsonl task's prompts,
rendered by ``areal_py.tasks.prompt_render.render_prompt``); ``chosen`` and ``rejected`` are the response
texts after it (EOS is appended when tokenised). A pair whose chosen and rejected responses are equal
states no preference and is a bad line. Every bad line is reported, file:line, none skipped.

Synthetic pairs (:func:`synthetic_pairs`) come from a :class:`PreferenceTask` (arith, sum_cot): for prompt
``i`` the chosen response is the rewarded one and the rejected one a wrong answer, so
``task.reward(prompt, chosen) = 1`` and ``task.reward(prompt, rejected) = 0`` for every pair.

Write a file of them: ``python -m areal_py.tasks.preference_pairs OUT.jsonl --task arith --n 2000``.
"""
from __future__ import annotations

import argparse
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from areal_py.tasks.base import ChatMessage, Prompt, Task
from areal_py.tasks.jsonl import read_records, write_records
from areal_py.tasks.prompt_render import messages_text, parse_messages

KEYS = ("prompt", "chosen", "rejected")


@dataclass(frozen=True)
class PreferencePair:
    """One preference: for `prompt` (text, or chat `messages` whose contents `prompt` joins), `chosen` ≻ `rejected`."""

    prompt: str
    chosen: str
    rejected: str
    messages: tuple[ChatMessage, ...] | None = None

    def as_prompt(self, index: int) -> Prompt:
        """The pair's prompt as a task prompt (no reference answer), for render_prompt."""
        return Prompt(index=index, text=self.prompt, answer="", messages=self.messages)

    def to_json(self) -> dict:
        prompt = ([{"role": m.role, "content": m.content} for m in self.messages] if self.messages
                  else self.prompt)
        return {"prompt": prompt, "chosen": self.chosen, "rejected": self.rejected}


@runtime_checkable
class PreferenceTask(Task, Protocol):
    """A synthetic task that can say, for each prompt, a rewarded response and a wrong one."""

    def reference_response(self, index: int) -> str:
        """The response that `reward` scores 1 (followed by EOS)."""
        ...

    def wrong_response(self, index: int, rng: random.Random) -> str:
        """A plausible response that `reward` scores 0, drawn with `rng`."""
        ...


def synthetic_pairs(task: Task, start: int, n: int, seed: int = 0) -> list[PreferencePair]:
    """Pairs for prompts ``start .. start + n - 1`` of `task`: chosen = the reference response, rejected = a
    wrong one (drawn from ``random.Random(f"pairs:{seed}:{index}")``, so a pair depends only on its index)."""
    if not isinstance(task, PreferenceTask):
        raise ValueError(f"task {task.name!r} has no synthetic preference pairs (arith and sum_cot do): "
                         f"give a pairs file instead")
    if start < 0 or n < 0:
        raise ValueError(f"need start >= 0 and n >= 0, got start={start}, n={n}")
    pairs = []
    for i in range(start, start + n):
        rng = random.Random(f"pairs:{seed}:{i}")
        pairs.append(PreferencePair(task.prompt(i).text, task.reference_response(i), task.wrong_response(i, rng)))
    return pairs


def parse_pair(obj: object, where: str) -> PreferencePair:
    """One record as a pair; ValueError starting with `where` (``path:line``) naming what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object with {', '.join(KEYS)}")
    missing = [k for k in KEYS if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing key {missing[0]!r} (a preference pair has {', '.join(KEYS)})")
    for key in ("chosen", "rejected"):
        if not isinstance(obj[key], str) or not obj[key]:
            raise ValueError(f"{where}: {key!r} must be a non-empty string, got {obj[key]!r}")
    if obj["chosen"] == obj["rejected"]:
        raise ValueError(f"{where}: 'chosen' and 'rejected' are the same response: the pair states no preference")
    prompt = obj["prompt"]
    if isinstance(prompt, str):
        return PreferencePair(prompt, obj["chosen"], obj["rejected"])
    if isinstance(prompt, list):
        messages = parse_messages(prompt, f"{where}: 'prompt'")
        return PreferencePair(messages_text(messages), obj["chosen"], obj["rejected"], messages)
    raise ValueError(f"{where}: 'prompt' must be a string or a list of chat messages, got {type(prompt).__name__}")


def read_pairs(path: str | Path) -> list[PreferencePair]:
    """Every pair of a JSONL file (blank lines skipped); ValueError listing every bad line, or for no pairs."""
    return read_records(path, parse_pair, "preference pairs")


def write_pairs(path: str | Path, pairs: Iterable[PreferencePair]) -> Path:
    """One JSON object per line (UTF-8, non-ASCII kept as is)."""
    return write_records(path, pairs)


def main(argv: Sequence[str] | None = None) -> int:
    from areal_py.tasks.base import build_task, parse_task_config

    ap = argparse.ArgumentParser(prog="python -m areal_py.tasks.preference_pairs",
                                 description="Write synthetic preference pairs of a task as JSONL.")
    ap.add_argument("out", help="output JSONL file")
    ap.add_argument("--task", default="arith", help="arith or sum_cot (default arith)")
    ap.add_argument("--n", type=int, default=2000, help="pairs (default 2000)")
    ap.add_argument("--start", type=int, default=0, help="first prompt index (default 0)")
    ap.add_argument("--seed", type=int, default=0, help="the task's seed and the wrong answers' (default 0)")
    ns = ap.parse_args(argv)
    task = build_task(parse_task_config({"name": ns.task}), ns.seed)
    out = write_pairs(ns.out, synthetic_pairs(task, ns.start, ns.n, ns.seed))
    print(f"{ns.n} pairs of task {ns.task} (prompts {ns.start}..{ns.start + ns.n - 1}) written to {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
