"""Weight-swap latency: from "new weights published" to "first token under the new version".

Setup: a ~20M-parameter Llama, 32 requests in flight on the built-in engine. For each
interruption mode (recompute, keep) and transfer path (disk: safetensors file + ZeroMQ notice;
stream: raw tensor frames over ZeroMQ; dist: the layout on ZeroMQ, the bytes broadcast in buckets
over a gloo weight group, areal_py/wire/dist_weights.py) the clock starts when the trainer side
begins publishing and stops when the engine emits its first token tagged with the new version.
The three paths run in interleaved rounds (one swap each per round, the order rotated), and the
medians are over rounds, so a change in the machine's load hits all three alike. The floor is what
no implementation can avoid: the in-memory copy of the state dict into the live parameters plus
one prefill of the in-flight tokens (the KV recompute), both timed through the same engine with
no transport. `keep` mode skips the prefill, so its ratio can fall below 1. Each path keeps one engine across
its rounds (its contexts grow by a token or two per swap, alike for all). Everything runs in one
process over real loopback sockets (dist: trainer rank 0 in a thread, the server in the main thread,
two gloo ranks on a TCPStore), so the numbers are comparable side by side. /proc/loadavg is recorded
before and after: time it alone (`flock /work/tmp/bench.lock ...`).

    python -m benchmarks.weight_swap            # full: 7 rounds, writes benchmarks/results/weight_swap.json
    python -m benchmarks.weight_swap --quick    # tiny model, 2 rounds, for the test suite (--out to keep the JSON)
"""
from __future__ import annotations

import argparse
import copy
import inspect
import json
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch
import zmq
from transformers import LlamaConfig, LlamaForCausalLM

from areal_py.threads import auto_threads
from areal_py.wire import dist_weights as D
from areal_py.wire import protocol as P
from areal_py.wire.transport import make_socket, parse, send
from areal_py.wire.weights import load_weights, named_weights, save_weights
from rollout_server.sampling import SamplingParams
from rollout_server.torch_engine.engine import Engine

RESULTS = Path(__file__).parent / "results" / "weight_swap.json"
PATHS = ("disk", "stream", "dist")
BUCKET_BYTES = 64 * 2**20  # weights.dist_bucket_mb's default
TIMEOUT_S = 60.0


