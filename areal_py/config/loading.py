"""Defaults <- YAML file <- `key.sub=value` overrides, validated as one tree; errors name the key."""
from __future__ import annotations

import datetime as _dt
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from areal_py.config.tree import Config
from areal_py.tasks.base import DEFAULT_TASK, UnknownTask, task_spec


class ConfigError(ValueError):
    """A config file or override that does not fit the schema; the message names the key."""


def _format_validation_error(err: ValidationError, data: Any = None) -> str:
    """One line per error, naming the key; `data` (the validated input) tells which task's keys are allowed."""
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in e["loc"]) or "<root>"
        if e["type"] == "extra_forbidden":
            lines.append(f"unknown key '{key}'{_allowed_keys(e['loc'][:-1], data)}")
        elif not e["loc"]:  # a cross-field check: its message names the keys; the input is the whole tree
            lines.append(e["msg"].removeprefix("Value error, "))
        else:
            lines.append(f"{key}: {e['msg']} (got {e.get('input')!r})")
    return "invalid config:\n  " + "\n  ".join(lines)


def _allowed_keys(loc: tuple, data: Any) -> str:
    """'; allowed here: a, b' for the section at `loc`; the `task` section's keys are those of its task."""
    if tuple(loc) == ("task",):
        section = data.get("task") if isinstance(data, dict) else None
        named = isinstance(section, dict) and "name" in section
        name = section["name"] if named else DEFAULT_TASK
        try:
            fields = task_spec(name).config.model_fields
        except UnknownTask:
            return ""
        return f" for task.name={name}{'' if named else ' (the default)'}; allowed here: {', '.join(fields)}"
    cls: type[BaseModel] = Config
    for part in loc:
        field = cls.model_fields.get(str(part))
        if field is None or not (isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel)):
            return "; allowed here: ?"
        cls = field.annotation
    return f"; allowed here: {', '.join(cls.model_fields)}"


def _parse_value(text: str) -> Any:
    """Override values are YAML scalars: `3`, `1e-4`, `true`, `null`, `[1, 2]`, or plain strings."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override '{item}' is not of the form key.sub=value")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override '{key}': '{p}' is not a section")
        node[parts[-1]] = _parse_value(value)
    return data


def _yaml_error(path: Path, err: yaml.YAMLError) -> str:
    """``path:line:column: invalid YAML: problem (context at line, column)``, 1-based as editors count."""
    mark = getattr(err, "problem_mark", None)
    if not isinstance(err, yaml.MarkedYAMLError) or mark is None:
        return f"{path}: invalid YAML: {err}"
    msg = f"{path}:{mark.line + 1}:{mark.column + 1}: invalid YAML: {err.problem or err}"
    if err.context and err.context_mark:
        msg += f" ({err.context} at line {err.context_mark.line + 1}, column {err.context_mark.column + 1})"
    return msg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Defaults <- YAML file <- overrides, validated as one tree."""
    data: dict = {}
    if path:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError as e:
            raise ConfigError(f"{p}: not valid UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
        except yaml.YAMLError as e:
            raise ConfigError(_yaml_error(p, e)) from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"config file {p} must hold a mapping at the top level")
        data = loaded
    apply_overrides(data, overrides or [])
    try:
        return Config.model_validate(data)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, data)) from None


def with_run_name(cfg: Config) -> Config:
    """Fill an empty run.name with a timestamp, the launcher's job so all processes agree."""
    if not cfg.run.name:
        cfg.run.name = _dt.datetime.now().strftime("run-%Y%m%d-%H%M%S")
    return cfg


def dump_config(cfg: Config, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False))
