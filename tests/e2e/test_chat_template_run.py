"""A run of the embedded model with task.chat_template=true: the cold start trains on the rendered prompts
(its own cache entry), the controller sends them, and the run completes its steps."""
from __future__ import annotations

import json

from conftest import run_cli

from areal_py.config import load_config
from areal_py.model_dir import embedded_model_request
from areal_py.models import EMBEDDED_CHAT_TEMPLATE, load_tokenizer
from areal_py.telemetry.metrics import read_jsonl


def test_embedded_run_with_the_chat_template(tmp_path, small_cfg):
    overrides = [*small_cfg, "task.chat_template=true", "task.system_prompt=add", "cold_start.steps=10",
                 "trainer.total_steps=2", "rollout.max_new_tokens=4"]
    res = run_cli(["run", "--quiet", *overrides], timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert [r["step"] for r in read_jsonl(tmp_path / "runs" / "t" / "metrics.jsonl")] == [1, 2]
    model = embedded_model_request(load_config(None, overrides)).path
    meta = json.loads((model / "cold_start.json").read_text())
    assert meta["settings"]["task"]["chat_template"] == "true" and meta["settings"]["task"]["system_prompt"] == "add"
    assert load_tokenizer(model).chat_template == EMBEDDED_CHAT_TEMPLATE
