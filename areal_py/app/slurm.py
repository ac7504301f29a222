"""`areal-py slurm`: the run as one sbatch script: the controller, trainer ranks and rollout servers as srun
steps of one job, started and stopped together.

The script is a pure function of the resolved config (`sbatch_script`), so what it will do is visible
before anything is submitted, and testable. Its layout (`job_steps`):

- the job's nodes, in `scontrol show hostnames "$SLURM_JOB_NODELIST"` order: trainer nodes first
  (`slurm.trainer_nodes`), then `slurm.rollout_nodes` rollout-only nodes. The first node is the head: it
  runs the controller and trainer rank 0, so it is where every other process connects (the controller's
  sockets, the ranks' rendezvous, the weight group of `weights.transfer=dist`).
- one srun step per trainer node, `torchrun --nnodes M --nproc-per-node P --node-rank k --master-addr HEAD`.
  The node rank is fixed, not left to a c10d rendezvous: c10d numbers nodes by sorted host name, which would
  put rank 0 (the rank that talks to the controller and hosts the weight group) on any node.
- one srun step per rollout server (`rollout.server_id=rollout-<i>`), servers spread evenly over the
  rollout nodes (or the trainer nodes when there are none); with GPUs each gets an equal share of its
  node's GPUs that the trainer ranks do not use.

The config is resolved and written once into the run directory at generation (`launcher.prepare_run`);
at job start, before any role, the script pins the node addresses into it (`pin_hosts`), so every role
reads the same file. Every step logs to `<run dir>/logs/<step>.log`. The job ends when the controller and
every trainer step have exited 0; a failing controller or trainer step, or the last rollout server
failing, stops every other step (SIGTERM, then SIGKILL after `slurm.stop_grace_s`) and fails the job with
that step's log tail. A rollout server that fails while others run is survived, as in `areal-py run`.
"""
from __future__ import annotations

import argparse
import ipaddress
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from areal_py.app.keys import ensure_run_keys
from areal_py.config import Config, ConfigError, dump_config, load_config

# Words of a step's command that the job script fills in: the head node's name is known only when the job
# runs; the interpreter and the config file are the script's variables, so each appears once in it.
HEAD, PY, CFG = "$HEAD", "$PY", "$CFG"


@dataclass(frozen=True)
class JobStep:
    """One srun step: `name` is its log's stem; it runs `argv` on the job's node number `node`.

    `gpus` (empty: untouched) becomes the step's CUDA_VISIBLE_DEVICES, indices into its node's GPUs;
    `essential` steps (controller, trainer) end the job when they fail, a rollout server only when it is
    the last one running."""

    name: str
    node: int
    argv: tuple[str, ...]
    gpus: tuple[int, ...] = ()
    essential: bool = True


def _split_evenly(what: str, count: int, over: str, parts: int) -> int:
    if count % parts:
        raise ConfigError(f"{what}={count} does not split evenly over {over}={parts}")
    return count // parts


def job_nodes(cfg: Config) -> int:
    return cfg.slurm.trainer_nodes + cfg.slurm.rollout_nodes


