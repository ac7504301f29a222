"""`areal-py run`: the one place that knows all three roles, starting them as local processes.

It resolves the config once (so every process agrees on the run name and ports), builds the
embedded model once, starts controller, trainer and servers with their logs under the run
directory, shows progress from `metrics.jsonl`, and on Ctrl-C or any process failing stops
them all and says which one failed and why.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tqdm import tqdm

from areal_py.app.check import check_config, enforce, load_task, refuse_bad_lines
from areal_py.app.keys import check_http_token, ensure_run_keys
from areal_py.app.role_procs import (
    STOP_GRACE_S,
    RoleChild,
    die_with_parent,
    log_tail,
    role_specs,
)
from areal_py.config import Config, ConfigError, dump_config, load_config, with_run_name
from areal_py.telemetry.step_record import StepRecord, read_step_records
from areal_py.telemetry.tensorboard import require_tensorboard


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log_path: Path

    def poll(self) -> int | None:
        return self.proc.poll()

    def tail(self, lines: int = 15) -> str:
        return log_tail(self.log_path, lines)

    def terminate(self) -> None:
        self.proc.terminate()


def latest_run_name(output_dir: Path) -> str:
    """The run under `output_dir` whose newest checkpoint was written last."""
    from trainer.checkpoint import checkpoint_dirs  # imports torch: only for --resume

    runs = {d: ckpts[0] for d in output_dir.glob("*") if (ckpts := checkpoint_dirs(d / "checkpoints"))}
    if not runs:
        raise FileNotFoundError(f"--resume: no run with a checkpoint under {output_dir}; set run.name")
    return max(runs, key=lambda d: runs[d].stat().st_mtime).name


def claim_run_dir(cfg: Config, resume: bool) -> None:
    """Accept the run directory for `run` or `run --resume`, or say exactly what to do, before any process starts.

    --resume needs a checkpoint. A plain run refuses a directory with a checkpoint (resume it or pick another
    run.name), but takes over one without: a start that failed before its first checkpoint has nothing to
    resume, and its partial metrics.jsonl is moved to `metrics.jsonl.abandoned-<UTC time>` (not deleted), so
    the new run's steps are the only ones in the record. Checkpoints are found, not verified: the trainer
    verifies them and falls back past damaged ones (trainer/checkpoint.py).
    """
    d = cfg.run_dir()
    ckpts = []
    if (d / "checkpoints").is_dir():
        from trainer.checkpoint import checkpoint_dirs  # imports torch: only for a directory with checkpoints

        ckpts = checkpoint_dirs(d / "checkpoints")
    if resume and not ckpts:
        raise FileNotFoundError(f"--resume: {d} has no checkpoint to resume from (none under {d / 'checkpoints'}); "
                                "run the same command without --resume to start it afresh")
    if not resume and ckpts:
        raise FileExistsError(f"{d} already holds a run with checkpoints (newest {ckpts[0].name}); pass --resume "
                              "to continue it, or set another run.name to start a new one")
    metrics = d / "metrics.jsonl"
    if not resume and metrics.exists():
        moved = metrics.with_name(f"metrics.jsonl.abandoned-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}")
        metrics.rename(moved)
        print(f"areal-py: {d} holds a run that stopped before its first checkpoint; starting afresh "
              f"(its metrics moved to {moved})", file=sys.stderr)


def busy_ports(cfg: Config) -> list[str]:
    """`key=port` for every port this run will listen on that something on this machine already holds.

    Two runs on the same ports do not fail on their own: a second trainer's PULL socket joins the
    first run's batch stream and silently takes every other batch. So the launcher refuses to start.
    """
    wanted = {f"net.{k}_port": getattr(cfg.net, f"{k}_port") for k in ("rollout", "weights", "trainer", "batch")}
    if cfg.run.dashboard_port:
        wanted["run.dashboard_port"] = cfg.run.dashboard_port
    if cfg.run.metrics_port:  # controller, trainer, then one per rollout server
        for i in range(2 + cfg.rollout.num_servers):
            wanted[f"run.metrics_port+{i}"] = cfg.run.metrics_port + i
    busy = []
    for key, port in wanted.items():
        with socket.socket() as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a port in TIME_WAIT is free to reuse
            try:
                s.bind((cfg.net.bind_host, port))
            except OSError:
                busy.append(f"{key}={port}")
    return busy


def prepare_run(config: str | None, overrides: list[str], resume: bool, data_check: bool = False) -> Config:
    """The run's config, checked and written to its run directory, before any process starts.

    `data_check` (areal-py run): with `model.path`, the data check (`areal_py.app.check`) runs here and
    refuses the run with what to change; the embedded model's tokenizer is checked once it is built."""
    cfg = load_config(config, overrides)
    task = load_task(cfg)  # fail before any process starts, not after the model is built
    refuse_bad_lines(cfg, task)
    if data_check and cfg.model.path:
        print(f"areal-py: {enforce(check_config(cfg, task=task))}", file=sys.stderr)
    busy = busy_ports(cfg)
    if busy:
        raise ConfigError(f"already in use on {cfg.net.bind_host}: {', '.join(busy)} (another areal-py run?); "
                          "stop it or override these keys with free ports")
    if cfg.run.tensorboard:  # fail before any process starts, not in the trainer's log
        try:
            require_tensorboard()
        except RuntimeError as e:
            raise ConfigError(str(e)) from None
    if resume and not cfg.run.name:
        cfg.run.name = latest_run_name(Path(cfg.run.output_dir).expanduser())
    with_run_name(cfg)
    claim_run_dir(cfg, resume)
    cfg.run_dir().mkdir(parents=True, exist_ok=True)
    if ensure_run_keys(cfg) is not None:  # off loopback: CURVE with the run's own keys, in config.yaml for every role
        print(f"areal-py: sockets authenticated and encrypted (CURVE) with the run's keys in {cfg.net.keys_dir}",
              file=sys.stderr)
    check_http_token(cfg, "controller")  # off loopback the dashboard and /metrics need a token, refused here first
    dump_config(cfg, cfg.run_dir() / "config.yaml")
    return cfg


