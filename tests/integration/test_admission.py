"""Prompts that cannot fit the model's context are skipped at admission and counted, never dispatched;
a run with nothing admissible left (or whose groups the servers all refuse) stops with an error that
says why, instead of live-locking until the trainer times out on "waiting for batch 0"."""
from __future__ import annotations

import logging

import pytest
from conftest import net_overrides

import controller.controller as ctrl_mod
from areal_py.config import load_config
from areal_py.models import build_char_tokenizer
from areal_py.tasks.arith import ArithTask
from areal_py.tasks.base import Prompt
from areal_py.telemetry.metrics import rejected_count
from areal_py.telemetry.prom import CONTROLLER as M
from areal_py.wire import protocol as P
from areal_py.wire.transport import RateLimitedLog
from controller import trainer_side
from controller.controller import AdmissionError, Controller

CONTEXT = 64  # model.embedded.max_position_embeddings by default


class LongPrompts:
    """Arithmetic whose prompts at positions where `long(index)` are padded past the context."""

    name = "long_arith"

    def __init__(self, long=lambda index: True) -> None:
        self.arith, self.long = ArithTask(), long

    def prompt(self, index: int) -> Prompt:
        p = self.arith.prompt(index)
        return Prompt(index, "0+" * 40 + p.text, p.answer) if self.long(index) else p

    def reward(self, prompt: Prompt, response_text: str, stopped: bool) -> float:
        return self.arith.reward(prompt, response_text, stopped)


class FakeClock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def skipped_metric() -> float:
    return M.skipped_prompts.labels(reason="too_long")._value.get()


@pytest.fixture
def cfg(tmp_path):
    return load_config(None, [f"run.output_dir={tmp_path}", "run.name=s", *net_overrides(), "controller.batch_size=2",
                              "controller.group_size=2", "reward.workers=0",
                              "controller.max_consecutive_skipped_prompts=50"])


def ready_controller(cfg, task, monkeypatch) -> tuple[Controller, list]:
    """A controller with one live server at version 0 whose outgoing messages are recorded."""
    ctrl = Controller(cfg, task=task, tokenizer=build_char_tokenizer())
    sent: list = []
    for mod in (ctrl_mod, trainer_side):  # the rollout side sends from one, the batches go from the other
        monkeypatch.setattr(mod, "send", lambda sock, body, *a, **k: sent.append(body))
    ctrl.registry.seen("a", 0)
    return ctrl, sent


def test_all_prompts_too_long_stop_the_run_with_a_clear_error(cfg, monkeypatch):
    ctrl, sent = ready_controller(cfg, LongPrompts(), monkeypatch)
    before = skipped_metric()
    try:
        with pytest.raises(AdmissionError) as err:
            for _ in range(100):  # bounded: the error comes within the first admission round
                ctrl.rollouts.admit()
                ctrl.rollouts.dispatch()
        msg = str(err.value)
        assert "long_arith" in msg and "50 prompts" in msg and f"context of {CONTEXT} tokens" in msg
        n = len(build_char_tokenizer()(LongPrompts().prompt(0).text).input_ids)
        assert n > CONTEXT and f"{n} tokens" in msg  # every prompt here has n tokens
        assert ctrl.rollouts.skipped_too_long == 50 and skipped_metric() - before == 50
        assert ctrl.counts.next_gid == 0 and ctrl.counts.running == 0
        assert not [b for b in sent if isinstance(b, P.Generate)]  # nothing dispatched
    finally:
        ctrl.close()


def test_mixed_prompts_run_and_count_the_skipped_ones(cfg, monkeypatch):
    ctrl, sent = ready_controller(cfg, LongPrompts(long=lambda i: i % 3 == 0), monkeypatch)
    before = skipped_metric()
    try:
        ctrl.rollouts.admit()
        ctrl.rollouts.dispatch()
        work = [b for b in sent if isinstance(b, P.Generate)]
        cap = (0 + cfg.controller.max_staleness + 1) * cfg.controller.batch_size
        assert len(work) == cap == ctrl.counts.running
        assert all(len(g.prompt_ids) < CONTEXT for g in work)
        skipped = sum(1 for i in range(ctrl.counts.data_position) if i % 3 == 0)
        assert ctrl.rollouts.skipped_too_long == skipped > 0 and skipped_metric() - before == skipped
        for g in work[:2]:  # two groups finish: a batch goes out carrying the count (metrics.jsonl ctrl_*)
            for idx in range(2):
                ctrl.rollouts.on_result("a", P.Result(gid=g.gid, attempt=0, idx=idx, output_ids=[2], logprobs=[-0.1],
                                             versions=[0], finish_reason="stop"))
        ctrl.rollouts.harvest_rewards()
        ctrl.assemble_batches()
        batch = next(b for b in sent if isinstance(b, P.Batch))
        assert batch.state.skipped_too_long == skipped
    finally:
        ctrl.close()


