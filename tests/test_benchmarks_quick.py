"""Every benchmark has a --quick mode the suite runs, so the full ones stay runnable."""
import subprocess
import sys

import pytest

from conftest import ROOT


@pytest.mark.parametrize("module,expect", [("benchmarks.weight_swap", "ratio"),
                                           ("benchmarks.metrics_overhead", "metrics on / off")])
def test_quick_mode_runs(module, expect):
    res = subprocess.run([sys.executable, "-m", module, "--quick"], cwd=ROOT, capture_output=True, text=True,
                         timeout=400)
    assert res.returncode == 0, res.stdout + res.stderr
    assert expect in res.stdout
