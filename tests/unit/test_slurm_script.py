"""`areal-py slurm`: the sbatch script's content for a one-node and two two-node splits, its syntax (bash -n,
shellcheck), the errors for splits that do not fit, pinning the head node, and submission. The script's
watch loop runs in tests/integration/test_slurm_watch.py, a real one-node Slurm job in tests/e2e/test_slurm_job.py."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from areal_py.app.slurm import SubmitError, job_steps, pin_hosts, sbatch_script, submit
from areal_py.config import ConfigError, dump_config, load_config

PYTHON = "/opt/venv/bin/python"


def _cfg(*overrides: str, tmp: Path = Path("/shared/runs")):
    return load_config(None, [f"run.output_dir={tmp}", "run.name=r1", *overrides])


def _start_lines(script: str) -> list[str]:
    return [line for line in script.splitlines() if line.startswith("start ")]


def test_one_node_script_runs_every_role_on_the_first_node():
    script = sbatch_script(_cfg(), PYTHON)
    assert "#SBATCH --nodes=1\n" in script and "#SBATCH --exclusive\n" in script
    assert "#SBATCH --output=/shared/runs/r1/logs/slurm-%j.out\n" in script
    assert "gpus-per-node" not in script and "--partition" not in script
    assert "PY=/opt/venv/bin/python\n" in script and "CFG=/shared/runs/r1/config.yaml\n" in script
    assert 'mapfile -t NODES < <(scontrol show hostnames "$SLURM_JOB_NODELIST")' in script
    assert '"$PY" -m areal_py.app.slurm pin-hosts "$CFG" "$HEAD" || exit 2' in script
    assert _start_lines(script) == [
        'start controller "${NODES[0]}" - "$PY" -m areal_py.app.cli serve controller "$CFG"',
        ('start trainer "${NODES[0]}" - "$PY" -m torch.distributed.run --nnodes=1 --nproc-per-node=1 --node-rank=0 '
         '--master-addr "$HEAD" --master-port=29500 -m areal_py.app.cli serve trainer "$CFG"'),
        'start rollout-0 "${NODES[0]}" - "$PY" -m areal_py.app.cli serve rollout "$CFG" rollout.server_id=rollout-0',
    ]
    assert "ESSENTIAL=(controller trainer)\nSERVERS=(rollout-0)\n" in script


def test_sbatch_options_come_from_the_slurm_section():
    script = sbatch_script(_cfg("slurm.partition=gpu", "slurm.account=proj7", "slurm.time=02:00:00",
                                "slurm.cpus_per_task=16", "slurm.exclusive=false", "slurm.job_name=grpo",
                                "slurm.extra_sbatch=['--mem=0', '--constraint=h100']",
                                "slurm.setup=['module load cuda/12.4']", "slurm.rdzv_port=29611",
                                "slurm.stop_grace_s=2.5"), PYTHON, resume=True)
    header = [line.removeprefix("#SBATCH ") for line in script.splitlines() if line.startswith("#SBATCH")]
    assert header == ["--job-name=grpo", "--nodes=1", "--ntasks-per-node=1",
                      "--output=/shared/runs/r1/logs/slurm-%j.out", "--cpus-per-task=16", "--partition=gpu",
                      "--account=proj7", "--time=02:00:00", "--mem=0", "--constraint=h100"]
    lines = script.splitlines()
    assert lines.index("module load cuda/12.4") < lines.index("set -uo pipefail  # not -e: the watch loop below "
                                                              "handles every step's exit code")
    assert "STOP_GRACE_S=3\n" in script  # rounded up: never a shorter grace than asked for
    trainer = next(line for line in _start_lines(script) if line.startswith("start trainer"))
    assert "--master-port=29611" in trainer and trainer.endswith('serve trainer "$CFG" --resume')


def test_two_trainer_nodes_sharing_with_servers_split_the_gpus():
    cfg = _cfg("slurm.trainer_nodes=2", "trainer.world_size=4", "rollout.num_servers=4", "slurm.gpus_per_node=4")
    script = sbatch_script(cfg, PYTHON)
    assert "#SBATCH --nodes=2\n" in script and "#SBATCH --gpus-per-node=4\n" in script
    assert "GPUS_PER_NODE=4\n" in script
    starts = _start_lines(script)
    torchrun = ('"$PY" -m torch.distributed.run --nnodes=2 --nproc-per-node=2 --node-rank={k} --master-addr "$HEAD" '
                '--master-port=29500 -m areal_py.app.cli serve trainer "$CFG"')
    assert starts[1] == 'start trainer "${NODES[0]}" 0,1 ' + torchrun.format(k=0)
    assert starts[2] == 'start trainer-node1 "${NODES[1]}" 0,1 ' + torchrun.format(k=1)
    # two servers per node, each with one of the two GPUs the ranks leave
    assert [s.split(" ", 4)[1:4] for s in starts[3:]] == [
        ["rollout-0", '"${NODES[0]}"', "2"], ["rollout-1", '"${NODES[0]}"', "3"],
        ["rollout-2", '"${NODES[1]}"', "2"], ["rollout-3", '"${NODES[1]}"', "3"]]
    assert "ESSENTIAL=(controller trainer trainer-node1)\n" in script


def test_a_rollout_node_takes_every_server_and_all_its_gpus():
    cfg = _cfg("slurm.rollout_nodes=1", "trainer.world_size=8", "rollout.num_servers=4", "slurm.gpus_per_node=8")
    steps = {s.name: s for s in job_steps(cfg)}
    assert list(steps) == ["controller", "trainer", "rollout-0", "rollout-1", "rollout-2", "rollout-3"]
    assert steps["trainer"].node == 0 and steps["trainer"].gpus == tuple(range(8))
    assert "--nproc-per-node=8" in steps["trainer"].argv and "--nnodes=1" in steps["trainer"].argv
    assert [(steps[f"rollout-{i}"].node, steps[f"rollout-{i}"].gpus) for i in range(4)] == [
        (1, (0, 1)), (1, (2, 3)), (1, (4, 5)), (1, (6, 7))]
    assert not any(steps[f"rollout-{i}"].essential for i in range(4)) and steps["controller"].essential
    assert "#SBATCH --nodes=2\n" in sbatch_script(cfg, PYTHON)


@pytest.mark.parametrize("overrides, message", [
    (["slurm.trainer_nodes=2", "trainer.world_size=3"], ("trainer.world_size=3 does not split evenly over "
                                                         "slurm.trainer_nodes=2")),
    (["slurm.rollout_nodes=2", "rollout.num_servers=3"], ("rollout.num_servers=3 does not split evenly over "
                                                          "slurm.rollout_nodes=2")),
    (["slurm.gpus_per_node=2", "trainer.world_size=4"], "4 trainer rank(s) per node"),
    (["slurm.gpus_per_node=2", "trainer.world_size=2"], "no GPU is left for rollout servers"),
    (["slurm.gpus_per_node=4", "trainer.world_size=2", "rollout.num_servers=3"],
     "the GPUs free for rollout servers on a node=2 does not split evenly"),
])
def test_splits_that_do_not_fit_are_config_errors(overrides, message):
    with pytest.raises(ConfigError) as e:
        job_steps(_cfg(*overrides))
    assert message in str(e.value)


def test_a_script_needs_the_run_name():
    with pytest.raises(ConfigError, match="run.name must be set"):
        sbatch_script(load_config(None, []), PYTHON)


SPLITS = {"one node": [], "two trainer nodes": ["slurm.trainer_nodes=2", "trainer.world_size=4",
                                                 "rollout.num_servers=2", "slurm.gpus_per_node=4"],
          "trainer + rollout node": ["slurm.rollout_nodes=1", "rollout.num_servers=2", "slurm.partition=a b"]}


@pytest.mark.parametrize("split", SPLITS)
def test_script_is_valid_bash(tmp_path, split):
    path = tmp_path / "job.sbatch"
    path.write_text(sbatch_script(_cfg(*SPLITS[split], tmp=tmp_path / "my runs"), PYTHON))
    proc = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("split", SPLITS)
def test_script_passes_shellcheck(tmp_path, split):
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed (apt-get install shellcheck; .ci/run installs it)")
    path = tmp_path / "job.sbatch"
    path.write_text(sbatch_script(_cfg(*SPLITS[split], tmp=tmp_path / "my runs"), PYTHON))
    proc = subprocess.run(["shellcheck", "--shell=bash", str(path)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("bind, expect", [("127.0.0.1", "0.0.0.0"), ("localhost", "0.0.0.0"),
                                          ("10.1.2.3", "10.1.2.3")])
def test_pin_hosts_points_every_role_at_the_head_node(tmp_path, bind, expect):
    f = tmp_path / "config.yaml"
    dump_config(_cfg(f"net.bind_host={bind}", "trainer.total_steps=7", tmp=tmp_path / "runs"), f)
    pin_hosts(f, "gpu-node-17")
    data = yaml.safe_load(f.read_text())
    assert data["net"]["controller_host"] == "gpu-node-17" and data["weights"]["dist_host"] == "gpu-node-17"
    assert data["net"]["bind_host"] == expect
    assert data["trainer"]["total_steps"] == 7  # the rest of the resolved config is untouched
    # off loopback, so CURVE: the run's own keys, made once on the shared run directory, named for every role
    keys = tmp_path / "runs" / "r1" / "keys"
    assert data["net"]["keys_dir"] == str(keys) and (keys / "trainer.key_secret").is_file()
    public = (keys / "controller.key").read_text()
    pin_hosts(f, "gpu-node-17")  # a requeued job: the same keys, not new ones
    assert yaml.safe_load(f.read_text())["net"]["keys_dir"] == str(keys)
    assert (keys / "controller.key").read_text() == public


def test_submit_without_sbatch_says_where_to_run_it(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(SubmitError, match="sbatch not found on PATH.*sbatch .*job.sbatch"):
        submit(tmp_path / "job.sbatch")


def _fake_tool(bin_dir: Path, name: str, body: str) -> None:
    """An executable stand-in for a Slurm command."""
    p = bin_dir / name
    p.write_text("#!/bin/bash\n" + body)
    p.chmod(0o755)


def test_cli_writes_the_script_and_config_and_submits(tmp_path, monkeypatch, capsys):
    """`areal-py slurm ... --submit`: config.yaml with the overrides and the script in the run directory,
    then sbatch (a stand-in recording its arguments) and the job id it printed."""
    from areal_py.app.cli import main

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_tool(bin_dir, "sbatch", f'echo "$@" > {tmp_path}/sbatch-args\necho "4242;cluster1"\n')
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    runs = tmp_path / "runs"
    assert main(["slurm", f"run.output_dir={runs}", "run.name=j", "trainer.total_steps=9", "slurm.trainer_nodes=2",
                 "trainer.world_size=2", "rollout.num_servers=2", "--submit"]) == 0
    script = runs / "j" / "slurm.sbatch"
    assert (tmp_path / "sbatch-args").read_text().split() == ["--parsable", str(script)]
    assert capsys.readouterr().out.splitlines()[-1] == "4242"
    assert load_config(runs / "j" / "config.yaml").trainer.total_steps == 9
    assert "#SBATCH --nodes=2\n" in script.read_text() and (runs / "j" / "logs").is_dir()
    assert f"PY={sys.executable}\n" in script.read_text()


def test_cli_refuses_a_bad_split_before_claiming_the_run_dir(tmp_path, capsys):
    from areal_py.app.cli import main

    runs = tmp_path / "runs"
    assert main(["slurm", f"run.output_dir={runs}", "run.name=j", "trainer.world_size=3",
                 "slurm.trainer_nodes=2", f"--out={tmp_path / 'x.sbatch'}"]) == 2
    assert "does not split evenly" in capsys.readouterr().err
    assert not runs.exists() and not (tmp_path / "x.sbatch").exists()


def test_cli_submit_without_sbatch_fails_naming_it(tmp_path, monkeypatch, capsys):
    from areal_py.app.cli import main

    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    out = tmp_path / "job.sbatch"
    assert main(["slurm", f"run.output_dir={tmp_path}", "run.name=j", f"--out={out}", "--submit"]) == 1
    assert "sbatch not found on PATH" in capsys.readouterr().err and out.is_file()


CLUSTER = Path(__file__).resolve().parents[2] / "configs" / "cluster"


@pytest.mark.parametrize("name, overrides, trainer_gpus, servers", [
    # docs/operations.md, Slurm: one node, ranks on GPUs 0-3 and the 4 servers on 4-7
    ("qwen2.5-1.5b-1node-8gpu.yaml", ["slurm.gpus_per_node=8"], (0, 1, 2, 3), [(0, (g,)) for g in range(4, 8)]),
    # two nodes: 8 ranks on the first, 8 servers of one GPU each on the second
    ("qwen2.5-7b-2node-16gpu.yaml", ["slurm.rollout_nodes=1", "slurm.gpus_per_node=8"], tuple(range(8)),
     [(1, (g,)) for g in range(8)]),
])
def test_the_cluster_configs_split_as_documented(tmp_path, name, overrides, trainer_gpus, servers):
    cfg = load_config(CLUSTER / name, overrides)
    steps = job_steps(cfg)
    assert steps[1].name == "trainer" and steps[1].node == 0 and steps[1].gpus == trainer_gpus
    assert [(s.node, s.gpus) for s in steps[2:]] == servers
    path = tmp_path / "job.sbatch"
    path.write_text(sbatch_script(cfg, PYTHON))
    assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
