"""The decode step benchmark runs end to end in its --quick mode and writes what it promises."""
from __future__ import annotations

import json
import subprocess
import sys

from conftest import ROOT


def test_decode_step_quick(tmp_path) -> None:
    out = tmp_path / "decode_step.json"
    res = subprocess.run([sys.executable, "-m", "benchmarks.decode_step", "--quick", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(out.read_text())
    assert data["quick"] and data["command"].startswith("python -m benchmarks.decode_step")
    assert data["environment"]["threads"] == 1 and "cpu" in data["environment"]
    for model in data["models"].values():
        assert set(model["batches"]) == {"1", "4"}
        for entry in model["batches"].values():
            for variant in data["settings"]["variants"]:
                e = entry[variant]
                assert e["step_cpu_ms"] > 0 and len(e["rounds"]) == data["settings"]["rounds"]
                assert f"decode={variant.split('/')[1]}" in e["kernels"]  # the forced kernel ran
