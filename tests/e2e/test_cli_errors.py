"""Bad input to `areal-py run` / `serve`: one `areal-py: ...` line naming the file and line, exit
code 2, and no process started (the launcher creates the run's `logs/` only when it starts them)."""
from __future__ import annotations

import pytest
from conftest import net_overrides, run_cli

GOOD = b'{"prompt": "1+1=", "answer": "2"}\n'


@pytest.mark.parametrize("content, where", [
    (GOOD + b"{not json\n", "bad.jsonl:2: invalid JSON"),
    (GOOD + GOOD + b'{"prompt": "caf\xe9", "answer": "1"}\n', "bad.jsonl:3: not valid UTF-8 (byte 0xe9 at column 16)"),
])
def test_run_with_a_bad_jsonl_line_fails_before_any_process_starts(tmp_path, small_cfg, content, where):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(content)
    # a jsonl task needs a real model (model.path); the run must stop at the data, before loading it
    res = run_cli(["run", "--quiet", *small_cfg, f"model.path={tmp_path}", "task.name=jsonl", f"task.path={data}"],
                  timeout=120)
    assert res.returncode == 2, res.stderr
    assert res.stderr.startswith("areal-py: task.path: ") and f"{data.parent}/{where}" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
    assert not (tmp_path / "runs" / "t" / "logs").exists()


def test_run_with_malformed_yaml_names_the_file(tmp_path):
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("run:\n  name: x\n   seed: 1\n")
    res = run_cli(["run", "--quiet", str(cfg)], timeout=120)
    assert res.returncode == 2, res.stderr
    assert f"areal-py: {cfg}:3:8: invalid YAML: mapping values are not allowed here" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr, res.stderr


def test_serve_controller_with_a_bad_jsonl_line_is_a_clean_error(tmp_path, model_cache):
    data = tmp_path / "bad.jsonl"
    data.write_bytes(GOOD + b"[1, 2]\n")
    res = run_cli(["serve", "controller", f"run.output_dir={tmp_path / 'runs'}", "run.name=t",
                   f"model.cache_dir={model_cache}", "run.dashboard_port=0", *net_overrides(),
                   f"model.path={tmp_path}", "task.name=jsonl", f"task.path={data}"], timeout=120)
    assert res.returncode == 2, res.stderr
    assert f"areal-py: task.path: {data}: 1 bad line(s) of 2 non-empty:\n  {data}:2: expected a JSON object" \
        in res.stderr, res.stderr
    assert "task.max_bad_fraction" in res.stderr, res.stderr
    assert "Traceback" not in res.stderr, res.stderr
