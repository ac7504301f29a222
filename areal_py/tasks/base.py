"""What a task is, and the registry that finds tasks by name.

A task is a deterministic prompt stream plus a reward rule. `Task.prompt(i)` is a pure function of
the integer `i`, so the whole data position of a run is one integer and resuming from a checkpoint
replays exactly the same prompts.

A task is one module of this package: it declares a pydantic config model (a subclass of
:class:`TaskConfig` whose `name` is a ``Literal`` with that name as default), the task class, and
calls :func:`register_task`. Every module of the package is imported on the first lookup that
misses (:func:`pkgutil.iter_modules` over the package's ``__path__``), so dropping a file into the
package makes its task available to the config (`task.name=...`), to :func:`build_task` and to the
reward workers, with nothing else edited.

Invariant: a task is built only by its registered `build(config, seed)`, and a built task is
described back by its registered `recipe(task)`; reward workers rebuild the task from that recipe,
so the controller and its workers score with the same settings.

This module imports nothing from `areal_py.config`: the config imports the registry, never the reverse.
"""

from __future__ import annotations

import importlib
import pkgutil
import random
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Generic, Literal, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, field_validator

ChatTemplateMode = Literal["auto", "true", "false"]
"""task.chat_template: whether prompts go through the tokenizer's chat template (see tasks.prompt_render)."""

DEFAULT_TASK = "arith"
"""The task of a config whose `task` section names none."""


@dataclass(frozen=True)
class ChatMessage:
    """One turn of a chat prompt; role is system, user or assistant (checked where prompts are loaded)."""

    role: str
    content: str


@dataclass(frozen=True)
class Prompt:
    """One prompt of a task.

    `text` is always set; for a chat prompt (`messages` given) it is the messages' contents joined by
    blank lines, for text-only consumers (the reward model, logs). The ids the engine sees come from
    `areal_py.tasks.prompt_render.render_prompt`, which uses `messages` when present."""

    index: int
    text: str
    answer: str
    messages: tuple[ChatMessage, ...] | None = None


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


@runtime_checkable
class SegmentedSftTask(SftTask, Protocol):
    """A synthetic task whose cold-start targets hold text the model does not write (a tool's output): the
    cold start keeps such segments in the context and out of the loss, as RL's loss mask does."""

    def sft_segments(self, rng: random.Random, label_noise: float) -> tuple[str, list[tuple[str, bool]]]:
        """A (prompt text, [(target segment text, trained)]) pair; the segments joined are the target."""
        ...


@dataclass(frozen=True)
class RunLimits:
    """What a task's config check may know of the rest of the config (tasks never import the config)."""

    max_new_tokens: int  # rollout.max_new_tokens
    model_path: str  # model.path; empty = the embedded model
    embedded_context: int  # model.embedded.max_position_embeddings


