"""`areal-py check [config.yaml] [key.sub=value ...]`, and the same check at the start of `areal-py run`.

It loads what the controller will load (the task, every line of a JSONL file, and the tokenizer of
`model.path` or of the embedded model), renders every prompt with the controller's own function
(`areal_py.tasks.prompt_render.render_prompt`, same settings), and counts what the run would skip
(`areal_py.app.data_check` holds the rules and the verdict). A finite task (a JSONL file) is checked
line by line; an endless synthetic task on its first `SYNTHETIC_SAMPLE` positions.

Exit codes of `areal-py check`: 0 the run may start, 1 the run would be refused (the report says what
to change), 2 the config, the data file or the model directory cannot be loaded at all.
"""
from __future__ import annotations

import sys
from typing import Any

from areal_py.app.data_check import DataReport, RenderedPrompt, build_report, format_report, refusal, skip_summary
from areal_py.config import Config, ConfigError, load_config
from areal_py.tasks.base import Task, build_task

SYNTHETIC_SAMPLE = 512
"""Positions of an endless (synthetic) task that the check renders."""


class DataRefused(ConfigError):
    """The data leaves nothing usable, or more unusable than task.max_bad_fraction allows."""


def load_task(cfg: Config) -> Task:
    """The configured task, or a ConfigError naming the key and, for a JSONL file, the file and line.

    Building it parses a JSONL file completely, so a missing or unreadable file is found here, before
    any process starts; bad lines are skipped and kept in `task.bad_lines`, which the data check
    (`areal_py.app.check`) counts against task.max_bad_fraction.
    """
    try:
        return build_task(cfg)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{'task.path' if cfg.task.name == 'jsonl' else 'task'}: {e}") from None


def refuse_bad_lines(cfg: Config, task: Task) -> None:
    """DataRefused when a data file's bad lines alone put the run past task.max_bad_fraction, listing every
    one with its number: found before any model or tokenizer is loaded."""
    bad = list(getattr(task, "bad_lines", []))
    total = len(bad) + (len(task) if hasattr(task, "__len__") else 0)
    if bad and len(bad) / total > cfg.task.max_bad_fraction:
        from areal_py.tasks.jsonl import bad_lines_message

        raise DataRefused(f"task.path: {bad_lines_message(getattr(task, 'path', cfg.task.name), bad, total - len(bad))}"
                          f"\n  refusing to start: {len(bad)} of {total} lines are bad, more than task.max_bad_fraction="
                          f"{cfg.task.max_bad_fraction:g}: fix or remove them, or raise task.max_bad_fraction to at least "
                          f"{len(bad) / total:.3g} to skip them")


def check_tokenizer(cfg: Config) -> tuple[Any, str]:
    """The tokenizer the controller will load, and a note on where it came from.

    `model.path`'s tokenizer (a directory that is not a Hugging Face model is a ConfigError naming
    model.path); for the embedded model, the built one's, or, before the cold start has built it, the
    same character tokenizer built from the model's charset (no weights needed to tokenize)."""
    from areal_py.model_dir import ModelNotPrepared, embedded_model_request, model_path
    from areal_py.models import build_char_tokenizer, load_tokenizer

    try:
        path = model_path(cfg)
    except ModelNotPrepared:
        charset = embedded_model_request(cfg).spec.charset
        return build_char_tokenizer(charset), "tokenizer: the embedded character tokenizer (model not built yet)"
    except FileNotFoundError as e:
        raise ConfigError(f"model.path: {e}; set model.path to a Hugging Face model directory "
                          "(config.json, tokenizer files, weights)") from None
    try:
        return load_tokenizer(path), f"tokenizer: {path}"
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path={cfg.model.path or path}: cannot load its tokenizer: {e}") from None


def _context(cfg: Config) -> int | None:
    from areal_py.model_dir import context_length

    try:
        return context_length(cfg)
    except (OSError, ValueError) as e:
        raise ConfigError(f"model.path={cfg.model.path}: cannot read its config.json: {e}") from None


def check_config(cfg: Config, task: Task | None = None, tokenizer: Any = None) -> DataReport:
    """The data report of `cfg` (a ConfigError when the task or model cannot be loaded at all); `task` and
    `tokenizer` default to what the roles will load (the task as `load_task` builds it: a JSONL
    file's bad lines skipped and kept in `task.bad_lines`)."""
    from areal_py.tasks.prompt_render import render_prompt, uses_chat_template

    task = task if task is not None else load_task(cfg)
    notes = []
    if tokenizer is None:
        tokenizer, note = check_tokenizer(cfg)
        notes.append(note)
    t = cfg.task
    malformed = [b.message for b in getattr(task, "bad_lines", []) if b.kind == "malformed"]
    missing = [b.message for b in getattr(task, "bad_lines", []) if b.kind == "missing_key"]
    if hasattr(task, "record") and hasattr(task, "line_numbers"):  # a file: every record, by line
        items = [(f"{task.path}:{task.line_numbers[i]}", task.record(i)) for i in range(len(task))]
        source = str(task.path)
    else:
        n = len(task) if hasattr(task, "__len__") else SYNTHETIC_SAMPLE
        items = [(f"prompt {i}", task.prompt(i)) for i in range(n)]
        source = f"task {task.name}" + ("" if hasattr(task, "__len__") else f", its first {n} prompts")
    try:
        how = "with the tokenizer's chat template" if uses_chat_template(tokenizer, t.chat_template) else "as plain text"
        notes.append(f"prompts rendered {how} (task.chat_template={t.chat_template})")
    except ValueError:
        pass  # every prompt then fails to render, with this reason: counted below
    rendered = []
    for where, prompt in items:
        try:
            ids = tuple(render_prompt(tokenizer, prompt, t.chat_template, t.system_prompt))
            rendered.append(RenderedPrompt(where, prompt.answer, ids))
        except ValueError as e:
            rendered.append(RenderedPrompt(where, prompt.answer, None, str(e)))
    from areal_py.tokenizer_checks import unknown_token_report

    unknown = unknown_token_report(tokenizer, [p.text for _, p in items])
    if unknown.unknown_tokens:  # which characters the tokenizer cannot spell
        notes.append(unknown.message())
    return build_report(source, rendered, context=_context(cfg), max_new_tokens=cfg.rollout.max_new_tokens,
                        max_bad_fraction=t.max_bad_fraction, malformed=malformed, missing_keys=missing,
                        unk_id=getattr(tokenizer, "unk_token_id", None), notes=notes)


def enforce(report: DataReport) -> str:
    """The line a starting run prints about its data; DataRefused (with what to change) when it must not start."""
    why = refusal(report)
    if why is not None:
        raise DataRefused(f"refusing to start: {why} (details: areal-py check with the same arguments)")
    return f"data check ({report.source}): {report.usable} of {report.total} usable; {skip_summary(report)}"


def check_command(config: str | None, overrides: list[str]) -> int:
    """`areal-py check`: print the report; 0 may start, 1 would be refused (2, a ConfigError, is the caller's)."""
    report = check_config(load_config(config, overrides))
    print(format_report(report))
    if report.refused:
        print("areal-py: `areal-py run` with these arguments would refuse to start", file=sys.stderr)
        return 1
    return 0
