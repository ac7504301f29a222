"""What a run's data will do on its model, counted before anything starts: the report and its verdict.

Pure: it takes prompts already rendered to token ids (by `areal_py.tasks.prompt_render.render_prompt`,
the controller's own function) and the lines the task could not load, and counts. `areal_py.app.check`
does the loading; `areal-py check` prints the report and `areal-py run` refuses on its verdict.

The rules:

- a prompt is **too long** when it leaves no room for a full response, ``tokens + rollout.max_new_tokens
  > context`` (`fits_full_response`); of those, the ones with no room for a single token (``tokens >=
  context``, `fits_context`, the engine's and the controller's rule) are skipped by the controller, the
  others run with their responses cut short;
- **bad** = malformed lines + lines without the prompt or answer key + prompts that cannot be rendered,
  have an empty answer, or are too long (each prompt counted once, under the first of these that applies);
  **usable** = the rest;
- the run is **refused** when nothing is usable, or when bad / (usable + bad) > task.max_bad_fraction;
- duplicates (a prompt whose token ids equal an earlier one's) and unknown tokens (the tokenizer's
  ``unk`` id) are reported, not counted as bad: they still train, if less well.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from areal_py.model_dir import fits_context, fits_full_response

SHOWN = 10
"""Examples listed per finding in the report (every count is complete)."""


@dataclass(frozen=True)
class RenderedPrompt:
    """One prompt as the check sees it: where it came from (``file:line`` or ``prompt i``), its answer,
    and its token ids, or why it could not be rendered (`ids` None)."""

    where: str
    answer: str
    ids: tuple[int, ...] | None
    error: str = ""


@dataclass(frozen=True)
class DataReport:
    """The counts of one check; every list holds ``where: detail`` strings, complete (not capped)."""

    source: str  # the data file, or the task and how many of its positions were looked at
    context: int | None  # model context (max_position_embeddings); None: the model does not say
    max_new_tokens: int  # rollout.max_new_tokens
    max_bad_fraction: float  # task.max_bad_fraction
    prompts: int  # rendered or not, every prompt the task loaded
    malformed: tuple[str, ...] = ()
    missing_keys: tuple[str, ...] = ()  # lines without the prompt or answer key
    unrenderable: tuple[str, ...] = ()
    empty_answers: tuple[str, ...] = ()
    no_room: tuple[str, ...] = ()  # tokens >= context: skipped by the controller
    cut_short: tuple[str, ...] = ()  # fit the context, not a full response
    duplicates: tuple[str, ...] = ()
    unknown_tokens: int = 0
    prompt_tokens: int = 0
    prompts_with_unknown: tuple[str, ...] = ()
    token_range: tuple[int, int] | None = None  # shortest and longest rendered prompt
    notes: tuple[str, ...] = field(default=())  # facts about how the check ran (e.g. which tokenizer)

    @property
    def too_long(self) -> int:
        return len(self.no_room) + len(self.cut_short)

    @property
    def bad(self) -> int:
        return (len(self.malformed) + len(self.missing_keys) + len(self.unrenderable) + len(self.empty_answers)
                + self.too_long)

    @property
    def total(self) -> int:
        """Prompts plus the lines that never became one."""
        return self.prompts + len(self.malformed) + len(self.missing_keys)

    @property
    def usable(self) -> int:
        return self.total - self.bad

    @property
    def bad_fraction(self) -> float:
        return self.bad / self.total if self.total else 1.0

    @property
    def unknown_rate(self) -> float:
        return self.unknown_tokens / self.prompt_tokens if self.prompt_tokens else 0.0

    @property
    def max_prompt_tokens(self) -> int | None:
        """The longest prompt that leaves room for a full response."""
        return None if self.context is None else self.context - self.max_new_tokens

    @property
    def refused(self) -> bool:
        return self.usable == 0 or self.bad_fraction > self.max_bad_fraction


def build_report(source: str, prompts: Sequence[RenderedPrompt], *, context: int | None, max_new_tokens: int,
                 max_bad_fraction: float, malformed: Sequence[str] = (), missing_keys: Sequence[str] = (),
                 unk_id: int | None = None, notes: Sequence[str] = ()) -> DataReport:
    """Count `prompts` (and the lines that never became prompts) by the module's rules."""
    unrenderable, empty, no_room, cut_short, dups, with_unk = [], [], [], [], [], []
    first: dict[tuple[int, ...], str] = {}
    unknown = total_tokens = 0
    lengths: list[int] = []
    for p in prompts:
        if p.ids is None:
            unrenderable.append(f"{p.where}: {p.error}")
            continue
        n = len(p.ids)
        lengths.append(n)
        total_tokens += n
        if not p.answer.strip():
            empty.append(f"{p.where}: empty answer")
        elif not fits_context(n, context):
            no_room.append(f"{p.where}: {n} tokens")
        elif not fits_full_response(n, context, max_new_tokens):
            cut_short.append(f"{p.where}: {n} tokens")
        if unk_id is not None:
            k = sum(1 for t in p.ids if t == unk_id)
            if k:
                unknown += k
                with_unk.append(f"{p.where}: {k} unknown")
        earlier = first.setdefault(p.ids, p.where)
        if earlier != p.where:
            dups.append(f"{p.where}: same as {earlier}")
    return DataReport(source=source, context=context, max_new_tokens=max_new_tokens, max_bad_fraction=max_bad_fraction,
                      prompts=len(prompts), malformed=tuple(malformed), missing_keys=tuple(missing_keys),
                      unrenderable=tuple(unrenderable), empty_answers=tuple(empty), no_room=tuple(no_room), cut_short=tuple(cut_short),
                      duplicates=tuple(dups), unknown_tokens=unknown, prompt_tokens=total_tokens,
                      prompts_with_unknown=tuple(with_unk),
                      token_range=(min(lengths), max(lengths)) if lengths else None, notes=tuple(notes))


