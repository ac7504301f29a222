"""Command line: `areal-py run [config.yaml] [key.sub=value ...] [--resume]`, `areal-py sft|rm|dpo [config.yaml]
[key.sub=value ...] [--resume]` (supervised fine-tuning, reward-model training, offline preference
optimisation: docs/post-training.md), `areal-py check [config.yaml]
[key.sub=value ...]` (the run's data check alone: exit 0 may start, 1 refused, 2 bad config), `areal-py serve ROLE ...`,
`areal-py sweep KEY=v1,v2,... [config.yaml] [key.sub=value ...]`, `areal-py slurm [config.yaml]
[key.sub=value ...] [--submit] [--out FILE]` and `areal-py keys DIR [--servers N]` (CURVE keys, net.keys_dir).

`serve` starts one role on its own (socket addresses from config), so the roles can run on
different machines; `run` is the same three roles launched locally.
"""
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys

from areal_py.config import Config, ConfigError, load_config

ROLES = ("controller", "trainer", "rollout")


def _split(items: list[str]) -> tuple[str | None, list[str]]:
    """The first argument without '=' (or ending in .yaml/.yml) is the config file; the rest are overrides."""
    config, overrides = None, []
    for item in items:
        if config is None and ("=" not in item or item.endswith((".yaml", ".yml"))):
            config = item
        else:
            overrides.append(item)
    return config, overrides


def torch_threads(cfg: Config, role: str) -> int:
    """run.torch_threads, or (0) the role's share of the cores free right now (areal_py.threads.role_threads).

    `areal-py run` sets run.torch_threads for every role from one measurement taken before its cold start."""
    from areal_py.threads import available_cores, busy_cores, role_threads

    busy = 0.0 if cfg.run.torch_threads or role == "controller" else busy_cores()
    return role_threads(role, cfg.run.mode, cfg.rollout.num_servers, available_cores(), busy, cfg.run.torch_threads)


