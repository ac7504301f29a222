"""decode_attention equals the runner's fused-kernel attention (with its additive mask) to fp32 rounding."""
from __future__ import annotations

import pytest
import torch

from rollout_server.torch_engine.decode_attention import decode_attention
from rollout_server.torch_engine.hf_runner import additive_mask
from rollout_server.torch_engine.model_runner import _attend


def _reference(q, k, v, lens, scale):
    """What the runner computed before: SDPA with an additive mask allowing key positions < lens."""
    n = k.shape[-2]
    allowed = torch.arange(n)[None, :] < torch.tensor(lens)[:, None]
    return _attend(q, k, v, additive_mask(allowed, q.dtype)[:, None, None], scale)


@pytest.mark.parametrize("kv_heads,group,head_dim", [(4, 1, 48), (2, 4, 16), (1, 3, 8)])
@pytest.mark.parametrize("lens", [[7, 7, 7], [1, 9, 4], [12], [5, 12, 3, 12, 1]])
@pytest.mark.parametrize("keys_dim_major", [False, True])
def test_matches_fused_attention_on_cache_views(kv_heads: int, group: int, head_dim: int, lens: list[int],
                                                 keys_dim_major: bool) -> None:
    gen = torch.Generator().manual_seed(len(lens) * 31 + kv_heads)
    rows, n, alloc = len(lens), max(lens), 64
    # The engine's layout: [slots, Hkv, alloc, D] buffers, a bucket is rows [1, 1+rows) up to its longest length;
    # keys may be stored dim-major ([slots, Hkv, D, alloc] in memory, the same logical view).
    kbuf = torch.randn(rows + 2, kv_heads, alloc, head_dim, generator=gen)
    if keys_dim_major:
        kbuf = kbuf.transpose(2, 3).contiguous().transpose(2, 3)
    vbuf = torch.randn(rows + 2, kv_heads, alloc, head_dim, generator=gen)
    kbuf[:, :, n:] = vbuf[:, :, n:] = 1e4  # beyond the bucket: must not be read
    k, v = kbuf[1:1 + rows, :, :n], vbuf[1:1 + rows, :, :n]
    for i, m in enumerate(lens):  # a shorter row's unreached positions hold stale values: must be masked
        k[i, :, m:] = 50.0
        v[i, :, m:] = -50.0
    q = torch.randn(rows * kv_heads * group * head_dim, generator=gen).view(rows, kv_heads, group, head_dim)
    scale = head_dim ** -0.5
    got = decode_attention(q, k, v, lens, scale)
    ref = _reference(q, k, v, lens, scale)
    assert got.shape == (rows, kv_heads, group, head_dim)
    assert torch.allclose(got, ref, rtol=0, atol=1e-5), (got - ref).abs().max()
    # each row is the plain softmax over its own positions (no trace of the stale or out-of-bucket ones)
    i = rows - 1
    p = torch.softmax(q[i] @ k[i, :, : lens[i]].transpose(-1, -2) * scale, -1)
    assert torch.allclose(got[i], p @ v[i, :, : lens[i]], atol=1e-5)


def test_does_not_modify_its_inputs() -> None:
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 1, 8, generator=gen), torch.randn(2, 2, 5, 8, generator=gen),
               torch.randn(2, 2, 5, 8, generator=gen))
    before = [t.clone() for t in (q, k, v)]
    decode_attention(q, k, v, [3, 5], 0.3)
    assert all(torch.equal(a, b) for a, b in zip(before, (q, k, v)))
