"""weights.transfer=dist over real gloo groups: trainer rank 0 (this process) and two rollout-server stand-ins
(spawned processes, tests/dist_weight_members.py) on a TCPStore at a free port."""
from __future__ import annotations

import time

import pytest
import torch
from conftest import net_overrides, scaled
from dist_weight_members import Members, Round, own_weights, plain_weights, specs_of, tiny_weights
from tiny_models import tiny_model

from areal_py.config import load_config
from areal_py.wire import dist_weights as D
from rollout_server.server import RolloutServer

TIMEOUT_S = 5.0  # weights.dist_timeout_s of these groups


def _tampered_names(layout):
    """Same bytes, a name the receiver's model does not have: it must drain the bucket and reject it."""
    d = layout.model_dump()
    d["buckets"][0]["tensors"][0]["name"] = "not.a.parameter"
    return d


@pytest.mark.timeout(120)
def test_broadcast_round_trip_and_a_rejected_layout():
    """Round 1: both servers end with exactly the trainer's tiny-model weights (they start from random values of the same shapes).
    Round 2: server 1 is told a layout with a foreign name: it drains the bytes and rejects (reason names),
    keeps its round-1 weights, and the group still works; server 2 takes round 2's weights."""
    trainer_w = tiny_weights(seed=1)
    layout = D.layout_for(trainer_w, bucket_bytes=8192)  # several buckets, one tensor larger than a bucket
    assert len(layout.buckets) > 2
    v2 = {k: v + 1 for k, v in trainer_w.items()}
    good = layout.model_dump()
    members = Members(2, {1: [Round(1, good), Round(2, _tampered_names(layout))], 2: [Round(1, good), Round(2, good)]},
                      specs=specs_of(trainer_w), timeout_s=TIMEOUT_S)
    try:
        g = members.join_root()
        g.send(trainer_w, 1, layout)
        g.send(v2, 2, layout)
        res = {(r, v): (status, w) for r, v, status, w in members.results(4, scaled(30))}
    finally:
        members.close()
    for rank in (1, 2):
        start = own_weights(specs_of(trainer_w), seed=100 + rank)  # what the member held before: not a no-op
        assert all(not torch.equal(start[k], trainer_w[k]) for k in trainer_w)
        status, w = res[(rank, 1)]
        assert status == "ok" and w.keys() == trainer_w.keys()
        assert all(w[k].dtype == trainer_w[k].dtype and torch.equal(w[k], trainer_w[k]) for k in trainer_w)
    assert res[(1, 2)] == ("rejected:names", None)
    status, w = res[(2, 2)]
    assert status == "ok" and all(torch.equal(w[k], v2[k]) for k in v2)


@pytest.mark.timeout(120)
def test_server_killed_during_a_broadcast_ends_it_with_a_named_error_within_the_timeout():
    """Server 2 dies after the first of several buckets. Trainer rank 0 gets DistWeightsError naming the bucket
    and the group within weights.dist_timeout_s, the group is closed for good (a second send fails at once,
    saying why), and server 1, whose root (the trainer) left the group, ends its wait with a named error within
    the timeout too (gloo sends to each member in turn: it may have had all of version 1 first)."""
    w = plain_weights(seed=0)
    layout = D.layout_for(w, bucket_bytes=16384)  # four buckets of one 64x64 float32 tensor each
    assert len(layout.buckets) == 4
    d = layout.model_dump()
    members = Members(2, {1: [Round(1, d), Round(2, d)], 2: [Round(1, d, die_after_buckets=1)]}, specs=specs_of(w),
                      timeout_s=TIMEOUT_S)
    try:
        g = members.join_root()
        t0 = time.monotonic()
        with pytest.raises(D.DistWeightsError) as e:
            g.send(w, 1, layout)
            g.send(w, 2, layout)  # gloo may buffer the one round: the dead peer surfaces by this one at the latest
        elapsed = time.monotonic() - t0
        assert elapsed < TIMEOUT_S + 1.0
        msg = str(e.value)
        assert "weights.transfer=dist" in msg and "of version" in msg and "rank 0 of 3" in msg
        assert g.broken
        with pytest.raises(D.DistWeightsError, match="closed after an earlier failure"):
            g.send(w, 3, layout)
        first = members.results(1, scaled(30))[0]  # server 1: ok at version 1 then an error, or an error at 1
        res = [first] if first[2] == "error" else [first, *members.results(1, scaled(30))]
        members.procs[2].join(scaled(10))
        assert members.procs[2].exitcode == -9
    finally:
        members.close()
    rank, version, status, detail = res[-1]
    assert rank == 1 and status == "error" and [r[2] for r in res[:-1]] in ([], ["ok"])
    err, waited = detail
    assert "weights.transfer=dist" in err and "rank 1 of 3" in err and f"of version {version}" in err
    assert waited < TIMEOUT_S + 1.0


class _Engine:
    version = 0

    def __init__(self, model=None) -> None:
        if model is not None:
            self.model = model


def test_server_refuses_dist_without_an_in_process_model_or_outside_the_group():
    """Both before any wait: a backend whose model is not in the server's process (SGLang) cannot take part,
    and a server index beyond rollout.num_servers has no rank in a group whose size is fixed."""
    cfg = load_config(None, ["weights.transfer=dist", "rollout.num_servers=1", *net_overrides()])
    with pytest.raises(ValueError, match="needs a backend whose model lives in this process"):
        RolloutServer(cfg, "rollout-0", engine=_Engine())
    with pytest.raises(ValueError, match="rollout.num_servers=1"):
        RolloutServer(cfg, "rollout-1", engine=_Engine(tiny_model()))