def role_thread_counts(cfg: Config, busy: float) -> dict[str, int]:
    """torch threads of each role ("controller", "trainer", "rollout"), given the cores others keep busy.

    The launcher measures `busy` before its own cold start and hands the result to the roles, which
    would otherwise count the launcher's just-finished cold start (the load average lags) as others' work.
    """
    from areal_py.threads import available_cores, role_threads

    cores = available_cores()
    return {r: role_threads(r, cfg.run.mode, cfg.rollout.num_servers, cores, busy, cfg.run.torch_threads)
            for r in ("controller", "trainer", "rollout")}


class ColdStartBar:
    """Cold-start progress for `areal-py run`: a tqdm bar over the SFT steps with the loss (tqdm adds the ETA)."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def __call__(self, e: dict) -> None:
        if e["event"] == "wait":
            tqdm.write(f"areal-py: another process is building this model; waiting for it ({e['lock']})")
        elif e["event"] == "start":
            self.bar = tqdm(total=e["steps"], desc=f"cold start ({e['threads']} thread(s))", unit="step")
        elif e["event"] == "step" and self.bar is not None:
            self.bar.set_postfix(loss=f"{e['loss']:.3f}", refresh=False)
            self.bar.update(1)
        elif e["event"] == "done" and self.bar is not None:
            self.bar.close()


def trainer_rank_envs(world_size: int, host: str = "127.0.0.1") -> list[dict[str, str]]:
    """The environment of each trainer rank, as torchrun would set it on one node: RANK, WORLD_SIZE,
    LOCAL_RANK, and a free MASTER_PORT on ``host`` for the process group's rendezvous. World size 1 sets
    nothing (no process group), so a plain run is what it always was."""
    if world_size == 1:
        return [{}]
    with socket.socket() as s:
        s.bind((host, 0))
        port = s.getsockname()[1]
    return [{"RANK": str(r), "WORLD_SIZE": str(world_size), "LOCAL_RANK": str(r), "MASTER_ADDR": host,
             "MASTER_PORT": str(port)} for r in range(world_size)]


def start_children(cfg: Config, resume: bool, threads: dict[str, int] | None = None) -> list[Child]:
    """Start every role (`role_specs`) as a local process."""
    cfg_file = str(cfg.run_dir() / "config.yaml")
    logs = cfg.run_dir() / "logs"
    logs.mkdir(exist_ok=True)
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1"}
    ranks = trainer_rank_envs(cfg.trainer.world_size)
    children = []
    for spec in role_specs(cfg, resume, threads):
        log_path = logs / f"{spec.name}.log"
        f = log_path.open("a")
        proc = subprocess.Popen([sys.executable, *spec.serve_args(cfg_file)], stdout=f, stderr=subprocess.STDOUT,
                                env={**env, **ranks[spec.rank]} if spec.role == "trainer" else env,
                                preexec_fn=die_with_parent)  # noqa: PLW1509 - prctl only, before exec
        f.close()
        children.append(Child(spec.name, proc, log_path))
    return children


def stop_children(children: list[Child]) -> None:
    for c in children:
        if c.proc.poll() is None:
            c.proc.terminate()
    deadline = time.monotonic() + STOP_GRACE_S
    for c in children:
        try:
            c.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            c.proc.kill()
            c.proc.wait()


def _postfix(rec: StepRecord) -> dict:
    """The progress bar's numbers from the newest step record (an unrecorded field shows as 0)."""
    t = max(rec.wall_time_s or 0.0, 1e-6)
    return {"reward": f"{rec.reward_mean or 0.0:.3f}", "stale": f"{rec.staleness_mean or 0.0:.2f}/{rec.staleness_max or 0}",
            "gen tok/s": f"{(rec.generated_tokens or 0) / t:.0f}",
            "train tok/s": f"{(rec.trained_tokens_total or 0) / t:.0f}"}


