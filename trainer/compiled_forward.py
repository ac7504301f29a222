"""The policy's training forward + backward through torch.compile (`trainer.compile`), checked against eager.

What is compiled: each decoder layer's forward (one graph serves every layer: the layer is an input,
not a constant) and the logprob math on the logits (`logprobs_from_logits`), both with dynamic shapes,
so every packed micro-batch width and row count runs the same graphs (a new graph only where torch
specialises, e.g. a single row). AOTAutograd compiles their backward with them, which fuses the norms,
RoPE, SiLU x up and the logsumexp/entropy math around the GEMMs. The embedding, the rotary tables and
the LM head GEMM run eager. The layers are compiled only while a checked call runs them: outside
`CompiledLogprobs.__call__` the model is the ordinary module (the proximal/reference forwards,
checkpoints and weight publishing see nothing compiled).

Invariants:
- No update ever uses an unchecked graph: the first call, and any call during which a graph was
  (re)compiled, runs compiled forward + backward of a probe (a fixed random weighting of the
  logprobs and entropy), then eager forward + the same probe's backward, compares logprobs, entropy
  and every weight gradient (max |diff| <= `atol * max(1, max |eager|)`), and returns the EAGER
  outputs (their graph kept for the caller's loss).
- Any error (compiling or running) or a mismatch turns compilation off for the rest of the run, the
  reason logged and kept in `status.reason`; that call and every later one run eager.
- Only calls with gradients on and right-padded rows (no attention mask reaches the model) go
  through the compiled path; anything else is eager.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from trainer import rollout_batch as rb
from trainer.sharding import decoder_layers

__all__ = ["CompileStatus", "CompiledLogprobs", "compile_wanted"]

log = logging.getLogger("trainer")


def _graphs_compiled() -> int:
    from torch._dynamo.utils import counters  # lazy: dynamo is imported only when compiling

    return counters["stats"]["unique_graphs"]


def compile_wanted(mode: str, device: torch.device, world_size: int, activation_checkpointing: bool
                   ) -> tuple[bool, str]:
    """(compile?, why) for `trainer.compile=mode` on a model on ``device``."""
    if mode not in ("auto", "off", "on"):
        raise ValueError(f"trainer.compile must be auto, off or on, got {mode!r}")
    if mode == "off":
        return False, "trainer.compile=off"
    if mode == "auto" and device.type != "cuda":
        return False, (f"trainer.compile=auto: off on {device.type} (the compile does not pay back within a run "
                       "on the CPU measured; docs/benchmarks.md)")
    if world_size > 1 or activation_checkpointing:
        return False, (f"trainer.compile={mode}: only at world size 1 without activation checkpointing "
                       f"(world size {world_size}, activation_checkpointing={activation_checkpointing})")
    return True, f"trainer.compile={mode} on {device.type}"


@dataclass
class CompileStatus:
    """`active`: compiled calls are being used; `seconds`: wall time of the compiled part of the checked
    calls (every compile included), `checks` how many there were; `compiled_calls`: unchecked compiled
    calls whose outputs trained; `reason`: why it runs eager (None while it does not)."""

    active: bool = True
    seconds: float = 0.0
    checks: int = 0
    compiled_calls: int = 0
    max_diff: float = 0.0
    reason: str | None = None

    def describe(self) -> str:
        if self.reason is not None:
            return f"trainer.compile: eager ({self.reason})"
        return (f"trainer.compile: on ({self.seconds:.1f}s compiling and checking over {self.checks} checked "
                f"call(s), max |diff| {self.max_diff:.2g}, {self.compiled_calls} compiled call(s))")


class CompiledLogprobs:
    """`token_logprobs` for ``model`` with its decoder layers and logprob math compiled (see the module
    docstring); a drop-in: same arguments, same outputs.

    `compiler` maps a function to its compiled version (default: ``torch.compile(dynamic=True)``); tests
    pass one that fails or perturbs the result to exercise the fallback. `graphs`: how many graphs this
    process has compiled so far (a change during a call means that call ran a new, unchecked graph)."""

    def __init__(self, model: torch.nn.Module, atol: float = 1e-4, compiler: Callable[[Callable], Callable] | None = None,
                 graphs: Callable[[], int] = _graphs_compiled) -> None:
        self.model = model
        self.atol = atol
        self.graphs = graphs
        self.status = CompileStatus()
        compile_fn = compiler or functools.partial(torch.compile, dynamic=True)
        try:
            self.layers = decoder_layers(model)
            kinds = {type(layer) for layer in self.layers}
            if len(kinds) != 1:
                raise ValueError(f"decoder layers of several types {sorted(k.__name__ for k in kinds)}")
            self._layer_forward = compile_fn(next(iter(kinds)).forward)
            self._head = compile_fn(rb.logprobs_from_logits)
        except Exception as e:  # noqa: BLE001 - any refusal means: stay eager
            self._off(f"compile failed: {type(e).__name__}: {e}")

    @contextlib.contextmanager
    def _compiled_layers(self) -> Iterator[None]:
        """Each decoder layer's forward is the compiled one while the context is open (an instance attribute
        over the class's forward: hooks and parameters are untouched, and removing it restores the module)."""
        for layer in self.layers:
            layer.forward = functools.partial(self._layer_forward, layer)
        try:
            yield
        finally:
            for layer in self.layers:
                del layer.forward

    def _compiled(self, input_ids: torch.Tensor, temperature: float, with_entropy: bool
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
        with self._compiled_layers():
            logits = self.model(input_ids=input_ids, attention_mask=None, use_cache=False).logits
        return self._head(logits, input_ids, temperature, with_entropy)

    def __call__(self, model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                 temperature: float, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
        def eager() -> tuple[torch.Tensor, torch.Tensor | None]:
            return rb.token_logprobs(model, input_ids, attention_mask, temperature, with_entropy)

        if (not self.status.active or model is not self.model or not torch.is_grad_enabled()
                or not rb.right_padded(attention_mask)):
            return eager()
        graphs, start = self.graphs(), time.perf_counter()
        try:
            got = self._compiled(input_ids, temperature, with_entropy)
            if self.status.checks and self.graphs() == graphs:
                self.status.compiled_calls += 1
                return got
            got_grads = self._probe_grads(got, retain=False)
        except Exception as e:  # noqa: BLE001 - dynamo/inductor raise many types; all mean: stay eager
            self._off(f"compiled forward failed at {tuple(input_ids.shape)}: {type(e).__name__}: {str(e)[:300]}")
            return eager()
        self.status.seconds += time.perf_counter() - start
        self.status.checks += 1
        ref = eager()
        ref_grads = self._probe_grads(ref, retain=True)
        pairs = [("logprobs", got[0], ref[0]), ("entropy", got[1], ref[1])]
        pairs += [(f"gradient of {name}", g, r) for name, g, r in zip(self._param_names(), got_grads, ref_grads,
                                                                        strict=True)]
        for what, g, r in pairs:
            err, bound = _diff(g, r, self.atol)
            if not err <= bound:  # also catches NaN
                self._off(f"compiled {what} differs from eager by {err:.3g} (> {bound:.3g}) at "
                          f"{tuple(input_ids.shape)}")
                return ref
            self.status.max_diff = max(self.status.max_diff, err)
        log.info("compiled training forward checked at %s: max |diff| %.2g (logprobs, entropy, gradients); "
                 "%.2fs compiling and checking so far", tuple(input_ids.shape), self.status.max_diff,
                 self.status.seconds)
        return ref

    def _param_names(self) -> list[str]:
        return [name for name, p in self.model.named_parameters() if p.requires_grad]

    def _probe_grads(self, out: tuple[torch.Tensor, torch.Tensor | None], retain: bool) -> list[torch.Tensor | None]:
        """Weight gradients of a fixed random weighting of ``out`` (the same weights for compiled and eager):
        the backward is linear in its incoming gradient, so one generic direction checks all of it."""
        gen = torch.Generator(device=out[0].device).manual_seed(0)
        probe = sum((x * torch.randn(x.shape, generator=gen, device=x.device, dtype=x.dtype)).sum()
                    for x in out if x is not None)
        params = [p for p in self.model.parameters() if p.requires_grad]
        return list(torch.autograd.grad(probe, params, retain_graph=retain, allow_unused=True))

    def _off(self, reason: str) -> None:
        self.status.active, self.status.reason = False, reason
        log.warning("compiled training forward off, running eager: %s", reason)


def _diff(got: torch.Tensor | None, ref: torch.Tensor | None, atol: float) -> tuple[float, float]:
    """(max |got - ref|, the bound it must stay within); inf when only one exists or the shapes differ."""
    if got is None or ref is None:
        return (0.0, 0.0) if got is None and ref is None else (float("inf"), 0.0)
    if got.shape != ref.shape:
        return float("inf"), 0.0
    got, ref = got.detach(), ref.detach()
    return float((got - ref).abs().max()) if got.numel() else 0.0, atol * max(1.0, float(ref.abs().max()))
