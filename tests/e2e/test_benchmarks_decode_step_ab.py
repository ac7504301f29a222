"""The decode step before/after benchmark runs end to end in its --quick mode (this checkout against
itself) and writes what it promises."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ROOT


@pytest.mark.slow  # two fresh interpreters with torch and transformers: about 35 s of CPU, a minute under load
def test_decode_step_ab_quick(tmp_path) -> None:
    out = tmp_path / "ab.json"
    res = subprocess.run([sys.executable, "-m", "benchmarks.decode_step_ab", "--quick", "--out", str(out)],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    data = json.loads(out.read_text())
    assert data["command"].startswith("python -m benchmarks.decode_step_ab") and data["limits"]["threads"] == 1
    entry = data["models"]["tiny"]
    assert entry["floor_s"] > 0 and len(entry["speedup_per_round"]) == 1
    for side in ("before", "after"):
        e = entry[side]
        assert e["median_s"] > 0 and e["x_above_roofline"] == e["median_s"] / entry["floor_s"]
        assert e["runner"].startswith("fast runner")
    assert entry["speedup"] == entry["before"]["median_s"] / entry["after"]["median_s"]