def job_steps(cfg: Config, resume: bool = False) -> list[JobStep]:
    """Every srun step of the job in start order: controller, trainer nodes, rollout servers.

    Raises ConfigError when the ranks, servers or GPUs do not divide over the nodes."""
    s = cfg.slurm
    serve = (PY, "-m", "areal_py.app.cli", "serve")
    ranks = _split_evenly("trainer.world_size", cfg.trainer.world_size, "slurm.trainer_nodes", s.trainer_nodes)
    gpus = s.gpus_per_node
    if gpus and ranks > gpus:
        raise ConfigError(f"{ranks} trainer rank(s) per node (trainer.world_size={cfg.trainer.world_size} over "
                          f"slurm.trainer_nodes={s.trainer_nodes}) do not fit slurm.gpus_per_node={gpus}")
    steps = [JobStep("controller", 0, (*serve, "controller", CFG))]
    for k in range(s.trainer_nodes):
        torchrun = (PY, "-m", "torch.distributed.run", f"--nnodes={s.trainer_nodes}",
                    f"--nproc-per-node={ranks}", f"--node-rank={k}", "--master-addr", HEAD,
                    f"--master-port={s.rdzv_port}")
        steps.append(JobStep("trainer" if k == 0 else f"trainer-node{k}", k,
                             (*torchrun, *serve[1:], "trainer", CFG, *(["--resume"] if resume else [])),
                             tuple(range(ranks)) if gpus else ()))
    servers = cfg.rollout.num_servers
    if s.rollout_nodes:
        first, hosts, over = s.trainer_nodes, s.rollout_nodes, "slurm.rollout_nodes"
        free = tuple(range(gpus))
    else:
        first, hosts, over = 0, s.trainer_nodes, "slurm.trainer_nodes (slurm.rollout_nodes=0)"
        free = tuple(range(ranks, gpus))
    per_node = _split_evenly("rollout.num_servers", servers, over, hosts)
    share = 0
    if gpus:
        if not free:
            raise ConfigError(f"no GPU is left for rollout servers: the trainer ranks take all slurm.gpus_per_node="
                              f"{gpus} of each trainer node; set slurm.rollout_nodes or use fewer ranks per node")
        share = _split_evenly("the GPUs free for rollout servers on a node", len(free),
                              "the servers per node", per_node)
    for i in range(servers):
        j = i % per_node
        steps.append(JobStep(f"rollout-{i}", first + i // per_node,
                             (*serve, "rollout", CFG, f"rollout.server_id=rollout-{i}"),
                             free[j * share:(j + 1) * share], essential=False))
    return steps


def _word(w: str) -> str:
    """A command word for bash: quoted literally, but a variable of the script (HEAD, PY, CFG) expanded."""
    return f'"{w}"' if w in (HEAD, PY, CFG) else shlex.quote(w)


def _sbatch_options(cfg: Config) -> list[str]:
    s = cfg.slurm
    opts = [f"--job-name={s.job_name or 'areal-py-' + cfg.run.name}", f"--nodes={job_nodes(cfg)}",
            "--ntasks-per-node=1", f"--output={cfg.run_dir() / 'logs' / 'slurm-%j.out'}"]
    opts += ["--exclusive"] if s.exclusive else []
    opts += [f"--cpus-per-task={s.cpus_per_task}"] if s.cpus_per_task else []
    opts += [f"--gpus-per-node={s.gpus_per_node}"] if s.gpus_per_node else []
    opts += [f"--{key}={value}" for key, value in (("partition", s.partition), ("account", s.account),
                                                   ("time", s.time)) if value]
    return opts + list(s.extra_sbatch)


# The job's body after its variables: the step runner, the watch loop and the cleanup. Plain text (no
# formatting), so it reads as the bash it is; shellcheck runs on the whole script in the tests.
_RUNNER = r"""
mkdir -p "$STATUS"
declare -A FAILED_SEEN=()

# start NAME NODE GPUS CMD...: CMD as one srun step on NODE, with CUDA_VISIBLE_DEVICES=GPUS (- = untouched);
# its output in $LOGS/NAME.log, its srun's pid in $STATUS/NAME.pid, its exit code in $STATUS/NAME.rc
start() {
  local name=$1 node=$2 gpus=$3
  shift 3
  local gres=()
  if [[ $gpus != - ]]; then
    gres=("--gres=gpu:$GPUS_PER_NODE")  # the node's GPUs, shared by the steps there (--overlap)
    set -- env "CUDA_VISIBLE_DEVICES=$gpus" "$@"
  fi
  (
    srun --overlap --nodes=1 --ntasks=1 --nodelist="$node" "${gres[@]}" "$@" >"$LOGS/$name.log" 2>&1 &
    echo $! >"$STATUS/$name.pid"
    wait $!
    echo $? >"$STATUS/$name.rc"
  ) &
}

rc_of() { cat "$STATUS/$1.rc" 2>/dev/null || true; }

# Stop every step still running: SIGTERM to the steps' processes, so every role exits cleanly, then SIGKILL
# after the grace. `scancel --signal` signals the job's steps, not this script; signalling srun instead would
# not do: srun answers SIGTERM by cancelling its step at once, SIGKILL to the processes.
stop_steps() {
  local pids=() f pid
  for f in "$STATUS"/*.pid; do
    [[ -e $f ]] || continue
    pid=$(cat "$f")
    if kill -0 "$pid" 2>/dev/null; then pids+=("$pid"); fi
  done
  (( ${#pids[@]} )) || return 0
  scancel --signal=TERM "$SLURM_JOB_ID" 2>/dev/null || kill -TERM "${pids[@]}" 2>/dev/null
  local deadline=$((SECONDS + STOP_GRACE_S))
  while (( SECONDS < deadline )); do
    local alive=0
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
    (( alive )) || return 0
    sleep 1
  done
  echo "areal-py slurm: steps still running ${STOP_GRACE_S}s after SIGTERM (slurm.stop_grace_s); SIGKILL" >&2
  kill -KILL "${pids[@]}" 2>/dev/null  # srun gone, the job's end (this script's exit) kills what is left
}

trap stop_steps EXIT
trap 'echo "areal-py slurm: job signalled; stopping every step (resume with --resume)" >&2; exit 143' TERM INT
"""

