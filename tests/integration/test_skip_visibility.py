"""Nothing a run leaves out is silent: each skip reason is counted by the controller, carried in the batch
state into the step record (metrics.jsonl), exported to Prometheus, and summed by `skips.skip_counts` for the
report; a run whose groups all carry no signal warns after trainer.warn_uninformative_steps, not before.
The controller runs in-process with its outgoing messages recorded (no server, no trainer)."""
from __future__ import annotations

import logging
import re

import pytest
from conftest import net_overrides
from prometheus_client import generate_latest

import controller.controller as ctrl_mod
from areal_py.config import load_config
from areal_py.models import build_char_tokenizer
from areal_py.tasks.arith import ArithTask
from areal_py.tasks.base import Prompt
from areal_py.telemetry import prom
from areal_py.telemetry.skips import skip_counts
from areal_py.telemetry.step_record import ControllerCounters, StepRecord
from areal_py.wire import protocol as P
from controller import trainer_side
from controller.controller import Controller

TOK = build_char_tokenizer()


class Scripted:
    """Arithmetic prompts, position 0 far past the 64-token context; two data lines "left out at load"; the
    reward reads the response: "1" scores 1, "7" raises (a reward error), anything else scores 0."""

    name = "scripted"

    def __init__(self) -> None:
        self.arith = ArithTask()
        self.bad_lines = ["line 3: malformed", "line 9: missing 'answer'"]

    def prompt(self, index: int) -> Prompt:
        p = self.arith.prompt(index)
        return Prompt(index, "0+" * 40 + p.text, p.answer) if index == 0 else p

    def reward(self, prompt: Prompt, response_text: str, stopped: bool) -> float:
        if response_text == "7":
            raise RuntimeError("verifier exploded")
        return 1.0 if response_text == "1" else 0.0


def prom_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample of the Prometheus text format (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    m = re.search(rf"^{re.escape(name)}{re.escape('{' + want + '}') if want else ''} (\S+)$", text, re.MULTILINE)
    return float(m.group(1)) if m else 0.0


def controller_text() -> str:
    return generate_latest(prom.role_registry("controller")).decode()


PROM_SAMPLES = {"too_long": ("areal_controller_skipped_prompts_total", {"reason": "too_long"}),
                "bad_line": ("areal_controller_skipped_prompts_total", {"reason": "bad_line"}),
                "uniform": ("areal_controller_dropped_groups_total", {"reason": "uniform"}),
                "reward_error": ("areal_reward_errors_total", {})}


@pytest.fixture
def ctrl(tmp_path, monkeypatch):
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=s", *net_overrides(), "controller.batch_size=1",
                             "controller.group_size=2", "controller.dynamic_sampling=true", "reward.workers=0",
                             "trainer.warn_uninformative_steps=3"])
    before = controller_text()  # bad lines are counted when the controller loads its task
    c = Controller(cfg, task=Scripted(), tokenizer=TOK)
    c.prom_before, c.sent = before, []
    for mod in (ctrl_mod, trainer_side):  # the rollout side sends from one, the batches go from the other
        monkeypatch.setattr(mod, "send", lambda sock, body, *a, **k: c.sent.append(body))
    c.on_rollout(b"a", P.Message(type="hello", body=P.Hello(server_id="a", version=0, engine_path="generic")))
    yield c
    c.close()


def finish(c: Controller, texts: tuple[str, str]) -> None:
    """Admit, dispatch, and answer the oldest dispatched group with one response per text."""
    c.rollouts.admit()
    c.rollouts.dispatch()
    pending = [b for b in c.sent if isinstance(b, P.Generate)]
    g = pending[0]
    c.sent.remove(g)
    for idx, text in enumerate(texts):
        c.rollouts.on_result("a", P.Result(gid=g.gid, attempt=g.attempt, idx=idx,
                                           output_ids=[TOK.convert_tokens_to_ids(text)], logprobs=[-0.5],
                                           versions=[0], finish_reason="stop"))
    c.rollouts.harvest_rewards()


def test_each_skip_reason_reaches_the_step_record_prometheus_and_the_report(ctrl):
    before = ctrl.prom_before
    finish(ctrl, ("0", "0"))  # uniform: dynamic sampling drops it
    finish(ctrl, ("7", "1"))  # one reward error (scored 0), then a mixed group: a batch
    ctrl.assemble_batches()
    [batch] = [b for b in ctrl.sent if isinstance(b, P.Batch)]

    assert batch.state.skipped_too_long == 1 and batch.state.skipped_bad_lines == 2
    assert batch.state.dropped_uniform == 1 and batch.state.reward_errors == 1
    assert batch.stats.generic_engine_servers == 1  # the server's hello said it runs the generic path
    # the step record, as the trainer builds it from the batch, and its file form
    rec = StepRecord(step=1, controller=ControllerCounters.model_validate(batch.state.model_dump()),
                     generic_engine_servers=batch.stats.generic_engine_servers)
    row = rec.to_dict()
    assert (row["ctrl_skipped_too_long"], row["ctrl_skipped_bad_lines"], row["ctrl_dropped_uniform"],
            row["ctrl_reward_errors"]) == (1, 2, 1, 1)
    counts = {c.reason: c.count for c in skip_counts([StepRecord.from_json(rec.to_json_line())])}
    assert {k: counts[k] for k in PROM_SAMPLES} == {"too_long": 1, "bad_line": 2, "uniform": 1, "reward_error": 1}
    assert counts["stale"] == counts["aborted"] == 0 and counts["nonfinite_reward"] is None  # not in this record

    after = controller_text()
    deltas = {k: prom_value(after, n, **lb) - prom_value(before, n, **lb) for k, (n, lb) in PROM_SAMPLES.items()}
    assert deltas == {"too_long": 1.0, "bad_line": 2.0, "uniform": 1.0, "reward_error": 1.0}


def test_uniform_groups_under_dynamic_sampling_warn_after_n_batches_worth_and_not_before(ctrl, caplog):
    """warn_uninformative_steps=3 at batch_size 1: the 3rd uniform group in a row warns, the 1st and 2nd do
    not; an informative group starts the count again; the 6th in a row warns again."""
    with caplog.at_level(logging.WARNING, logger="controller"):
        for _ in range(2):
            finish(ctrl, ("0", "0"))
        assert "no learning signal" not in caplog.text
        finish(ctrl, ("0", "1"))  # informative: the stretch ends
        finish(ctrl, ("1", "1"))
        finish(ctrl, ("0", "0"))
        assert "no learning signal" not in caplog.text
        finish(ctrl, ("0", "0"))
        warned = [r for r in caplog.records if "no learning signal" in r.getMessage()]
        assert len(warned) == 1 and "the last 3 scored groups" in warned[0].getMessage()
        assert "warn_uninformative_steps=3" in warned[0].getMessage()
        for _ in range(2):
            finish(ctrl, ("1", "1"))
        assert len([r for r in caplog.records if "no learning signal" in r.getMessage()]) == 1
        finish(ctrl, ("1", "1"))
        assert len([r for r in caplog.records if "no learning signal" in r.getMessage()]) == 2
    assert ctrl.counts.dropped_uniform == 8
