"""The micro-batch cost model `pack_by_cost` minimises: measured once per machine and model shape.

``cost(rows, maxlen) = c0 + c1 * rows * maxlen + c2 * rows * maxlen**2`` is fitted to the time of
one forward + backward of the policy at a few padded shapes (`probe_shapes`): a tiny one (mostly
``c0``), short rows (mostly ``c1``) and long rows (``c2``), all within the memory budget. The fit
(`fit_cost`) is least squares on *relative* error, so the tiny shape counts as much as the big ones,
with every coefficient >= 0 (the best non-negative fit over the supports of the three terms).

Where the coefficients come from (`pack_cost_for`, in order): ``trainer.pack_cost`` in the config
(reproducible packing across machines); else a cache file under ``model.cache_dir/pack_cost/``
keyed by the machine (CPU model, torch version, threads, device), the model's shape and dtype and
the probed shapes; else a measurement, written to that cache. The log states which, and the values.

Every probe batch has one row a token shorter than the others: a padded micro-batch almost always
holds padding. It is right padding, which `token_logprobs` runs without a mask (plain causal
attention), as it runs the learner's micro-batches; `PROBE` in the cache key names that path, so
costs timed through another one are not reused.
The probe leaves no trace: gradients are reset to None and the CPU RNG state is restored.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from areal_py.config import Config
from trainer.micro_batching import PackCost
from trainer.rollout_batch import token_logprobs

log = logging.getLogger("trainer")

PROBE = "token_logprobs: right padding unmasked"  # what a probe times; part of the cache key
PROBE_TOKENS = 1024  # padded tokens of the larger probes: big enough to time, small enough to start fast


@dataclass(frozen=True)
class CostPoint:
    """One timed probe: a padded micro-batch of ``rows`` x ``maxlen`` took ``seconds`` (forward + backward)."""
    rows: int
    maxlen: int
    seconds: float


def probe_shapes(max_tokens: int, max_len: int) -> list[tuple[int, int]]:
    """(rows, maxlen) shapes to time, each within ``rows * maxlen <= max_tokens`` and ``maxlen <= max_len``
    (the model's context): one tiny shape, then ~`PROBE_TOKENS` tokens as short, medium and long rows."""
    if max_tokens < 1 or max_len < 2:
        raise ValueError(f"need max_tokens >= 1 and max_len >= 2, got {max_tokens}, {max_len}")
    tokens = min(max_tokens, PROBE_TOKENS)
    shapes = [(1, min(8, max_len))]
    for length in (32, 128, 512):
        length = max(2, min(length, max_len, tokens))
        shapes.append((max(1, tokens // length), length))
    return list(dict.fromkeys(shapes))


def fit_cost(points: list[CostPoint]) -> PackCost:
    """Non-negative least-squares fit of (c0, c1, c2) to the points, on relative error.

    Tries every non-empty subset of the three terms, solves ordinary least squares on it and keeps
    the feasible (all >= 0) solution with the smallest residual: with three unknowns that is the
    exact non-negative optimum, without an iterative solver.
    """
    if not points or any(p.seconds <= 0 or p.rows < 1 or p.maxlen < 0 for p in points):
        raise ValueError(f"need timed points with seconds > 0 and rows >= 1, got {points}")
    design = np.array([[1.0, p.rows * p.maxlen, p.rows * p.maxlen ** 2] for p in points])
    target = np.array([p.seconds for p in points])
    a, b = design / target[:, None], np.ones(len(points))  # relative error: each row divided by its time
    best: tuple[float, np.ndarray] | None = None
    for k in (1, 2, 3):
        for support in itertools.combinations(range(3), k):
            cols = list(support)
            coef, *_ = np.linalg.lstsq(a[:, cols], b, rcond=None)
            if (coef < 0).any():
                continue
            full = np.zeros(3)
            full[cols] = coef
            resid = float(((a @ full - b) ** 2).sum())
            if best is None or resid < best[0] - 1e-15:
                best = (resid, full)
    assert best is not None  # the one-term fits with a positive column always give a c >= 0
    return PackCost(*(float(c) for c in best[1]))


def time_shapes(model: torch.nn.Module, shapes: list[tuple[int, int]], reps: int = 2) -> list[CostPoint]:
    """Forward + backward of ``model`` at each shape, the fastest of ``reps`` after one warm-up run.

    One CPU thread: process CPU time (other processes on the machine do not inflate it); several
    threads or a GPU: wall time (CPU time would add the threads up)."""
    device = next(model.parameters()).device
    vocab = int(model.get_input_embeddings().num_embeddings)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = time.perf_counter if device.type == "cuda" or torch.get_num_threads() > 1 else time.process_time
    gen = torch.Generator().manual_seed(0)
    points = []
    with torch.random.fork_rng(devices=[]), torch.enable_grad():
        for rows, maxlen in shapes:
            ids = torch.randint(0, vocab, (rows, maxlen), generator=gen).to(device)
            mask = torch.ones(rows, maxlen, dtype=torch.long)
            mask[0, -1] = 0  # padding, as in a real micro-batch (see the module docstring)
            mask = mask.to(device)
            times = []
            for _ in range(reps + 1):
                sync()
                t0 = clock()
                logp, _ = token_logprobs(model, ids, mask, 1.0)
                logp.sum().backward()
                sync()
                times.append(clock() - t0)
            model.zero_grad(set_to_none=True)
            points.append(CostPoint(rows, maxlen, max(min(times[1:]), 1e-9)))
    return points


def machine_key(model: torch.nn.Module) -> dict:
    """What the timings depend on: the machine, torch, threads, device, dtype and the model's shape."""
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), cpu)
    except OSError:
        pass
    p = next(model.parameters())
    shape = {k: v for k, v in model.config.to_dict().items()
             if k in ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                      "num_key_value_heads", "vocab_size", "head_dim", "tie_word_embeddings")}
    attn = getattr(model.config, "_attn_implementation", None)
    return {"cpu": cpu, "torch": torch.__version__, "threads": torch.get_num_threads(), "device": str(p.device),
            "dtype": str(p.dtype), "model": shape, "attn": attn}


def cached_cost(cache_dir: Path, model: torch.nn.Module, max_tokens: int, max_len: int) -> tuple[PackCost, str]:
    """The cost model for this machine and model: read from ``cache_dir/pack_cost/`` or measured and
    written there. Returns it and where it came from ("cached <file>" or "measured, cached in <file>")."""
    shapes = probe_shapes(max_tokens, max_len)
    key = {**machine_key(model), "shapes": shapes, "probe": PROBE}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(cache_dir).expanduser() / "pack_cost" / f"{digest}.json"
    try:
        saved = json.loads(path.read_text())
        if saved.get("key") == json.loads(json.dumps(key)):
            return PackCost(**saved["cost"]), f"cached {path}"
    except (OSError, ValueError, TypeError, KeyError):
        pass  # absent or unreadable: measure again
    t0 = time.perf_counter()
    points = time_shapes(model, shapes)
    took = time.perf_counter() - t0
    cost = fit_cost(points)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps({"key": key, "cost": asdict(cost), "points": [asdict(p) for p in points]}, indent=1))
    tmp.replace(path)
    return cost, f"measured at (rows, maxlen) {shapes} in {took:.1f} s, cached in {path}"


def pack_cost_for(cfg: Config, model: torch.nn.Module) -> PackCost | None:
    """The cost model the learner packs by, or None when it does not pack by cost (see the module docstring)."""
    t = cfg.trainer
    if t.micro_batch_packing != "cost" or not t.max_tokens_per_micro_batch:
        return None
    if t.pack_cost is not None:
        cost, where = PackCost(*t.pack_cost), "from trainer.pack_cost"
    else:
        max_len = int(getattr(model.config, "max_position_embeddings", 0) or t.max_tokens_per_micro_batch)
        cost, where = cached_cost(Path(cfg.model.cache_dir), model, t.max_tokens_per_micro_batch, max_len)
    log.info("micro-batch cost model (seconds): %.3g + %.3g * rows*maxlen + %.3g * rows*maxlen^2 (%s)",
             cost.c0, cost.c1, cost.c2, where)
    return cost