_WATCH = r"""
fail() {  # fail NAME RC: a step that ends the job
  echo "areal-py slurm: step '$1' failed with exit code $2; stopping the others. log: $LOGS/$1.log" >&2
  tail -n 15 "$LOGS/$1.log" | sed 's/^/    /' >&2
  exit 1
}

last=""
while :; do
  # returns as soon as any step's runner ends; 127: nothing is left to wait for, yet the run is not done
  wait -n
  status=$?
  if (( status == 127 )); then
    echo "areal-py slurm: every step has ended without the run finishing (see $LOGS)" >&2
    exit 1
  fi
  done_all=1
  for name in "${ESSENTIAL[@]}"; do
    rc=$(rc_of "$name")
    if [[ -z $rc ]]; then done_all=0; elif [[ $rc != 0 ]]; then fail "$name" "$rc"; fi
  done
  if (( done_all )); then
    echo "areal-py slurm: the run finished; metrics in $RUN_DIR/metrics.jsonl"
    exit 0
  fi
  left=0
  for name in "${SERVERS[@]}"; do
    rc=$(rc_of "$name")
    if [[ -z $rc || $rc == 0 ]]; then
      left=$((left + 1))
    elif [[ -z ${FAILED_SEEN[$name]:-} ]]; then
      FAILED_SEEN[$name]=1
      last=$name
      echo "areal-py slurm: rollout server '$name' died with exit code $rc (log: $LOGS/$name.log)" >&2
    fi
  done
  if (( left == 0 )); then fail "$last" "$(rc_of "$last")"; fi
done
"""


def _array(name: str, words: list[str]) -> str:
    return f"{name}=({' '.join(shlex.quote(w) for w in words)})"


def sbatch_script(cfg: Config, python: str, resume: bool = False, steps: list[JobStep] | None = None) -> str:
    """The job script for the resolved `cfg` (run.name set; its config.yaml in the run directory).

    `python` is the interpreter the nodes run; `steps` defaults to `job_steps(cfg, resume)`. Pure: it reads
    no file and no environment."""
    if not cfg.run.name:
        raise ConfigError("run.name must be set before writing a job script (launcher.prepare_run sets it)")
    steps = job_steps(cfg, resume) if steps is None else steps
    n = job_nodes(cfg)
    run_dir = cfg.run_dir()
    lines = ["#!/bin/bash",
             f"# areal-py run '{cfg.run.name}' as one Slurm job: written by `areal-py slurm` (areal_py/app/slurm.py)",
             f"# from {run_dir / 'config.yaml'}; write it again rather than editing it.",
             *(f"#SBATCH {opt}" for opt in _sbatch_options(cfg)),
             *cfg.slurm.setup,
             "set -uo pipefail  # not -e: the watch loop below handles every step's exit code",
             f"PY={shlex.quote(python)}",
             f"CFG={shlex.quote(str(run_dir / 'config.yaml'))}",
             f"RUN_DIR={shlex.quote(str(run_dir))}",
             'LOGS="$RUN_DIR/logs"',
             'STATUS="$LOGS/steps-${SLURM_JOB_ID:?run this script with sbatch}"',
             f"STOP_GRACE_S={int(cfg.slurm.stop_grace_s + 0.999)}",
             f"GPUS_PER_NODE={cfg.slurm.gpus_per_node}",
             "export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1",
             'mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")',
             f"if (( ${{#NODES[@]}} < {n} )); then",
             f'  echo "areal-py slurm: the job has ${{#NODES[@]}} node(s) (${{NODES[*]}}); it needs {n}" >&2',
             "  exit 2",
             "fi",
             "HEAD=${NODES[0]}",
             'echo "areal-py slurm: job $SLURM_JOB_ID on ${NODES[*]}; controller and trainer rank 0 on $HEAD"',
             '"$PY" -m areal_py.app.slurm pin-hosts "$CFG" "$HEAD" || exit 2',
             _array("ESSENTIAL", [st.name for st in steps if st.essential]),
             _array("SERVERS", [st.name for st in steps if not st.essential]),
             _RUNNER.strip("\n")]
    for st in steps:
        gpus = ",".join(map(str, st.gpus)) or "-"
        lines.append(f'start {st.name} "${{NODES[{st.node}]}}" {gpus} {" ".join(map(_word, st.argv))}')
    lines.append(_WATCH.strip("\n"))
    return "\n".join(lines) + "\n"


