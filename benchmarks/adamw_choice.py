"""AdamW implementations on the learner's model: fused (the learner's choice) vs foreach vs the per-tensor loop.

The model is the embedded one at `configs/sum_cot.yaml`'s shape, every parameter given a random
gradient; each variant is its own `torch.optim.AdamW` over its own copy of the weights, one torch
thread. Rounds are interleaved (one `step()` of every variant per round, the order rotated); the
statistic is the median over rounds of the process CPU time of one `step()`, and of the per-round
ratio to `fused`. The updated weights of every variant are compared with `fused`'s after the rounds
(they must agree to float rounding: the same update, differently scheduled). Writes `adamw_choice.json`.

    python -m benchmarks.adamw_choice --rounds 41
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from areal_py.models import EmbeddedModelSpec, create_embedded_model, load_model_and_tokenizer
from benchmarks.common import command_line

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"fused": {"fused": True}, "foreach": {"foreach": True}, "loop": {"foreach": False}}


def run(rounds: int) -> dict:
    torch.set_num_threads(1)
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    with tempfile.TemporaryDirectory() as tmp:
        model, _ = load_model_and_tokenizer(create_embedded_model(Path(tmp) / "m", EmbeddedModelSpec(
            max_position_embeddings=768)))
    models = {name: copy.deepcopy(model) for name in VARIANTS}
    for m in models.values():  # the same gradient on every copy (deepcopy does not carry .grad)
        gen = torch.Generator().manual_seed(0)
        for p in m.parameters():
            p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    opts = {name: torch.optim.AdamW(models[name].parameters(), lr=1e-4, **kw) for name, kw in VARIANTS.items()}
    for opt in opts.values():  # warm-up: state allocated
        opt.step()
    names = list(VARIANTS)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            t0 = time.process_time()
            opts[name].step()
            times[name].append(time.process_time() - t0)
    ref = dict(models["fused"].named_parameters())
    with torch.no_grad():
        moved = max(float((p - q).abs().max()) for p, q in zip(model.parameters(), ref.values(), strict=True))
        diff = {n: max(float((p - ref[k]).abs().max()) for k, p in models[n].named_parameters()) for n in names}
    return {"what": "one AdamW step() on the embedded model at sum_cot's shape, process CPU time, 1 thread, "
                    "median over interleaved rounds",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "torch": torch.__version__,
            "params": sum(p.numel() for p in model.parameters()), "tensors": len(list(model.parameters())),
            "loadavg_before": load_before, "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
            "rounds": rounds,
            "median_ms": {n: 1e3 * statistics.median(times[n]) for n in names},
            "over_fused_median": {n: statistics.median(a / b for a, b in zip(times[n], times["fused"], strict=True))
                                  for n in names},
            "max_weight_diff_vs_fused": diff, "max_weight_change_fused": moved}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=41)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    rep = run(args.rounds)
    rep["command"] = command_line("benchmarks.adamw_choice", argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "adamw_choice.json").write_text(json.dumps(rep, indent=1))
    for n in VARIANTS:
        print(f"{n:8s} {rep['median_ms'][n]:7.2f} ms  x fused {rep['over_fused_median'][n]:.2f}  "
              f"max weight diff vs fused {rep['max_weight_diff_vs_fused'][n]:.2g}")
    print(f"load {' '.join(rep['loadavg_before'])} -> {' '.join(rep['loadavg_after'])}")
    return rep


if __name__ == "__main__":
    main()