def _examples(items: Sequence[str]) -> str:
    shown = "; ".join(items[:SHOWN])
    return shown + (f"; ... and {len(items) - SHOWN} more" if len(items) > SHOWN else "")


def _pct(k: int, n: int) -> str:
    return f"{k} ({100 * k / n:.1f}%)" if n else str(k)


def format_report(r: DataReport) -> str:
    """The report as a plain table (count, then what it means), then the examples of each finding."""
    ctx = "unknown" if r.context is None else str(r.context)
    room = "any length" if r.max_prompt_tokens is None else f"<= {r.max_prompt_tokens} tokens"
    rows = [
        ("prompts and lines", str(r.total), r.source),
        ("malformed lines", _pct(len(r.malformed), r.total), "not a JSON object, or a prompt of the wrong form"),
        ("missing prompt/answer", _pct(len(r.missing_keys), r.total), "no prompt or answer key"),
        ("empty answer", _pct(len(r.empty_answers), r.total), "nothing to grade against"),
        ("cannot be rendered", _pct(len(r.unrenderable), r.total), "task.chat_template / task.system_prompt"),
        ("too long", _pct(r.too_long, r.total), (f"context {ctx} - rollout.max_new_tokens "
         f"{r.max_new_tokens}: a prompt needs {room}")),
        ("  no room at all", str(len(r.no_room)), "skipped by the controller (no room for one token)"),
        ("  responses cut short", str(len(r.cut_short)), "run, with less than max_new_tokens to answer in"),
        ("duplicates", _pct(len(r.duplicates), r.total), "same token ids as an earlier prompt (kept)"),
        ("unknown tokens", f"{r.unknown_tokens} of {r.prompt_tokens} ({100 * r.unknown_rate:.2f}%)",
         f"in {len(r.prompts_with_unknown)} prompt(s) (kept)"),
        ("prompt length", "-" if r.token_range is None else f"{r.token_range[0]}..{r.token_range[1]}", "tokens"),
        ("usable", _pct(r.usable, r.total), (f"bad share {100 * r.bad_fraction:.1f}%, "
         f"task.max_bad_fraction={r.max_bad_fraction:g}")),
    ]
    w0, w1 = max(len(a) for a, _, _ in rows), max(len(b) for _, b, _ in rows)
    lines = [f"{a:<{w0}}  {b:>{w1}}  {c}" for a, b, c in rows]
    for title, items in (("malformed", r.malformed), ("missing", r.missing_keys), ("cannot be rendered", r.unrenderable),
                         ("empty answer", r.empty_answers),
                         ("no room", r.no_room), ("cut short", r.cut_short), ("duplicates", r.duplicates),
                         ("unknown tokens", r.prompts_with_unknown)):
        if items:
            lines.append(f"{title}: {_examples(items)}")
    lines += [f"note: {n}" for n in r.notes]
    verdict = refusal(r)
    lines.append(f"verdict: refused: {verdict}" if verdict else f"verdict: the run may start; {skip_summary(r)}")
    return "\n".join(lines)


def skip_summary(r: DataReport) -> str:
    """What a run that starts on this data leaves out or cuts short, in one line."""
    parts = []
    if r.malformed or r.missing_keys:
        where = [m.split(": ", 1)[0] for m in (*r.malformed, *r.missing_keys)]
        parts.append(f"{len(where)} bad line(s) are never prompted ({', '.join(where[:3])}"
                     f"{', ...' if len(where) > 3 else ''})")
    if r.empty_answers:
        parts.append(f"{len(r.empty_answers)} prompt(s) with an empty answer score 0")
    if r.unrenderable:
        parts.append(f"{len(r.unrenderable)} prompt(s) cannot be rendered")
    if r.no_room:
        parts.append(f"{len(r.no_room)} prompt(s) too long for the context are skipped by the controller")
    if r.cut_short:
        parts.append(f"{len(r.cut_short)} prompt(s) get less than rollout.max_new_tokens={r.max_new_tokens} to answer in")
    return "; ".join(parts) if parts else "nothing is skipped"


def refusal(r: DataReport) -> str | None:
    """Why a run on this data must not start and what to change, or None when it may start."""
    if not r.refused:
        return None
    head = (f"no usable prompt in {r.total}" if r.usable == 0 else
            f"{r.bad} of {r.total} lines/prompts ({100 * r.bad_fraction:.1f}%) are unusable, more than "
            f"task.max_bad_fraction={r.max_bad_fraction:g}")
    fixes = []
    bad_lines = [*r.malformed, *r.missing_keys, *r.empty_answers]
    if bad_lines:
        fixes.append(f"fix or remove the {len(bad_lines)} bad line(s) ({_examples(bad_lines[:3])}"
                     f"{', ...' if len(bad_lines) > 3 else ''})")
    if r.unrenderable:
        fixes.append(f"{len(r.unrenderable)} prompt(s) cannot be rendered ({r.unrenderable[0]})")
    if r.too_long:
        longest = r.token_range[1] if r.token_range else 0
        fixes.append(f"{r.too_long} prompt(s) leave no room for a full response (up to {longest} tokens; the model's "
                     f"context is {r.context} and rollout.max_new_tokens={r.max_new_tokens}, so at most "
                     f"{r.max_prompt_tokens} fit): shorten them, lower rollout.max_new_tokens, or use a model "
                     f"with a longer context (model.path)")
    if r.usable:
        fixes.append(f"or raise task.max_bad_fraction to at least {r.bad_fraction:.3g} to train on the "
                     f"{r.usable} usable prompt(s)")
    return f"{head}: " + "; ".join(fixes)
