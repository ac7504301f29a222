"""Where one learner step's time goes: a torch.profiler breakdown of `Learner.train_step` on a sum_cot batch.

The step is `benchmarks.trainer_step`'s `cost_8192` variant (configs/sum_cot.yaml, cost-model packing at
8192, one torch thread) on that benchmark's batch of round `--round`. The learner's own parts are
labelled by wrapping them in `record_function` ranges for the profiled step only (logprob, loss,
clipping, AdamW, the finite check, packing and slicing); ops inside the model's forward are split by
kind (linear GEMMs, SDPA attention, everything else), and its Python time is the model range's self
time. A backward op is charged to the part whose forward op has its autograd sequence number.

Shares, not seconds, are the result: profiler times are wall-clock per op, so on a loaded machine
the absolute values stretch while the shares stay comparable; the step's process CPU time (without
the profiler) is reported next to them.

    python -m benchmarks.learner_profile --round 2   # a short-tailed batch (most rounds look like it)
    python -m benchmarks.learner_profile --round 4   # a long-tailed one (responses to ~730 tokens)
    python -m benchmarks.learner_profile --round 2 --fused     # the same with trainer.fused_ops=true

`--compare-compile` measures instead `trainer.compile=on` against `off` side by side: two `Learner`s over
the same initial weights, one warm-up step each on a first batch (the compiled one's includes the
compile and its checks against eager: reported as compile CPU/wall seconds), then `--rounds` interleaved
rounds (order alternating, a fresh `benchmarks.trainer_step` batch per round shared by both) of process
CPU time per step; per round the ratio eager/compiled and each variant's multiple of the floor (useful
FLOPs at the fp32 GEMM peak measured at start, as `benchmarks.trainer_step`). Steps that compiled a new
graph (and so ran a check) are flagged and left out of the steady-state medians. The inductor cache is a
fresh directory unless `--warm-cache` (then torch's default, which earlier runs may have filled).
Writes `learner_compile.json`.

    python -m benchmarks.learner_profile --compare-compile --rounds 7
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import copy
import functools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

import trainer.learner as L
from areal_py.config import load_config
from areal_py.models import EmbeddedModelSpec, create_embedded_model, load_model_and_tokenizer
from areal_py.tasks.sum_cot import SumCotTask
from benchmarks.common import command_line
from benchmarks.roofline import ModelShape, measure_machine, train_floor_s, train_step_flops
from benchmarks.trainer_step import CONFIG, VERSION, measure_cost, sum_cot_batch

ROOT = Path(__file__).resolve().parents[1]
LINEAR_OPS = ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul")
EVAL = "autograd::engine::evaluate_function: "


@contextlib.contextmanager
def labelled(owner, name: str, label: str):
    """`owner.name` runs inside a profiler range named ``#label`` while the context is open."""
    fn = getattr(owner, name)

    @functools.wraps(fn)
    def wrapped(*a, **k):
        with record_function("#" + label):
            return fn(*a, **k)

    setattr(owner, name, wrapped)
    try:
        yield
    finally:
        setattr(owner, name, fn)


def _chain(e) -> list[str]:
    out = []
    while e is not None:
        out.append(e.name)
        e = e.cpu_parent
    return out


def _model_kind(chain: list[str]) -> str:
    if any(c in LINEAR_OPS for c in chain):
        return "model: linear GEMMs"
    if any("scaled_dot_product" in c for c in chain):
        return "model: attention (SDPA)"
    return "model: other ops (norms, RoPE, SiLU, residuals, copies, embedding)"


def _forward_part(chain: list[str]) -> str | None:
    labels = [c[1:] for c in chain if c.startswith("#")]
    if not labels:
        return None
    if labels[0] == "model":
        return _model_kind(chain) if len(chain) > 1 and not chain[0].startswith("#") else "model: Python (HF forward)"
    return labels[0]


def breakdown(events) -> dict[str, float]:
    """Self time (seconds) per part of the step, from a profiler's events (see the module docstring)."""
    by_seq: dict[int, str] = {}
    for e in events:
        chain = _chain(e)
        if e.sequence_nr >= 0 and not any(c.startswith(EVAL) for c in chain):
            part = _forward_part(chain)
            if part is not None:
                by_seq.setdefault(e.sequence_nr, part)
    parts: collections.Counter = collections.Counter()
    for e in events:
        chain = _chain(e)
        node = e
        while node is not None and not node.name.startswith(EVAL):
            node = node.cpu_parent
        if node is not None:  # backward: the part of the forward op with the same sequence number
            seqs = [c.sequence_nr for c in node.cpu_children if c.sequence_nr >= 0]
            name = node.name[len(EVAL):]
            part = by_seq.get(seqs[0]) if seqs else None
            if part is None:
                part = "gradient accumulation" if "AccumulateGrad" in name else f"backward: {name}"
        else:
            part = _forward_part(chain) or "outside the labelled parts"
        parts[part] += e.self_cpu_time_total / 1e6
    return dict(parts)


