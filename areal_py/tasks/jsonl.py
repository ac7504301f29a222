"""`jsonl`: prompts from a JSONL file of {"prompt", "answer"} records, graded by math-verify.

A `prompt` is a string or a list of chat messages (validated at load, errors as file:line).

It has no SFT example: the embedded model cannot be cold-started on it, so it needs model.path.

The JSONL reading (UTF-8, lines numbered as text mode splits them, every bad line reported as ``path:line``) is
shared with the offline data files: ``read_records`` reads the SFT records and preference pairs.
"""

from __future__ import annotations

import dataclasses
import io
import json
import random
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, TypeVar

from pydantic import Field

from areal_py.tasks.base import ChatMessage, Prompt, RunLimits, TaskConfig, TaskRecipe, register_task
from areal_py.tasks.math_answer import grade_answer
from areal_py.tasks.prompt_render import messages_text, parse_messages

T = TypeVar("T")


class MissingKey(ValueError):
    """A JSON object without the prompt or answer key."""


@dataclass(frozen=True)
class BadLine:
    """A non-empty line of a JSONL file that is not a record: its 1-based number, what is wrong
    (`malformed`: not a JSON object or a prompt of the wrong form; `missing_key`), and the message
    (``path:line: why``)."""

    line: int
    kind: Literal["malformed", "missing_key"]
    message: str


def bad_lines_message(path: Path, bad: list[BadLine], good: int, shown: int = 20) -> str:
    """``path: B bad line(s) of N non-empty:`` then each message, one a line (the first `shown`)."""
    listed = [b.message for b in bad[:shown]] + ([f"... and {len(bad) - shown} more"] if len(bad) > shown else [])
    return f"{path}: {len(bad)} bad line(s) of {len(bad) + good} non-empty:\n  " + "\n  ".join(listed)


def numbered_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(number from 1, line) of every non-blank line of the UTF-8 file `path`. Lines are split as text-mode
    reading splits them (universal newlines): a raw U+2028 inside a JSON string, as ``json.dumps(...,
    ensure_ascii=False)`` writes it, ends no line, and the numbers match those of ``_read_utf8``'s errors."""
    for lineno, line in enumerate(io.StringIO(_read_utf8(path), newline=None), start=1):
        if line.strip():
            yield lineno, line


def load_json_line(line: str, where: str) -> object:
    """The JSON value of one line; ``ValueError("where: invalid JSON: why")``."""
    try:
        return json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where}: invalid JSON: {e.msg}") from e