class TaskConfig(BaseModel):
    """The `task` section of the config; each task subclasses it with its own fields.

    Unknown keys are errors (a field of another task is a typo here, not a setting)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    name: str = Field(DEFAULT_TASK, description="Which registered task (a module of areal_py.tasks).")
    chat_template: ChatTemplateMode = Field(
        "auto", description="Render prompts with the tokenizer's chat template (apply_chat_template with "
        "add_generation_prompt): auto = when the tokenizer has one, true = required (error without one), false = "
        "never (plain tokenizer(text); chat-message prompts are then an error). The synthetic tasks default to "
        "false: the embedded model's cold start trains on their raw text.")
    system_prompt: str | None = Field(
        None, description="A system message put before every prompt; needs a chat template (see chat_template). "
        "Empty or null: none.")
    max_bad_fraction: float = Field(
        0.1, ge=0, le=1, description="`areal-py run` (and `areal-py check`) refuse to start when more than this "
        "share of the data is unusable: bad lines (not JSON, no prompt or answer key), prompts that cannot be "
        "rendered, or prompts too long for a full response (model context - rollout.max_new_tokens). Below it the "
        "run starts and says what it skips; with no usable prompt it never starts.")

    @field_validator("chat_template", mode="before")
    @classmethod
    def _yaml_bool(cls, value: Any) -> Any:
        """YAML reads `true`/`false` as booleans; they mean the words."""
        return ("true" if value else "false") if isinstance(value, bool) else value

    def check(self, limits: RunLimits) -> None:
        """Cross-field checks against the rest of the config; raise ValueError naming the keys."""


C = TypeVar("C", bound=TaskConfig)


@dataclass(frozen=True)
class TaskRecipe:
    """Everything a task is built from: plain data that crosses processes (reward workers)."""

    config: TaskConfig
    seed: int


@dataclass(frozen=True)
class TaskSpec(Generic[C]):
    name: str
    config: type[C]
    build: Callable[[C, int], Task]
    recipe: Callable[[Any], TaskRecipe]


class UnknownTask(ValueError):
    """No module of the task package registers this name."""


_REGISTRY: dict[str, TaskSpec] = {}
_PACKAGE = __name__.rpartition(".")[0]


def register_task(config: type[C], build: Callable[[C, int], Task], recipe: Callable[[Any], TaskRecipe]) -> None:
    """Make the task named by `config`'s `name` default available; called by the task's module.

    `build(config, seed)` makes the task; `recipe(task)` is its inverse (the config and seed that
    build an equal task), used to rebuild the task in another process."""
    name = config.model_fields["name"].default
    if not isinstance(name, str) or not name:
        raise ValueError(f"{config.__name__}: the `name` field needs the task's name as its default")
    old = _REGISTRY.get(name)
    if old is not None and old.config.__module__ != config.__module__:
        raise ValueError(f"task {name!r} is registered twice: by {old.config.__module__} and {config.__module__}")
    _REGISTRY[name] = TaskSpec(name, config, build, recipe)


def _discover() -> None:
    """Import every module of the task package not imported yet; each registers its task."""
    package = importlib.import_module(_PACKAGE)
    for info in pkgutil.iter_modules(package.__path__):
        module = f"{_PACKAGE}.{info.name}"
        if module not in sys.modules:
            importlib.import_module(module)


def task_names() -> list[str]:
    """Every registered task, sorted."""
    _discover()
    return sorted(_REGISTRY)


def task_spec(name: str) -> TaskSpec:
    """The registered task `name`; UnknownTask lists the allowed names."""
    if isinstance(name, str) and name not in _REGISTRY:
        _discover()
    if not isinstance(name, str) or name not in _REGISTRY:
        raise UnknownTask(f"unknown task {name!r}; allowed: {task_names()}")
    return _REGISTRY[name]


def parse_task_config(data: TaskConfig | Mapping[str, Any]) -> TaskConfig:
    """The config model of the task `data["name"]` (default DEFAULT_TASK), validated.

    Raises UnknownTask for an unknown name and pydantic's ValidationError for bad or foreign fields."""
    if isinstance(data, TaskConfig):
        if type(data) is task_spec(data.name).config:
            return data
        data = data.model_dump()  # a base or foreign model: validated as its task's config below
    if not isinstance(data, Mapping):
        raise ValueError(f"a task config is a mapping with a `name`, got {data!r}")
    config = task_spec(data.get("name", DEFAULT_TASK)).config
    return config.model_validate(drop_other_tasks_defaults(config, data))


def drop_other_tasks_defaults(config: type[TaskConfig], data: Mapping[str, Any]) -> dict[str, Any]:
    """`data` less the keys that `config` lacks but another registered task has, at that task's default.

    A `config.yaml` written before each task owned its config holds every task's fields, almost all at
    their defaults; those still load. A foreign key with a value of its own stays, so the validation
    error names it (a setting meant for another task is a mistake worth reporting)."""
    own = config.model_fields
    defaults: dict[str, list[Any]] = {}
    for name in task_names():
        for key, field in _REGISTRY[name].config.model_fields.items():
            defaults.setdefault(key, []).append(field.default)
    return {k: v for k, v in data.items() if k in own or k not in defaults or v not in defaults[k]}


class _RunLike(Protocol):
    @property
    def seed(self) -> int: ...


class _ConfigLike(Protocol):
    """The parts of `areal_py.config.Config` that build_task reads."""

    @property
    def task(self) -> TaskConfig: ...

    @property
    def run(self) -> _RunLike: ...


def build_task(source: TaskConfig | _ConfigLike, seed: int | None = None) -> Task:
    """The task `source` describes, seeded with `seed`.

    `source` is a task config model (default seed 0) or a whole config (default seed: run.seed)."""
    if isinstance(source, TaskConfig):
        config, default_seed = source, 0
    else:
        config, default_seed = source.task, source.run.seed
    return task_spec(config.name).build(config, default_seed if seed is None else seed)


def recipe_of(task: Task) -> TaskRecipe:
    """The config and seed that rebuild `task` (the registered inverse of its build)."""
    try:
        spec = task_spec(task.name)
    except UnknownTask as e:
        raise TypeError(f"cannot describe task {type(task).__name__} as a config: {e}") from None
    return spec.recipe(task)