def monitor(cfg: Config, children: list[RoleChild], quiet: bool = False,
            stop: Callable[[list], None] = stop_children) -> int:
    """Wait for the run to finish; returns the exit code of the whole run. `stop` ends whatever still runs
    (every launcher has its own: local processes, Ray actors); a lost rollout server leaves `children`."""
    metrics_path = cfg.run_dir() / "metrics.jsonl"
    seen = len(read_step_records(metrics_path))
    bar = tqdm(total=cfg.trainer.total_steps, initial=seen, desc="train steps", disable=quiet, unit="step")
    try:
        while True:
            records = read_step_records(metrics_path)
            if len(records) != seen:  # fewer: a resumed trainer cut back the rows past its checkpoint
                bar.update(len(records) - seen)
                seen = len(records)
                if records:
                    bar.set_postfix(_postfix(records[-1]))
            codes = {c.name: c.poll() for c in children}
            failed = [c for c in children if codes[c.name] not in (None, 0)]
            servers_left = [c for c in children if c.name.startswith("rollout") and codes[c.name] in (None, 0)]
            for c in [c for c in failed if c.name.startswith("rollout")]:
                if servers_left:  # the controller re-dispatches its work; the run goes on
                    print(f"\nareal-py: process '{c.name}' died with exit code {codes[c.name]}; continuing with "
                          f"{len(servers_left)} server(s)\n{c.tail(5)}", file=sys.stderr)
                    children.remove(c)
                    failed.remove(c)
            if failed:
                bar.close()
                c = failed[0]
                print(f"\nareal-py: process '{c.name}' failed with exit code {codes[c.name]}; stopping the others."
                      f"\n  log: {c.log_path}\n{c.tail()}\nareal-py: {resume_hint(cfg)}", file=sys.stderr)
                return 1
            if codes["controller"] == 0 and all(codes[c.name] == 0 for c in children if c.name.startswith("trainer")):
                bar.close()
                return 0
            time.sleep(0.3)
    except KeyboardInterrupt:
        bar.close()
        print("\nareal-py: interrupted; stopping all processes (resume with --resume)", file=sys.stderr)
        return 130
    finally:
        stop(children)


def resume_hint(cfg: Config) -> str:
    """How to go on after a failed or killed run: from its newest checkpoint, which holds the controller's
    buffer as well (nothing admitted is lost), or, without one, from the start."""
    from trainer.checkpoint import checkpoint_dirs  # imports torch: only once a run has failed

    ckpts = checkpoint_dirs(cfg.run_dir() / "checkpoints")
    if not ckpts:
        return "no checkpoint was written yet: run the same command again (without --resume) to start afresh"
    return (f"continue from {ckpts[0].name} with the same command and `--resume run.name={cfg.run.name}` "
            "(the steps after it are trained again, nothing admitted is lost)")


