"""Both generation engines implement the whole `Backend` protocol, with its exact signatures, and the
SGLang engine's documented fallbacks (add_group as single adds, no stale detection) behave as stated."""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from tiny_models import tiny_model

from rollout_server.backend import Backend, Finished, Trajectory
from rollout_server.sampling import SamplingParams
from rollout_server.sglang_engine.engine import SGLangEngine
from rollout_server.torch_engine.engine import Engine

ENGINES = (Engine, SGLangEngine)


def protocol_members() -> dict[str, object]:
    return {name: obj for name, obj in vars(Backend).items()
            if not name.startswith("_") and (callable(obj) or isinstance(obj, property))}


class NoTransport:
    """Stands in for sglang's HTTP client where nothing is ever submitted."""

    def close(self) -> None:
        pass


def sglang_engine(tmp_path: Path, **kw) -> SGLangEngine:
    return SGLangEngine(tmp_path / "model", eos_token_id=3, backend=NoTransport(), staging_dir=tmp_path / "s", **kw)


def test_the_protocol_lists_what_the_server_calls() -> None:
    assert set(protocol_members()) == {"num_running", "num_waiting", "has_work", "kv_usage", "add", "add_group",
                                       "abort", "requests_older_than", "update_weights", "step", "close"}
    assert set(Backend.__annotations__) == {"version", "max_running"}


@pytest.mark.parametrize("cls", ENGINES, ids=lambda c: c.__name__)
def test_engine_methods_have_the_protocols_signatures(cls) -> None:
    for name, member in protocol_members().items():
        impl = inspect.getattr_static(cls, name)
        if isinstance(member, property):
            assert isinstance(impl, property), f"{cls.__name__}.{name} must be a property"
            continue
        want, got = inspect.signature(member), inspect.signature(impl)
        assert [(p.name, p.kind, p.default) for p in got.parameters.values()] == \
               [(p.name, p.kind, p.default) for p in want.parameters.values()], f"{cls.__name__}.{name}"
        assert {k: p.annotation for k, p in got.parameters.items()} == \
               {k: p.annotation for k, p in want.parameters.items()}, f"{cls.__name__}.{name} annotations"
        assert got.return_annotation == want.return_annotation, f"{cls.__name__}.{name} return"


def test_both_engines_are_backends(tmp_path) -> None:
    torch_engine = Engine(tiny_model(0, vocab_size=16, max_positions=32), eos_token_id=3, max_running=2)
    sg = sglang_engine(tmp_path, max_running=2)
    for eng in (torch_engine, sg):
        assert isinstance(eng, Backend), type(eng).__name__
        assert eng.version == 0 and eng.max_running == 2 and not eng.has_work()
        eng.close()
    assert not isinstance(object(), Backend)


def test_torch_engine_loads_a_weight_file_by_path(tmp_path) -> None:
    from areal_py.wire.weights import save_weights

    eng = Engine(tiny_model(0, vocab_size=16, max_positions=32), eos_token_id=3)
    new = tiny_model(1, vocab_size=16, max_positions=32)
    path = save_weights(new, tmp_path, 1)
    eng.update_weights(str(path), 1)
    assert eng.version == 1
    for (name, got), (_, want) in zip(eng.model.named_parameters(), new.named_parameters()):
        assert torch.equal(got, want), name
    with pytest.raises(OSError):
        eng.update_weights(tmp_path / "missing.safetensors", 2)
    assert eng.version == 1


def test_sglang_add_group_is_validated_as_a_whole(tmp_path) -> None:
    eng = sglang_engine(tmp_path)
    p = SamplingParams(max_new_tokens=4)
    eng.add_group(["g:0", "g:1"], [5, 6], p)
    assert eng.num_waiting == 2
    with pytest.raises(ValueError, match="duplicate request ids in group"):
        eng.add_group(["h:0", "h:0"], [5], p)
    with pytest.raises(ValueError, match="duplicate request id 'g:1'"):
        eng.add_group(["h:0", "g:1"], [5], p)
    with pytest.raises(ValueError, match="empty prompt"):
        eng.add_group(["h:0", "h:1"], [], p)
    assert eng.num_waiting == 2  # a rejected group queued nothing
    assert eng.abort("g:1") == Finished("g:1", [5, 6], [], [], [], "abort")
    assert eng.requests_older_than(10**6) == []  # the fallback: never judged stale here


def test_trajectory_result_is_a_snapshot() -> None:
    t = Trajectory("r", [1, 2], SamplingParams(), output_ids=[3], logprobs=[-0.5], versions=[0])
    f = t.result("length")
    t.output_ids.append(4)
    assert f == Finished("r", [1, 2], [3], [-0.5], [0], "length") and t.tokens == [1, 2, 3, 4]
