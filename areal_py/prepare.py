"""Turning config into the things every role needs: the model directory and the task."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from areal_py.config import Config
from areal_py.tasks import SftTask, Task, make_task


def build_task(cfg: Config, seed: int | None = None) -> Task:
    """The configured task, seeded with `seed` (default: run.seed)."""
    t = cfg.task
    seed = cfg.run.seed if seed is None else seed
    if t.name == "arith":
        return make_task("arith", min_operand=t.min_operand, max_operand=t.max_operand, seed=seed)
    if t.name == "sum_cot":
        return make_task("sum_cot", min_terms=t.min_terms, max_terms=t.max_terms, alpha=t.tail_alpha, seed=seed,
                         sft_max_terms=t.sft_max_terms or None, sft_alpha=t.sft_tail_alpha or None)
    return make_task("jsonl", path=t.path, prompt_key=t.prompt_key, answer_key=t.answer_key, seed=seed)


def model_path(cfg: Config, progress: Callable[[dict], None] | None = None) -> Path:
    """A real checkpoint directory as given, or the embedded tiny model, built and cold-started once and cached.

    `progress` receives the cold start's events (see areal_py.cold_start.LogProgress, the default: log lines)."""
    if cfg.model.path:
        p = Path(cfg.model.path).expanduser()
        if not p.is_dir():
            raise FileNotFoundError(f"model.path {p} is not a directory")
        return p
    from areal_py.cold_start import prepare_embedded_model
    from areal_py.models import EmbeddedModelSpec

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
    return prepare_embedded_model(Path(cfg.model.cache_dir).expanduser(), spec, task=task, steps=cs.steps,
                                  label_noise=cs.label_noise, lr=cs.lr, final_lr_ratio=cs.final_lr_ratio,
                                  batch_size=cs.batch_size, seed=seed, threads=cfg.run.torch_threads,
                                  progress=progress)


def context_length(cfg: Config) -> int | None:
    """Longest sequence (prompt + response) the policy handles, as the rollout engine reads it
    (`max_position_embeddings`); None when the model config does not say. Reads only the config,
    so the controller can check prompt lengths without loading weights."""
    if not cfg.model.path:
        return cfg.model.embedded.max_position_embeddings
    from transformers import AutoConfig

    n = getattr(AutoConfig.from_pretrained(model_path(cfg), local_files_only=True), "max_position_embeddings", None)
    return int(n) if n else None
