"""Which part of a response is its final answer: pure text rules, no grading (see math_answer.py).

Order of operations (every form):

1. **The think block is never graded.** Only the text after the last ``</think>`` is kept (a
   chat template may open ``<think>`` in the prompt, so a lone ``</think>`` also ends one). If a
   ``<think>`` is still open in what is kept, the response was cut inside its reasoning: it has
   **no final answer** (no candidates). Tags are case-sensitive, as in ``think_answer_format``.
2. **Candidates** are taken from the rest by the form:

   ============= ============================================================================
   form          candidates
   ============= ============================================================================
   boxed         the content of every ``\\boxed{...}`` (balanced braces, ``\\{`` ``\\}`` are
                 escaped; an unclosed box ends the search); a box holding boxes gives those
   answer_tag    every ``<answer>...</answer>``: its boxes if it holds any, else its whole text
   gsm8k         the rest of the line after every ``####``
   last_number   every number of the last line that holds a number (see NUMBER_RE)
   auto          the first of answer_tag, boxed, gsm8k that has a candidate; with
                 ``strict=False`` then last_number
   ============= ============================================================================

   Whole-text candidates (answer_tag, gsm8k) are stripped of whitespace and one trailing period.

The grader (:func:`areal_py.tasks.math_answer.grade_answer`) decides what the candidates score:
strict, all of them must be right and there must be one; lenient, the last one counts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

AnswerForm = Literal["auto", "boxed", "answer_tag", "gsm8k", "last_number"]
ANSWER_FORMS: tuple[str, ...] = ("auto", "boxed", "answer_tag", "gsm8k", "last_number")
AUTO_ORDER: tuple[str, ...] = ("answer_tag", "boxed", "gsm8k")
"""The structured forms ``auto`` tries, in this order: the R1 answer block first, since it may hold a box."""


@dataclass(frozen=True)
class AnswerExtraction:
    """How a response's final answer is found and graded (``reward.answer`` in the config).

    ``strict``: every candidate must be right and there must be at least one, so a hedge
    (two different answers in the form) or a missing answer scores 0. Lenient: the last
    candidate counts and its own text is searched by math-verify (words around it allowed).
    """

    form: AnswerForm = "auto"
    strict: bool = True

    def __post_init__(self) -> None:
        if self.form not in ANSWER_FORMS:
            raise ValueError(f"answer form {self.form!r} is not one of {', '.join(ANSWER_FORMS)}")


DEFAULT_EXTRACTION = AnswerExtraction()
"""The default of every grader: form auto, strict."""


@dataclass(frozen=True)
class Candidates:
    """The candidate final answers of one response and the form they were found in (None: no form matched)."""

    texts: tuple[str, ...]
    form: str | None


THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_GSM8K_RE = re.compile(r"####[^\S\n]*([^\n]*)")
_BOXED = "\\boxed"
NUMBER_RE = re.compile(r"(?<![\w.])-?(?:[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)(?:\.[0-9]+)?(?:/[0-9]+)?(?![\w])")
"""A plain number: optional sign (not after a word, digit or ``.``, so ``5-3`` is 5 and 3),
thousands commas (``1,000``), decimals, a ``/denominator``; ASCII digits only; not glued to a
following letter or digit (``2nd``, ``x2`` are not numbers)."""


def strip_think(text: str) -> str | None:
    """The text after the last ``</think>``; None when a ``<think>`` is still open in it (no final answer)."""
    _, closed, rest = text.rpartition(THINK_CLOSE)
    kept = rest if closed else text
    return None if THINK_OPEN in kept else kept


MAX_BOX_NESTING = 8
"""Boxes nested deeper than this are taken whole (math-verify then grades the text): bounds the work."""


def boxed_contents(text: str, _depth: int = 0) -> list[str]:
    """The contents of the top-level ``\\boxed{...}`` of ``text``, nested boxes unwrapped to the innermost.

    Braces are matched with ``\\{`` and ``\\}`` skipped; a box never closed (a cut response)
    ends the search. ``\\boxed{\\boxed{41} \\boxed{42}}`` gives ``["41", "42"]``.
    """
    out: list[str] = []
    pos = 0
    while (start := text.find(_BOXED, pos)) >= 0:
        i = start + len(_BOXED)
        while i < len(text) and text[i] in " \t":
            i += 1
        if i >= len(text) or text[i] != "{":
            pos = i
            continue
        end = _closing_brace(text, i)
        if end is None:
            break
        inner = text[i + 1:end]
        nested = boxed_contents(inner, _depth + 1) if _BOXED in inner and _depth < MAX_BOX_NESTING else []
        out.extend(nested or [inner.strip()])
        pos = end + 1
    return out


def _closing_brace(text: str, open_at: int) -> int | None:
    """Index of the ``}`` closing the ``{`` at ``open_at``, skipping backslash escapes; None if unclosed."""
    depth, i = 0, open_at
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def balanced_braces(text: str) -> bool:
    """Whether every unescaped ``{`` of ``text`` is closed by a later ``}`` and no ``}`` is left over."""
    depth, i = 0, 0
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        depth += (ch == "{") - (ch == "}")
        if depth < 0:
            return False
        i += 1
    return depth == 0


def _whole(text: str) -> str:
    """A whole-text candidate: surrounding whitespace and one trailing period removed."""
    text = text.strip()
    return text[:-1].rstrip() if text.endswith(".") else text


def answer_tag_contents(text: str) -> list[str]:
    """Every closed ``<answer>`` block: its boxes if it holds any, else its whole (stripped) text."""
    out: list[str] = []
    for block in _ANSWER_TAG_RE.findall(text):
        out.extend(boxed_contents(block) or [_whole(block)])
    return out


def gsm8k_contents(text: str) -> list[str]:
    """The rest of the line after every ``####`` (stripped)."""
    return [_whole(m) for m in _GSM8K_RE.findall(text)]


def last_line_numbers(text: str) -> list[str]:
    """Every number (NUMBER_RE) of the last line that holds one, in order; [] if no line does."""
    for line in reversed(text.splitlines()):
        numbers = NUMBER_RE.findall(line)
        if numbers:
            return numbers
    return []


def last_number(text: str) -> list[str]:
    """The last number of the whole text (the lenient last_number candidate), or []."""
    numbers = last_line_numbers(text)
    return numbers[-1:]


_FORMS = {"boxed": boxed_contents, "answer_tag": answer_tag_contents, "gsm8k": gsm8k_contents}


def extract_candidates(response: str, spec: AnswerExtraction = DEFAULT_EXTRACTION) -> Candidates:
    """The candidate final answers of ``response`` under ``spec`` (rules in the module docstring).

    Never raises on any text. An empty result means "no final answer", which every grader scores 0.
    """
    text = strip_think(response)
    if text is None:
        return Candidates((), None)
    if spec.form == "last_number":
        found = last_line_numbers(text) if spec.strict else last_number(text)
        return Candidates(tuple(found), "last_number" if found else None)
    forms = AUTO_ORDER if spec.form == "auto" else (spec.form,)
    for form in forms:
        found = _FORMS[form](text)
        if found:
            return Candidates(tuple(found), form)
    if spec.form == "auto" and not spec.strict:
        found = last_number(text)
        return Candidates(tuple(found), "last_number" if found else None)
    return Candidates((), None)
