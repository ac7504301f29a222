"""Every example in configs/cluster/ loads with the real config loader (unknown keys and bad values fail)
and describes a cluster run: a model directory, no embedded model, weights that reach other processes."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from areal_py.config import ConfigError, load_config

CLUSTER = Path(__file__).resolve().parents[2] / "configs" / "cluster"
FILES = sorted(CLUSTER.glob("*.yaml"))


def test_there_are_cluster_examples():
    assert len(FILES) >= 2, f"expected at least two cluster configs in {CLUSTER}"


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_cluster_config_loads_and_describes_a_cluster_run(path):
    cfg = load_config(path)
    assert Path(cfg.model.path).is_absolute(), "model.path: a directory downloaded beforehand"
    assert cfg.model.dtype == "bfloat16"
    assert cfg.trainer.world_size > 1 and cfg.rollout.num_servers > 1
    assert cfg.rollout.backend == "sglang"
    # weights reach the servers without a shared weights dir named in the file: over the controller or a group
    assert cfg.weights.transfer in ("stream", "dist") or cfg.weights.dir
    assert Path(cfg.run.output_dir).is_absolute(), "run.output_dir: a directory every node shares"
    assert cfg.controller.max_token_staleness is None or cfg.controller.max_token_staleness >= cfg.controller.max_staleness


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_an_unknown_key_in_a_cluster_config_is_refused(path, tmp_path):
    """The loader is strict for these files too: a misspelt key fails, naming it, instead of falling back."""
    data = yaml.safe_load(path.read_text())
    data["trainer"]["world_sise"] = data["trainer"]["world_size"]
    bad = tmp_path / path.name
    bad.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError, match="world_sise"):
        load_config(bad)


def test_a_multi_node_config_names_the_nodes_not_loopback():
    """Where the controller binds every interface, the others must connect to a name other nodes resolve."""
    multi = [load_config(f) for f in FILES if load_config(f).net.bind_host == "0.0.0.0"]
    assert multi, "expected one multi-node example (net.bind_host=0.0.0.0)"
    for cfg in multi:
        assert not cfg.net.controller_host.startswith("127.") and not cfg.weights.dist_host.startswith("127.")


@pytest.mark.parametrize("path", FILES, ids=[f.name for f in FILES])
def test_the_slurm_job_of_a_cluster_config_gives_every_process_its_own_gpus(path):
    """`areal-py slurm`'s placement of the file (areal_py/app/slurm.py job_steps): every trainer rank and rollout
    server gets GPUs, and no GPU of a node goes to two job steps."""
    from areal_py.app.slurm import job_steps

    cfg = load_config(path)
    steps = job_steps(cfg)
    gpu_steps = [s for s in steps if s.name != "controller"]
    assert all(s.gpus for s in gpu_steps), [(s.name, s.gpus) for s in gpu_steps]
    used = [(s.node, g) for s in gpu_steps for g in s.gpus]
    assert len(used) == len(set(used)), used
    assert all(0 <= g < cfg.slurm.gpus_per_node for _, g in used)
    servers = [s for s in steps if s.name.startswith("rollout-")]
    assert len(servers) == cfg.rollout.num_servers
