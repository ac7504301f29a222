"""A published weight file is loaded only from this run's weights dir, under its version's name, with the
hash the trainer published and the version in its own metadata; every refusal names its reason."""
from __future__ import annotations

import hashlib
import os

import pytest
import torch

from areal_py.wire.weight_files import (
    WeightFileError,
    confined_path,
    header_metadata,
    load_verified,
    path_problem,
    read_verified,
    sha256_file,
)
from areal_py.wire.weights import save_weights

W = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3)}


@pytest.fixture
def published(tmp_path):
    d = tmp_path / "weights"
    path = save_weights(W, d, 3)
    return d, path, sha256_file(path)


def reason(fn, *args) -> str:
    with pytest.raises(WeightFileError) as e:
        fn(*args)
    return e.value.reason


def test_the_trainers_file_loads_with_its_hash(published):
    d, path, digest = published
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    got = load_verified(str(path), d, 3, digest)
    assert torch.equal(got["w"], W["w"])
    # the weights dir may itself be reached through a symlink: both sides are resolved
    link = d.parent / "via_link"
    link.symlink_to(d)
    assert torch.equal(load_verified(str(link / path.name), link, 3, digest)["w"], W["w"])


@pytest.mark.parametrize("path, why", [
    ("weights/v000003.safetensors", "not absolute"),
    ("/run/weights/../weights/v000003.safetensors", "'..'"),
    ("/run/weights/v000004.safetensors", "not named v000003.safetensors"),
    ("/etc/passwd", "not named"),
])
def test_path_text_rules(path, why):
    assert why in path_problem(path, 3)


def test_paths_outside_the_weights_dir_are_refused(published, tmp_path):
    d, path, _ = published
    assert path_problem(str(path), 3) is None
    assert confined_path(str(path), d, 3) == path.resolve()
    # a '..' that resolves back inside is still refused: the rule is on the text
    dotted = str(d / ".." / d.name / path.name)
    assert reason(confined_path, dotted, d, 3) == "weights_path"
    # the right name in another directory
    other = tmp_path / "elsewhere"
    save_weights(W, other, 3)
    assert reason(load_verified, str(other / path.name), d, 3, sha256_file(other / path.name)) == "weights_path"
    # a symlink in the weights dir pointing out of it
    os.replace(other / path.name, tmp_path / "outside.safetensors")
    path.unlink()
    path.symlink_to(tmp_path / "outside.safetensors")
    assert reason(load_verified, str(path), d, 3, sha256_file(path)) == "weights_path"
    # a file that does not exist
    assert reason(confined_path, str(d / "v000009.safetensors"), d, 9) == "weights_path"


def test_a_fifo_in_the_weights_dir_is_refused_without_blocking(tmp_path):
    d = tmp_path / "weights"
    d.mkdir()
    os.mkfifo(d / "v000001.safetensors")
    assert reason(read_verified, str(d / "v000001.safetensors"), d, 1, "0" * 64) == "weights_path"


def test_hash_must_be_given_and_match(published):
    d, path, digest = published
    assert reason(load_verified, str(path), d, 3, None) == "weights_hash"
    assert reason(load_verified, str(path), d, 3, "0" * 64) == "weights_hash"
    path.write_bytes(path.read_bytes()[:-4] + b"\0\0\0\0")  # tampered after publishing
    assert reason(load_verified, str(path), d, 3, digest) == "weights_hash"


def test_metadata_version_must_be_the_notices(tmp_path):
    d = tmp_path / "weights"
    src = save_weights(W, d, 2)
    renamed = d / "v000007.safetensors"  # an old file under a newer version's name, with its own true hash
    os.replace(src, renamed)
    assert reason(load_verified, str(renamed), d, 7, sha256_file(renamed)) == "bad_weights"


def test_garbage_with_the_right_name_and_hash_is_refused_not_raised(tmp_path):
    d = tmp_path / "weights"
    d.mkdir()
    for i, data in enumerate([b"", b"root:x:0:0:root:/root:/bin/bash\n", (5).to_bytes(8, "little") + b"{nope",
                              (2**40).to_bytes(8, "little") + b"{}"]):
        p = d / f"v{i:06d}.safetensors"
        p.write_bytes(data)
        assert reason(load_verified, str(p), d, i, hashlib.sha256(data).hexdigest()) == "bad_weights"
    # a well-formed header whose body does not hold the tensors it lists
    header = b'{"__metadata__":{"version":"9"},"w":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}'
    data = len(header).to_bytes(8, "little") + header + b"\0" * 4
    p = d / "v000009.safetensors"
    p.write_bytes(data)
    assert header_metadata(data) == {"version": "9"}
    assert reason(load_verified, str(p), d, 9, hashlib.sha256(data).hexdigest()) == "bad_weights"