def test_groups_the_servers_all_refuse_stop_the_run_and_are_counted(cfg, monkeypatch):
    """A prompt the controller admits but the engine refuses (another context, a vocabulary mismatch) comes
    back as `abort`; refusals are counted and logged rate-limited, and a run of them stops the run."""
    cfg.controller.max_consecutive_skipped_prompts = 5
    ctrl, sent = ready_controller(cfg, ArithTask(), monkeypatch)
    clock = FakeClock()
    ctrl.rollouts.drop_log = RateLimitedLog(ctrl_mod.log, clock=clock)
    before = M.dropped_groups.labels(reason="aborted")._value.get()

    pending: list[P.Generate] = []

    def finish(reason: str) -> None:
        ctrl.rollouts.admit()
        ctrl.rollouts.dispatch()
        pending.extend(b for b in sent if isinstance(b, P.Generate))
        sent.clear()
        g = pending.pop(0)
        for idx in range(2):
            ctrl.rollouts.on_result("a", P.Result(gid=g.gid, attempt=g.attempt, idx=idx, output_ids=[], logprobs=[],
                                         versions=[], finish_reason=reason))

    try:
        for _ in range(4):
            finish("abort")
        finish("stop")  # one that works: refusals are not "in a row" any more
        for _ in range(4):
            finish("abort")
        assert ctrl.counts.dropped_aborted == 8 and M.dropped_groups.labels(reason="aborted")._value.get() - before == 8
        with pytest.raises(AdmissionError, match=r"5 groups in a row .*refused"):
            finish("abort")
    finally:
        ctrl.close()


def test_refused_groups_log_rate_limited(cfg, monkeypatch, caplog):
    ctrl, sent = ready_controller(cfg, ArithTask(), monkeypatch)
    ctrl.rollouts.drop_log = RateLimitedLog(ctrl_mod.log, clock=FakeClock())
    before = rejected_count("controller")
    try:
        ctrl.rollouts.admit()
        ctrl.rollouts.dispatch()
        work = [b for b in sent if isinstance(b, P.Generate)]
        with caplog.at_level(logging.WARNING, logger="controller"):
            for g in work:
                for idx in range(2):
                    ctrl.rollouts.on_result("a", P.Result(gid=g.gid, attempt=0, idx=idx, output_ids=[], logprobs=[],
                                                 versions=[], finish_reason="abort"))
        assert ctrl.counts.dropped_aborted == len(work) > 1
        assert len([r for r in caplog.records if "refused" in r.getMessage()]) == 1
        assert rejected_count("controller") == before
    finally:
        ctrl.close()


def test_running_never_exceeds_max_concurrent(tmp_path, monkeypatch):
    """controller.max_concurrent=3 under a staleness bound that allows (0 + 2 + 1) * 4 = 12: groups are
    admitted, dispatched and finished a few at a time over many rounds and the count in flight never
    passes 3; the bound is reached (it is what limits admission here), and the run still makes batches."""
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=c", *net_overrides(), "controller.batch_size=4",
                             "controller.group_size=2", "controller.max_staleness=2", "controller.max_concurrent=3",
                             "reward.workers=0"])
    ctrl, sent = ready_controller(cfg, ArithTask(), monkeypatch)
    try:
        seen_running, finished = [], 0
        for round_ in range(12):
            ctrl.rollouts.admit()
            ctrl.rollouts.dispatch()
            seen_running.append(ctrl.counts.running)
            work = [b for b in sent if isinstance(b, P.Generate) and b.gid in ctrl.rollouts.inflight]
            for g in work[: 1 + round_ % 2]:  # one or two groups finish per round
                for idx in range(2):
                    ctrl.rollouts.on_result("a", P.Result(gid=g.gid, attempt=0, idx=idx, output_ids=[2],
                                                          logprobs=[-0.1], versions=[0], finish_reason="stop"))
                finished += 1
            ctrl.rollouts.harvest_rewards()
            ctrl.assemble_batches()
        assert max(seen_running) == 3 and all(r <= 3 for r in seen_running)
        assert finished > 3 and ctrl.counts.accepted + ctrl.counts.running <= 12
        assert any(isinstance(b, P.Batch) for b in sent)
    finally:
        ctrl.close()
