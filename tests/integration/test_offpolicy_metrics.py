"""Off-policy statistics end to end in one process: a real learner step on stale tokens -> the step record
(metrics.jsonl row), the trainer's /metrics text, and the report's charts."""
from __future__ import annotations

import json
import re
import urllib.request

import pytest
import torch
from conftest import free_ports
from tiny_models import tiny_model

from areal_py.config import load_config
from areal_py.telemetry import prom
from areal_py.telemetry.report_sections import chart_sections
from areal_py.telemetry.step_record import StepRecord
from areal_py.wire import protocol as P
from trainer.algo.offpolicy_stats import offpolicy_stats
from trainer.learner import Learner
from trainer.rollout_batch import collate, token_logprobs
from trainer.step_metrics import StepTiming, build_step_record, export_offpolicy

TRAINER_VERSION = 3


def stale_batch() -> P.Batch:
    """Two groups of 4 samples: group 0 generated at the trained version (staleness 0), group 1 two versions
    earlier (staleness 2); behaviour logprobs drawn at random around the tiny model's own (about
    -ln 32), so some weights exceed the bound and most do not."""
    g = torch.Generator().manual_seed(3)
    groups = []
    for gid, version in enumerate((TRAINER_VERSION, TRAINER_VERSION - 2)):
        samples = []
        for i in range(4):
            n = 2 + i
            samples.append(P.Sample(output_ids=torch.randint(4, 32, (n,), generator=g).tolist(),
                                    logprobs=(-2.5 - torch.rand(n, generator=g) * 3).tolist(), versions=[version] * n,
                                    finish_reason="stop", reward=float(i % 2)))
        groups.append(P.Group(gid=gid, prompt_index=gid, prompt_ids=[1, 2 + gid, 3], samples=samples))
    return P.Batch(version=TRAINER_VERSION, groups=groups, state={}, stats={})


@pytest.fixture(scope="module")
def record() -> tuple[StepRecord, object]:
    cfg = load_config(None, ["controller.group_size=4", "algo.offpolicy.upper=2.0"])
    learner = Learner(cfg, tiny_model(max_positions=64), model_dir=None)
    wire = stale_batch()
    batch = collate(wire.groups, pad_id=0)
    with torch.no_grad():  # the proximal policy: the weights before the update
        prox = token_logprobs(learner.model, batch.input_ids, batch.attention_mask, 1.0)[0]
    over = batch.loss_mask.bool() & (prox - batch.behav_logprobs > torch.log(torch.tensor(2.0)))  # w > upper
    expected = offpolicy_stats(prox, batch.behav_logprobs, batch.loss_mask, over,
                               TRAINER_VERSION - batch.token_versions)
    stats = learner.train_step(batch, TRAINER_VERSION)
    r = build_step_record(trained_version=TRAINER_VERSION, batch=batch, dropped={}, wire=wire, stats=stats,
                          timing=StepTiming(wall_time_s=1.0, epoch0=0.0, wait_s=0.1, train_s=0.2, publish_s=0.1),
                          trained_tokens_total=10, max_staleness=2, max_token_staleness=2,
                          offpolicy=learner.offpolicy)
    return r, expected


def test_a_learner_step_records_the_statistics(record):
    r, expected = record
    row = json.loads(r.to_json_line())  # what metrics.jsonl holds
    assert row["offpolicy_kl_mean"] == pytest.approx(expected.all.kl_mean, abs=1e-5) and row["offpolicy_kl_mean"] > 0
    assert row["offpolicy_kl_max"] == pytest.approx(expected.all.kl_max, abs=1e-5)
    assert row["offpolicy_ess"] == pytest.approx(expected.all.ess, abs=1e-5) and 0 < row["offpolicy_ess"] < 1
    assert row["offpolicy_bounded_fraction"] == pytest.approx(expected.all.bounded_fraction, abs=1e-6)
    assert 0 < row["offpolicy_bounded_fraction"] < 1  # some weights exceed 2, not all
    assert set(row["offpolicy_by_staleness"]) == {"0", "2"}
    for key, b in expected.by_staleness.items():
        got = row["offpolicy_by_staleness"][key]
        assert got["tokens"] == b.tokens and got["kl_mean"] == pytest.approx(b.kl_mean, abs=1e-5)
        assert got["ess"] == pytest.approx(b.ess, abs=1e-5)
    assert sum(b["tokens"] for b in row["offpolicy_by_staleness"].values()) == r.response_tokens
    back = StepRecord.from_json(r.to_json_line())  # typed on the way back in
    assert back.offpolicy_by_staleness["2"].tokens == expected.by_staleness["2"].tokens


def test_the_statistics_reach_the_metrics_endpoint(record):
    r, _ = record
    port = free_ports(1)[0]
    assert prom.start_metrics_server(port, role="trainer") == port
    try:
        export_offpolicy(r)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
    finally:
        prom.stop_metrics_server(port)

    def value(name: str, label: str) -> float:
        m = re.search(rf'^{name}{{staleness="{re.escape(label)}"}} (\S+)$', text, re.MULTILINE)
        assert m, (name, label)
        return float(m.group(1))

    assert value("areal_trainer_offpolicy_kl", "all") == pytest.approx(r.offpolicy_kl_mean)
    assert value("areal_trainer_offpolicy_ess_ratio", "all") == pytest.approx(r.offpolicy_ess)
    assert value("areal_trainer_offpolicy_bounded_ratio", "2") == pytest.approx(
        r.offpolicy_by_staleness["2"].bounded_fraction)
    assert value("areal_trainer_offpolicy_tokens", "1") == 0 and value("areal_trainer_offpolicy_ess_ratio", "1") == 1
    exported = {line.split("{")[0].split(" ")[0] for line in text.splitlines() if line.startswith("areal_")}
    assert exported <= prom.ALL_METRIC_NAMES


def test_the_report_charts_kl_and_ess_over_steps(record):
    r, _ = record
    later = r.model_copy(update={"step": r.step + 1})
    secs = {s.chart_id: s for s in chart_sections([r, later])}
    assert "offpolicy_kl" in secs and "offpolicy_ess" in secs
    assert "staleness 2" in secs["offpolicy_kl"].svg and "ESS/N, all tokens" in secs["offpolicy_ess"].svg
    older = StepRecord(step=1, reward_mean=0.5)  # a run that did not record them: no chart
    assert not {"offpolicy_kl", "offpolicy_ess"} & {s.chart_id for s in chart_sections([older])}
