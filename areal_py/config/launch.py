"""Where and how the processes of a run start: run identity, sockets, and a Slurm job's shape."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from areal_py.config.section import Section


class RunConfig(Section):
    name: str = Field("", description="Run name; empty means a timestamped name chosen at launch.")
    output_dir: str = Field("runs", description="Directory holding one subdirectory per run.")
    seed: int = Field(0, description="Seed for sampling, data order and initialisation.")
    mode: Literal["async", "sync"] = Field(
        "async", description="async: generation and training overlap within max_staleness; "
        "sync: strictly alternate generate-a-batch / train (forces controller.max_staleness=0).")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Logging level of every process.")
    dashboard_port: int = Field(8787, ge=0, le=65535, description="Live dashboard served by the controller on "
                                "http://<net.bind_host>:<port>/ (0 = off).")
    metrics_port: int = Field(0, ge=0, le=65535, description="Prometheus /metrics base port: controller on it, "
                              "trainer +1, rollout server i +2+i (0 = off).")
    tensorboard: bool = Field(False, description="Also write every numeric field of each step's metrics record "
                              "as a TensorBoard scalar, in <run.output_dir>/<run.name>/tensorboard/ (runs/<name>/"
                              "tensorboard/ by default); needs `pip install 'areal-py[tensorboard]'`.")
    torch_threads: int = Field(0, ge=0, description="torch threads per process (and for the cold start); 0 = "
                               "the cores free at start (load average and a short CPU sample), shared between "
                               "trainer and servers in async mode, all free cores per phase in sync mode, "
                               "never under 1: more threads than free cores slows torch several-fold.")
    launcher: Literal["local", "ray"] = Field(
        "local", description="How `areal-py run` starts the roles: local processes on this machine, or Ray actors "
        "on a Ray cluster (needs `pip install 'areal-py[ray]'`; the run directory must be on a filesystem every "
        "node shares; docs/operations.md).")
    ray_address: str = Field("", description="ray launcher: empty starts a Ray instance on this machine for the run "
                             "(shut down after it); `auto` or `<host>:<port>` joins a running cluster.")
    ray_num_cpus: int = Field(0, ge=0, description="ray launcher, Ray started for the run only: logical CPUs it "
                              "offers; 0 = exactly what the placement groups ask for.")
    ray_cpus_per_role: float = Field(1.0, gt=0, description="ray launcher: logical CPUs each role's placement "
                                     "bundle reserves (controller, each trainer rank, each rollout server).")
    ray_gpus_per_trainer: float = Field(0.0, ge=0, description="ray launcher: GPUs each trainer rank's bundle "
                                        "reserves; Ray sets CUDA_VISIBLE_DEVICES for it, so LOCAL_RANK is then 0.")
    ray_gpus_per_server: float = Field(0.0, ge=0, description="ray launcher: GPUs each rollout server's bundle "
                                       "reserves.")
    ray_trainer_strategy: Literal["PACK", "STRICT_PACK"] = Field(
        "PACK", description="ray launcher: placement of the trainer ranks' group: PACK (on as few nodes as fit) "
        "or STRICT_PACK (one node or none). Rollout servers are always SPREAD across nodes.")
    ray_timeout_s: float = Field(120.0, gt=0, description="ray launcher: bound on each wait on Ray (placement "
                                 "groups scheduled, actors answering); a wait that runs out names what it waited "
                                 "for and stops the run.")


class NetConfig(Section):
    bind_host: str = Field("127.0.0.1", description="Interface the controller binds to; off loopback only with "
                           "net.keys_dir (the sockets refuse to start without keys).")
    keys_dir: str = Field("", description="Directory of CURVE keys (`areal-py keys DIR`): set, every socket is "
                          "authenticated and encrypted and the controller accepts only the listed trainer and rollout "
                          "keys; empty, plain TCP, allowed on loopback only. `areal-py run`/`slurm` fill it with "
                          "<run dir>/keys when the controller binds off loopback (docs/operations.md).")
    http_token_file: str = Field("", description="File holding the token the dashboard and /metrics require off "
                                 "loopback (`Authorization: Bearer <token>`); empty = <net.keys_dir>/http_token, which "
                                 "`areal-py keys` writes. Off loopback an HTTP endpoint without a token refuses to "
                                 "start; on loopback it answers anyone.")
    controller_host: str = Field("127.0.0.1", description="Host the trainer and servers connect to.")
    rollout_port: int = Field(45501, ge=1, le=65535, description="Controller ROUTER for rollout servers.")
    weights_port: int = Field(45502, ge=1, le=65535, description="Controller PUB for weight-update broadcasts.")
    trainer_port: int = Field(45503, ge=1, le=65535, description="Controller ROUTER for trainer messages (accepted from the "
                              "trainer's routing id only).")
    batch_port: int = Field(45504, ge=1, le=65535, description="Controller ROUTER sending ready batches to the trainer "
                            "(its routing id only).")
    max_message_bytes: int = Field(
        8 * 2**30, ge=1024, description="ZMQ_MAXMSGSIZE of every role's sockets: a larger incoming frame (libzmq "
        "checks each frame of a multipart message, not the sum) is dropped with its connection. Streamed weights "
        "send one tensor per frame, so this must exceed the largest tensor (8 GiB: a 2.1B-element float32 "
        "embedding, Llama-3-405B's).")

    def addr(self, port: int, *, bind: bool = False) -> str:
        return f"tcp://{self.bind_host if bind else self.controller_host}:{port}"


class SlurmConfig(Section):
    """Sizing of the job `areal-py slurm` writes (areal_py/app/slurm.py); no other command reads it."""

    trainer_nodes: int = Field(1, ge=1, description="Nodes running trainer ranks (torchrun --nnodes); "
                               "trainer.world_size must be a multiple of it: world_size / trainer_nodes ranks per "
                               "node. The controller and trainer rank 0 run on the first of them.")
    rollout_nodes: int = Field(0, ge=0, description="Nodes running only rollout servers, rollout.num_servers spread "
                               "evenly over them; 0 = the servers share the trainer's nodes (a one-node job).")
    gpus_per_node: int = Field(0, ge=0, description="GPUs of each node (#SBATCH --gpus-per-node; every GPU of a node, "
                               "with exclusive=true); 0 = CPU only. Trainer ranks get GPUs 0..ranks-1 of their node, "
                               "rollout servers share the rest of a trainer node, or all of a rollout node, evenly.")
    cpus_per_task: int = Field(0, ge=0, description="#SBATCH --cpus-per-task: one task per node, so the CPUs each "
                               "node gives the job; 0 = not set (the whole node with exclusive=true).")
    exclusive: bool = Field(True, description="#SBATCH --exclusive: whole nodes for the job, every role's processes "
                            "on a node sharing them.")
    partition: str = Field("", description="#SBATCH --partition; empty = the cluster's default partition.")
    account: str = Field("", description="#SBATCH --account; empty = the user's default account.")
    time: str = Field("", description="#SBATCH --time (e.g. 24:00:00); empty = the partition's default limit. A job "
                      "stopped at its limit resumes from its latest checkpoint with `areal-py slurm ... --resume`.")
    job_name: str = Field("", description="#SBATCH --job-name; empty = areal-py-<run.name>.")
    extra_sbatch: list[str] = Field(default_factory=list, description="More sbatch options, one per #SBATCH line, "
                                    "e.g. ['--mem=0', '--constraint=h100'].")
    setup: list[str] = Field(default_factory=list, description="Shell lines the job runs before any role starts, "
                             "e.g. ['module load cuda/12.4'].")
    python: str = Field("", description="Python interpreter on the nodes (with areal-py installed); empty = the one "
                        "that ran `areal-py slurm` (a virtualenv on a filesystem every node shares).")
    rdzv_port: int = Field(29500, ge=1, le=65535, description="Port on the first node for the trainer ranks' "
                           "rendezvous (torchrun --master-port).")
    stop_grace_s: float = Field(30.0, gt=0, description="When one step fails, seconds the others get after SIGTERM "
                                "before SIGKILL (Slurm's own KillWait default).")
