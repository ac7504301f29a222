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
  keys along their contiguous axis); a layout experiment, not what the cache does (`--layouts`);
- `kernel`: `rollout_server.torch_engine.attention_kernel`, one call over the cache buffers, each row
  read to its own length (built once per machine; skipped with the reason if it cannot be built);
  `kernel_append`: the same call storing each row's new K/V first (the decode step's fused write).

GB/s = K/V bytes the variant reads / CPU seconds: the padded `rows x context` for plain, sdpa and
the matmuls, each row's own length for the kernel; `vs_plain` is a variant's GB/s over plain's (1.00x
is read speed). Shapes: the engine benchmark's two models' heads (2M: 4 KV heads of 48, the embedded
default's and sum_cot's; 20M: 8 of 64) at 1/16/64 rows x 100/400/800 positions, and a grouped-query
shape. Run under `flock /work/tmp/bench.lock` on a shared machine:

    python -m benchmarks.decode_attention            # a few minutes
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
from rollout_server.torch_engine.attention_kernel import Kernel, load_kernel
from rollout_server.torch_engine.decode_attention import decode_attention


@dataclass(frozen=True)
class Shape:
    name: str
    rows: int
    context: int
    kv_heads: int
    group: int
    head_dim: int


HEADS = {"2M": (4, 1, 48), "20M": (8, 1, 64)}  # KV heads, group, head dim of engine_throughput's models
SHAPES = [Shape(f"{m} {rows}x{ctx}", rows, ctx, *HEADS[m])
          for m in HEADS for rows in (1, 16, 64) for ctx in (100, 400, 800)] + [Shape("GQA 64x400", 64, 400, 2, 4, 64)]
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


def variants(s: Shape, case, kernel: Kernel | None = None, layouts: bool = False) -> dict:
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

    fns = {
        "plain": lambda: k.sum() + v.sum(),
        "sdpa": lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=additive, scale=scale),
        "matmul": lambda: decode_attention(q, k, v, lens, scale),
    }
    if layouts:
        fns["matmul_kt"] = matmul_kt
    if kernel is not None:
        slots, lens_t = torch.arange(s.rows), torch.tensor(lens)
        fns["kernel"] = lambda: kernel(q, kbuf, vbuf, slots, lens_t, scale)
        if hasattr(kernel, "append"):  # the built kernel: its fused write
            # the rows it stores are the ones already there, so every call reads the same cache
            kn, vn = kbuf[slots, :, lens_t - 1].clone(), vbuf[slots, :, lens_t - 1].clone()
            fns["kernel_append"] = lambda: kernel.append(q, kbuf, vbuf, slots, lens_t, scale, kn, vn)
    return fns


def kv_bytes(s: Shape, lens: list[int] | None = None) -> int:
    """K/V bytes read: every row to `context` (padded), or each row to its own length."""
    positions = sum(lens) if lens is not None else s.rows * s.context
    return 2 * positions * s.kv_heads * s.head_dim * 4


@torch.inference_mode()
def bench_shape(s: Shape, rounds: int, min_s: float, kernel: Kernel | None = None, layouts: bool = False) -> dict:
    case = make_case(s)
    fns = variants(s, case, kernel, layouts)
    ref = fns["sdpa"]()
    for name in set(fns) - {"plain", "sdpa"}:
        err = (fns[name]() - ref).abs().max().item()
        if err > 1e-5 * max(1.0, ref.abs().max().item()):
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
    nbytes = {name: kv_bytes(s, case[-1] if name.startswith("kernel") else None) for name in fns}
    med = {name: statistics.median(ts) for name, ts in times.items()}
    gbps = {name: nbytes[name] / t / 1e9 for name, t in med.items()}
    return {"shape": asdict(s), "kv_bytes": nbytes, "median_s": med, "gbps": gbps,
            "vs_plain": {name: g / gbps["plain"] for name, g in gbps.items()}, "rounds_s": times}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--layouts", action="store_true", help="also time matmul_kt (keys stored transposed)")
    ap.add_argument("--shapes", default=None, help="comma-separated subset of shape names, e.g. '2M 64x400'")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    rounds = args.rounds or (2 if args.quick else 7)
    min_s = 0.01 if args.quick else 0.15
    out = args.out or (Path(tempfile.mkdtemp(prefix="decode_attention_")) if args.quick else Path("benchmarks/results"))
    out.mkdir(parents=True, exist_ok=True)
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    built = load_kernel(build=not args.quick)  # the test suite's quick run never compiles
    results = {"command": command_line("benchmarks.decode_attention", argv), "threads": args.threads,
               "rounds": rounds, "load_average_before": load_before, "kernel": built.reason, "shapes": []}
    names = ["plain", "sdpa", "matmul"] + ["matmul_kt"] * args.layouts + ["kernel"] * (built.fn is not None)
    names += ["kernel_append"] * hasattr(built.fn, "append")
    if built.fn is None:
        print(f"kernel skipped: {built.reason}", flush=True)
    print(f"{'shape':<14} " + " ".join(f"{v:>16}" for v in names), flush=True)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    if args.shapes:
        shapes = [s for s in shapes if s.name in args.shapes.split(",")]
    for s in shapes:
        r = bench_shape(s, rounds, min_s, built.fn, args.layouts)
        results["shapes"].append(r)
        print(f"{s.name:<14} " + " ".join(f"{r['gbps'][v]:6.2f} GB/s {r['vs_plain'][v]:4.2f}x" for v in names),
              flush=True)
    results["load_average_after"] = Path("/proc/loadavg").read_text().split()[:3]
    (out / "decode_attention.json").write_text(json.dumps(results, indent=1))
    print(f"load {' '.join(load_before)} -> {' '.join(results['load_average_after'])}; "
          f"wrote {out / 'decode_attention.json'}  (x = this variant's GB/s / plain's: 1.00x is read speed)")
    return results


if __name__ == "__main__":
    main()
