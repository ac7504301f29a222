"""Learner step time on `sum_cot`-shaped batches: micro-batch packers against the step's floor.

The batch is what `configs/sum_cot.yaml` trains: 16 prompts x 8 samples, the number of terms drawn
as `areal_py.tasks.sum_cot` draws it (truncated Pareto, 3..120 terms), the prompt ``3+5+2=`` and the
reference response ``3,8,10;10`` + EOS in the embedded character tokenizer (one token per character,
BOS first). Samples of one prompt differ in length in a real run, so each sample's response is cut or
extended (repeating its last characters) by up to +-10%, at most `rollout.max_new_tokens`. Rewards
alternate within a group (every group informative), every token is one version stale (the one-update
path: proximal logprobs from the training forward), behaviour logprobs random. The model is the
embedded one at `configs/sum_cot.yaml`'s shape (random init: the step's time does not depend on the
weights).

Variants, each its own `Learner` (AdamW step included) over the same initial weights, all with
`configs/sum_cot.yaml`'s settings and one torch thread (`run.torch_threads: 1`):
- `padded_8192`: greedy length-sorted padded packing, budget 8192 (the config before this benchmark);
- `padded_2048`: the same with a quarter of the budget;
- `cost_8192`: `pack_by_cost` at budget 8192, the cost model timed at start (as the trainer does);
- `cost_8192_masked`: the same packing with the logprob formula used before (`masked_token_logprobs`:
  the attention mask always passed, so SDPA attends through a dense mask over full squares, and a full
  log_softmax over the vocabulary), to measure what `token_logprobs`' fast path gains under the same load;
- `cost_8192_fused` / `cost_8192_unfused`: `cost_8192` with `trainer.fused_ops` true / false (trainer/fused_ops.py's
  RMSNorm, attention and MLP against the model's own modules), the fused ops' A/B in the same rounds.
`--variants` picks a subset (the speedup vs `padded_8192` is reported only when it is among them).

Side measurement (`varlen_vs_padded`): the model's forward + backward alone on the last batch, with
the sequences packed back to back into rows (position ids restarting, block-diagonal causal mask built
by transformers) against the cost-packed padded micro-batches, and the largest logprob difference.

Rounds are interleaved (one step of every variant per round, the order rotated), each round on a
fresh batch shared by all variants; the statistic is the median over rounds of the process CPU time
of `Learner.train_step`. The floor of a batch is its useful FLOPs (forward + backward over real tokens,
causal attention, `benchmarks.roofline.train_step_flops`) at the fp32 GEMM peak measured at start
(`benchmarks.roofline.measure_machine`, one thread). Writes `<out>/trainer_step.json`.

    python -m benchmarks.trainer_step             # 7 rounds, a few minutes
    python -m benchmarks.trainer_step --quick     # seconds, for the test suite
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import logging
import platform
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

import trainer.learner as learner_module
from areal_py.config import load_config
from areal_py.models import EmbeddedModelSpec, create_embedded_model, eos_token_id, load_model_and_tokenizer
from areal_py.tasks.sum_cot import SumCotTask, response_for
from areal_py.wire import protocol as P
from benchmarks.common import command_line
from benchmarks.roofline import ModelShape, measure_machine, model_gemm_gflops, train_floor_s, train_step_flops
from trainer.learner import Learner
from trainer.micro_batching import PackCost, pack_by_cost, pack_by_tokens
from trainer.pack_cost import fit_cost, probe_shapes, time_shapes
from trainer.rollout_batch import RolloutBatch, collate, token_logprobs

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "sum_cot.yaml"
VARIANTS = {"padded_8192": ("padded", 8192), "padded_2048": ("padded", 2048), "cost_8192": ("cost", 8192),
            "cost_8192_masked": ("cost", 8192), "cost_8192_unfused": ("cost", 8192), "cost_8192_fused": ("cost", 8192)}
EXTRA = {"cost_8192_unfused": ["trainer.fused_ops=false"], "cost_8192_fused": ["trainer.fused_ops=true"]}  # config overrides beyond packing and budget
QUICK_VARIANTS = ("padded_8192", "cost_8192")
VERSION = 5


def sum_cot_batch(tokenizer, task: SumCotTask, groups: int, group_size: int, first_index: int, seed: int,
                  max_new_tokens: int) -> RolloutBatch:
    """A collated batch of `groups` sum_cot prompts x `group_size` samples (see the module docstring)."""
    rng = random.Random(seed)
    eos = eos_token_id(tokenizer)
    out = []
    for g in range(groups):
        terms = task.terms(first_index + g)
        prompt_ids = tokenizer("+".join(map(str, terms)) + "=")["input_ids"]
        ref = response_for(terms)
        samples = []
        for i in range(group_size):
            n = max(1, round(len(ref) * rng.uniform(0.9, 1.1)))
            text = (ref * (n // len(ref) + 1))[:n] if n <= len(ref) else ref + ref[-(n - len(ref)):]
            ids = (tokenizer(text, add_special_tokens=False)["input_ids"] + [eos])[:max_new_tokens]
            samples.append(P.Sample(output_ids=ids, logprobs=[-rng.random() * 3 for _ in ids],
                                    versions=[VERSION - 1] * len(ids), finish_reason="stop", reward=float(i % 2)))
        out.append(P.Group(gid=g, prompt_index=first_index + g, prompt_ids=prompt_ids, samples=samples))
    return collate(out, pad_id=tokenizer.pad_token_id)


def masked_token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                          temperature: float, with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`token_logprobs` as first written: the mask always passed, log_softmax over the whole vocabulary."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1].float()
    if temperature > 0:
        logits = logits / temperature
    logp_all = torch.log_softmax(logits, dim=-1)
    logp = logp_all.gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    return logp, (-(logp_all.exp() * logp_all).sum(-1) if with_entropy else None)


@contextlib.contextmanager
def logprob_formula(name: str):
    """The learner's logprob function for variant `name` (only `*_masked` variants swap it)."""
    if not name.endswith("_masked"):
        yield
        return
    saved = learner_module.token_logprobs
    learner_module.token_logprobs = masked_token_logprobs
    try:
        yield
    finally:
        learner_module.token_logprobs = saved


