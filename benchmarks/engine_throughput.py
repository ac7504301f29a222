"""Engine throughput under long-tailed output lengths: our engine vs the engines a user would use.

One run, same prompts, same per-request output lengths (log-normal, clipped to about 8x the mean
and at most 512 new tokens, fixed seed, EOS ignored so every request produces exactly its length),
same sampling (temperature 1, no top-k / top-p), fp32, `--threads` torch threads (default: the cores
free at start, areal_py.threads; recorded in the result), for:

- `ours`: `rollout_server.torch_engine.engine.Engine` (continuous batching, `max_running` slots).
- `hf_static`: Hugging Face `model.generate` in static batches of `max_running` requests in order;
  a batch runs until its longest member is done. Only the requested tokens count as useful.
- `hf_cb`: transformers' own continuous batching. `generate_batch` takes one `max_new_tokens` for
  all requests, so we drive the manager it wraps (`continuous_batching_context_manager` +
  `add_request(..., max_new_tokens=n_i)`), which is the same engine with per-request lengths;
  `max_requests_per_batch = max_running`.

Both a ~2M (the embedded default's shape) and a ~20M parameter Llama, random init (seeded).
Next to each measurement it prints the roofline (`benchmarks.roofline`, the machine's GEMM peak and
read bandwidths measured at start at the same thread count): for the workload, the floor time no
engine can beat (`generation_floor_s`), and for single decode steps of the fast runner at
`--decode-shapes` rows x context, the step's floor (`decode_floor_s`); "x above roofline" is the
measured time over the floor. Decode steps are timed with each decode attention variant
(`attention_choice`: sdpa, and the C++ kernel where this machine has built it), rounds
interleaved; the step's headline numbers are those of the variant the engine chose.

Writes `<out>/engine_throughput.json` (tokens/s per engine and model, speedup over the better
baseline, peak RSS, floors and decode steps, machine limits, workload, command) and
`<out>/engine_throughput_slots.png` (active slots over time per engine; needs matplotlib). Run
from the repository root:

    python -m benchmarks.engine_throughput            # full run, a few minutes
    python -m benchmarks.engine_throughput --quick    # seconds, for the test suite
"""
from __future__ import annotations

import argparse
import json
import logging
import platform
import re
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch
import transformers
from transformers import (
    GenerationConfig,
    LlamaConfig,
    LlamaForCausalLM,
    LogitsProcessor,
    LogitsProcessorList,
)

from areal_py.threads import auto_threads
from benchmarks.common import command_line
from benchmarks.roofline import MachineLimits, ModelShape, decode_floor_s, generation_floor_s, measure_machine
from rollout_server.sampling import SamplingParams
from rollout_server.torch_engine.attention_kernel import load_kernel
from rollout_server.torch_engine.engine import Engine

EOS = 2
MODELS = {  # name -> Llama shape; parameter counts are measured and reported
    "2M": dict(hidden_size=192, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4,
               intermediate_size=512, vocab_size=56),
    "20M": dict(hidden_size=512, num_hidden_layers=6, num_attention_heads=8, num_key_value_heads=8,
                intermediate_size=1408, vocab_size=1000),
}
QUICK_MODELS = {"tiny": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                             intermediate_size=128, vocab_size=56)}
ENGINES = ("ours", "hf_static", "hf_cb")


# --- workload ------------------------------------------------------------------------------------
def make_workload(num_requests: int, mean_new: int, vocab: int, seed: int, prompt_len: tuple[int, int]) -> dict:
    """Prompts (uniform lengths, random tokens) and log-normal output lengths, max ~8x the mean, <= 512."""
    rng = np.random.default_rng(seed)
    sigma = 1.0
    cap = min(512, 8 * mean_new)
    lengths = rng.lognormal(np.log(mean_new) - sigma ** 2 / 2, sigma, num_requests)
    lengths = np.clip(np.round(lengths), 1, cap).astype(int).tolist()
    prompts = [rng.integers(4, vocab, int(rng.integers(prompt_len[0], prompt_len[1] + 1))).tolist()
               for _ in range(num_requests)]
    return {"prompts": prompts, "lengths": lengths, "sigma": sigma, "cap": cap}


def make_model(shape: dict, max_pos: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(**shape, max_position_embeddings=max_pos, tie_word_embeddings=False, eos_token_id=EOS,
                      bos_token_id=1, pad_token_id=0)
    model = LlamaForCausalLM(cfg).eval()
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


# --- memory -------------------------------------------------------------------------------------
def _status_kb(field: str) -> int:
    try:
        return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))
    except (OSError, AttributeError):
        return 0


