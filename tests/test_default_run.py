"""The README's promise, checked on the real default (minutes, so kept out of CI: pytest -m slow)."""
import pytest
from conftest import net_overrides, run_cli

from areal_py.metrics import read_jsonl


@pytest.mark.slow
def test_default_run_learns(tmp_path):
    res = run_cli(["run", "--quiet", f"run.output_dir={tmp_path}", "run.name=default", *net_overrides()], timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    recs = read_jsonl(tmp_path / "default" / "metrics.jsonl")
    first = sum(r["reward_mean"] for r in recs[:10]) / 10
    last = sum(r["reward_mean"] for r in recs[-10:]) / 10
    assert last - first >= 0.3, (first, last)
    assert max(r["staleness_max"] for r in recs) <= 2
