"""The shared argument checks name the argument, the shape it needed and what it got."""
import pytest
import torch

from trainer.algo.shapes import require_matrix, require_shape, shape_of


def test_shape_of_names_non_tensors():
    assert shape_of(torch.zeros(2, 3)) == "(2, 3)"
    assert shape_of([1, 2]) == "a list, not a torch.Tensor"


def test_require_matrix():
    require_matrix("x", torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"^x must be a torch.Tensor of shape \[B, T\], got \(3,\)$"):
        require_matrix("x", torch.zeros(3))
    with pytest.raises(ValueError, match="got a tuple, not a torch.Tensor"):
        require_matrix("x", (1, 2))


def test_require_shape():
    require_shape("mask", torch.ones(2, 3), torch.Size([2, 3]), "(2, 3)")
    with pytest.raises(ValueError, match=r"^mask must have shape \(2, 3\) \(same as kl\), got \(3, 2\)$"):
        require_shape("mask", torch.ones(3, 2), torch.Size([2, 3]), "(2, 3) (same as kl)")
    with pytest.raises(ValueError, match="score must have shape .* got a list, not a torch.Tensor"):
        require_shape("score", [1.0, 2.0], torch.Size([2]), "[B] = (2,)")
