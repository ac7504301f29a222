"""Weight-swap latency: from "new weights published" to "first token under the new version".

Setup: a ~20M-parameter Llama, 32 requests in flight on the built-in engine. For each
interruption mode (recompute, keep) and transfer path (disk: safetensors file + ZeroMQ notice;
stream: raw tensor frames over ZeroMQ) the clock starts when the trainer side begins publishing
and stops when the engine emits its first token tagged with the new version. The floor is what
no implementation can avoid: the in-memory copy of the state dict into the live parameters plus
one prefill of the in-flight tokens (the KV recompute), both timed through the same engine with
no transport. `keep` mode skips the prefill, so its ratio can fall below 1. Everything runs in one process over real
loopback sockets, so the numbers are comparable side by side.

    python -m benchmarks.weight_swap            # full: 7 repeats, writes benchmarks/results/weight_swap.json
    python -m benchmarks.weight_swap --quick    # tiny model, 2 repeats, for the test suite
"""
from __future__ import annotations

import argparse
import inspect
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
import zmq
from transformers import LlamaConfig, LlamaForCausalLM

from areal_py.threads import auto_threads
from areal_py.wire import protocol as P
from areal_py.wire.transport import make_socket, parse, send
from areal_py.wire.weights import load_weights, named_weights, save_weights
from rollout_server.sampling import SamplingParams
from rollout_server.torch_engine.engine import Engine

RESULTS = Path(__file__).parent / "results" / "weight_swap.json"


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


def swap_once(eng: Engine, trainer: LlamaForCausalLM, path: str, pub: zmq.Socket, sub: zmq.Socket,
              weights_dir: Path, version: int) -> float:
    t0 = time.perf_counter()
    if path == "disk":
        file = save_weights(trainer, weights_dir, version)
        send(pub, P.UpdateWeights(version=version, path=str(file)))
    else:
        send(pub, P.UpdateWeights(version=version), named_weights(trainer))
    if not sub.poll(30_000):
        raise TimeoutError("weight_swap: timed out after 30s waiting for the update notice on the SUB socket")
    _, msg = parse(sub.recv_multipart(copy=False), "bench")
    tensors = load_weights(msg.body.path) if msg.body.path else msg.tensors
    eng.update_weights(tensors, version)
    first_new_token(eng, version)
    return time.perf_counter() - t0


def run(size: str, repeats: int, in_flight: int, prompt_len: int, warm_tokens: int) -> dict:
    threads = auto_threads(1)  # the cores free now: more threads than that slows torch several-fold
    torch.set_num_threads(threads)
    trainer = build_model(size, seed=1)
    ctx = zmq.Context.instance()
    port = 0
    pub = ctx.socket(zmq.PUB)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    sub = make_socket(ctx, zmq.SUB, f"tcp://127.0.0.1:{port}", bind=False)
    time.sleep(0.3)  # subscription must reach the publisher before the first broadcast
    out: dict = {"model": size, "params": sum(p.numel() for p in trainer.parameters()), "in_flight": in_flight,
                 "prompt_len": prompt_len, "tokens_generated_before_swap": warm_tokens, "repeats": repeats,
                 "threads": threads, "results": {}}
    with tempfile.TemporaryDirectory() as tmp:
        version = 0  # strictly increasing across configurations: old weight files are pruned by version
        for mode in ("recompute", "keep"):
            for path in ("disk", "stream"):
                lat, floors = [], []
                for r in range(repeats):
                    eng = make_engine(build_model(size, seed=0), mode, in_flight, prompt_len, warm_tokens)
                    version += 1
                    lat.append(swap_once(eng, trainer, path, pub, sub, Path(tmp), version=version))
                    copy_s, prefill_s = floor(make_engine(build_model(size, seed=0), "recompute", in_flight,
                                                          prompt_len, warm_tokens), named_weights(trainer), 1)
                    floors.append(copy_s + prefill_s)
                med, fl = statistics.median(lat), statistics.median(floors)
                out["results"][f"{mode}/{path}"] = {"latency_s": round(med, 4), "floor_s": round(fl, 4),
                                                    "ratio_to_floor": round(med / fl, 2),
                                                    "latencies_s": [round(x, 4) for x in lat]}
                print(f"{size} {mode:9s} {path:6s} latency {med * 1000:7.1f} ms  floor {fl * 1000:7.1f} ms  "
                      f"ratio {med / fl:4.2f}")
    pub.close()
    sub.close()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model, 2 repeats, no result file")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.quick:
        res = run("tiny", repeats=2, in_flight=8, prompt_len=8, warm_tokens=4)
    else:
        res = run("20M", repeats=args.repeats, in_flight=32, prompt_len=32, warm_tokens=32)
        res["command"] = "python -m benchmarks.weight_swap"
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=1))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