def _loadavg() -> list[float] | None:
    try:
        return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return None


def reset_peak_rss() -> bool:
    """Reset VmHWM (Linux `clear_refs` 5) so the next peak belongs to one engine only."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# --- engines --------------------------------------------------------------------------------------
def run_ours(model, wl: dict, max_running: int, seed: int) -> dict:
    max_seq_len = max(map(len, wl["prompts"])) + max(wl["lengths"]) + 1
    engine = Engine(model, EOS, max_running=max_running, max_seq_len=max_seq_len, seed=seed)
    params = [SamplingParams(max_new_tokens=n, temperature=1.0, top_p=1.0, ignore_eos=True) for n in wl["lengths"]]
    timeline, done = [], {}
    start = time.perf_counter()
    for i, (prompt, p) in enumerate(zip(wl["prompts"], params)):
        engine.add(str(i), prompt, p)
    while engine.has_work():
        n = min(engine.num_running + engine.num_waiting, max_running)  # rows in this step
        for f in engine.step():
            done[int(f.rid)] = len(f.output_ids)
        timeline.append((time.perf_counter() - start, n))
    elapsed = time.perf_counter() - start
    return {"elapsed_s": elapsed, "produced": [done[i] for i in range(len(params))], "timeline": timeline,
            "steps": len(timeline), "forwards": engine.runner.forwards, "runner": type(engine.runner).__name__,
            "kernels": engine.kernel_summary()}


class _StepClock(LogitsProcessor):
    """Records when each decoding step of `generate` happens (a logits processor is called once per step)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def __call__(self, input_ids, scores):
        self.times.append(time.perf_counter())
        return scores


def run_hf_static(model, wl: dict, batch_size: int, seed: int) -> dict:
    torch.manual_seed(seed)
    prompts, lengths = wl["prompts"], wl["lengths"]
    timeline, produced, computed = [], [], 0
    start = time.perf_counter()
    for s in range(0, len(prompts), batch_size):
        batch, want = prompts[s:s + batch_size], lengths[s:s + batch_size]
        width = max(map(len, batch))
        ids = torch.zeros(len(batch), width, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, p in enumerate(batch):  # left padding, as decoder-only generation needs
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        clock = _StepClock()
        gen = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max(want),
                               min_new_tokens=0, eos_token_id=None, pad_token_id=0)
        with torch.inference_mode():
            out = model.generate(ids, attention_mask=mask, generation_config=gen,
                                 logits_processor=LogitsProcessorList([clock]))
        new = out.shape[1] - width
        computed += len(batch) * new
        produced += [min(n, new) for n in want]  # each request keeps only its requested tokens
        for step, t in enumerate(clock.times):
            timeline.append((t - start, sum(n > step for n in want)))
    elapsed = time.perf_counter() - start
    return {"elapsed_s": elapsed, "produced": produced, "timeline": timeline, "computed_tokens": computed}


# transformers' CB sizes its paged cache from free memory by default (GBs here); "sized" gives it
# exactly the blocks this workload needs. Both are tried in the full run and the faster is kept.
CB_CONFIG = "sized"


def _cb_config(model, wl: dict, max_running: int, seed: int):
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    kwargs = dict(max_requests_per_batch=max_running, seed=seed)
    if CB_CONFIG == "sized":
        page = 64
        need = max(map(len, wl["prompts"])) + max(wl["lengths"])
        kwargs.update(page_size=page, num_blocks=max_running * -(-need // page) + 2,
                      max_batch_tokens=max(256, max_running * max(map(len, wl["prompts"]))))
    return ContinuousBatchingConfig(**kwargs)


def run_hf_cb(model, wl: dict, max_running: int, seed: int) -> dict:

    prompts, lengths = wl["prompts"], wl["lengths"]
    gen = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=max(lengths),
                           eos_token_id=-1, pad_token_id=0)
    cb = _cb_config(model, wl, max_running, seed)
    results = {}
    with model.continuous_batching_context_manager(generation_config=gen, continuous_batching_config=cb,
                                                   warmup=True) as manager:
        start = time.perf_counter()
        for i, (p, n) in enumerate(zip(prompts, lengths)):
            manager.add_request(p, request_id=str(i), max_new_tokens=n, eos_token_id=-1)
        while len(results) < len(prompts):
            r = manager.get_result(timeout=1)
            if r is not None and r.is_finished():
                results[int(r.request_id)] = r
            elif r is None and not manager.is_running():
                raise RuntimeError("transformers continuous batching stopped before finishing")
        elapsed = time.perf_counter() - start
    # Active requests over time from each request's lifespan (scheduled -> finished).
    spans = [(results[i].lifespan[0] - start, results[i].lifespan[1] - start) for i in range(len(prompts))]
    grid = np.linspace(0, elapsed, 400)
    timeline = [(float(t), int(sum(a <= t <= b for a, b in spans))) for t in grid]
    return {"elapsed_s": elapsed, "produced": [len(results[i].generated_tokens) for i in range(len(prompts))],
            "timeline": timeline}


