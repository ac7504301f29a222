"""`jsonl`: prompts from a JSONL file of {"prompt", "answer"} records, graded by math-verify.

A `prompt` is a string or a list of chat messages (validated at load, errors as file:line).

It has no SFT example: the embedded model cannot be cold-started on it, so it needs model.path.
"""

from __future__ import annotations

import io
import json
import random
import threading
from pathlib import Path
from typing import Literal

from pydantic import Field

from areal_py.tasks.base import ChatMessage, Prompt, RunLimits, TaskConfig, TaskRecipe, register_task
from areal_py.tasks.math_answer import math_reward
from areal_py.tasks.prompt_render import messages_text, parse_messages


class JsonlConfig(TaskConfig):
    name: Literal["jsonl"] = Field("jsonl", description="jsonl: prompt file + math-verify reward.")
    path: str = Field("", description="jsonl: file with one {\"prompt\": ..., \"answer\": ...} object per line.")
    prompt_key: str = Field("prompt", description="jsonl: key of the prompt: a string, or a list of chat messages "
                            "[{\"role\": system|user|assistant, \"content\": ...}] ending with the user's "
                            "(rendered by the chat template, see task.chat_template).")
    answer_key: str = Field("answer", description="jsonl: key of the reference answer.")

    def check(self, limits: RunLimits) -> None:
        if not self.path:
            raise ValueError("task.path is required when task.name=jsonl")
        if not limits.model_path:
            raise ValueError("task.name=jsonl needs model.path: the embedded model is cold-started only on the "
                             "synthetic tasks (arith, sum_cot)")


class JsonlTask:
    """Prompts from a JSONL file of {"prompt", "answer"} records, graded by math-verify.

    Positions cycle through epochs; each epoch is a fresh permutation seeded by (seed, epoch).
    """

    name = "jsonl"

    def __init__(
        self,
        path: str | Path,
        prompt_key: str = "prompt",
        answer_key: str = "answer",
        seed: int = 0,
    ) -> None:
        self.path = Path(path)
        self.prompt_key = prompt_key
        self.answer_key = answer_key
        self.seed = seed
        self.records = self._load()
        self._perm_cache: dict[int, list[int]] = {}
        self._lock = threading.Lock()

    def _load(self) -> list[tuple[str, str, tuple[ChatMessage, ...] | None]]:
        """(text, answer, messages) per record; a `prompt` is a string or a list of chat messages."""
        if not self.path.is_file():
            raise FileNotFoundError(f"JSONL task file not found: {self.path}")
        records: list[tuple[str, str, tuple[ChatMessage, ...] | None]] = []
        for lineno, line in enumerate(io.StringIO(_read_utf8(self.path), newline=None), start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{self.path}:{lineno}: invalid JSON: {e.msg}") from e
            if not isinstance(obj, dict):
                raise ValueError(f"{self.path}:{lineno}: expected a JSON object")
            for key in (self.prompt_key, self.answer_key):
                if key not in obj:
                    raise ValueError(f"{self.path}:{lineno}: missing key {key!r}")
            value = obj[self.prompt_key]
            if isinstance(value, str):
                records.append((value, str(obj[self.answer_key]), None))
            elif isinstance(value, list):
                messages = parse_messages(value, f"{self.path}:{lineno}: {self.prompt_key!r}")
                records.append((messages_text(messages), str(obj[self.answer_key]), messages))
            else:
                raise ValueError(f"{self.path}:{lineno}: {self.prompt_key!r} must be a string or a list of chat "
                                 f"messages ({{\"role\", \"content\"}}), got {type(value).__name__}")
        if not records:
            raise ValueError(f"{self.path}: no records")
        return records

    def __len__(self) -> int:
        return len(self.records)

    def _permutation(self, epoch: int) -> list[int]:
        with self._lock:
            perm = self._perm_cache.get(epoch)
            if perm is None:
                perm = list(range(len(self.records)))
                random.Random(f"jsonl:{self.seed}:{epoch}").shuffle(perm)
                if len(self._perm_cache) > 4:  # positions move forward; keep a few epochs
                    self._perm_cache.pop(min(self._perm_cache))
                self._perm_cache[epoch] = perm
            return perm

    def prompt(self, index: int) -> Prompt:
        if index < 0:
            raise IndexError(f"prompt index must be >= 0, got {index}")
        epoch, offset = divmod(index, len(self.records))
        text, answer, messages = self.records[self._permutation(epoch)[offset]]
        return Prompt(index=index, text=text, answer=answer, messages=messages)

    def reward(self, prompt: Prompt, response_text: str, stopped: bool) -> float:
        # `stopped` is not required: a truncated response that already contains the answer
        # is still graded (the answer extraction decides).
        return math_reward(prompt.answer, response_text)


def _read_utf8(path: Path) -> str:
    """The file's text, or ``ValueError("path:line: not valid UTF-8 (byte 0x.. at column c)")``.

    Lines and columns (1-based, in characters) are counted as text-mode reading splits lines
    (universal newlines), so they match the line numbers of the JSON errors.
    """
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        lines = io.StringIO(data[: e.start].decode("utf-8"), newline=None).read().split("\n")
        raise ValueError(f"{path}:{len(lines)}: not valid UTF-8 "
                         f"(byte 0x{data[e.start]:02x} at column {len(lines[-1]) + 1})") from e


def build(config: JsonlConfig, seed: int) -> JsonlTask:
    return JsonlTask(config.path, prompt_key=config.prompt_key, answer_key=config.answer_key, seed=seed)


def recipe(task: JsonlTask) -> TaskRecipe:
    if not isinstance(task, JsonlTask):
        raise TypeError(f"cannot describe task {type(task).__name__} as a jsonl config")
    return TaskRecipe(JsonlConfig(path=str(task.path), prompt_key=task.prompt_key, answer_key=task.answer_key),
                      task.seed)


register_task(JsonlConfig, build, recipe)
