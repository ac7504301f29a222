"""Argument checks shared by the loss and advantage functions: a wrong shape fails with a message
naming the argument and the shape it needed, not with a broadcasting error three calls later."""
from __future__ import annotations

import torch

__all__ = ["require_matrix", "require_shape", "shape_of"]


def shape_of(x: object) -> str:
    """A tensor's shape as a tuple, or the type name of anything else (for error messages)."""
    return str(tuple(x.shape)) if isinstance(x, torch.Tensor) else f"a {type(x).__name__}, not a torch.Tensor"


def require_matrix(name: str, x: object) -> None:
    """``x`` must be a [B, T] tensor (a batch of token rows)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        raise ValueError(f"{name} must be a torch.Tensor of shape [B, T], got {shape_of(x)}")


def require_shape(name: str, x: object, shape: torch.Size, expected: str) -> None:
    """``x`` must be a tensor of exactly ``shape``; ``expected`` says it in the reader's terms."""
    if not isinstance(x, torch.Tensor) or x.shape != shape:
        raise ValueError(f"{name} must have shape {expected}, got {shape_of(x)}")
