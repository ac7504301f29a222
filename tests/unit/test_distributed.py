"""trainer.distributed: world size from the environment, collectives over 2 gloo ranks, named timeouts."""
from __future__ import annotations

import pytest
import torch
from dist_ranks import run_ranks

from trainer.distributed import Dist, DistError, all_reduce, broadcast, init_dist, scatter


def test_world_size_one_creates_no_group(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    d = init_dist(5.0)
    assert (d.rank, d.world_size, d.backend, d.is_main, d.distributed) == (0, 1, "none", True, False)
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert init_dist(5.0) == Dist.single()
    assert not torch.distributed.is_initialized()
    t = torch.tensor([3.0])
    assert all_reduce(t, Dist.single(), "x").item() == 3.0  # no-op without a group


@pytest.mark.parametrize(("env", "match"), [({"WORLD_SIZE": "2"}, "RANK is not set"),
                                            ({"WORLD_SIZE": "2", "RANK": "2"}, "outside 0..1"),
                                            ({"WORLD_SIZE": "2", "RANK": "0"}, "MASTER_ADDR is not set"),
                                            ({"WORLD_SIZE": "two"}, "not an integer")])
def test_bad_environment_is_named(monkeypatch, env, match):
    for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        init_dist(5.0)


def _collectives() -> list[float]:
    d = init_dist(30.0)
    assert d.backend == "gloo" and d.world_size == 2 and d.is_main == (d.rank == 0)
    s = all_reduce(torch.tensor([float(d.rank + 1)]), d, "rank sum").item()
    b = broadcast(torch.tensor([7.0 if d.is_main else 0.0]), d, "seven").item()
    chunks = [torch.tensor([10.0, 11.0]), torch.tensor([20.0, 21.0])] if d.is_main else None
    out = scatter(torch.zeros(2), chunks, d, "rows").tolist()
    return [s, b, *out]


def test_collectives_over_two_gloo_ranks():
    r0, r1 = run_ranks(_collectives, 2)
    assert r0 == [3.0, 7.0, 10.0, 11.0]  # 1 + 2; rank 0's value; rank 0's own chunk
    assert r1 == [3.0, 7.0, 20.0, 21.0]


def _one_rank_absent() -> str:
    d = init_dist(30.0)
    if d.rank == 1:  # never joins the collective, stays alive past rank 0's timeout
        import time
        time.sleep(4)
        return "absent"
    try:
        all_reduce(torch.ones(1), d, "token counts", step=3, timeout_s=1.0)
    except DistError as e:
        return str(e)
    return "no error"


def test_a_missing_peer_is_a_named_timeout():
    msg, _ = run_ranks(_one_rank_absent, 2)
    assert "all_reduce of token counts" in msg and "rank 0/2" in msg and "step 3" in msg


def _one_rank_dies() -> str:
    d = init_dist(30.0)
    if d.rank == 1:  # a crashed rank: gone without a word
        import os
        os._exit(3)
    try:
        all_reduce(torch.ones(1), d, "token counts", step=5, timeout_s=20.0)
    except DistError as e:
        return str(e)
    return "no error"


def test_a_crashed_peer_is_a_named_error_not_a_hang():
    from dist_ranks import run_ranks_partial

    results = run_ranks_partial(_one_rank_dies, 2, timeout_s=60)
    assert "all_reduce of token counts" in results[0] and "rank 0/2, step 5" in results[0]
