"""Supervised examples: the JSONL records `areal-py sft` reads, and the synthetic ones of the embedded default.

A record is either ``{"prompt", "response"}`` (the prompt a string or a list of chat messages ending with the
user's) or ``{"messages"}``: a chat whose last message is the assistant's, which is the target; the messages
before it are the prompt (they must end with the user's). Earlier assistant turns are context, not targets:
one record trains one response. The prompt is rendered as ``areal-py run`` renders prompts
(``areal_py.tasks.prompt_render.render_prompt``), the response's tokens follow it with EOS, and only those
are trained on. Every bad line is reported, file:line, none skipped.

Synthetic examples (:func:`synthetic_examples`) of a task that can say a rewarded response (arith, sum_cot):
for prompt ``i`` the response is ``task.reference_response(i)``, so ``task.reward(prompt, response) = 1``.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from areal_py.tasks.base import ChatMessage, Prompt, Task
from areal_py.tasks.jsonl import read_records, write_records
from areal_py.tasks.prompt_render import messages_text, parse_messages


@dataclass(frozen=True)
class SftExample:
    """One supervised target: `response` after `prompt` (text, or chat `messages` whose contents `prompt` joins)."""

    prompt: str
    response: str
    messages: tuple[ChatMessage, ...] | None = None

    def as_prompt(self, index: int) -> Prompt:
        """The example's prompt as a task prompt (no reference answer), for render_prompt."""
        return Prompt(index=index, text=self.prompt, answer="", messages=self.messages)

    def to_json(self) -> dict:
        if self.messages:
            return {"messages": [{"role": m.role, "content": m.content} for m in self.messages]
                    + [{"role": "assistant", "content": self.response}]}
        return {"prompt": self.prompt, "response": self.response}


def synthetic_examples(task: Task, start: int, n: int) -> list[SftExample]:
    """Examples for prompts ``start .. start + n - 1`` of `task`, the response the rewarded one."""
    if not hasattr(task, "reference_response"):
        raise ValueError(f"task {task.name!r} has no synthetic supervised examples (arith and sum_cot do): "
                         f"give a data file instead")
    if start < 0 or n < 0:
        raise ValueError(f"need start >= 0 and n >= 0, got start={start}, n={n}")
    return [SftExample(task.prompt(i).text, task.reference_response(i)) for i in range(start, start + n)]


def _response(value: object, where: str) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"{where}: the response must be a non-empty string, got {value!r}")
    return value


def parse_example(obj: object, where: str) -> SftExample:
    """One record as an example; ValueError starting with `where` (``path:line``) naming what is wrong."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected a JSON object with prompt and response, or messages")
    if "messages" in obj:
        extra = sorted(set(obj) - {"messages"})
        if extra:
            raise ValueError(f"{where}: {extra[0]!r} next to 'messages' (a chat record has only 'messages')")
        msgs = obj["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2 or not isinstance(msgs[-1], dict) \
                or msgs[-1].get("role") != "assistant":
            raise ValueError(f"{where}: 'messages' must be a list ending with the assistant's message (the target) "
                             "after at least one user message")
        if set(msgs[-1]) != {"role", "content"}:
            raise ValueError(f"{where}: the last message must have exactly \"role\" and \"content\"")
        prompt = parse_messages(msgs[:-1], f"{where}: 'messages'")
        return SftExample(messages_text(prompt), _response(msgs[-1]["content"], f"{where}: last message"), prompt)
    missing = [k for k in ("prompt", "response") if k not in obj]
    if missing:
        raise ValueError(f"{where}: missing key {missing[0]!r} (a supervised record has prompt and response, or "
                         "messages)")
    extra = sorted(set(obj) - {"prompt", "response"})
    if extra:
        raise ValueError(f"{where}: unexpected key {extra[0]!r} (a supervised record has prompt and response)")
    response = _response(obj["response"], f"{where}: 'response'")
    prompt = obj["prompt"]
    if isinstance(prompt, str):
        return SftExample(prompt, response)
    if isinstance(prompt, list):
        messages = parse_messages(prompt, f"{where}: 'prompt'")
        return SftExample(messages_text(messages), response, messages)
    raise ValueError(f"{where}: 'prompt' must be a string or a list of chat messages, got {type(prompt).__name__}")


def read_examples(path: str | Path) -> list[SftExample]:
    """Every example of a JSONL file (blank lines skipped); ValueError listing every bad line, or for none."""
    return read_records(path, parse_example, "supervised examples")


def write_examples(path: str | Path, examples: Iterable[SftExample]) -> Path:
    """One JSON object per line (UTF-8, non-ASCII kept as is)."""
    return write_records(path, examples)
