"""FSDP2 sharding of the trainer's models, and the full weights gathered back on rank 0.

Each decoder layer is its own FSDP2 unit (`fully_shard`), then the root (embeddings, final norm,
head), so a forward holds at most one layer's full parameters beyond the root. On CUDA the
parameters compute in bf16 with gradients reduced in fp32; on CPU everything stays fp32, which
is what makes world size 2 reproduce world size 1 to rounding.

Gradients are SUMMED over ranks, not averaged: FSDP2 divides the reduced gradient by the world
size by default, but every rank's loss is already divided by the GLOBAL normaliser (all ranks'
tokens or sequences), so the rank losses add up to the single-process loss and so must their
gradients. `shard_model` sets the divide factor of every FSDP unit to 1 for that.

At world size 1 nothing is sharded: the models stay ordinary modules, exactly as before.
"""
from __future__ import annotations

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

from areal_py.wire.weights import named_weights
from trainer.distributed import Dist, DistError


def decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The model's stack of decoder layers: the first ``layers`` ModuleList found (HF Llama/Qwen2/Mistral
    keep it at ``model.layers`` of a causal LM, ``layers`` of a bare backbone)."""
    for name, module in model.named_modules():
        if name.split(".")[-1] == "layers" and isinstance(module, torch.nn.ModuleList) and len(module):
            return module
    raise ValueError(f"{type(model).__name__} has no non-empty `layers` ModuleList: cannot shard it per decoder "
                     "layer (a Llama/Qwen2/Mistral-style model is expected)")


def enable_activation_checkpointing(model: torch.nn.Module) -> None:
    """Recompute each decoder layer in the backward pass (Hugging Face's non-reentrant checkpointing, which
    keeps parameter names unchanged, so checkpoints and published weights are unaffected)."""
    target = model
    if not hasattr(target, "gradient_checkpointing_enable"):  # ValueModel: the HF backbone inside
        target = next((m for m in model.children() if hasattr(m, "gradient_checkpointing_enable")), None)
    if target is None or not getattr(target, "supports_gradient_checkpointing", False):
        raise ValueError(f"trainer.activation_checkpointing: {type(model).__name__} does not support gradient "
                         "checkpointing")
    target.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def shard_model(model: torch.nn.Module, dist: Dist, activation_checkpointing: bool = False) -> torch.nn.Module:
    """Shard ``model`` in place per decoder layer and then at the root (world size > 1), with gradients
    summed over ranks (see the module docstring). Returns the same module."""
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    if not dist.distributed:
        return model
    mesh = init_device_mesh(dist.device.type, (dist.world_size,))
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if dist.device.type == "cuda" else MixedPrecisionPolicy())
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            m.set_force_sum_reduction_for_comms(True)  # a plain SUM: gloo has no PREMUL_SUM
    return model


def full_weights(model: torch.nn.Module, dist: Dist) -> dict[str, torch.Tensor] | None:
    """The full parameters (``named_parameters`` names, tied ones once, on the CPU) on rank 0, None on the
    other ranks. A collective at world size > 1: every rank must call it."""
    if not dist.distributed:
        return {k: v.cpu() for k, v in named_weights(model).items()}
    try:
        sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    except Exception as e:
        raise DistError(f"gathering the full weights of {type(model).__name__} on rank 0 failed (rank "
                        f"{dist.rank}/{dist.world_size}): {type(e).__name__}: {e}") from e
    if not dist.is_main:
        return None
    return {name: sd[name].detach() for name, _ in model.named_parameters()}
