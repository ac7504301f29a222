"""Tasks: a deterministic prompt stream plus a reward function.

`Task.prompt(i)` is a pure function of the integer `i`, so the whole data position of a run
is one integer and resuming from a checkpoint replays exactly the same prompts.
"""

from __future__ import annotations

import io
import json
import random
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import math_verify

# math-verify enforces its timeouts with signal.alarm, which only works on the main thread
# (elsewhere it raises). Rewards may be computed in worker threads, so there we pass None,
# which disables the alarm; a pathological expression could then take long, which is the
# price of threading. On the main thread the usual signal timeout is kept.
MATH_VERIFY_TIMEOUT_SECONDS = 5


@dataclass(frozen=True)
class Prompt:
    index: int
    text: str
    answer: str


@runtime_checkable
class Task(Protocol):
    name: str

    def prompt(self, index: int) -> Prompt:
        """The prompt at position `index` (deterministic in `index`)."""
        ...

    def reward(self, prompt: Prompt, response_text: str, stopped: bool) -> float:
        """Score a response; `stopped` says it ended with EOS (excluded from the text)."""
        ...


@runtime_checkable
class SftTask(Task, Protocol):
    """A synthetic task that can also teach its format: the embedded model's cold start needs one."""

    def sft_example(self, rng: random.Random, label_noise: float) -> tuple[str, str]:
        """A (prompt text, target response) pair; a `label_noise` fraction of targets is wrong."""
        ...


class ArithTask:
    """"a+b=" with operands in [min_operand, max_operand]; reward is exact match plus EOS."""

    name = "arith"

    def __init__(self, min_operand: int = 0, max_operand: int = 9, seed: int = 0) -> None:
        if min_operand < 0 or max_operand < min_operand:
            raise ValueError(
                f"need 0 <= min_operand <= max_operand, got {min_operand}..{max_operand}"
            )
        self.min_operand = min_operand
        self.max_operand = max_operand
        self.seed = seed

    def operands(self, index: int) -> tuple[int, int]:
        # A string seed is hashed deterministically (unlike tuple hash, stable across runs).
        rng = random.Random(f"arith:{self.seed}:{index}")
        return (
            rng.randint(self.min_operand, self.max_operand),
            rng.randint(self.min_operand, self.max_operand),
        )

    def prompt(self, index: int) -> Prompt:
        a, b = self.operands(index)
        return Prompt(index=index, text=f"{a}+{b}=", answer=str(a + b))

    def reward(self, prompt: Prompt, response_text: str, stopped: bool) -> float:
        return 1.0 if stopped and response_text == prompt.answer else 0.0

    def sft_example(self, rng: random.Random, label_noise: float) -> tuple[str, str]:
        """Any index works: the task is synthetic, so SFT and RL prompts share a distribution.

        With prob. `label_noise` the answer is wrong: half the time off by 1..9 (kept >= 0),
        otherwise uniform over the possible sums.
        """
        p = self.prompt(rng.randrange(1 << 31))
        answer = int(p.answer)
        if rng.random() < label_noise:
            if rng.random() < 0.5:
                delta = rng.randint(1, 9)
                down = answer - delta
                answer = down if rng.random() < 0.5 and down >= 0 else answer + delta
            else:
                answer = rng.randint(2 * self.min_operand, 2 * self.max_operand)
        return p.text, str(answer)


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

    def _load(self) -> list[tuple[str, str]]:
        if not self.path.is_file():
            raise FileNotFoundError(f"JSONL task file not found: {self.path}")
        records: list[tuple[str, str]] = []
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
            records.append((str(obj[self.prompt_key]), str(obj[self.answer_key])))
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
        text, answer = self.records[self._permutation(epoch)[offset]]
        return Prompt(index=index, text=text, answer=answer)

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


def _timeout() -> int | None:
    on_main = threading.current_thread() is threading.main_thread()
    return MATH_VERIFY_TIMEOUT_SECONDS if on_main else None


def math_reward(gold: str, response_text: str) -> float:
    """1.0 if math-verify finds the response equivalent to `gold`; any failure gives 0.0."""
    try:
        timeout = _timeout()
        gold_parsed = math_verify.parse(gold, parsing_timeout=timeout)
        if not gold_parsed:
            # Plain-text gold that math-verify cannot parse: fall back to exact match.
            return 1.0 if response_text.strip() == gold.strip() else 0.0
        pred_parsed = math_verify.parse(response_text, parsing_timeout=timeout)
        if not pred_parsed:
            return 0.0
        return 1.0 if math_verify.verify(gold_parsed, pred_parsed, timeout_seconds=timeout) else 0.0
    except Exception:  # noqa: BLE001 - a verifier failure must never crash a rollout
        return 0.0


def _task_classes() -> dict[str, type]:
    # sum_cot imports Prompt from this module, so it is resolved late.
    from areal_py.tasks.sum_cot import SumCotTask

    return {"arith": ArithTask, "jsonl": JsonlTask, "sum_cot": SumCotTask}


def make_task(name: str, **kwargs: Any) -> Task:
    """Instantiate a task by name ("arith", "sum_cot" or "jsonl")."""
    classes = _task_classes()
    try:
        cls = classes[name]
    except KeyError:
        raise ValueError(f"unknown task {name!r}; allowed: {sorted(classes)}") from None
    return cls(**kwargs)
