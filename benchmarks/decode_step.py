"""Decode step time of the engine's fast runner per linear kernel, and compiled vs eager.

For each model of `benchmarks.engine_throughput` (the embedded default's 2M shape and the 20M
one, random init) and each batch of 1, 16, 64 sequences, every variant runs the same decode steps:

- `eager/f_linear`, `eager/onednn`: the eager runner forced to one linear kernel (`use_linear`);
- `compiled`: decode steps through `torch.compile`d dense layers (`rollout.compile_decode`).

A round = for every variant, in turn: add the sequences (prompts of `--prompt-len` tokens), prefill,
`--warmup` decode steps, then `--steps` timed decode steps (process CPU time and wall time per
step), then abort them all. Rounds are interleaved; per variant the median over rounds of each
round's median step is reported. Compile time is the first compiled call of each row bucket and
of each recompile (`CompileStatus.seconds`); the inductor cache starts in a fresh temporary
directory, so the first batch size of each model compiles cold and later ones only recompile for
their new row count, as one rollout server would. Break-even = compile time / time saved per step. Run from the repository root:

    python -m benchmarks.decode_step                 # a few minutes
    python -m benchmarks.decode_step --quick         # seconds: tiny model, no compile
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.common import command_line
from benchmarks.engine_throughput import EOS, MODELS, QUICK_MODELS, _loadavg, make_model
from rollout_server.sampling import SamplingParams
from rollout_server.torch_engine.engine import Engine
from rollout_server.torch_engine.linear_choice import candidates, machine

VARIANTS = ("eager/f_linear", "eager/onednn", "compiled")


def build(model, variant: str, batch: int, max_seq_len: int, cache: Path) -> tuple[Engine, float]:
    """An engine for `variant` and the seconds its construction took."""
    start = time.perf_counter()
    engine = Engine(model, EOS, max_running=batch, max_seq_len=max_seq_len, kernel_cache=cache,
                    compile_decode=variant == "compiled")
    if variant.startswith("eager/"):
        engine.runner.use_linear(variant.split("/")[1])
    return engine, time.perf_counter() - start


def one_round(engine: Engine, batch: int, prompt_len: int, warmup: int, steps: int, rnd: int) -> dict:
    gen = torch.Generator().manual_seed(rnd)
    params = SamplingParams(max_new_tokens=warmup + steps + 2, temperature=1.0, ignore_eos=True)
    for i in range(batch):
        engine.add(f"{rnd}:{i}", torch.randint(4, engine.vocab_size, (prompt_len,), generator=gen).tolist(), params)
    first = time.perf_counter()
    engine.step()  # prefill
    for _ in range(warmup):
        engine.step()
    warm_s = time.perf_counter() - first
    cpu, wall = [], []
    for _ in range(steps):
        c0, w0 = time.process_time(), time.perf_counter()
        engine.step()
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    for i in range(batch):
        engine.abort(f"{rnd}:{i}")
    return {"cpu_s": statistics.median(cpu), "wall_s": statistics.median(wall), "warm_s": warm_s}


def bench(name: str, shape: dict, batches: list[int], variants: list[str], rounds: int, prompt_len: int,
          warmup: int, steps: int, cache: Path) -> dict:
    max_seq_len = prompt_len + warmup + steps + 8
    model = make_model(shape, max_seq_len, seed=0)
    out: dict = {"params": sum(p.numel() for p in model.parameters()), "shape": shape, "batches": {}}
    for batch in batches:
        engines, entry = {}, {}
        for v in variants:
            engines[v], build_s = build(model, v, batch, max_seq_len, cache)
            entry[v] = {"build_s": build_s, "rounds": [], "kernels": None}
        for rnd in range(rounds):
            for v in variants:
                entry[v]["rounds"].append(one_round(engines[v], batch, prompt_len, warmup, steps, rnd))
        for v in variants:
            e, runner = entry[v], engines[v].runner
            e["step_cpu_ms"] = 1e3 * statistics.median(r["cpu_s"] for r in e["rounds"])
            e["step_wall_ms"] = 1e3 * statistics.median(r["wall_s"] for r in e["rounds"])
            e["tokens_per_s_cpu"] = batch / (e["step_cpu_ms"] / 1e3)
            e["kernels"] = engines[v].kernel_summary()
            status = runner.compile_status
            if status is not None:
                e["compile"] = {"active": status.active, "seconds": status.seconds, "reason": status.reason,
                                "checked_buckets": status.checked, "compiled_steps": status.compiled_steps,
                                "first_round_warm_s": e["rounds"][0]["warm_s"]}
            print(f"  {name:>4} x{batch:<3} {v:<15} {e['step_cpu_ms']:7.2f} ms/step cpu "
                  f"{e['step_wall_ms']:7.2f} wall  {engines[v].kernel_summary()}", flush=True)
        eager = [entry[v]["step_cpu_ms"] for v in variants if v.startswith("eager/")]
        if "compiled" in entry and eager and entry["compiled"].get("compile", {}).get("active"):
            c = entry["compiled"]
            saved_ms = min(eager) - c["step_cpu_ms"]
            c["speedup_vs_best_eager"] = min(eager) / c["step_cpu_ms"]
            c["break_even_steps"] = c["compile"]["seconds"] * 1e3 / saved_ms if saved_ms > 0 else None
        if {"eager/f_linear", "eager/onednn"} <= set(entry):
            entry["f_linear_speedup_over_onednn"] = entry["eager/onednn"]["step_cpu_ms"] / entry["eager/f_linear"][
                "step_cpu_ms"]
        out["batches"][str(batch)] = entry
    return out


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny model, no compile, seconds (for the tests)")
    ap.add_argument("--out", type=Path, default=None, help="JSON to write (default benchmarks/results/decode_step.json)")
    ap.add_argument("--models", default=None, help="comma-separated subset of " + ",".join(MODELS))
    ap.add_argument("--batches", default=None, help="sequences per step, comma-separated (default 1,16,64)")
    ap.add_argument("--variants", default=None, help="comma-separated subset of " + ",".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--steps", type=int, default=None, help="timed decode steps per round")
    ap.add_argument("--warmup", type=int, default=None, help="untimed decode steps per round")
    ap.add_argument("--prompt-len", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="inductor_"))
    quick = args.quick
    models = QUICK_MODELS if quick else {k: MODELS[k] for k in (args.models.split(",") if args.models else MODELS)}
    batches = [int(b) for b in (args.batches or ("1,4" if quick else "1,16,64")).split(",")]
    variants = (args.variants or ("eager/f_linear,eager/onednn" if quick else ",".join(VARIANTS))).split(",")
    if "onednn" not in candidates(torch.device("cpu"), torch.float32):
        variants = [v for v in variants if v != "eager/onednn"]
    rounds, steps = args.rounds or (2 if quick else 5), args.steps or (3 if quick else 20)
    warmup, prompt_len = args.warmup or (2 if quick else 5), args.prompt_len or (8 if quick else 32)
    out = args.out or (Path(tempfile.mkdtemp(prefix="decode_step_")) / "decode_step.json" if quick
                       else Path("benchmarks/results/decode_step.json"))
    cache = Path(tempfile.mkdtemp(prefix="kernels_")) / "kernels.json"  # never a stale choice
    results: dict = {"command": command_line("benchmarks.decode_step", argv), "quick": quick,
                     "environment": {**machine(), "threads": args.threads},
                     "settings": {"rounds": rounds, "steps": steps, "warmup": warmup, "prompt_len": prompt_len,
                                  "batches": batches, "variants": variants, "temperature": 1.0, "dtype": "float32"},
                     "load_average_before": _loadavg(), "models": {}}
    wall = time.perf_counter()
    for name, shape in models.items():
        print(f"{name}:", flush=True)
        results["models"][name] = bench(name, shape, batches, variants, rounds, prompt_len, warmup, steps, cache)
    results["wall_time_s"] = time.perf_counter() - wall
    results["load_average_after"] = _loadavg()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"wrote {out}")
    return results


if __name__ == "__main__":
    main()
