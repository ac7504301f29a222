"""`areal-py sft|rm|dpo [config.yaml] [key.sub=value ...] [--resume] [--quiet]`: the offline post-training commands,
each in one process (no controller, no rollout servers), into the same run directory layout as `areal-py run`:
config.yaml, metrics.jsonl (one record per step, `kind: train`, and per held-out evaluation, `kind: eval`),
checkpoints/ (one per epoch, for --resume), report.html (written at the end, finished or not) and final/ (a
Hugging Face directory: for sft and dpo `areal-py run model.path=...` starts from it, for rm it is
`reward.reward_model_path`). The start model is resolved and, for the embedded default, cold-started exactly as
for `areal-py run`. With run.metrics_port set, the trainer role's Prometheus metrics are served on its port + 1
(the trainer's port in an RL run)."""
from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

from tqdm import tqdm

from areal_py.app.launcher import ColdStartBar, claim_run_dir, latest_run_name
from areal_py.config import Config, ConfigError, dump_config, load_config, with_run_name

COMMANDS = ("sft", "rm", "dpo")


class OfflineBar:
    """A tqdm bar over the optimiser steps (the step's loss, and margin and accuracy where the command has them)
    and a line per held-out evaluation."""

    def __init__(self, command: str, quiet: bool) -> None:
        self.command, self.quiet = command, quiet
        self.bar: tqdm | None = None

    def say(self, line: str) -> None:
        (tqdm.write if self.bar is not None else print)(f"areal-py: {line}", file=sys.stderr)

    def __call__(self, e: dict) -> None:
        kind = e["event"]
        if kind == "start":
            self.bar = tqdm(total=e["steps"], initial=e["step"], desc=f"{self.command} steps", unit="step",
                            disable=self.quiet)
        elif kind == "step" and self.bar is not None:
            post = {"loss": f"{e['loss']:.3f}"}
            if "margin" in e:
                post |= {"margin": f"{e['margin']:.3f}", "acc": f"{e['accuracy']:.2f}"}
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(1)
        elif kind == "eval":
            self.say(describe_eval(self.command, e))
        elif kind == "done" and self.bar is not None:
            self.bar.close()


def describe_eval(command: str, e: dict) -> str:
    """One line of a held-out record: the command's numbers (and sampled accuracy when measured)."""
    sampled = f", sampled accuracy {e['sampled_accuracy']:.3f}" if "sampled_accuracy" in e else ""
    head = f"held-out after epoch {e['epoch']} (step {e['step']}): loss {e['eval_loss']:.4f}"
    if command == "dpo":
        return (f"{head}, margin {e['eval_margin']:.4f}, preference accuracy {e['eval_accuracy']:.3f} (policy alone "
                f"ranks {e['eval_ranked']:.3f} right){sampled}")
    if command == "rm":
        return f"{head}, pairwise accuracy {e['eval_accuracy']:.3f}, margin {e['eval_margin']:.3f}"
    return f"{head}{sampled}"


def _settings(cfg: Config, command: str) -> str:
    if command == "dpo":
        d = cfg.dpo
        return f"loss={d.loss}, beta={d.beta:g}" + (f", label_smoothing={d.label_smoothing:g}" if d.label_smoothing else "")
    c = getattr(cfg, command)
    return f"lr={c.lr:g}, epochs={c.epochs}, batch_size={c.batch_size}"


def _trainer(command: str) -> Callable[..., dict]:
    if command == "sft":
        from trainer.sft import train_sft

        return train_sft
    if command == "rm":
        from trainer.rm import train_rm

        return train_rm
    from trainer.dpo import train_dpo

    return train_dpo


def offline_command(command: str, config: str | None, overrides: list[str], resume: bool = False,
                    quiet: bool = False) -> int:
    """Run `command` (one of COMMANDS) to the end; ConfigError for bad data or settings (what to change)."""
    cfg = load_config(config, overrides)
    if resume and not cfg.run.name:
        cfg.run.name = latest_run_name(Path(cfg.run.output_dir).expanduser())
    with_run_name(cfg)
    claim_run_dir(cfg, resume)
    run_dir = cfg.run_dir()
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, run_dir / "config.yaml")
    print(f"areal-py: {command} '{cfg.run.name}' in {run_dir} ({_settings(cfg, command)})", file=sys.stderr)
    import torch

    from areal_py.app.model_dir import prepare_model
    from areal_py.threads import auto_threads
    from trainer.cold_start import LogProgress

    torch.set_num_threads(cfg.run.torch_threads or auto_threads(1))
    torch.manual_seed(cfg.run.seed)
    if cfg.run.metrics_port:
        from areal_py.telemetry.prom import start_metrics_server

        port = start_metrics_server(cfg.run.metrics_port + 1, role="trainer")
        print(f"areal-py: Prometheus metrics on http://127.0.0.1:{port}/metrics", file=sys.stderr)
    quiet_log = LogProgress(every_s=60, log=lambda m: print(f"areal-py: {m}", file=sys.stderr, flush=True))
    path = prepare_model(cfg, progress=quiet_log if quiet else ColdStartBar())
    t0 = time.monotonic()
    try:
        summary = _trainer(command)(cfg, path, resume=resume, progress=OfflineBar(command, quiet))
    except ValueError as e:  # bad data or settings: say what to change, no traceback
        raise ConfigError(str(e)) from None
    finally:
        _write_report(run_dir, command)
    first, last = summary["first_eval"], summary["last_eval"]
    if first is not None:
        print(f"areal-py: before: {describe_eval(command, first)}", file=sys.stderr)
    print(f"areal-py: after:  {describe_eval(command, last)}", file=sys.stderr)
    n = summary.get("train_pairs", summary.get("train_records"))
    what = "records" if command == "sft" else "pairs"
    print(f"areal-py: {summary['steps']} steps on {n} {what} in {time.monotonic() - t0:.0f}s\n"
          f"metrics: {run_dir / 'metrics.jsonl'}\nreport: {run_dir / 'report.html'}\nfinal model: {summary['final']}")
    return 0


def _write_report(run_dir: Path, command: str) -> None:
    """report.html from the run as it stands; a failure to draw it is said, never raised over the run's outcome."""
    from areal_py.telemetry.offline_report import write_offline_report

    try:
        write_offline_report(run_dir, command)
    except Exception as e:  # noqa: BLE001 - the report must never fail a run, nor hide why it failed
        print(f"areal-py: report not written: {type(e).__name__}: {e}", file=sys.stderr)