def measure_cost(model: torch.nn.Module, budget: int, quick: bool) -> tuple[PackCost, list[dict], float]:
    """The cost model as the trainer measures it (trainer/pack_cost.py), uncached; quick: one repetition."""
    t0 = time.perf_counter()
    shapes = probe_shapes(budget, model.config.max_position_embeddings)
    points = time_shapes(copy.deepcopy(model), shapes, reps=1 if quick else 3)
    return fit_cost(points), [vars(p) for p in points], time.perf_counter() - t0


def varlen_rows(lengths: list[int], width: int) -> list[list[int]]:
    """Sequences packed into rows of at most `width` summed tokens (first-fit-decreasing, `pack_by_tokens`)."""
    return pack_by_tokens(lengths, width)


def packed_logprobs(model: torch.nn.Module, batch: RolloutBatch, rows: list[list[int]]) -> list[torch.Tensor]:
    """One forward over rows holding several sequences each, back to back, position ids restarting at
    every sequence and no attention mask: transformers then builds a block-diagonal causal mask from
    the position ids (masking_utils.find_packed_sequence_indices; only without a KV cache, hence
    ``use_cache=False``: with one it silently attends across sequences). Rows are filled to a common width
    with padding that forms a block of its own. Returns each sequence's token logprobs, in row order."""
    lengths = batch.attention_mask.sum(dim=1).tolist()
    width = max(sum(lengths[i] for i in row) for row in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    pos = torch.zeros(len(rows), width, dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, : sum(lengths[i] for i in row)] = torch.cat([batch.input_ids[i, : lengths[i]] for i in row])
        pos[r] = torch.cat([torch.arange(n) for n in [lengths[i] for i in row] + [width - sum(lengths[i] for i in row)]])
    logp = torch.log_softmax(model(input_ids=ids, position_ids=pos, use_cache=False).logits.float(), dim=-1)
    out = []
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            n = lengths[i]
            out.append(logp[r, start: start + n - 1].gather(-1, ids[r, start + 1: start + n, None]).squeeze(-1))
            start += n
    return out


def varlen_vs_padded(model: torch.nn.Module, batch: RolloutBatch, cost: PackCost, budget: int,
                     reps: int) -> dict:
    """Forward + backward of the model alone (no loss, no optimizer) over one batch: varlen rows of the
    batch's longest sequence vs cost-packed padded micro-batches, process CPU time, the faster of
    `reps` each (interleaved); and the largest logprob difference between the two layouts."""
    lengths = batch.attention_mask.sum(dim=1).tolist()
    rows = varlen_rows(lengths, max(lengths))
    mbs = pack_by_cost(lengths, budget, cost)

    def padded() -> list[torch.Tensor]:
        out = []
        for mb in mbs:
            idx = torch.tensor(mb)
            width = max(lengths[i] for i in mb)
            logp, _ = token_logprobs(model, batch.input_ids[idx, :width], batch.attention_mask[idx, :width], 1.0)
            out.extend(logp[k, : lengths[i] - 1] for k, i in enumerate(mb))
        return out

    times = {"varlen": [], "padded_cost": []}
    for _ in range(reps):
        for name, fn in (("varlen", lambda: packed_logprobs(model, batch, rows)), ("padded_cost", padded)):
            t0 = time.process_time()
            torch.cat(fn()).sum().backward()
            times[name].append(time.process_time() - t0)
            model.zero_grad(set_to_none=True)
    with torch.no_grad():
        a = dict(zip([i for r in rows for i in r], packed_logprobs(model, batch, rows)))
        b = dict(zip([i for mb in mbs for i in mb], padded()))
    diff = max(float((a[i] - b[i]).abs().max()) for i in a if a[i].numel())
    real = sum(lengths)
    return {"varlen_cpu_s": min(times["varlen"]), "padded_cost_cpu_s": min(times["padded_cost"]),
            "varlen_rows": len(rows), "varlen_width": max(lengths),
            "varlen_real_token_fraction": real / (len(rows) * max(lengths)),
            "varlen_attention_pairs": sum(sum(lengths[i] for i in r) ** 2 for r in rows),
            "padded_attention_pairs": sum(len(mb) * max(lengths[i] for i in mb) ** 2 for mb in mbs),
            "max_logprob_diff": diff}


def run(rounds: int, groups: int, quick: bool, variants: tuple[str, ...] | None = None) -> dict:
    torch.set_num_threads(1)
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    limits = (measure_machine(1, gemm_n=512, dram_bytes=16 << 20, repeats=2) if quick else measure_machine(1))
    with tempfile.TemporaryDirectory() as tmp:
        cfg0 = load_config(CONFIG, [f"model.cache_dir={tmp}"])
        spec = EmbeddedModelSpec(max_position_embeddings=cfg0.model.embedded.max_position_embeddings)
        path = create_embedded_model(Path(tmp) / "model", spec)
        model, tokenizer = load_model_and_tokenizer(path)
    cost, points, cost_s = measure_cost(model, 8192, quick)
    names = QUICK_VARIANTS if quick else tuple(VARIANTS)
    if variants:
        unknown = set(variants) - set(VARIANTS)
        if unknown:
            raise ValueError(f"unknown variants {sorted(unknown)}; known: {sorted(VARIANTS)}")
        names = tuple(dict.fromkeys(variants))
    learners = {}
    for name in names:
        packing, budget = VARIANTS[name]
        cfg = load_config(CONFIG, [f"trainer.micro_batch_packing={packing}",
                                   f"trainer.max_tokens_per_micro_batch={budget}", *EXTRA.get(name, [])])
        learners[name] = Learner(cfg, copy.deepcopy(model), None, pack_cost=cost if packing == "cost" else None)
    shape = ModelShape.from_config(model.config)
    # extra column: the GEMM rate at the model's own linear shapes (2048 rows, about a cost-packed micro-batch)
    model_gemm = model_gemm_gflops(shape, 256 if quick else 2048, repeats=1 if quick else 3)
    task = SumCotTask(min_terms=cfg0.task.min_terms, max_terms=cfg0.task.max_terms, alpha=cfg0.task.tail_alpha,
                      seed=1234)
    per_round = []
    for r in range(rounds):
        batch = sum_cot_batch(tokenizer, task, groups, cfg0.controller.group_size, r * groups, seed=r,
                              max_new_tokens=cfg0.rollout.max_new_tokens)
        lengths = batch.attention_mask.sum(dim=1).tolist()
        flops = train_step_flops(shape, lengths)
        row = {"round": r, "sequences": len(lengths), "tokens": sum(lengths), "min_len": min(lengths),
               "max_len": max(lengths), "useful_gflop": flops / 1e9, "floor_s": train_floor_s(flops, limits),
               "variants": {}}
        order = list(names[r % len(names):] + names[: r % len(names)])
        for name in order:
            learner = learners[name]
            mbs = len(learner.micro_batches(batch, torch.arange(batch.num_samples)))
            with logprob_formula(name):
                t0 = time.process_time()
                stats = learner.train_step(batch, VERSION)
                cpu = time.process_time() - t0
            row["variants"][name] = {"cpu_s": cpu, "real_token_fraction": stats["real_token_fraction"],
                                     "micro_batches": mbs}
        per_round.append(row)
        print(f"round {r}: {row['sequences']} seqs, {row['tokens']} tokens ({row['min_len']}-{row['max_len']}), "
              f"floor {row['floor_s']:.3f} s | " + " | ".join(
                  f"{n} {v['cpu_s']:.3f} s real {v['real_token_fraction']:.3f} mbs {v['micro_batches']}"
                  for n, v in row["variants"].items()), flush=True)
    side = varlen_vs_padded(copy.deepcopy(model), batch, cost, 8192, reps=1 if quick else 3)
    print(f"model fwd+bwd on the last batch: varlen rows ({side['varlen_rows']} x {side['varlen_width']}, "
          f"real {side['varlen_real_token_fraction']:.3f}) {side['varlen_cpu_s']:.3f} s vs cost-packed padded "
          f"{side['padded_cost_cpu_s']:.3f} s; max logprob difference {side['max_logprob_diff']:.2e}", flush=True)
    summary = {}
    for name in names:
        cpu = [row["variants"][name]["cpu_s"] for row in per_round]
        over = [row["variants"][name]["cpu_s"] / row["floor_s"] for row in per_round]
        summary[name] = {
            "cpu_s_median": statistics.median(cpu),
            "real_token_fraction_median": statistics.median(row["variants"][name]["real_token_fraction"]
                                                            for row in per_round),
            "real_token_fraction_min": min(row["variants"][name]["real_token_fraction"] for row in per_round),
            "micro_batches_median": statistics.median(row["variants"][name]["micro_batches"] for row in per_round),
            "x_floor_median": statistics.median(over),
            "x_floor_min": min(over), "x_floor_max": max(over),
            # the same steps against the floor at the model-shape GEMM rate (extra column, not the floor)
            "x_model_gemm_floor_median": statistics.median(o * model_gemm / limits.gemm_gflops for o in over),
        }
        if "padded_8192" in names:
            summary[name]["speedup_vs_padded_8192_median"] = statistics.median(
                row["variants"]["padded_8192"]["cpu_s"] / row["variants"][name]["cpu_s"] for row in per_round)
    if "cost_8192_fused" in names and "cost_8192_unfused" in names:  # the fused ops' A/B, paired per round
        ratios = [row["variants"]["cost_8192_unfused"]["cpu_s"] / row["variants"]["cost_8192_fused"]["cpu_s"]
                  for row in per_round]
        summary["cost_8192_fused"]["unfused_over_fused_median"] = statistics.median(ratios)
        summary["cost_8192_fused"]["unfused_over_fused_min"] = min(ratios)
        summary["cost_8192_fused"]["unfused_over_fused_max"] = max(ratios)
    return {
        "what": "learner step (Learner.train_step, AdamW included) on sum_cot-shaped batches, process CPU time, "
                "1 torch thread, medians over interleaved rounds",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "quick": quick,
        "machine": {"cpu": platform.processor() or platform.machine(), "torch": torch.__version__,
                    "loadavg_before": load_before, "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
                    "limits": limits.to_dict(), "limits_source": "benchmarks.roofline.measure_machine(1)",
                    "model_gemm_gflops": model_gemm,
                    "model_gemm_source": "benchmarks.roofline.model_gemm_gflops(shape, 2048 rows)"},
        "model": {**vars(spec), "params": sum(p.numel() for p in model.parameters()),
                  "linear_params": shape.linear_params},
        "cost_model": {"c0": cost.c0, "c1": cost.c1, "c2": cost.c2, "points": points, "measure_s": cost_s},
        "rounds": rounds, "groups": groups, "summary": summary, "per_round": per_round,
        "varlen_vs_padded_last_batch": side,
    }


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--groups", type=int, default=16, help="prompts per batch (x 8 samples)")
    ap.add_argument("--quick", action="store_true", help="2 rounds of 2 prompts, two variants (the suite's check)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--variants", nargs="+", choices=tuple(VARIANTS), help="a subset of the variants (default: all)")
    ap.add_argument("--name", default="trainer_step", help="the results file's name, <out>/<name>.json")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    rep = run(2 if args.quick else args.rounds, 2 if args.quick else args.groups, args.quick,
              tuple(args.variants) if args.variants else None)
    rep["command"] = command_line("benchmarks.trainer_step", argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.json").write_text(json.dumps(rep, indent=1))
    lim = rep["machine"]["limits"]
    print(f"fp32 GEMM peak {lim['gemm_gflops']:.1f} GFLOP/s (1 thread; at the model's linear shapes "
          f"{rep['machine']['model_gemm_gflops']:.1f}); cost model c0={rep['cost_model']['c0']:.3g} "
          f"c1={rep['cost_model']['c1']:.3g} c2={rep['cost_model']['c2']:.3g} (measured in "
          f"{rep['cost_model']['measure_s']:.1f} s)")
    for name, s in rep["summary"].items():
        print(f"{name:12s} step {s['cpu_s_median']:.3f} s  real tokens {s['real_token_fraction_median']:.3f} "
              f"(min {s['real_token_fraction_min']:.3f})  micro-batches {s['micro_batches_median']:.0f}  "
              f"x floor {s['x_floor_median']:.2f} ({s['x_floor_min']:.2f}-{s['x_floor_max']:.2f}; "
              f"{s['x_model_gemm_floor_median']:.2f} at the model-shape GEMM rate)"
              + (f"  speedup vs padded_8192 {s['speedup_vs_padded_8192_median']:.2f}"
                 if "speedup_vs_padded_8192_median" in s else "")
              + (f"  unfused/fused {s['unfused_over_fused_median']:.3f} ({s['unfused_over_fused_min']:.3f}-"
                 f"{s['unfused_over_fused_max']:.3f})" if "unfused_over_fused_median" in s else ""))
    return rep


if __name__ == "__main__":
    main()