def run(round_: int, groups: int, fused: bool = False) -> dict:
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        cfg0 = load_config(CONFIG, [f"model.cache_dir={tmp}"])
        spec = EmbeddedModelSpec(max_position_embeddings=cfg0.model.embedded.max_position_embeddings)
        model, tokenizer = load_model_and_tokenizer(create_embedded_model(Path(tmp) / "model", spec))
    cost, _, _ = measure_cost(model, 8192, quick=False)
    cfg = load_config(CONFIG, ["trainer.micro_batch_packing=cost", "trainer.max_tokens_per_micro_batch=8192",
                               f"trainer.fused_ops={str(fused).lower()}"])
    learner = L.Learner(cfg, copy.deepcopy(model), None, pack_cost=cost)
    task = SumCotTask(min_terms=cfg0.task.min_terms, max_terms=cfg0.task.max_terms, alpha=cfg0.task.tail_alpha,
                      seed=1234)
    batch = sum_cot_batch(tokenizer, task, groups, cfg0.controller.group_size, round_ * groups, seed=round_,
                          max_new_tokens=cfg0.rollout.max_new_tokens)
    learner.train_step(batch, VERSION)  # warm-up
    cpu = []
    for _ in range(3):
        t0 = time.process_time()
        learner.train_step(batch, VERSION)
        cpu.append(time.process_time() - t0)
    forward = learner.model.forward
    with contextlib.ExitStack() as stack:
        for owner, name, label in ((L, "token_logprobs", "logprob"), (L.A, "micro_batch_loss", "loss math"),
                                   (torch.nn.utils, "clip_grad_norm_", "gradient clipping"),
                                   (L, "first_nonfinite", "finite check of the weights"),
                                   (L.Learner, "micro_batches", "packing and slicing"),
                                   (L.RolloutBatch, "rows", "packing and slicing"),
                                   (L.A, "advantages", "advantages"), (learner.optimizer, "step", "AdamW step")):
            stack.enter_context(labelled(owner, name, label))

        def model_forward(*a, **k):
            with record_function("#model"):
                return forward(*a, **k)

        learner.model.forward = model_forward
        try:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                learner.train_step(batch, VERSION)
        finally:
            del learner.model.forward  # the class's forward again
    parts = breakdown(prof.events())
    total = sum(parts.values())
    lengths = batch.attention_mask.sum(dim=1).tolist()
    return {"what": "self time per part of one Learner.train_step (cost_8192, sum_cot batch), torch.profiler",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "round": round_,
            "fused_ops": learner.fused.patched if learner.fused is not None else {},
            "loadavg": Path("/proc/loadavg").read_text().split()[:3],
            "batch": {"sequences": len(lengths), "tokens": sum(lengths), "max_len": max(lengths)},
            "step_cpu_s": sorted(cpu)[len(cpu) // 2], "profiled_self_s": total,
            "share": {k: v / total for k, v in sorted(parts.items(), key=lambda kv: -kv[1])}}


def summarise(warm: dict, per_round: list[dict]) -> dict:
    """Medians over the rounds that compiled nothing new (all rounds if every one did); the compile's cost is
    the compiled warm-up step's extra CPU time plus every new-graph round's, and it pays back after that many
    seconds over the median per-step saving."""
    steady = [row for row in per_round if not row["compiled_new_graph"]] or per_round
    saved = statistics.median(row["off"] - row["on"] for row in steady)
    compile_cpu = warm["on"]["cpu_s"] - warm["off"]["cpu_s"] + sum(
        row["on"] - row["off"] for row in per_round if row["compiled_new_graph"])
    return {
        "steady_rounds": len(steady),
        "eager_over_compiled_median": statistics.median(row["eager_over_compiled"] for row in steady),
        "eager_over_compiled_range": [min(r["eager_over_compiled"] for r in steady),
                                      max(r["eager_over_compiled"] for r in steady)],
        "eager_x_floor_median": statistics.median(row["off"] / row["floor_s"] for row in steady),
        "compiled_x_floor_median": statistics.median(row["on"] / row["floor_s"] for row in steady),
        "saved_cpu_s_per_step_median": saved,
        "compile_cpu_s": compile_cpu,
        "steps_to_pay_back": compile_cpu / saved if saved > 0 else None,
    }


def compare_compile(rounds: int, groups: int, warm_cache: bool) -> dict:
    """trainer.compile=on vs off on sum_cot batches (see the module docstring)."""
    torch.set_num_threads(1)
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    cache = contextlib.nullcontext(None) if warm_cache else tempfile.TemporaryDirectory()
    saved_env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with cache as cache_dir, tempfile.TemporaryDirectory() as tmp:
        if cache_dir is not None:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache_dir
        limits = measure_machine(1)
        cfg0 = load_config(CONFIG, [f"model.cache_dir={tmp}"])
        spec = EmbeddedModelSpec(max_position_embeddings=cfg0.model.embedded.max_position_embeddings)
        model, tokenizer = load_model_and_tokenizer(create_embedded_model(Path(tmp) / "model", spec))
        cost, _, _ = measure_cost(model, 8192, quick=False)
        learners = {mode: L.Learner(load_config(CONFIG, ["trainer.micro_batch_packing=cost", f"trainer.compile={mode}"]),
                                    copy.deepcopy(model), None, pack_cost=cost) for mode in ("off", "on")}
        task = SumCotTask(min_terms=cfg0.task.min_terms, max_terms=cfg0.task.max_terms, alpha=cfg0.task.tail_alpha,
                          seed=1234)

        def make(r: int):
            return sum_cot_batch(tokenizer, task, groups, cfg0.controller.group_size, r * groups, seed=r,
                                 max_new_tokens=cfg0.rollout.max_new_tokens)

        warm = {}
        first = make(0)
        for mode, learner in learners.items():
            c0, w0 = time.process_time(), time.perf_counter()
            stats = learner.train_step(first, VERSION)
            warm[mode] = {"cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - w0,
                          "compile_s": stats.get("compile_s")}
        status = learners["on"].compiled.status
        print(f"warm-up step: eager {warm['off']['cpu_s']:.2f} s CPU; compiled {warm['on']['cpu_s']:.1f} s CPU "
              f"({warm['on']['wall_s']:.1f} s wall, compile and check {warm['on']['compile_s']:.1f} s wall); "
              f"{status.describe()}", flush=True)
        shape = ModelShape.from_config(model.config)
        per_round = []
        for r in range(1, rounds + 1):
            batch = make(r)
            lengths = batch.attention_mask.sum(dim=1).tolist()
            row = {"round": r, "tokens": sum(lengths), "max_len": max(lengths),
                   "floor_s": train_floor_s(train_step_flops(shape, lengths), limits)}
            for mode in (("off", "on") if r % 2 else ("on", "off")):
                t0 = time.process_time()
                stats = learners[mode].train_step(batch, VERSION)
                row[mode] = time.process_time() - t0
                if mode == "on":
                    row["compiled_new_graph"] = bool(stats.get("compile_s"))
            row["eager_over_compiled"] = row["off"] / row["on"]
            per_round.append(row)
            print(f"round {r}: {row['tokens']} tokens (longest {row['max_len']}), floor {row['floor_s']:.3f} s | "
                  f"eager {row['off']:.3f} s ({row['off'] / row['floor_s']:.2f}x floor) | compiled {row['on']:.3f} s "
                  f"({row['on'] / row['floor_s']:.2f}x floor{', new graph checked' if row['compiled_new_graph'] else ''})"
                  f" | eager/compiled {row['eager_over_compiled']:.3f}", flush=True)
    if cache_dir is not None:
        os.environ.pop("TORCHINDUCTOR_CACHE_DIR")
        if saved_env is not None:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved_env
    summary = summarise(warm, per_round)
    return {"what": "Learner.train_step with trainer.compile=on vs off (cost_8192, sum_cot batches), process CPU "
                    "time, 1 torch thread, interleaved rounds",
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "warm_inductor_cache": warm_cache,
            "loadavg_before": load_before, "loadavg_after": Path("/proc/loadavg").read_text().split()[:3],
            "limits": limits.to_dict(), "torch": torch.__version__, "warm_up": warm,
            "compile_status": status.describe(), "summary": summary, "per_round": per_round}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--round", type=int, default=2, help="which benchmarks.trainer_step round's batch")
    ap.add_argument("--groups", type=int, default=16, help="prompts per batch (x 8 samples)")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--compare-compile", action="store_true", help="trainer.compile on vs off, interleaved rounds")
    ap.add_argument("--rounds", type=int, default=7, help="--compare-compile: timed rounds after the warm-up")
    ap.add_argument("--warm-cache", action="store_true", help="--compare-compile: keep torch's inductor cache")
    ap.add_argument("--fused", action="store_true", help="profile with trainer.fused_ops=true (trainer/fused_ops.py "
                    "instead of the model's own modules); writes learner_profile_round<N>_fused.json")
    args = ap.parse_args(argv)
    if args.compare_compile:
        rep = compare_compile(args.rounds, args.groups, args.warm_cache)
        rep["command"] = command_line("benchmarks.learner_profile", argv)
        args.out.mkdir(parents=True, exist_ok=True)
        name = "learner_compile_warm_cache.json" if args.warm_cache else "learner_compile.json"
        (args.out / name).write_text(json.dumps(rep, indent=1))
        print(json.dumps(rep["summary"], indent=1))
        return rep
    rep = run(args.round, args.groups, args.fused)
    rep["command"] = command_line("benchmarks.learner_profile", argv)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"learner_profile_round{args.round}{'_fused' if args.fused else ''}.json").write_text(json.dumps(rep, indent=1))
    b = rep["batch"]
    print(f"round {rep['round']}: {b['sequences']} sequences, {b['tokens']} tokens (longest {b['max_len']}); "
          f"step {rep['step_cpu_s']:.3f} s CPU (median of 3, unprofiled); load {' '.join(rep['loadavg'])}")
    for k, v in rep["share"].items():
        if v >= 0.001:
            print(f"{100 * v:5.1f}%  {k}")
    return rep


if __name__ == "__main__":
    main()
