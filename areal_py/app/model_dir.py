"""The app layer's half of model resolution: build the embedded model before any role needs it.

Roles resolve their model with `areal_py.model_dir.model_path`, which never builds. Building the
embedded model is a short SFT run (trainer.cold_start); only this layer may import trainer code
for a process that is not the trainer, and it does so only when the cache entry is missing.
"""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from areal_py.config import Config
from areal_py.model_dir import ModelNotPrepared, embedded_model_request, model_path


def prepare_model(cfg: Config, progress: Callable[[dict], None] | None = None) -> Path:
    """`model_path(cfg)`, building and caching the cold-started embedded model first if it is missing.

    `progress` receives the cold start's events (see trainer.cold_start.LogProgress, the default: log lines)."""
    try:
        return model_path(cfg)
    except ModelNotPrepared:
        pass
    from trainer.cold_start import prepare_embedded_model  # training code: loaded only to build

    req = embedded_model_request(cfg)
    s = req.settings
    path = prepare_embedded_model(req.cache_dir, req.spec, task=req.task, steps=s.steps, label_noise=s.label_noise,
                                  lr=s.lr, betas=s.betas, warmup_steps=s.warmup_steps,
                                  final_lr_ratio=s.final_lr_ratio, batch_size=s.batch_size, seed=s.seed,
                                  threads=req.threads, progress=progress)
    assert path == req.path, f"cold start built {path}, the config resolves to {req.path}"
    return path
