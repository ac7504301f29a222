"""The offline commands publish the trainer role's Prometheus metrics as RL runs do: after `areal-py sft` (in
process, on a small random model) a scrape of the trainer's /metrics shows the last step and its loss."""
from __future__ import annotations

import urllib.request

import pytest
import torch
from conftest import free_ports
from prometheus_client.parser import text_string_to_metric_families

from areal_py.config import load_config
from areal_py.models import EmbeddedModelSpec, create_embedded_model
from areal_py.telemetry.metrics import read_jsonl
from areal_py.telemetry.prom import start_metrics_server
from trainer.sft import train_sft


def scrape(port: int) -> dict[str, float]:
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_sft_steps_are_served_as_trainer_metrics(tmp_path):
    torch.manual_seed(0)
    tiny = create_embedded_model(tmp_path / "emb", EmbeddedModelSpec())
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=s", f"model.path={tiny}",
                             "sft.synthetic_examples=16", "sft.eval_examples=8", "sft.batch_size=8", "sft.epochs=1",
                             "sft.eval_samples=8", "rollout.max_new_tokens=4"])
    port = start_metrics_server(free_ports(1)[0], role="trainer")
    train_sft(cfg, tiny)
    last = [r for r in read_jsonl(tmp_path / "s" / "metrics.jsonl") if r["kind"] == "train"][-1]
    got = scrape(port)
    assert last["step"] == 2
    assert got["areal_trainer_policy_version"] == 2
    assert got["areal_trainer_loss"] == pytest.approx(last["loss"], rel=1e-6)
