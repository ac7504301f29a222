"""Hand-fused training ops for the policy's Hugging Face Llama layers, patched in reversibly.

What is replaced (per module instance, only on the learner's policy):
- `LlamaRMSNorm.forward` -> `rms_norm`: one autograd node; the forward keeps x_hat = x * rstd and rstd,
  the backward is the closed form dx = rstd * (g*w - x_hat * mean(g*w * x_hat)), dw = sum(g * x_hat)
  (the model's own formula records pow, mean, add, rsqrt and three muls, each with its own backward).
- `LlamaAttention.forward` -> one GEMM for q, k and v (their weights concatenated per call; the
  concatenation's backward hands each weight its slice of the gradient), RoPE applied once to q and
  k together in their [rows, width, heads, dim] layout by `rope` (three ops each way, no
  `rotate_half` cat), then the model's own attention interface (SDPA) as before.
- `LlamaMLP.forward` -> one GEMM for gate and up (weights concatenated per call), SiLU(gate) * up,
  down projection. Parameters are never re-laid-out, so the state dict, checkpoints and weight
  publishing see the model unchanged.

Invariants:
- Exact to float rounding: `fuse_llama` checks every patched kind against the model's own forward
  and backward on a small random probe (outputs and every parameter/input gradient to
  `CHECK_ATOL * max(1, max |ref|)`) before it keeps a patch; a mismatch or error restores the
  original forwards and reports why (`FusedPatch.reason`), so the model is never left half patched.
- Only the training path is patched: a call with a KV cache or with output_attentions falls back
  to the original forward.
- `FusedPatch.undo()` restores every original forward (instance attributes removed).
"""
from __future__ import annotations

import logging
import types
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

__all__ = ["CHECK_ATOL", "FusedPatch", "fuse_llama", "rms_norm", "rope"]