def serve(role: str, config: str | None, overrides: list[str], resume: bool) -> int:
    cfg = load_config(config, overrides)
    if not cfg.run.name:
        raise ConfigError("run.name must be set when starting a role on its own (every role must agree on it)")
    from areal_py.app.check import load_task, refuse_bad_lines

    # the roles that read the task (the controller, and any role that may have to build the embedded
    # model) build it first, so a bad data file is a ConfigError here, not a traceback from inside
    from areal_py.app.keys import check_role_keys

    check_role_keys(cfg, role)  # off loopback only with CURVE keys, and those readable, before any model loads
    task = load_task(cfg) if role == "controller" or not cfg.model.path else None
    if task is not None:
        refuse_bad_lines(cfg, task)
    logging.basicConfig(level=cfg.run.log_level, format=f"%(asctime)s {role} %(levelname)s %(message)s")
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run finally-blocks: sockets close cleanly
    import torch

    torch.set_num_threads(torch_threads(cfg, role))
    from areal_py.app.model_dir import prepare_model

    prepare_model(cfg)  # a no-op once built; `areal-py run` builds it before starting any role
    if role == "controller":  # started by hand: the same data check as `areal-py run`, refusing the same way
        from areal_py.app.check import check_config, enforce

        logging.getLogger(role).info(enforce(check_config(cfg, task=task)))
    rank = int(os.environ.get("RANK") or 0) if role == "trainer" else 0  # trainer ranks > 0 (world_size > 1)
    if cfg.run.metrics_port and rank == 0:  # trainer rank 0 serves every rank's metrics (a `rank` label)
        from areal_py.telemetry.prom import start_metrics_server

        offset = {"controller": 0, "trainer": 1}.get(role)
        if offset is None:  # rollout-<i>
            tail = cfg.rollout.server_id.rsplit("-", 1)[-1]
            offset = 2 + (int(tail) if tail.isdigit() else 0)
        from areal_py.app.keys import metrics_host
        from areal_py.telemetry.http_auth import http_token

        host = metrics_host(cfg, role)
        port = start_metrics_server(cfg.run.metrics_port + offset, host=host, role=role, token=http_token(cfg.net))
        logging.getLogger(role).info("Prometheus metrics on http://%s:%d/metrics", host, port)
    torch.manual_seed(cfg.run.seed)
    if role == "controller":
        from controller.controller import Controller

        if resume:  # its state comes from the trainer's hello either way; --resume says the run is under way
            logging.getLogger(role).info("waiting for the run's trainer and servers to rejoin: the trainer rolls back "
                                         "to its latest checkpoint and says the hello of a resume")
        Controller(cfg, task=task).serve()
    elif role == "trainer":
        from trainer.trainer import Trainer

        Trainer(cfg, resume=resume).serve()
    else:
        from rollout_server.server import RolloutServer

        RolloutServer(cfg).serve()
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # our own progress bar is the one to watch
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    parser = argparse.ArgumentParser(prog="areal-py", description="Asynchronous RL for language models.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="run controller, trainer and rollout servers locally")
    p_run.add_argument("args", nargs="*", help="[config.yaml] [key.sub=value ...]")
    p_run.add_argument("--resume", action="store_true", help="continue the run's latest checkpoint")
    p_run.add_argument("--quiet", action="store_true", help="no progress bar")
    offline_help = {
        "sft": "supervised fine-tuning on prompt/response or chat JSONL: sft.* keys (docs/post-training.md)",
        "rm": "Bradley-Terry reward model on preference JSONL, for reward.functions={reward_model: 1.0}: rm.* keys",
        "dpo": "offline preference optimisation (DPO, IPO, conservative DPO) against a frozen reference: dpo.* keys",
    }
    for name, text in offline_help.items():
        p_off = sub.add_parser(name, help=text)
        p_off.add_argument("args", nargs="*", help="[config.yaml] [key.sub=value ...]")
        p_off.add_argument("--resume", action="store_true", help="continue the run's latest checkpoint (an epoch end)")
        p_off.add_argument("--quiet", action="store_true", help="no progress bar")
    p_check = sub.add_parser("check", help="check the data and model of a run before starting it (exit 1: refused)")
    p_check.add_argument("args", nargs="*", help="[config.yaml] [key.sub=value ...]")
    p_serve = sub.add_parser("serve", help="start one role on its own")
    p_serve.add_argument("role", choices=ROLES)
    p_serve.add_argument("args", nargs="*", help="[config.yaml] [key.sub=value ...]")
    p_serve.add_argument("--resume", action="store_true", help="trainer: continue from the latest checkpoint; controller: "
                         "restart a running run's controller, which its trainer and servers rejoin")
    p_keys = sub.add_parser("keys", help="write CURVE key pairs for the roles (net.keys_dir), say where each goes")
    p_keys.add_argument("dir", help="directory to create the keys in (refused if it already holds them)")
    p_keys.add_argument("--servers", type=int, default=0,
                        help="one pair per rollout server, rollout-0..N-1 (default 0: one pair all servers share)")
    p_sweep = sub.add_parser("sweep", help="run a grid over one config key, compare, recommend a value")
    p_sweep.add_argument("grid", help="KEY=v1,v2,... e.g. max_staleness=0,1,2,4,8 (a unique leaf name is enough)")
    p_sweep.add_argument("args", nargs="*", help="[config.yaml] [key.sub=value ...] for every run")
    p_sweep.add_argument("--quick", action="store_true", help="short runs (30 steps, 16 prompts per batch)")
    p_sweep.add_argument("--tolerance", type=float, default=0.05,
                         help="largest final-reward drop vs the baseline run still accepted (absolute, default 0.05)")
    p_sweep.add_argument("--threshold", type=float, default=None,
                         help="reward for the time-to-threshold column (default: baseline final reward - tolerance)")
    p_sweep.add_argument("--name", default="", help="sweep directory under run.output_dir (default: timestamp)")
    p_sweep.add_argument("--quiet", action="store_true", help="no progress bar per run")
    p_slurm = sub.add_parser("slurm", help="write the run as a Slurm job script (sbatch), optionally submit it")
    p_slurm.add_argument("args", nargs="*", help="[config.yaml] [key.sub=value ...]; slurm.* sizes the job")
    p_slurm.add_argument("--submit", action="store_true", help="submit it with sbatch and print the job id")
    p_slurm.add_argument("--out", default=None, help="where to write the script (default <run dir>/slurm.sbatch)")
    p_slurm.add_argument("--resume", action="store_true", help="the job continues the run's latest checkpoint")
    # Overrides may follow options (`sweep k=0,1 --quick trainer.lr=1e-4`): argparse leaves them over.
    ns, extra = parser.parse_known_args(argv)
    unknown = [a for a in extra if a.startswith("-")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    config, overrides = _split([*getattr(ns, "args", []), *extra])
    try:
        if ns.command == "keys":
            from areal_py.app.keys import keys_command

            return keys_command(ns.dir, ns.servers)
        if ns.command == "sweep":
            from areal_py.app.sweep import run_sweep

            return run_sweep(ns.grid, config, overrides, quick=ns.quick, tolerance=ns.tolerance,
                             threshold=ns.threshold, name=ns.name, quiet=ns.quiet)
        if ns.command == "slurm":
            from areal_py.app.slurm import SubmitError, write_job

            try:
                return write_job(config, overrides, out=ns.out, resume=ns.resume, submit_job=ns.submit)
            except SubmitError as e:
                print(f"areal-py: {e}", file=sys.stderr)
                return 1
        if ns.command in offline_help:
            from areal_py.app.post_training import offline_command

            return offline_command(ns.command, config, overrides, resume=ns.resume, quiet=ns.quiet)
        if ns.command == "check":
            from areal_py.app.check import check_command

            return check_command(config, overrides)
        if ns.command == "run":
            from areal_py.app.launcher import run

            return run(config, overrides, resume=ns.resume, quiet=ns.quiet)
        return serve(ns.role, config, overrides, ns.resume)
    except (ConfigError, FileNotFoundError, FileExistsError) as e:
        print(f"areal-py: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