def build_model(size: str, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    if size == "20M":
        cfg = LlamaConfig(vocab_size=1000, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                          num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=1024)
    else:  # tiny, for --quick
        cfg = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def make_engine(model: LlamaForCausalLM, mode: str, in_flight: int, prompt_len: int, warm_tokens: int) -> Engine:
    kwargs = {"interrupt_mode": mode} if "interrupt_mode" in inspect.signature(Engine).parameters else {}
    if mode != "recompute" and not kwargs:
        raise RuntimeError("this engine has no interrupt_mode parameter")
    eng = Engine(model, eos_token_id=-1, max_running=in_flight, **kwargs)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    for i in range(in_flight):
        ids = torch.randint(0, vocab, (prompt_len,), generator=g).tolist()
        eng.add(f"r{i}", ids, SamplingParams(max_new_tokens=10_000, temperature=1.0, ignore_eos=True))
    for _ in range(warm_tokens):
        eng.step()
    return eng


def first_new_token(eng: Engine, version: int) -> None:
    """Step until some running request holds a token tagged `version`."""
    while True:
        eng.step()
        if any(s.versions and s.versions[-1] == version for s in eng._running.values()):
            return


def floor(eng: Engine, new_weights: dict[str, torch.Tensor], version: int) -> tuple[float, float]:
    """(copy seconds, prefill seconds) with no transport at all: the in-memory copy into the live
    parameters, then the engine's own re-prefill of every in-flight token (one step)."""
    params = dict(eng.model.named_parameters())
    with torch.no_grad():  # warm-up copy, then the timed one
        for k, v in new_weights.items():
            params[k].copy_(v)
        t0 = time.perf_counter()
        for k, v in new_weights.items():
            params[k].copy_(v)
    copy_s = time.perf_counter() - t0
    eng.update_weights({}, version)  # an empty update only invalidates the KV: next step re-prefills
    t0 = time.perf_counter()
    first_new_token(eng, version)
    return copy_s, time.perf_counter() - t0


def form_group(port: int) -> tuple[D.WeightGroup, D.WeightGroup]:
    """(trainer rank 0, server rank 1) of a two-rank gloo weight group in this process."""
    root: list = []
    t = threading.Thread(target=lambda: root.append(D.WeightGroup.join_root(
        host="127.0.0.1", port=port, num_servers=1, timeout_s=TIMEOUT_S, join_timeout_s=TIMEOUT_S)), daemon=True)
    t.start()
    member = D.WeightGroup.join_member(host="127.0.0.1", port=port, rank=1, num_servers=1, timeout_s=TIMEOUT_S,
                                       join_timeout_s=TIMEOUT_S)
    t.join(TIMEOUT_S)
    if not root or member is None:
        raise TimeoutError(f"weight_swap: timed out after {TIMEOUT_S:g}s forming the weight group on port {port}")
    return root[0], member


def _publish_dist(trainer: LlamaForCausalLM, pub: zmq.Socket, root: D.WeightGroup, version: int, errors: list) -> None:
    """What Trainer.publish_dist does: the layout over ZeroMQ, then the buckets over the group."""
    try:
        weights = named_weights(trainer)
        layout = D.layout_for(weights, BUCKET_BYTES)
        send(pub, P.UpdateWeights(version=version, dist=layout))
        root.send(weights, version, layout)
    except Exception as e:  # noqa: BLE001 - handed to the main thread, which raises it
        errors.append(e)


def swap_once(eng: Engine, trainer: LlamaForCausalLM, path: str, pub: zmq.Socket, sub: zmq.Socket,
              weights_dir: Path, version: int, group: tuple[D.WeightGroup, D.WeightGroup] | None = None) -> float:
    t0 = time.perf_counter()
    sender, errors = None, []
    if path == "disk":
        file = save_weights(trainer, weights_dir, version)
        send(pub, P.UpdateWeights(version=version, path=str(file)))
    elif path == "stream":
        send(pub, P.UpdateWeights(version=version), named_weights(trainer))
    else:
        sender = threading.Thread(target=_publish_dist, args=(trainer, pub, group[0], version, errors), daemon=True)
        sender.start()
    if not sub.poll(int(TIMEOUT_S * 1000)):
        raise TimeoutError(f"weight_swap: timed out after {TIMEOUT_S:g}s waiting for the update notice on the SUB socket")
    _, msg = parse(sub.recv_multipart(copy=False), "bench")
    if msg.body.dist is not None:
        tensors = group[1].receive(msg.body.dist, version, D.model_specs(eng.model))
    else:
        tensors = load_weights(msg.body.path) if msg.body.path else msg.tensors
    eng.update_weights(tensors, version)
    first_new_token(eng, version)
    elapsed = time.perf_counter() - t0
    if sender is not None:
        sender.join(TIMEOUT_S)
        if errors or sender.is_alive():
            raise RuntimeError(f"weight_swap: the dist sender failed: {errors or 'still running'}")
    return elapsed


def loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "unknown"


def run(size: str, repeats: int, in_flight: int, prompt_len: int, warm_tokens: int,
        modes: tuple[str, ...] = ("recompute", "keep")) -> dict:
    threads = auto_threads(1)  # the cores free now: more threads than that slows torch several-fold
    torch.set_num_threads(threads)
    trainer = build_model(size, seed=1)
    base = build_model(size, seed=0)  # every engine starts from a copy: random init of each would dominate
    ctx = zmq.Context.instance()
    port = 0
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    sub = make_socket(ctx, zmq.SUB, f"tcp://127.0.0.1:{port}", bind=False)
    time.sleep(0.3)  # subscription must reach the publisher before the first broadcast
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    dist_port = s.getsockname()[1]
    s.close()
    group = form_group(dist_port)
    out: dict = {"model": size, "params": sum(p.numel() for p in trainer.parameters()), "in_flight": in_flight,
                 "prompt_len": prompt_len, "tokens_generated_before_swap": warm_tokens, "rounds": repeats,
                 "dist_bucket_bytes": BUCKET_BYTES, "threads": threads, "loadavg_before": loadavg(), "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        version = 0  # strictly increasing across configurations: old weight files are pruned by version
        for mode in modes:
            load_before, started = loadavg(), time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
            lat: dict[str, list[float]] = {p: [] for p in PATHS}
            floors: list[float] = []
            # one engine per path (and one for the floor), reused round after round: the in-flight contexts
            # grow by a token or two per swap, alike for every path
            engines = {p: make_engine(copy.deepcopy(base), mode, in_flight, prompt_len, warm_tokens) for p in PATHS}
            floor_eng = make_engine(copy.deepcopy(base), "recompute", in_flight, prompt_len, warm_tokens)
            for r in range(repeats):
                for path in PATHS[r % len(PATHS):] + PATHS[:r % len(PATHS)]:  # rotated: no path always first
                    version += 1
                    lat[path].append(swap_once(engines[path], trainer, path, pub, sub, Path(tmp), version, group))
                version += 1
                copy_s, prefill_s = floor(floor_eng, named_weights(trainer), version)
                floors.append(copy_s + prefill_s)
                print(f"{mode} round {r + 1}/{repeats}: " + ", ".join(f"{p} {lat[p][-1] * 1000:.0f} ms" for p in PATHS),
                      file=sys.stderr, flush=True)
            fl = statistics.median(floors)
            load_after = loadavg()
            for path in PATHS:
                med = statistics.median(lat[path])
                out["results"][f"{mode}/{path}"] = {"latency_s": round(med, 4), "floor_s": round(fl, 4),
                                                    "ratio_to_floor": round(med / fl, 2),
                                                    "latencies_s": [round(x, 4) for x in lat[path]],
                                                    "started": started, "threads": threads,
                                                    "loadavg_before": load_before,
                                                    "loadavg_after": load_after}
                print(f"{size} {mode:9s} {path:6s} latency {med * 1000:7.1f} ms  floor {fl * 1000:7.1f} ms  "
                      f"ratio {med / fl:4.2f}")
    for g in group:
        g.close()
    out["loadavg_after"] = loadavg()  # of this run; each row has its own mode's too
    pub.close()
    sub.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 repeats, no result file")
    ap.add_argument("--repeats", type=int, default=7, help="interleaved rounds (one swap per path each)")
    ap.add_argument("--out", type=Path, default=None, help=f"result file (full run default: {RESULTS})")
    ap.add_argument("--modes", default="recompute,keep", help="interrupt modes to measure, comma-separated")
    ap.add_argument("--merge", action="store_true", help="update only these modes' rows of an existing result file "
                    "(same model and workload): one mode per run keeps each run short on a busy machine")
    args = ap.parse_args()
    modes = tuple(m for m in args.modes.split(",") if m)
    if not modes or set(modes) - {"recompute", "keep"}:
        raise SystemExit(f"--modes: recompute and/or keep, got {args.modes!r}")
    if args.quick:
        res = run("tiny", repeats=2, in_flight=8, prompt_len=8, warm_tokens=4, modes=modes)
        if args.out is not None:
            args.out.write_text(json.dumps(res, indent=1))
        return
    args.out = args.out or RESULTS
    res = run("20M", repeats=args.repeats, in_flight=32, prompt_len=32, warm_tokens=32, modes=modes)
    res["command"] = f"python -m benchmarks.weight_swap --repeats {args.repeats} --modes <each mode> --merge"
    if args.merge and args.out.exists():
        old = json.loads(args.out.read_text())
        same = ("model", "params", "in_flight", "prompt_len", "tokens_generated_before_swap", "rounds")
        differ = [k for k in same if old.get(k) != res[k]]
        if differ:
            raise SystemExit(f"--merge: {args.out} was measured with other {differ}; run without --merge")
        res["results"] = {**old.get("results", {}), **res["results"]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
