"""The engine throughput benchmark runs end to end in its --quick mode and writes what it promises."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from conftest import ROOT


def test_engine_throughput_quick(tmp_path) -> None:
    res = subprocess.run([sys.executable, "-m", "benchmarks.engine_throughput", "--quick", "--repeats", "2",
                          "--out", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads((tmp_path / "engine_throughput.json").read_text())
    assert data["quick"] and data["command"].startswith("python -m benchmarks.engine_throughput")
    wl = data["workload"]
    assert wl["ignore_eos"] and wl["max_new_tokens"] <= wl["cap_new_tokens"] <= 512
    for model in data["models"].values():
        engines = model["engines"]
        assert set(engines) == {"ours", "hf_static", "hf_cb"}
        for r in engines.values():
            assert r["tokens_per_s"] > 0 and r["useful_tokens"] == wl["total_new_tokens"] and r["timeline"]
        assert engines["ours"]["runner"] == "FastLlamaRunner"
        assert engines["hf_static"]["computed_tokens"] >= wl["total_new_tokens"]  # batches run to their longest
        assert model["speedup_vs_best_baseline"] > 0 and "peak_rss_mb_ours" in model
        # the roofline next to every measurement: the workload's floor, and decode steps against theirs
        floor = model["roofline"]["floor_s"]
        assert floor > 0 and model["roofline"]["floor_tokens_per_s"] == wl["total_new_tokens"] / floor
        for r in engines.values():
            assert r["x_above_roofline"] == r["elapsed_s"] / floor and len(r["runs_x_above_roofline"]) == 2
            assert min(r["runs_x_above_roofline"]) <= r["median_x_above_roofline"] <= max(r["runs_x_above_roofline"])
        # rounds: the engines' order rotates, and each round's ratio uses that round's numbers
        assert [r["order"] for r in model["rounds"]] == [["ours", "hf_static", "hf_cb"], ["hf_static", "hf_cb", "ours"]]
        for r in model["rounds"]:
            t = r["tokens_per_s"]
            assert r["speedup_vs_best_baseline"] == t["ours"] / max(t["hf_static"], t["hf_cb"])
        assert model["speedup_per_round"] == [r["speedup_vs_best_baseline"] for r in model["rounds"]]
        assert model["best_baseline_median_x_above_roofline"] == min(
            engines[e]["median_x_above_roofline"] for e in ("hf_static", "hf_cb"))
        (step,) = model["decode_steps"]
        assert (step["rows"], step["context"], step["runner"]) == (4, 16, "FastLlamaRunner")
        assert step["floor_s"] > 0 and step["x_above_roofline"] == step["median_s"] / step["floor_s"]
    assert data["machine"]["threads"] >= 1 and data["machine"]["gemm_gflops"] > 0
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "engine_throughput_slots.png").stat().st_size > 1000


def test_decode_attention_quick(tmp_path) -> None:
    """The decode attention micro-benchmark runs, checks its variants agree, and reports GB/s per variant."""
    res = subprocess.run([sys.executable, "-m", "benchmarks.decode_attention", "--quick", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads((tmp_path / "decode_attention.json").read_text())
    (shape,) = data["shapes"]
    built = data["kernel"] in ("loaded", "built") or data["kernel"].startswith("built in")
    kernel = {"kernel", "kernel_append"} if built else set()  # the built kernel also times its fused write
    assert set(shape["gbps"]) == {"plain", "sdpa", "matmul"} | kernel and shape["vs_plain"]["plain"] == 1.0
    assert all(v > 0 for v in shape["gbps"].values()) and len(shape["rounds_s"]["matmul"]) == data["rounds"]
