"""Sharded checkpoints across world sizes: written at world size 1 and read by 2 gloo ranks with FSDP2
(`fully_shard` per decoder layer), written by those ranks and read at world size 1; weights and AdamW
state come back identical, at the saved version; a damaged shard is caught by the manifest on every rank,
which all fall back to the same older checkpoint. One spawn of 2 ranks serves every test here."""
from __future__ import annotations

import errno
import json
import os
import shutil

import pytest
import torch
from dist_ranks import run_ranks
from tiny_models import tiny_model
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict
from torch.utils._pytree import tree_map_only

from trainer import checkpoint as C

FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def _model(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    m = tiny_model(seed=seed)
    return m, torch.optim.AdamW(m.parameters(), lr=1e-2)


def _step(m: torch.nn.Module, opt: torch.optim.Optimizer, seed: int) -> None:
    """One AdamW step on a batch fixed by `seed` (the same on every rank)."""
    x = torch.randint(0, 32, (2, 8), generator=torch.Generator().manual_seed(seed))
    m(input_ids=x, labels=x).loss.backward()
    opt.step()
    opt.zero_grad()


def _full(m: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """A copy of the full weights and optimizer state (gathered on rank 0 when sharded), keyed by parameter
    name (at world size 1 the state dicts share storage with the live tensors, hence the copy)."""
    full = {"model": get_model_state_dict(m, options=FULL), "optim": get_optimizer_state_dict(m, opt, options=FULL)}
    return tree_map_only(torch.Tensor, lambda t: t.detach().clone(), full)


def _assert_same(got: dict, want: dict) -> None:
    assert got["model"].keys() == want["model"].keys()
    for k, t in want["model"].items():
        assert torch.equal(got["model"][k], t), k
    gs, ws = got["optim"]["state"], want["optim"]["state"]
    assert gs.keys() == ws.keys() and len(ws) == len(want["model"])
    for k, st in ws.items():
        assert st.keys() == gs[k].keys() == {"step", "exp_avg", "exp_avg_sq"}, k
        for name, t in st.items():
            assert torch.equal(gs[k][name], t), (k, name)
    assert [g["lr"] for g in got["optim"]["param_groups"]] == [g["lr"] for g in want["optim"]["param_groups"]]


def _on_two_ranks(root_1: str, root_2: str, out: str) -> dict:
    """Rank side: read the world-size-1 checkpoints (the newest damaged), train a step, save sharded."""
    from pathlib import Path
    from types import SimpleNamespace

    from trainer.distributed import init_dist
    from trainer.sharding import shard_model
    from trainer.trainer import Trainer

    dist = init_dist(60.0)
    m = shard_model(tiny_model(seed=7), dist)  # other weights than the saved ones: loading must replace them all
    opt = torch.optim.AdamW(m.parameters(), lr=1e-2)  # over the sharded (DTensor) parameters
    root_1, root_2, out = Path(root_1), Path(root_2), Path(out)
    try:
        C.load_checkpoint(root_1 / "step_000003", {"policy": m}, {"policy": opt}, dist)
        damaged = "loaded"
    except C.CheckpointError as e:
        damaged = str(e)
    d, state = C.load_latest_checkpoint(root_1, {"policy": m}, {"policy": opt}, dist)
    loaded = _full(m, opt)
    _step(m, opt, seed=3)
    full_disk = _save_with_a_full_disk_on_rank_1(root_2.parent / "full_disk", m, opt, dist)
    saved = C.save_checkpoint(root_2, {"policy": m}, {"policy": opt}, {"version": state["version"] + 1}, dist=dist)
    after = _full(m, opt)
    final = Trainer.save_final(SimpleNamespace(cfg=SimpleNamespace(run_dir=lambda: out), dist=dist, model=m,
                                               tokenizer=SimpleNamespace(save_pretrained=lambda d: None)))
    if dist.is_main:
        torch.save({"loaded": loaded, "after": after}, out / "rank0.pt")
    return {"damaged": damaged, "loaded_dir": d.name, "version": state["version"], "saved_dir": saved.name,
            "world_size": dist.world_size, "final": str(final), "full_disk": full_disk}


def _save_with_a_full_disk_on_rank_1(root, m, opt, dist) -> str:
    """What each rank raises when rank 1 cannot write its part of a checkpoint."""
    real = C._seal

    def full(path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    if dist.rank == 1:
        C._seal = full
    try:
        C.save_checkpoint(root, {"policy": m}, {"policy": opt}, {"version": 9}, dist=dist)
    except OSError as e:
        return f"errno={e.errno} {e}"
    finally:
        C._seal = real
    return "saved"


@pytest.fixture(scope="module")
def two_rank_run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ckpt_dist")
    root_1, root_2 = tmp / "ws1", tmp / "ws2"
    m, opt = _model(seed=0)
    _step(m, opt, seed=1)
    C.save_checkpoint(root_1, {"policy": m}, {"policy": opt}, {"version": 2, "controller_state": {}}, keep=0)
    saved_v2 = _full(m, opt)
    _step(m, opt, seed=2)
    d3 = C.save_checkpoint(root_1, {"policy": m}, {"policy": opt}, {"version": 3, "controller_state": {}}, keep=0)
    shard = d3 / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only the checksum can tell
    shard.write_bytes(bytes(data))
    results = run_ranks(_on_two_ranks, 2, str(root_1), str(root_2), str(tmp), timeout_s=180.0)
    return {"tmp": tmp, "root_2": root_2, "saved_v2": saved_v2, "results": results,
            "rank0": torch.load(tmp / "rank0.pt", weights_only=True), "damaged_shard": shard}


def test_world_size_1_checkpoint_loads_on_2_sharded_ranks(two_rank_run):
    r = two_rank_run
    assert [x["world_size"] for x in r["results"]] == [2, 2]
    for res in r["results"]:  # both ranks skipped the damaged step 3 and resumed at version 2
        assert res["loaded_dir"] == "step_000002" and res["version"] == 2
    _assert_same(r["rank0"]["loaded"], r["saved_v2"])


def test_a_damaged_shard_is_caught_by_the_manifest_on_every_rank(two_rank_run):
    shard = two_rank_run["damaged_shard"]
    names = sorted(json.loads((shard.parent / C.MANIFEST).read_text())["files"])
    hasher = names.index(shard.name) % 2  # rank r hashes every 2nd file from the r-th, in name order
    for res in two_rank_run["results"]:  # both ranks report it, naming the rank that found it
        assert res["damaged"].startswith(f"rank {hasher}: {shard} does not match the sha256"), res["damaged"]


def test_2_rank_checkpoint_loads_at_world_size_1(two_rank_run):
    r = two_rank_run
    assert [x["saved_dir"] for x in r["results"]] == ["step_000003", "step_000003"]
    d = r["root_2"] / "step_000003"
    files = json.loads((d / C.MANIFEST).read_text())["files"]
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata", "state.json"} <= set(files)  # each rank wrote its shards
    m, opt = _model(seed=9)
    got_dir, state = C.load_latest_checkpoint(r["root_2"], {"policy": m}, {"policy": opt})
    assert got_dir == d and state["version"] == 3
    _assert_same(_full(m, opt), r["rank0"]["after"])


def test_a_damaged_rank_1_shard_falls_back_at_world_size_1(two_rank_run, tmp_path):
    root = tmp_path / "ckpts"
    shutil.copytree(two_rank_run["root_2"], root)
    m, opt = _model(seed=9)
    C.save_checkpoint(root, {"policy": m}, {"policy": opt}, {"version": 1}, keep=0)
    shutil.copytree(two_rank_run["root_2"] / "step_000003", root / "step_000003")  # saving step 1 pruned it
    shard = root / "step_000003" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-8])
    with pytest.raises(C.CheckpointError, match="truncated"):
        C.verify_checkpoint(root / "step_000003")
    got_dir, state = C.load_latest_checkpoint(root, {"policy": m}, {"policy": opt})
    assert got_dir.name == "step_000001" and state["version"] == 1


def test_final_is_a_plain_hugging_face_directory_gathered_from_the_shards(two_rank_run):
    from transformers import AutoModelForCausalLM

    final = two_rank_run["results"][0]["final"]
    assert json.loads((two_rank_run["tmp"] / "final" / "config.json").read_text())["architectures"] == \
        ["LlamaForCausalLM"]  # not the FSDP2 wrapper class
    m = AutoModelForCausalLM.from_pretrained(final)
    want = two_rank_run["rank0"]["after"]["model"]
    got = m.state_dict()
    assert want.keys() <= got.keys()
    for k, t in want.items():
        assert torch.equal(got[k], t), k


def test_a_failed_write_on_one_rank_fails_the_save_on_every_rank_and_leaves_nothing(two_rank_run):
    root = two_rank_run["tmp"] / "full_disk"
    r0, r1 = (res["full_disk"] for res in two_rank_run["results"])
    for msg in (r0, r1):  # both name the checkpoint and rank 1's error
        assert f"could not write {root / 'step_000009'}" in msg and "rank 1: OSError" in msg, msg
        assert os.strerror(errno.ENOSPC) in msg, msg
    assert r1.startswith(f"errno={errno.ENOSPC} ")  # the rank that hit it keeps the errno
    assert not list(root.iterdir())  # no step_000009, no .tmp_step_000009, no latest