RUNNERS = {"ours": run_ours, "hf_static": run_hf_static, "hf_cb": run_hf_cb}


def warm_up(model, max_running: int) -> None:
    """A few tiny requests through every engine so one-time costs (allocator, kernels) are not timed."""
    wl = {"prompts": [[5, 6, 7, 8]] * 2, "lengths": [3, 2]}
    for run in RUNNERS.values():
        run(model, wl, max_running, 0)


@torch.inference_mode()
def decode_steps(model, rows: int, context: int, limits: MachineLimits, rounds: int) -> dict:
    """The fast runner's decode step over `rows` rows at `context` positions each, against its floor,
    with every decode attention variant usable here (rounds interleaved).

    The rows' caches are left as allocated (zeros): a step's work does not depend on the values. Each
    round times a few steps per variant; with one thread the clock is process CPU time (the machine is
    shared), else wall time. The median over rounds counts; the headline is the engine's own choice."""
    engine = Engine(model, EOS, max_running=rows, max_seq_len=context + 1, seed=0)
    runner, slots = engine.runner, list(range(rows))
    clock = time.process_time if limits.threads == 1 else time.perf_counter
    chosen = runner.attention.variant if hasattr(runner, "attention") else None
    variants = []
    for v in ("sdpa", "kernel") if chosen else ():
        runner.use_attention(v)
        if runner.attention.variant == v:
            variants.append(v)
        else:
            print(f"  decode attention {v} unusable: {runner.attention.reason}", flush=True)

    def step() -> None:
        runner.forward(slots, [context - 1] * rows, [[5]] * rows)

    per_round = {}
    for v in variants or [None]:
        if v:
            runner.use_attention(v)
        step()
        per_round[v] = max(1, int(0.2 / max(_timed(step, clock), 1e-6)))
    times: dict = {v: [] for v in per_round}
    for _ in range(rounds):
        for v, calls in per_round.items():
            if v:
                runner.use_attention(v)
            times[v].append(_timed(step, clock, calls))
    floor = decode_floor_s(ModelShape.from_config(model.config), [context] * rows, limits)
    medians = {v: float(np.median(t)) for v, t in times.items()}
    head = chosen if chosen in medians else next(iter(medians))
    return {"rows": rows, "context": context, "runner": type(runner).__name__, "median_s": medians[head],
            "rounds_s": times[head], "clock": clock.__name__, "floor_s": floor,
            "x_above_roofline": medians[head] / floor, "attention_chosen": chosen,
            "attention": {v: {"median_s": medians[v], "rounds_s": times[v], "x_above_roofline": medians[v] / floor}
                          for v in medians if v}}


def _timed(fn, clock, calls: int = 1) -> float:
    t = clock()
    for _ in range(calls):
        fn()
    return (clock() - t) / calls


