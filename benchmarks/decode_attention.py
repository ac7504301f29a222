"""Decode attention's K/V read rate against a plain read of the same bytes.

For the engine's decode shapes (rows x context, the 2M and 20M benchmark models' heads, and a
grouped-query shape) the K/V cache is laid out as the engine lays it out (`[slots, Hkv, alloc, D]`,
`alloc` the next power of two from 64, rows attending up to ragged lengths in one bucket), and
each variant is timed in interleaved rounds (process CPU time per call, median over rounds):

- `plain`: `k.sum() + v.sum()` over the very views attention reads (the bytes, read once);
- `sdpa`: the runner's previous decode attention, PyTorch's fused kernel with an additive mask;
- `matmul`: `rollout_server.torch_engine.decode_attention` (two batched matmuls, in-place mask
  and softmax);
- `matmul_kt`: the same with the keys stored transposed (`[slots, Hkv, D, alloc]`, so q.k reads
  keys along their contiguous axis); a layout experiment, not what the cache does.

GB/s = K/V bytes attended / CPU seconds. Run under `flock /work/tmp/bench.lock` on a shared machine:

    python -m benchmarks.decode_attention            # about a minute
    python -m benchmarks.decode_attention --quick    # seconds
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from benchmarks.common import command_line
from rollout_server.torch_engine.decode_attention import decode_attention


@dataclass(frozen=True)
class Shape:
    name: str
    rows: int
    context: int
    kv_heads: int
    group: int
    head_dim: int


SHAPES = [
    Shape("2M 64x400", 64, 400, 4, 1, 48),
    Shape("20M 64x400", 64, 400, 8, 1, 64),
    Shape("2M 16x100", 16, 100, 4, 1, 48),
    Shape("20M 16x100", 16, 100, 8, 1, 64),
    Shape("GQA 64x400", 64, 400, 2, 4, 64),
]
QUICK_SHAPES = [Shape("tiny 8x40", 8, 40, 2, 2, 16)]


def _alloc(n: int) -> int:
    a = 64
    while a < n:
        a *= 2
    return a


def make_case(s: Shape, seed: int = 0):
    """Cache buffers and a query as the engine has them: rows of one bucket, ragged lengths in [3/4 n, n]."""
    gen = torch.Generator().manual_seed(seed)
    alloc = _alloc(s.context)
    kbuf = torch.randn(s.rows, s.kv_heads, alloc, s.head_dim, generator=gen)
    vbuf = torch.randn(s.rows, s.kv_heads, alloc, s.head_dim, generator=gen)
    ktbuf = kbuf.transpose(-1, -2).contiguous()  # [rows, Hkv, D, alloc]
    q = torch.randn(s.rows, s.kv_heads, s.group, s.head_dim, generator=gen)
    lens = torch.randint(3 * s.context // 4, s.context + 1, (s.rows,), generator=gen).tolist()
    lens[0] = s.context
    return kbuf, vbuf, ktbuf, q, lens


def variants(s: Shape, case) -> dict:
    kbuf, vbuf, ktbuf, q, lens = case
    n, scale = s.context, s.head_dim ** -0.5
    k, v, kt = kbuf[:, :, :n], vbuf[:, :, :n], ktbuf[..., :n]
    allowed = torch.arange(n)[None, :] < torch.tensor(lens)[:, None]
    additive = torch.zeros(allowed.shape).masked_fill_(~allowed, torch.finfo(torch.float32).min)[:, None, None]

    def matmul_kt():
        scores = torch.matmul(q, kt).mul_(scale)
        scores.masked_fill_(~allowed[:, None, None], float("-inf"))
        torch.softmax(scores, -1, out=scores)
        return torch.matmul(scores, v)

    return {
        "plain": lambda: k.sum() + v.sum(),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=scale),
        "matmul": lambda: decode_attention(q, k, v, lens, scale),
        "matmul_kt": matmul_kt,
    }


def kv_bytes(s: Shape) -> int:
    return 2 * s.rows * s.kv_heads * s.context * s.head_dim * 4


@torch.inference_mode()
def bench_shape(s: Shape, rounds: int, min_s: float) -> dict:
    fns = variants(s, make_case(s))
    ref = fns["sdpa"]()
    for name in ("matmul", "matmul_kt"):
        err = (fns[name]() - ref).abs().max().item()
        if err > 1e-5:
            raise AssertionError(f"{name} differs from sdpa by {err} on {s.name}")
    iters = {}
    for name, fn in fns.items():  # calls per timing: about min_s of CPU time
        fn()
        t = time.process_time()
        fn()
        iters[name] = max(1, int(min_s / max(time.process_time() - t, 1e-6)))
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            t = time.process_time()
            for _ in range(iters[name]):
                fn()
            times[name].append((time.process_time() - t) / iters[name])
    nbytes = kv_bytes(s)
    med = {name: statistics.median(ts) for name, ts in times.items()}
    return {"shape": asdict(s), "kv_bytes": nbytes, "median_s": med,
            "gbps": {name: nbytes / t / 1e9 for name, t in med.items()},
            "vs_plain": {name: med["plain"] / t for name, t in med.items()},
            "rounds_s": times}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (2 if args.quick else 7)
    min_s = 0.01 if args.quick else 0.15
    out = args.out or (Path(tempfile.mkdtemp(prefix="decode_attention_")) if args.quick else Path("benchmarks/results"))
    out.mkdir(parents=True, exist_ok=True)
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    results = {"command": command_line("benchmarks.decode_attention", argv), "threads": args.threads,
               "rounds": rounds, "load_average_before": load_before, "shapes": []}
    print(f"{'shape':<12} " + " ".join(f"{v:>16}" for v in ("plain", "sdpa", "matmul", "matmul_kt")), flush=True)
    for s in QUICK_SHAPES if args.quick else SHAPES:
        r = bench_shape(s, rounds, min_s)
        results["shapes"].append(r)
        print(f"{s.name:<12} " + " ".join(f"{r['gbps'][v]:6.2f} GB/s {r['vs_plain'][v]:4.2f}x"
                                         for v in ("plain", "sdpa", "matmul", "matmul_kt")), flush=True)
    results["load_average_after"] = Path("/proc/loadavg").read_text().split()[:3]
    (out / "decode_attention.json").write_text(json.dumps(results, indent=1))
    print(f"load {' '.join(load_before)} -> {' '.join(results['load_average_after'])}; "
          f"wrote {out / 'decode_attention.json'}  (x = plain's time / this variant's: 1.00x is read speed)")
    return results


if __name__ == "__main__":
    main()
