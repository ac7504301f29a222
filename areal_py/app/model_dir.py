"""The app layer's half of model resolution: build the embedded model before any role needs it.

Roles resolve their model with `areal_py.model_dir.model_path`, which never builds. Building the
embedded model is a short SFT run (trainer.cold_start); only this layer may import trainer code
for a process that is not the trainer, and it does so only when the cache entry is missing.
The rollout engine's decode attention kernel is built here too (`prepare_kernels`): a compile
once per machine, announced, so no rollout server stalls silently on it at start-up.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

from areal_py.config import Config
from areal_py.model_dir import ModelNotPrepared, embedded_model_request, model_path


def prepare_model(cfg: Config, progress: Callable[[dict], None] | None = None) -> Path:
    """`model_path(cfg)`, building and caching the cold-started embedded model first if it is missing.

    `progress` receives the cold start's events (see trainer.cold_start.LogProgress, the default: log lines).
    Then `prepare_kernels(cfg)`."""
    try:
        path = model_path(cfg)
    except ModelNotPrepared:
        path = _build_embedded(cfg, progress)
    prepare_kernels(cfg)
    return path


def prepare_kernels(cfg: Config, say: Callable[[str], None] | None = None) -> None:
    """Build the decode attention kernel if the config may use it and this machine has not built it.

    A failed build is reported and the run goes on: the servers then use SDPA (they never compile
    in auto mode: rollout_server.torch_engine.attention_choice). A build that failed on this machine
    before is reported, not retried (rollout_server.torch_engine.build_failure says how to retry)."""
    if cfg.rollout.backend != "torch" or cfg.rollout.decode_attention == "sdpa":
        return
    from rollout_server.torch_engine.attention_kernel import build_dir, is_built, load_kernel, remembered_failure

    if is_built():
        return
    say = say or (lambda m: print(f"areal-py: {m}", file=sys.stderr, flush=True))
    failed = remembered_failure()
    if failed is not None:  # a compile that failed here fails again: say so, do not spend a minute on it
        say(f"decode attention kernel unavailable, the rollout servers use SDPA: {failed}")
        return
    say(f"building the decode attention kernel into {build_dir()} (once per machine, about a minute)")
    built = load_kernel()
    say(f"decode attention kernel {built.reason}" if built.fn else f"decode attention kernel unavailable, "
        f"the rollout servers use SDPA: {built.reason}")


def _build_embedded(cfg: Config, progress: Callable[[dict], None] | None) -> Path:
    from trainer.cold_start import prepare_embedded_model  # training code: loaded only to build

    req = embedded_model_request(cfg)
    s = req.settings
    path = prepare_embedded_model(req.cache_dir, req.spec, task=req.task, steps=s.steps, label_noise=s.label_noise,
                                  lr=s.lr, betas=s.betas, warmup_steps=s.warmup_steps,
                                  final_lr_ratio=s.final_lr_ratio, batch_size=s.batch_size, seed=s.seed,
                                  threads=req.threads, progress=progress, chat_template=req.chat_template,
                                  system_prompt=req.system_prompt)
    assert path == req.path, f"cold start built {path}, the config resolves to {req.path}"
    return path