def bench_model(name: str, shape: dict, wl: dict, max_running: int, seed: int, engines: list[str],
                repeats: int, cb_configs: list[str], limits: MachineLimits,
                decode_shapes: list[tuple[int, int]]) -> dict:
    """Every engine `repeats` times in interleaved rounds (the machine is shared and noisy), the order of
    the engines rotated by one each round so that no engine always runs first while the load drifts; the
    best run counts, and each round's ratio (ours over the better baseline of that round) is kept."""
    global CB_CONFIG
    max_pos = max(map(len, wl["prompts"])) + max(wl["lengths"]) + 8
    max_pos = max([max_pos] + [c + 8 for _, c in decode_shapes])
    model = make_model(shape, max_pos, seed)
    n_params = sum(p.numel() for p in model.parameters())
    warm_up(model, max_running)
    useful = sum(wl["lengths"])
    floor = generation_floor_s(ModelShape.from_config(model.config), [len(p) for p in wl["prompts"]],
                               wl["lengths"], max_running, limits)
    entry: dict = {"params": n_params, "shape": shape, "engines": {},
                   "roofline": {"floor_s": floor, "floor_tokens_per_s": useful / floor}}
    print(f"  {name:>4} roofline   {useful / floor:8.0f} tok/s {floor:6.2f}s  (the floor for this workload)",
          flush=True)
    entry["rounds"] = []
    for rep in range(repeats):
        order = engines[rep % len(engines):] + engines[:rep % len(engines)]
        this_round: dict = {"order": order, "tokens_per_s": {}, "load_before": _loadavg()}
        for eng in order:
            for variant in (cb_configs if eng == "hf_cb" else [None]):
                if variant:
                    CB_CONFIG = variant
                rss_before = _status_kb("VmRSS")
                peak_ok = reset_peak_rss()
                res = RUNNERS[eng](model, wl, max_running, seed)
                if res["produced"] != wl["lengths"]:
                    raise AssertionError(f"{eng} on {name} did not produce exactly the requested lengths")
                peak = _status_kb("VmHWM") / 1024 if peak_ok else None
                tps = useful / res["elapsed_s"]
                print(f"  {name:>4} {eng:<10}{'/' + variant if variant else '':<7} {tps:8.0f} tok/s "
                      f"{res['elapsed_s']:6.1f}s {res['elapsed_s'] / floor:6.1f}x above roofline"
                      + (f"  peak RSS {peak:.0f} MB" if peak else ""), flush=True)
                r = entry["engines"].setdefault(eng, {"runs_tokens_per_s": [], "tokens_per_s": 0.0,
                                                      "runs_x_above_roofline": []})
                r["runs_tokens_per_s"].append(round(tps, 1))
                this_round["tokens_per_s"][eng] = max(this_round["tokens_per_s"].get(eng, 0.0), round(tps, 1))
                r["runs_x_above_roofline"].append(round(res["elapsed_s"] / floor, 3))
                r["peak_rss_mb"] = max(r.get("peak_rss_mb") or 0, peak or 0) or None
                if tps > r["tokens_per_s"]:  # keep the best run's details
                    r.update({"tokens_per_s": tps, "elapsed_s": res["elapsed_s"], "useful_tokens": useful,
                              "rss_before_mb": rss_before / 1024, "x_above_roofline": res["elapsed_s"] / floor})
                    if variant:
                        r["cb_config"] = variant
                    r.update({k: v for k, v in res.items() if k not in ("produced", "elapsed_s")})
        this_round["load_after"] = _loadavg()
        this_round["speedup_vs_best_baseline"] = round_speedup(this_round["tokens_per_s"])
        entry["rounds"].append(this_round)
    for r in entry["engines"].values():
        r["timeline"] = [(round(t, 4), n) for t, n in r["timeline"]]
    base = [entry["engines"][e]["tokens_per_s"] for e in ("hf_static", "hf_cb") if e in entry["engines"]]
    if "ours" in entry["engines"] and base:
        entry["best_baseline_tokens_per_s"] = max(base)
        entry["speedup_vs_best_baseline"] = entry["engines"]["ours"]["tokens_per_s"] / max(base)
        entry["peak_rss_mb_ours"] = entry["engines"]["ours"]["peak_rss_mb"]
    entry["decode_steps"] = []
    for rows, context in decode_shapes:
        d = decode_steps(model, rows, context, limits, max(3, 2 * repeats + 1))
        entry["decode_steps"].append(d)
        for v, a in d["attention"].items() or [(None, d)]:
            print(f"  {name:>4} decode step {rows}x{context} attention {v}{'*' if v == d['attention_chosen'] else ''}: "
                  f"{a['median_s'] * 1e3:.2f} ms, floor {d['floor_s'] * 1e3:.2f} ms, "
                  f"{a['x_above_roofline']:.2f}x above roofline", flush=True)
    del model
    return entry


def round_speedup(tokens_per_s: dict) -> float | None:
    """Ours over the better Hugging Face baseline, both from the same round (None if one is missing)."""
    base = [tokens_per_s[e] for e in ("hf_static", "hf_cb") if e in tokens_per_s]
    return tokens_per_s["ours"] / max(base) if "ours" in tokens_per_s and base else None


