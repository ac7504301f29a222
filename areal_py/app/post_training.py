"""`areal-py dpo [config.yaml] [key.sub=value ...] [--resume] [--quiet]`: offline preference optimisation in one
process (no controller, no rollout servers), into the same run directory layout as `areal-py run`: config.yaml,
metrics.jsonl (one record per step, `kind: train`, and per held-out evaluation, `kind: eval`), checkpoints/ and
final/ (a Hugging Face directory for `areal-py run model.path=...`). The start model is resolved and, for the
embedded default, cold-started exactly as for `areal-py run`; it is also the frozen reference."""
from __future__ import annotations

import sys
import time

from tqdm import tqdm

from areal_py.app.launcher import ColdStartBar, claim_run_dir, latest_run_name
from areal_py.config import ConfigError, dump_config, load_config, with_run_name


class DpoBar:
    """A tqdm bar over the optimiser steps (loss, margin, accuracy of the step's pairs) and a line per evaluation."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.bar: tqdm | None = None

    def say(self, line: str) -> None:
        (tqdm.write if self.bar is not None else print)(f"areal-py: {line}", file=sys.stderr)

    def __call__(self, e: dict) -> None:
        kind = e["event"]
        if kind == "start":
            self.bar = tqdm(total=e["steps"], initial=e["step"], desc="dpo steps", unit="step", disable=self.quiet)
        elif kind == "step" and self.bar is not None:
            self.bar.set_postfix(loss=f"{e['loss']:.3f}", margin=f"{e['margin']:.3f}", acc=f"{e['accuracy']:.2f}",
                                 refresh=False)
            self.bar.update(1)
        elif kind == "eval":
            self.say(describe_eval(e))
        elif kind == "done" and self.bar is not None:
            self.bar.close()


def describe_eval(e: dict) -> str:
    """One line: held-out loss, margin and preference accuracy (and sampled accuracy when measured)."""
    sampled = f", sampled accuracy {e['sampled_accuracy']:.3f}" if "sampled_accuracy" in e else ""
    return (f"held-out after epoch {e['epoch']} (step {e['step']}): loss {e['eval_loss']:.4f}, margin "
            f"{e['eval_margin']:.4f}, preference accuracy {e['eval_accuracy']:.3f} (policy alone ranks "
            f"{e['eval_ranked']:.3f} right){sampled}")


def dpo_command(config: str | None, overrides: list[str], resume: bool = False, quiet: bool = False) -> int:
    cfg = load_config(config, overrides)
    if resume and not cfg.run.name:
        from pathlib import Path

        cfg.run.name = latest_run_name(Path(cfg.run.output_dir).expanduser())
    with_run_name(cfg)
    claim_run_dir(cfg, resume)
    cfg.run_dir().mkdir(parents=True, exist_ok=True)
    dump_config(cfg, cfg.run_dir() / "config.yaml")
    d = cfg.dpo
    print(f"areal-py: dpo '{cfg.run.name}' in {cfg.run_dir()} (loss={d.loss}, beta={d.beta:g}"
          + (f", label_smoothing={d.label_smoothing:g}" if d.label_smoothing else "") + ")", file=sys.stderr)
    import torch

    from areal_py.app.model_dir import prepare_model
    from areal_py.threads import auto_threads
    from trainer.cold_start import LogProgress
    from trainer.dpo import train_dpo

    torch.set_num_threads(cfg.run.torch_threads or auto_threads(1))
    torch.manual_seed(cfg.run.seed)
    quiet_log = LogProgress(every_s=60, log=lambda m: print(f"areal-py: {m}", file=sys.stderr, flush=True))
    path = prepare_model(cfg, progress=quiet_log if quiet else ColdStartBar())
    t0 = time.monotonic()
    try:
        summary = train_dpo(cfg, path, resume=resume, progress=DpoBar(quiet))
    except ValueError as e:  # bad data or settings: say what to change, no traceback
        raise ConfigError(str(e)) from None
    first, last = summary["first_eval"], summary["last_eval"]
    if first is not None:
        print(f"areal-py: before: {describe_eval(first)}", file=sys.stderr)
    print(f"areal-py: after:  {describe_eval(last)}", file=sys.stderr)
    print(f"areal-py: {summary['steps']} steps on {summary['train_pairs']} pairs in {time.monotonic() - t0:.0f}s\n"
          f"metrics: {cfg.run_dir() / 'metrics.jsonl'}\nfinal model: {summary['final']}")
    return 0