log = logging.getLogger("trainer")
CHECK_ATOL = 1e-5


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        xf = x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 for fp32/bf16/fp16, as LlamaRMSNorm
        rstd = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True).add_(eps))
        xhat = xf * rstd
        ctx.save_for_backward(xhat, rstd, weight)
        ctx.in_dtype = x.dtype
        return weight * xhat.to(x.dtype)

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        xhat, rstd, weight = ctx.saved_tensors
        dw = None
        if ctx.needs_input_grad[1]:
            dw = (g * xhat.to(ctx.in_dtype)).reshape(-1, g.shape[-1]).sum(0).to(weight.dtype)
        dx = None
        if ctx.needs_input_grad[0]:
            gw = (g * weight).to(xhat.dtype)
            dot = (gw * xhat).mean(-1, keepdim=True)
            dx = gw.sub_(xhat * dot).mul_(rstd).to(ctx.in_dtype)
        return dx, dw, None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x * rsqrt(mean(x^2) + eps))`` over the last dim, computed in fp32 (LlamaRMSNorm's formula)."""
    return _RMSNorm.apply(x, weight, eps)


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        h = x.shape[-1] // 2
        out = x * cos
        out[..., :h].addcmul_(x[..., h:], sin[..., :h], value=-1.0)
        out[..., h:].addcmul_(x[..., :h], sin[..., h:])
        ctx.save_for_backward(cos, sin)
        return out

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        cos, sin = ctx.saved_tensors
        h = g.shape[-1] // 2
        dx = g * cos  # the transpose of x -> x*cos + rotate_half(x)*sin
        dx[..., :h].addcmul_(g[..., h:], sin[..., h:])
        dx[..., h:].addcmul_(g[..., :h], sin[..., :h], value=-1.0)
        return dx, None, None


class _RopeQKV(torch.autograd.Function):
    @staticmethod
    def forward(ctx, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int):
        rot = heads + kv_heads
        qk = _Rope.forward(ctx, qkv[:, :, :rot], cos, sin)
        ctx.heads, ctx.rot = heads, rot
        return qk[:, :, :heads], qk[:, :, heads:], qkv[:, :, rot:].clone()

    @staticmethod
    def backward(ctx, gq: torch.Tensor, gk: torch.Tensor, gv: torch.Tensor):
        cos, sin = ctx.saved_tensors
        heads, rot = ctx.heads, ctx.rot
        d = gv.new_empty(*gv.shape[:2], rot + gv.shape[2], gv.shape[3])
        for g, part in ((gq, d[:, :, :heads]), (gk, d[:, :, heads:rot])):
            h = g.shape[-1] // 2
            torch.mul(g, cos, out=part)
            part[..., :h].addcmul_(g[..., h:], sin[..., h:])
            part[..., h:].addcmul_(g[..., :h], sin[..., :h], value=-1.0)
        d[:, :, rot:] = gv
        return d, None, None, None, None


def rope_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, heads: int, kv_heads: int
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(q, k, v) ``[rows, width, heads, dim]`` from one ``[rows, width, heads + 2 kv_heads, dim]`` projection,
    RoPE on q and k (``rope``'s formula), the gradient written straight into one tensor of qkv's shape."""
    if qkv.dim() != 4 or qkv.shape[2] != heads + 2 * kv_heads or qkv.shape[-1] % 2:
        raise ValueError(f"rope_qkv needs [rows, width, {heads} + 2 x {kv_heads} heads, even dim], got {tuple(qkv.shape)}")
    return _RopeQKV.apply(qkv, cos, sin, heads, kv_heads)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` (HF's rotary embedding) without building rotate_half; cos and sin
    broadcast against x and carry no gradient."""
    if x.shape[-1] % 2:
        raise ValueError(f"rope needs an even head dimension, got {x.shape[-1]}")
    return _Rope.apply(x, cos, sin)


class _SwiGLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, gate_up: torch.Tensor) -> torch.Tensor:
        gate, up = gate_up.chunk(2, dim=-1)
        act = F.silu(gate)
        ctx.save_for_backward(gate, up, act)
        return act * up

    @staticmethod
    def backward(ctx, g: torch.Tensor):
        gate, up, act = ctx.saved_tensors
        n = gate.shape[-1]
        d = torch.empty(*g.shape[:-1], 2 * n, dtype=g.dtype, device=g.device)
        torch.mul(g, act, out=d[..., n:])  # d/d up
        d[..., :n] = torch.ops.aten.silu_backward(g * up, gate)  # d/d gate through SiLU
        return d


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` for ``gate_up = [gate | up]`` along the last dim, its gradient written as one
    ``[..., 2n]`` tensor (what the fused gate/up GEMM's backward takes, no cat of two halves)."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"swiglu needs an even last dimension ([gate | up]), got {gate_up.shape[-1]}")
    return _SwiGLU.apply(gate_up)


def _cat_weights(*linears: torch.nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    w = torch.cat([m.weight for m in linears])
    biases = [m.bias for m in linears]
    if all(b is None for b in biases):
        return w, None
    if any(b is None for b in biases):
        raise ValueError("fused projections need a bias on all or none of the linears")
    return w, torch.cat(biases)


def _norm_forward(self: torch.nn.Module, hidden_states: torch.Tensor) -> torch.Tensor:
    return rms_norm(hidden_states, self.weight, self.variance_epsilon)


def _mlp_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    gate_up = F.linear(x, *_cat_weights(self.gate_proj, self.up_proj))
    if isinstance(self.act_fn, torch.nn.SiLU) or type(self.act_fn).__name__ == "SiLUActivation":
        return self.down_proj(swiglu(gate_up))
    gate, up = gate_up.chunk(2, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)


def _attention_forward(self: torch.nn.Module, hidden_states: torch.Tensor, position_embeddings=None,
                       attention_mask=None, *args, **kwargs):
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    from transformers.models.llama.modeling_llama import eager_attention_forward

    if args or kwargs.get("cache") is not None or kwargs.get("past_key_values") is not None or \
            kwargs.get("output_attentions") or position_embeddings is None:  # not a training forward
        return type(self).forward(self, hidden_states, position_embeddings, attention_mask, *args, **kwargs)
    kwargs.pop("cache", None)
    kwargs.pop("past_key_values", None)
    cfg = self.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    rows, width = hidden_states.shape[:2]
    qkv = F.linear(hidden_states, *_cat_weights(self.q_proj, self.k_proj, self.v_proj))
    cos, sin = position_embeddings  # [rows, width, dim]
    q, k, v = (t.transpose(1, 2) for t in rope_qkv(qkv.view(rows, width, heads + 2 * kv_heads, self.head_dim),
                                                  cos.unsqueeze(2), sin.unsqueeze(2), heads, kv_heads))
    attention = ALL_ATTENTION_FUNCTIONS.get_interface(cfg._attn_implementation, eager_attention_forward)
    out, weights = attention(self, q, k, v, attention_mask, dropout=0.0 if not self.training else self.attention_dropout,
                             scaling=self.scaling, **kwargs)
    return self.o_proj(out.reshape(rows, width, -1).contiguous()), weights


KINDS = {"LlamaRMSNorm": "norm", "LlamaAttention": "attention", "LlamaMLP": "mlp"}


@dataclass
class FusedPatch:
    """The patched modules (by kind) of one model; ``reason`` says why nothing is patched when it is empty."""

    patched: dict[str, int] = field(default_factory=dict)
    reason: str = ""
    _modules: list[torch.nn.Module] = field(default_factory=list, repr=False)

    @property
    def active(self) -> bool:
        return bool(self._modules)

    def undo(self) -> None:
        for m in self._modules:
            vars(m).pop("forward", None)
        self._modules.clear()
        self.patched.clear()


FORWARDS = {"norm": _norm_forward, "attention": _attention_forward, "mlp": _mlp_forward}


def _patch(module: torch.nn.Module, kind: str) -> None:
    # a bound method, not a closure: copy.deepcopy rebinds it to the copy (a closure would keep the original's weights)
    module.forward = types.MethodType(FORWARDS[kind], module)


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max()) / max(1.0, float(b.float().abs().max()))


def _check(module: torch.nn.Module, kind: str, rows: int = 2, width: int = 7) -> str | None:
    """None when the patched forward + backward of ``module`` equal its own on a random probe, else why not."""
    p = next(module.parameters())
    hidden = module.weight.shape[0] if kind == "norm" else module.config.hidden_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(rows, width, hidden, generator=gen).to(p.device, p.dtype)
    extra: tuple = ()
    if kind == "attention":
        dim = module.head_dim
        pos = torch.arange(width, dtype=torch.float32)[:, None] * torch.rand(dim // 2, generator=gen)
        emb = torch.cat([pos, pos], dim=-1).expand(rows, width, dim).to(p.device, p.dtype)
        extra = ((emb.cos(), emb.sin()), None)
    probe = torch.randn(rows, width, hidden, generator=gen).to(p.device, p.dtype)

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        xi = x.clone().requires_grad_(True)
        out = module(xi, *extra)
        out = out[0] if isinstance(out, tuple) else out
        params = [q for q in module.parameters() if q.requires_grad]
        grads = torch.autograd.grad((out * probe).sum(), [xi, *params])
        return out.detach(), list(grads)

    patched_out, patched_grads = run()
    saved = vars(module).pop("forward")
    try:
        ref_out, ref_grads = run()
    finally:
        module.forward = saved
    diffs = [_max_diff(patched_out, ref_out)] + [_max_diff(a, b) for a, b in zip(patched_grads, ref_grads, strict=True)]
    if max(diffs) > CHECK_ATOL:
        return f"{kind} ({type(module).__name__}): patched differs from the model's own by {max(diffs):.2e}"
    return None


def fuse_llama(model: torch.nn.Module) -> FusedPatch:
    """Patch ``model``'s Llama norms, attentions and MLPs with the fused forwards, each kind checked
    once against the model's own forward + backward; on any failure nothing stays patched."""
    patch = FusedPatch()
    checked: set[str] = set()
    try:
        for m in model.modules():
            kind = KINDS.get(type(m).__name__)
            if kind is None:
                continue
            _patch(m, kind)
            patch._modules.append(m)
            if kind not in checked:
                checked.add(kind)
                why = _check(m, kind)
                if why is not None:
                    raise ValueError(why)
            patch.patched[kind] = patch.patched.get(kind, 0) + 1
    except Exception as e:  # noqa: BLE001 - any failure falls back to the model's own modules
        patch.undo()
        patch.reason = f"fused ops off: {e}"
        log.warning("%s; the model's own modules run", patch.reason)
        return patch
    if not patch.active:
        patch.reason = "fused ops off: no Llama norm, attention or MLP module in the model"
    return patch