def summarize(results: dict) -> None:
    """Medians next to the best runs, so the noise of a shared machine is visible in the JSON.

    Per engine, the median distance from the workload's floor (`median_x_above_roofline`, time over
    floor time): the ratio of two engines is the inverse ratio of their distances, so the baseline's
    distance is the largest ratio over it any engine could reach (one running at the floor)."""
    for m in results["models"].values():
        for r in m["engines"].values():
            r["median_tokens_per_s"] = float(np.median(r["runs_tokens_per_s"]))
            r["median_x_above_roofline"] = float(np.median(r["runs_x_above_roofline"]))
        base = [m["engines"][e]["median_tokens_per_s"] for e in ("hf_static", "hf_cb") if e in m["engines"]]
        if "ours" in m["engines"] and base:
            m["speedup_median_vs_best_baseline_median"] = m["engines"]["ours"]["median_tokens_per_s"] / max(base)
        per_round = [r["speedup_vs_best_baseline"] for r in m.get("rounds", [])
                     if r.get("speedup_vs_best_baseline") is not None]
        if per_round:
            m["speedup_per_round"] = per_round
            m["speedup_median_per_round"] = float(np.median(per_round))
        bases = [e for e in ("hf_static", "hf_cb") if e in m["engines"]]
        if bases:
            best = min(bases, key=lambda e: m["engines"][e]["median_x_above_roofline"])
            m["best_baseline_median_x_above_roofline"] = m["engines"][best]["median_x_above_roofline"]


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: plot skipped", file=sys.stderr)
        return False
    models = list(results["models"])
    fig, axes = plt.subplots(len(models), 1, figsize=(10, 3.6 * len(models)), squeeze=False)
    labels = {"ours": "our engine", "hf_static": "HF generate, static batches", "hf_cb": "HF continuous batching"}
    for ax, name in zip(axes[:, 0], models):
        m = results["models"][name]
        for eng, r in m["engines"].items():
            t, n = zip(*r["timeline"]) if r["timeline"] else ((), ())
            ax.step(t, n, where="post", label=f"{labels[eng]} ({r['tokens_per_s']:.0f} tok/s)", lw=1.4,
                    zorder=3 if eng == "ours" else 2)
        ax.set_title(f"{name} Llama ({m['params'] / 1e6:.1f}M params): requests being generated")
        ax.set_xlabel("seconds since the first request")
        ax.set_ylabel("active slots")
        ax.axhline(results["workload"]["max_running"], color="grey", lw=0.5, ls="--")
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.28), ncol=3, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model and workload (seconds), for the tests")
    ap.add_argument("--out", type=Path, default=None, help="output directory (default benchmarks/results; "
                                                            "a temporary directory with --quick)")
    ap.add_argument("--requests", type=int, default=None)
    ap.add_argument("--mean-new-tokens", type=int, default=None)
    ap.add_argument("--max-running", type=int, default=None)
    ap.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(MODELS))
    ap.add_argument("--engines", default=",".join(ENGINES))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--replot", action="store_true", help="only redraw the PNG (and summary) from <out>'s JSON")
    ap.add_argument("--repeats", type=int, default=None, help="runs per engine, interleaved; the best counts")
    ap.add_argument("--cb-configs", default=None, help="transformers CB cache sizing(s) to try: auto,sized")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = the cores free now; more than "
                                                           "that slows every engine several-fold)")
    ap.add_argument("--decode-shapes", default=None, help="decode steps to time against their floor, "
                                                          "ROWSxCONTEXT,... or none (default 64x400,16x100; quick 4x16)")
    args = ap.parse_args(argv)

    threads = args.threads or auto_threads(1)
    torch.set_num_threads(threads)
    logging.getLogger("transformers").setLevel(logging.ERROR)
    logging.getLogger("ContinuousBatchingLogger").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    transformers.logging.set_verbosity_error()
    quick = args.quick
    models = QUICK_MODELS if quick else {k: MODELS[k] for k in (args.models.split(",") if args.models else MODELS)}
    requests = args.requests or (12 if quick else 128)
    mean_new = args.mean_new_tokens or (8 if quick else 64)
    max_running = args.max_running or (4 if quick else 32)
    out = args.out or (Path(tempfile.mkdtemp(prefix="engine_throughput_")) if quick else Path("benchmarks/results"))
    out.mkdir(parents=True, exist_ok=True)
    engines = args.engines.split(",")
    if args.replot:
        results = json.loads((out / "engine_throughput.json").read_text())
        summarize(results)
        (out / "engine_throughput.json").write_text(json.dumps(results, indent=1))
        plot(results, out / "engine_throughput_slots.png")
        return results
    repeats = args.repeats or (1 if quick else 3)
    cb_configs = (args.cb_configs or ("sized" if quick else "auto,sized")).split(",")

    decode_spec = args.decode_shapes or ("4x16" if quick else "64x400,16x100")
    decode_shapes = [tuple(int(x) for x in d.split("x")) for d in decode_spec.split(",") if d and d != "none"]
    if not quick:  # as `areal-py run` does before its servers start: the engine's "auto" then can pick it
        built = load_kernel()
        print("decode attention kernel: " + ("built" if built.fn is not None else f"unusable ({built.reason})"),
              flush=True)
    limits = (measure_machine(threads, gemm_n=256, dram_bytes=64 << 20, repeats=2) if quick
              else measure_machine(threads))
    print(f"machine at {threads} thread(s): fp32 GEMM {limits.gemm_gflops:.1f} GFLOP/s, reads {limits.dram_gbps:.1f} "
          f"GB/s (DRAM) / {limits.cache_gbps:.1f} GB/s (cache)", flush=True)
    results: dict = {
        "command": command_line("benchmarks.engine_throughput", argv),
        "machine": limits.to_dict(),
        "quick": quick,
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__, "threads": threads,
                        "cpu": platform.processor() or platform.machine(), "python": platform.python_version()},
        "models": {},
        "decode_attention_kernel": "not built (--quick)" if quick else ("built" if built.fn else built.reason),
    }
    wall = time.perf_counter()
    results["load_average_before"] = _loadavg()
    for name, shape in models.items():
        wl = make_workload(requests, mean_new, shape["vocab_size"], args.seed, (4, 8) if quick else (16, 32))
        lengths = np.array(wl["lengths"])
        results["workload"] = {
            "requests": requests, "max_running": max_running, "static_batch_size": max_running,
            "prompt_len": [4, 8] if quick else [16, 32], "new_tokens": "lognormal", "lognormal_sigma": wl["sigma"],
            "target_mean_new_tokens": mean_new, "cap_new_tokens": wl["cap"], "mean_new_tokens": float(lengths.mean()),
            "median_new_tokens": float(np.median(lengths)), "max_new_tokens": int(lengths.max()),
            "total_new_tokens": int(lengths.sum()), "seed": args.seed, "ignore_eos": True, "temperature": 1.0,
            "top_p": 1.0, "top_k": None, "dtype": "float32", "repeats": repeats, "hf_cb_configs": cb_configs,
        }
        print(f"{name}: {requests} requests, new tokens mean {lengths.mean():.1f} max {lengths.max()}, "
              f"{max_running} slots", flush=True)
        results["models"][name] = bench_model(name, shape, wl, max_running, args.seed, engines, repeats, cb_configs,
                                              limits, decode_shapes)
    results["wall_time_s"] = time.perf_counter() - wall
    results["load_average_after"] = _loadavg()
    summarize(results)
    (out / "engine_throughput.json").write_text(json.dumps(results, indent=1))
    plotted = plot(results, out / "engine_throughput_slots.png")
    print(f"wrote {out / 'engine_throughput.json'}" + (f" and {out / 'engine_throughput_slots.png'}" if plotted else ""))
    for name, m in results["models"].items():
        for eng, r in m["engines"].items():
            print(f"{name}: {eng:<10} median {r['median_tokens_per_s']:8.0f} tok/s, "
                  f"{r['median_x_above_roofline']:.2f}x the workload floor")
        if "best_baseline_median_x_above_roofline" in m:
            print(f"{name}: the best baseline is {m['best_baseline_median_x_above_roofline']:.2f}x above the floor: "
                  f"the largest ratio over it any engine could reach")
        if "speedup_vs_best_baseline" in m:
            print(f"{name}: ours / best baseline = {m['speedup_vs_best_baseline']:.2f}x (best runs)")
        if "speedup_median_per_round" in m:
            print(f"{name}: per round " + ", ".join(f"{x:.2f}" for x in m["speedup_per_round"])
                  + f"; median {m['speedup_median_per_round']:.2f}x")
    return results


if __name__ == "__main__":
    main()
