"""metrics.jsonl on resume: rows past the checkpoint go (kept aside), a crash's partial line goes, every step
appears once and nothing is lost."""
from __future__ import annotations

import json
from itertools import pairwise

from areal_py.telemetry.metrics import JsonlWriter, read_jsonl, truncate_after_step


def _write(path, steps, tail: str = "") -> None:
    path.write_text("".join(json.dumps({"step": s, "wall_time_s": float(s)}) + "\n" for s in steps) + tail)


def test_rows_after_the_checkpoint_are_moved_aside(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, range(1, 26), tail='{"step": 26, "wall_')  # kill -9 mid-line at step 26
    dropped = truncate_after_step(path, 20)
    assert [r["step"] for r in read_jsonl(path)] == list(range(1, 21))
    assert path.read_text().endswith("\n")
    assert dropped is not None and dropped.parent == tmp_path and dropped.name.startswith("metrics.jsonl.dropped-")
    lines = dropped.read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines[:-1]] == list(range(21, 26)) and lines[-1] == '{"step": 26, "wall_'
    # the resumed run appends; every step once, time never goes back
    w = JsonlWriter(path)
    for s in range(21, 25):
        w.write({"step": s, "wall_time_s": 20.5 + s})
    w.close()
    recs = read_jsonl(path)
    assert [r["step"] for r in recs] == list(range(1, 25))
    assert all(a["wall_time_s"] <= b["wall_time_s"] for a, b in pairwise(recs))
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith("metrics.jsonl.tmp")] == []


def test_nothing_to_drop_leaves_the_file_alone(tmp_path):
    path = tmp_path / "metrics.jsonl"
    _write(path, range(1, 5))
    before = path.stat().st_mtime_ns
    assert truncate_after_step(path, 4) is None
    assert path.stat().st_mtime_ns == before and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]
    assert truncate_after_step(tmp_path / "absent.jsonl", 3) is None