def pin_hosts(cfg_file: Path, head: str) -> Config:
    """At job start: the head node's name into the run's config, before any role reads it.

    The controller's sockets, the trainer ranks' rendezvous and the weight group are on the head node, so
    net.controller_host and weights.dist_host become `head`; a loopback net.bind_host (unreachable from the
    other nodes) becomes 0.0.0.0, any other is kept (an interface the user chose). Off loopback without
    net.keys_dir, the run's own CURVE keys are made in <run dir>/keys and named there (app/keys.py)."""
    cfg = load_config(cfg_file)
    cfg.net.controller_host = head
    cfg.weights.dist_host = head
    if cfg.net.bind_host == "localhost" or _is_loopback(cfg.net.bind_host):
        cfg.net.bind_host = "0.0.0.0"
    ensure_run_keys(cfg)
    dump_config(cfg, cfg_file)
    return cfg


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class SubmitError(RuntimeError):
    """sbatch is missing or refused the job; the message says which and how."""


def submit(script: Path) -> str:
    """`sbatch --parsable script`: the job id, or SubmitError with sbatch's own message."""
    sbatch = shutil.which("sbatch")
    if sbatch is None:
        raise SubmitError(f"sbatch not found on PATH: run this on a Slurm login node, or submit {script} there with "
                          f"`sbatch {script}`")
    proc = subprocess.run([sbatch, "--parsable", str(script)], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        raise SubmitError(f"sbatch refused {script} (exit code {proc.returncode}): {proc.stderr.strip()}")
    return proc.stdout.strip().split(";")[0]


def write_job(config: str | None, overrides: list[str], out: str | None = None, resume: bool = False,
              submit_job: bool = False) -> int:
    """`areal-py slurm`: resolve the config into the run directory, write the script, optionally submit it."""
    from areal_py.app.launcher import prepare_run

    cfg = load_config(config, overrides)
    python = cfg.slurm.python or sys.executable
    job_steps(cfg, resume)  # a split that does not fit fails before the run directory is claimed
    cfg = prepare_run(config, overrides, resume)
    (cfg.run_dir() / "logs").mkdir(exist_ok=True)  # sbatch --output goes there: it must exist at job start
    path = Path(out) if out else cfg.run_dir() / "slurm.sbatch"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(sbatch_script(cfg, python, resume))
    path.chmod(0o755)
    print(f"areal-py: run '{cfg.run.name}' as a Slurm job of {job_nodes(cfg)} node(s): {path}")
    if submit_job:
        job = submit(path)
        print(f"areal-py: submitted job {job}; logs in {cfg.run_dir() / 'logs'} (slurm-{job}.out, one per step)")
        print(job)
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m areal_py.app.slurm pin-hosts CFG HEAD`: what the job script runs at its start."""
    parser = argparse.ArgumentParser(prog="python -m areal_py.app.slurm")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("pin-hosts", help="put the head node's name into a run's config.yaml")
    p.add_argument("config")
    p.add_argument("head")
    ns = parser.parse_args(argv)
    try:
        cfg = pin_hosts(Path(ns.config), ns.head)
    except ConfigError as e:
        print(f"areal-py slurm: {e}", file=sys.stderr)
        return 2
    print(f"areal-py slurm: {ns.config}: net.controller_host={cfg.net.controller_host} "
          f"net.bind_host={cfg.net.bind_host} weights.dist_host={cfg.weights.dist_host}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
