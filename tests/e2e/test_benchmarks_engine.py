"""The engine throughput benchmark runs end to end in its --quick mode and writes what it promises."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

from conftest import ROOT


def test_engine_throughput_quick(tmp_path) -> None:
    res = subprocess.run([sys.executable, "-m", "benchmarks.engine_throughput", "--quick", "--out", str(tmp_path)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
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
    if importlib.util.find_spec("matplotlib") is not None:
        assert (tmp_path / "engine_throughput_slots.png").stat().st_size > 1000