def summarize(cfg: Config) -> str:
    recs = read_step_records(cfg.run_dir() / "metrics.jsonl")
    if not recs:
        return "no training steps recorded"
    k = min(10, len(recs))
    first = sum(r.reward_mean or 0.0 for r in recs[:k]) / k
    last = sum(r.reward_mean or 0.0 for r in recs[-k:]) / k
    return (f"{len(recs)} steps in {recs[-1].wall_time_s or 0.0:.0f}s; mean reward first {k} steps {first:.3f} -> "
            f"last {k} steps {last:.3f}; max staleness seen {max(r.staleness_max or 0 for r in recs)}\n"
            f"metrics: {cfg.run_dir() / 'metrics.jsonl'}\nfinal model: {cfg.run_dir() / 'final'}")


def _token_limit(cfg: Config) -> str:
    """Shown only when raised above the admission bound: otherwise the two are the same number."""
    limit = cfg.effective_max_token_staleness
    return f", max_token_staleness={limit}" if limit != cfg.effective_max_staleness else ""


def run(config: str | None, overrides: list[str], resume: bool = False, quiet: bool = False) -> int:
    cfg = prepare_run(config, overrides, resume, data_check=True)
    print(f"areal-py: run '{cfg.run.name}' in {cfg.run_dir()} (mode={cfg.run.mode}, "
          f"max_staleness={cfg.effective_max_staleness}{_token_limit(cfg)}, servers={cfg.rollout.num_servers})")
    # heavy imports only once the config is known good
    from areal_py.app.model_dir import prepare_model
    from areal_py.threads import busy_cores
    from trainer.cold_start import LogProgress

    try:  # SIGTERM (a test's timeout, a job scheduler) runs the finally-blocks: no temp model dir, no orphan
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    except ValueError:  # not the main thread: leave signals to the caller
        pass
    threads = role_thread_counts(cfg, busy_cores())  # before the cold start loads the machine
    t0 = time.monotonic()
    quiet_log = LogProgress(every_s=60, log=lambda m: print(f"areal-py: {m}", file=sys.stderr, flush=True))
    path = prepare_model(cfg, progress=quiet_log if quiet else ColdStartBar())
    print(f"areal-py: model ready at {path} ({time.monotonic() - t0:.1f}s); torch threads: "
          + ", ".join(f"{r} {n}" for r, n in threads.items()))
    if not cfg.model.path:  # the embedded model's own tokenizer, now that it is built
        print(f"areal-py: {enforce(check_config(cfg))}", file=sys.stderr)
    if cfg.run.launcher == "ray":  # the only place Ray is imported from
        from areal_py.app.ray_launcher import RayLaunchError, start_on_ray

        try:
            children, stop = start_on_ray(cfg, resume, threads)
        except RayLaunchError as e:
            print(f"areal-py: {e}", file=sys.stderr)
            return finish(cfg, 1)
    else:
        children, stop = start_children(cfg, resume, threads), stop_children
    stop_watch = threading.Event()
    if cfg.run.dashboard_port:  # printed once it answers: the controller serves it only after loading its model
        from areal_py.telemetry.dashboard import announce_when_serving, local_url

        end_report = cfg.run_dir() / "report.html"
        announce_when_serving(local_url(cfg.net.bind_host, cfg.run.dashboard_port), lambda url: tqdm.write(
            f"areal-py: live dashboard {url} (report at the end: {end_report})"), stop_watch)
    code = monitor(cfg, children, quiet=quiet, stop=stop)
    stop_watch.set()
    return finish(cfg, code)


def finish(cfg: Config, code: int) -> int:
    """Write the report (also for a failed or interrupted run: what happened so far) and return the run's
    exit code `code`, even when the report cannot be written (a full disk): that is one line naming it."""
    from areal_py.telemetry.report import write_report

    report = cfg.run_dir() / "report.html"
    try:
        report = write_report(cfg.run_dir())
    except OSError as e:
        print(f"areal-py: could not write the report {report}: {e}", file=sys.stderr)
        report = None
    if code == 0:
        print("areal-py: done. " + summarize(cfg))
    if report is not None:
        print(f"areal-py: report {report}")
    return code
