"""The launcher's trainer ranks: the environment torchrun would give each one."""
from __future__ import annotations

from areal_py.app.launcher import trainer_rank_envs


def test_world_size_one_sets_nothing():
    assert trainer_rank_envs(1) == [{}]  # no process group: a plain run stays what it was


def test_each_rank_gets_the_standard_environment_with_one_port():
    envs = trainer_rank_envs(3)
    assert [e["RANK"] for e in envs] == ["0", "1", "2"] == [e["LOCAL_RANK"] for e in envs]
    assert {e["WORLD_SIZE"] for e in envs} == {"3"}
    assert {e["MASTER_ADDR"] for e in envs} == {"127.0.0.1"}
    ports = {e["MASTER_PORT"] for e in envs}
    assert len(ports) == 1 and 0 < int(ports.pop()) < 65536
