"""Turning config into the things every role needs: the model directory and the task.

This module only resolves; building the embedded model is training and lives in trainer.cold_start,
called by the app layer."""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from areal_py.config import Config
from areal_py.models import EmbeddedModelSpec
from areal_py.tasks.base import SftTask, build_task
from areal_py.tasks.prompt_render import prompt_format

# Bump when the cold-start recipe changes so stale cached models are not reused.
CACHE_VERSION = 1
# The cold start's fixed optimiser settings (not in the config, but part of the cache key): defined
# once here, where the key is computed, and used as trainer.cold_start's defaults.
COLD_START_BETAS = (0.9, 0.98)
COLD_START_WARMUP_STEPS = 30


class ModelNotPrepared(RuntimeError):
    """The embedded model for these settings has not been built yet (roles never build it)."""


@dataclass(frozen=True)
class EmbeddedSettings:
    """Every setting that shapes a cold-started embedded model; its hash names the cache directory.

    Invariant: two processes with equal settings resolve to the same directory, so the app layer
    builds it once (trainer.cold_start) and every role finds it by this key alone."""

    spec: dict
    task: dict
    steps: int
    label_noise: float
    lr: float
    betas: tuple[float, float]
    warmup_steps: int
    batch_size: int
    seed: int
    final_lr_ratio: float = 1.0
    version: int = CACHE_VERSION

    def key(self) -> str:
        blob = json.dumps(self.__dict__, sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def dir_name(self) -> str:
        return f"embedded-{self.key()}"


def task_identity(task: SftTask) -> dict:
    """What makes a task's SFT data distinct: its name and public settings (part of the cache key)."""
    return {"name": task.name, **{k: v for k, v in vars(task).items() if not k.startswith("_")}}


@dataclass(frozen=True)
class EmbeddedModelRequest:
    """What the config asks of the embedded model: where it is cached, its shape, its cold-start recipe."""

    cache_dir: Path
    spec: EmbeddedModelSpec
    task: SftTask
    settings: EmbeddedSettings
    threads: int
    chat_template: str = "false"  # task.chat_template: the cold start renders its prompts as the controller does
    system_prompt: str | None = None  # task.system_prompt

    @property
    def path(self) -> Path:
        return self.cache_dir / self.settings.dir_name()


def embedded_model_request(cfg: Config) -> EmbeddedModelRequest:
    """The embedded model this config describes (pure: reads nothing from disk)."""
    e = cfg.model.embedded
    cs = cfg.cold_start
    seed = cfg.run.seed if cs.seed is None else cs.seed
    spec = EmbeddedModelSpec(hidden_size=e.hidden_size, num_layers=e.num_layers, num_heads=e.num_heads,
                             num_kv_heads=e.num_heads, intermediate_size=e.intermediate_size,
                             max_position_embeddings=e.max_position_embeddings, seed=seed)
    task = build_task(cfg, seed)
    if not isinstance(task, SftTask):
        raise ValueError(f"the embedded model is cold-started on a synthetic task (arith, sum_cot); "
                         f"task.name={cfg.task.name} needs model.path")
    fmt = prompt_format(cfg.task.chat_template, cfg.task.system_prompt)
    settings = EmbeddedSettings(spec=spec.to_dict(), task=task_identity(task) | fmt, steps=cs.steps,
                                label_noise=cs.label_noise, lr=cs.lr, betas=COLD_START_BETAS,
                                warmup_steps=COLD_START_WARMUP_STEPS,
                                batch_size=cs.batch_size, seed=seed, final_lr_ratio=cs.final_lr_ratio)
    return EmbeddedModelRequest(Path(cfg.model.cache_dir).expanduser(), spec, task, settings,
                                cfg.run.torch_threads, cfg.task.chat_template, cfg.task.system_prompt)


def model_path(cfg: Config) -> Path:
    """The policy's checkpoint directory: `model.path` as given, or the embedded model's cache entry.

    Roles call this; it never builds anything. The app layer (`areal_py.app.model_dir.prepare_model`)
    builds the embedded model before any role starts, so a controller or rollout server never loads
    the trainer's cold-start code."""
    if cfg.model.path:
        p = Path(cfg.model.path).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"model.path {p} is not a directory")
        return p
    path = embedded_model_request(cfg).path
    if not (path / "config.json").is_file():
        raise ModelNotPrepared(f"the embedded model for this config is not built yet ({path}); start roles with "
                               f"`areal-py run` or `areal-py serve`, which build it first")
    return path


def context_length(cfg: Config) -> int | None:
    """Longest sequence (prompt + response) the policy handles, as the rollout engine reads it
    (`max_position_embeddings`); None when the model config does not say. Reads only the config,
    so the controller can check prompt lengths without loading weights."""
    if not cfg.model.path:
        return cfg.model.embedded.max_position_embeddings
    from transformers import AutoConfig  # heavy; only for a real checkpoint

    n = getattr(AutoConfig.from_pretrained(model_path(cfg), local_files_only=True), "max_position_embeddings", None)
    return int(n) if n else None


def vocab_size(cfg: Config) -> int | None:
    """Rows of the policy's embedding (`vocab_size` of its config, padding included), the bound on any token id
    it can generate; None when the config does not say or the model is the embedded one (its vocabulary is
    its tokenizer's, `len(tokenizer)`). Reads only the config."""
    if not cfg.model.path:
        return None
    from transformers import AutoConfig  # heavy; only for a real checkpoint

    n = getattr(AutoConfig.from_pretrained(model_path(cfg), local_files_only=True), "vocab_size", None)
    return int(n) if n else None


def fits_context(prompt_tokens: int, context: int | None) -> bool:
    """Whether the rollout engine takes a prompt of `prompt_tokens` tokens: it needs room for one new
    token, so ``prompt_tokens < context`` (any prompt when the context is unknown, None). The engine
    refuses the rest; the controller's length gate skips them with this rule, and `areal-py check`
    counts them with it."""
    return context is None or prompt_tokens < context


def fits_full_response(prompt_tokens: int, context: int | None, max_new_tokens: int) -> bool:
    """Whether a prompt leaves room for a whole response: ``prompt_tokens + max_new_tokens <= context``
    (rollout.max_new_tokens); a prompt that fits the context but not this gets its responses cut short."""
    return context is None or prompt_tokens + max_new_tokens <= context