def read_records(path: str | Path, parse: Callable[[object, str], T], what: str) -> list[T]:
    """``parse(value, "path:line")`` of every non-blank line of a JSONL file, in file order.

    Strict: a line that is not JSON or that `parse` refuses (ValueError) is a bad line, and any bad line makes
    the whole file a ValueError listing every one (``bad_lines_message``); so is a file of no records
    (``path: no <what>``). A missing file is FileNotFoundError (``<what> file not found: path``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    out: list[T] = []
    bad: list[BadLine] = []
    for lineno, line in numbered_lines(path):
        where = f"{path}:{lineno}"
        try:
            out.append(parse(load_json_line(line, where), where))
        except ValueError as e:
            bad.append(BadLine(lineno, "malformed", str(e)))
    if bad:
        raise ValueError(bad_lines_message(path, bad, len(out)))
    if not out:
        raise ValueError(f"{path}: no {what}")
    return out


def write_records(path: str | Path, records: Iterable[Any]) -> Path:
    """``record.to_json()`` of each record, one JSON object a line (UTF-8, non-ASCII kept as is, so a raw U+2028
    may stand inside a string: ``numbered_lines`` does not split there); parent directories are made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
    return path


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
    A bad line (not a JSON object, a bad prompt, no prompt or answer key) is never a record: a strict
    task (the default) refuses the file, listing every bad line; a lenient one (`strict=False`, how the
    config builds it, after the launcher has applied task.max_bad_fraction) skips them and keeps them in
    `bad_lines`, so every process that builds the task from one file holds the same records.
    """

    name = "jsonl"

    def __init__(
        self,
        path: str | Path,
        prompt_key: str = "prompt",
        answer_key: str = "answer",
        seed: int = 0,
        strict: bool = True,
    ) -> None:
        self.path = Path(path)
        self.prompt_key = prompt_key
        self.answer_key = answer_key
        self.seed = seed
        self.strict = strict
        self.bad_lines: list[BadLine] = []
        self.line_numbers: list[int] = []  # the file line of each record
        self.records = self._load()
        self._perm_cache: dict[int, list[int]] = {}
        self._lock = threading.Lock()

    def _load(self) -> list[tuple[str, str, tuple[ChatMessage, ...] | None]]:
        """(text, answer, messages) per record; a `prompt` is a string or a list of chat messages."""
        if not self.path.is_file():
            raise FileNotFoundError(f"JSONL task file not found: {self.path}")
        records: list[tuple[str, str, tuple[ChatMessage, ...] | None]] = []
        for lineno, line in numbered_lines(self.path):
            try:
                records.append(self._parse_line(lineno, line))
            except ValueError as e:  # every bad line is kept, not only the first
                self.bad_lines.append(BadLine(lineno, "missing_key" if isinstance(e, MissingKey) else "malformed",
                                              str(e)))
                continue
            self.line_numbers.append(lineno)
        if self.bad_lines and self.strict:
            raise ValueError(bad_lines_message(self.path, self.bad_lines, len(records)))
        if not records:
            raise ValueError(f"{self.path}: no records" + (f"; {bad_lines_message(self.path, self.bad_lines, 0)}"
                                                           if self.bad_lines else ""))
        return records

    def _parse_line(self, lineno: int, line: str) -> tuple[str, str, tuple[ChatMessage, ...] | None]:
        """One non-empty line as a record; ValueError ``path:line: why`` (MissingKey for a missing key)."""
        obj = load_json_line(line, f"{self.path}:{lineno}")
        if not isinstance(obj, dict):
            raise ValueError(f"{self.path}:{lineno}: expected a JSON object")
        for key in (self.prompt_key, self.answer_key):
            if key not in obj:
                raise MissingKey(f"{self.path}:{lineno}: missing key {key!r}")
        value = obj[self.prompt_key]
        if isinstance(value, str):
            return (value, str(obj[self.answer_key]), None)
        if isinstance(value, list):
            messages = parse_messages(value, f"{self.path}:{lineno}: {self.prompt_key!r}")
            return (messages_text(messages), str(obj[self.answer_key]), messages)
        raise ValueError(f"{self.path}:{lineno}: {self.prompt_key!r} must be a string or a list of chat "
                         f"messages ({{\"role\", \"content\"}}), got {type(value).__name__}")

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
        return dataclasses.replace(self.record(self._permutation(epoch)[offset]), index=index)

    def record(self, i: int) -> Prompt:
        """The `i`-th record in file order (from line `line_numbers[i]`), as a prompt with index `i`."""
        text, answer, messages = self.records[i]
        return Prompt(index=i, text=text, answer=answer, messages=messages)

    def reward(self, prompt: Prompt, response_text: str, stopped: bool) -> float:
        # `stopped` is not required: a truncated response that already contains the answer
        # is still graded. The final answer is extracted strictly, the think block never graded
        # (areal_py.tasks.answer_extraction): the same grading as math_accuracy's default.
        return grade_answer(prompt.answer, response_text)


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
    return JsonlTask(config.path, prompt_key=config.prompt_key, answer_key=config.answer_key, seed=seed, strict=False)


def recipe(task: JsonlTask) -> TaskRecipe:
    if not isinstance(task, JsonlTask):
        raise TypeError(f"cannot describe task {type(task).__name__} as a jsonl config")
    return TaskRecipe(JsonlConfig(path=str(task.path), prompt_key=task.prompt_key, answer_key=task.answer_key),
                      task.seed)


register_task(JsonlConfig, build, recipe)
