"""Lossless resume at the controller: the buffer a checkpointed batch carries (ready groups, pending ones
with their finished samples) is what a restarted controller goes on from, so every prompt taken is
trained exactly once or dropped with a reason, and resumed tokens keep their versions (the staleness
rule applies to them).

In-process: a scripted server answers the controller's Generate messages (5 samples a round, so groups
are caught half-finished), a scripted trainer takes batches; a "crash" throws the controller
away after some batch and a new one resumes from the batch the trainer checkpointed last."""
from __future__ import annotations

import pytest
from conftest import net_overrides

import controller.controller as ctrl_mod
from areal_py.config import load_config
from areal_py.models import build_char_tokenizer
from areal_py.tasks.arith import ArithTask
from areal_py.telemetry.ledger import ledger_from_records
from areal_py.telemetry.step_record import StepRecord
from areal_py.wire import protocol as P
from controller import trainer_side
from controller.controller import Controller

TOK = build_char_tokenizer()
TASK = ArithTask()


def ids(prompt_index: int) -> list[int]:
    return TOK(TASK.prompt(prompt_index).text).input_ids


def make_cfg(tmp_path, *extra: str):
    return load_config(None, [f"run.output_dir={tmp_path}", "run.name=s", *net_overrides(), "controller.batch_size=2",
                              "controller.group_size=2", "reward.workers=0", "controller.max_staleness=2",
                              "trainer.total_steps=8", *extra])


class Sim:
    """One controller, its one server "a" (answering 5 samples a round, oldest groups first, so groups are
    often half done) and a trainer that trains each batch at once (the server then runs the new version).
    `batches` is what the trainer got."""

    def __init__(self, cfg, monkeypatch, version: int = 0, hello: P.TrainerHello | None = None) -> None:
        self.sent: list = []
        for mod in (ctrl_mod, trainer_side):  # the rollout side sends from one, the batches go from the other
            monkeypatch.setattr(mod, "send", lambda sock, body, *a, **k: self.sent.append(body))
        self.ctrl = Controller(cfg, task=TASK, tokenizer=build_char_tokenizer())
        self.ctrl.resume(hello or P.TrainerHello(version=version))
        self.version = version
        self.ctrl.registry.seen("a", version)
        self.work: dict[int, P.Generate] = {}  # gid -> its Generate, samples not yet answered
        self.answered: dict[int, int] = {}
        self.generates: list[P.Generate] = []
        self.batches: list[P.Batch] = []

    def answer(self, g: P.Generate, j: int) -> P.Result:
        """Sample j of group g: the right sum when gid + j is even (so groups are mixed), stopped at EOS."""
        a, b = (int(x) for x in TOK.decode(g.prompt_ids, skip_special_tokens=True).rstrip("=").split("+"))
        text = str(a + b) if (g.gid + j) % 2 == 0 else str(a + b + 1)
        ids = TOK(text, add_special_tokens=False).input_ids + [TOK.eos_token_id]
        return P.Result(gid=g.gid, attempt=g.attempt, idx=j, output_ids=ids, logprobs=[-0.5] * len(ids),
                        versions=[self.version] * len(ids), finish_reason="stop")

    def round(self) -> None:
        """The controller's loop body once, then 5 answered samples, oldest groups first."""
        ro = self.ctrl.rollouts
        ro.harvest_rewards()
        ro.admit()
        ro.dispatch()
        self.ctrl.assemble_batches()
        for body in self.sent:
            if isinstance(body, P.Generate):
                self.work[body.gid], self.answered[body.gid] = body, 0
                self.generates.append(body)
            elif isinstance(body, P.Batch):
                self.batches.append(body)
                self.version = body.version + 1  # trained and published; the server loads the new weights
                self.ctrl.weights.publish(P.WeightsReady(version=self.version, path=None), {})
                self.ctrl.registry.seen("a", self.version)
        self.sent.clear()
        for _ in range(5):
            if not self.work:
                return
            gid, g = next(iter(self.work.items()))
            self.ctrl.on_rollout(b"a", P.Message("result", self.answer(g, self.answered[gid])))
            self.answered[gid] += 1
            if self.answered[gid] == g.n:
                del self.work[gid]

    def run_until(self, pred, rounds: int = 200) -> None:
        for _ in range(rounds):
            if pred():
                return
            self.round()
        raise AssertionError("the simulated run did not get there")


def records(batches: list[P.Batch]) -> list[StepRecord]:
    """The step records a trainer would write for `batches` (the ledger fields and the controller position)."""
    return [StepRecord(step=b.version + 1, trained_prompts=[g.prompt_index for g in b.groups],
                       dropped_prompts=b.dropped_prompts, controller={"data_position": b.state.data_position})
            for b in batches]


def test_a_resumed_controller_loses_nothing_and_trains_nothing_twice(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path, "trainer.checkpoint_every=3")
    first = Sim(cfg, monkeypatch)
    try:
        first.run_until(lambda: len(first.batches) >= 5)  # checkpoints at versions 3 (batch 2) and 6 (batch 5)
    finally:
        first.ctrl.close()
    assert [b.buffer is not None for b in first.batches[:5]] == [False, False, True, False, False]
    ckpt = first.batches[2]  # the trainer crashed after training batches 3 and 4: version 3 is what it resumes
    buf = ckpt.buffer
    assert buf.pending and any(0 < len(p.done) < 2 for p in buf.pending), "no half-finished group to resume"
    held = {g.prompt_index for g in buf.ready} | {p.prompt_index for p in buf.pending}
    trained = {g.prompt_index for b in first.batches[:3] for g in b.groups}
    assert held | trained == set(range(ckpt.state.data_position))  # everything taken is trained or held
    assert buf.next_gid == max(p.gid for p in buf.pending) + 1

    cfg = make_cfg(tmp_path, "trainer.checkpoint_every=3")  # the same run; ports of its own (zmq closes lazily)
    second = Sim(cfg, monkeypatch, version=3, hello=P.TrainerHello(version=3, resume_state=ckpt.state,
                                                                   resume_buffer=buf))
    try:
        c = second.ctrl.counts
        assert (c.accepted, c.running, c.next_gid) == (3 * 2 + len(buf.ready), len(buf.pending), buf.next_gid)
        second.run_until(lambda: len(second.batches) == 5)  # batches 3..7
    finally:
        second.ctrl.close()
    # a half-finished group generated only its missing sample, under a new gid-free attempt of its own
    half = next(p for p in buf.pending if len(p.done) == 1)
    regen = [g for g in second.generates if g.gid == half.gid]
    assert len(regen) == 1 and regen[0].n == 1 and regen[0].prompt_ids == half.prompt_ids
    assert min(g.gid for g in second.generates if g.gid not in {p.gid for p in buf.pending}) >= buf.next_gid
    # its finished sample is trained with the version it was generated at (0..2), the new one at 3 or later
    group = next(g for b in second.batches for g in b.groups if g.gid == half.gid)
    kept = half.done[0]
    assert group.samples[kept.idx].versions == kept.versions and group.samples[kept.idx].output_ids == kept.output_ids
    assert min(group.samples[1 - kept.idx].versions) >= 3

    ledger = ledger_from_records(records(first.batches[:3] + second.batches))
    assert ledger.problems() == []
    assert [b.version for b in second.batches] == [3, 4, 5, 6, 7]
    assert sum(ledger.trained.values()) == 8 * 2


def test_resumed_tokens_too_old_for_the_next_batch_are_dropped_as_stale(tmp_path, monkeypatch):
    """A ready group whose tokens are version 0, resumed at version 4 with max_staleness 1: never trained,
    dropped as stale with its prompt in the ledger; a pending one of the same age likewise once scored."""
    cfg = make_cfg(tmp_path)
    old = P.Sample(output_ids=[5, 2], logprobs=[-0.1, -0.2], versions=[0, 0], finish_reason="stop", reward=1.0)
    ready = [P.Group(gid=9, prompt_index=9, prompt_ids=ids(9), samples=[old, old.model_copy(update={"reward": 0.0})])]
    done = [P.Result(gid=10, attempt=0, idx=1, output_ids=[5, 2], logprobs=[-0.1, -0.2], versions=[0, 0],
                     finish_reason="stop")]
    buffer = P.ControllerBuffer(ready=ready, pending=[P.PendingGroup(gid=10, prompt_index=10, prompt_ids=ids(10),
                                                                     done=done)], next_gid=11)
    state = P.ControllerState(data_position=11, accepted=4 * 2 + 1, running=1)
    sim = Sim(cfg, monkeypatch, version=4, hello=P.TrainerHello(version=4, resume_state=state, resume_buffer=buffer))
    try:
        sim.run_until(lambda: len(sim.batches) >= 1)
    finally:
        sim.ctrl.close()
    trained = [g.prompt_index for g in sim.batches[0].groups]
    assert 9 not in trained and 10 not in trained
    assert sorted(sim.batches[0].dropped_prompts["stale"]) == [9, 10]
    assert sim.ctrl.counts.dropped_stale == 2
    assert all(min(s.versions) >= 4 for g in sim.batches[0].groups for s in g.samples)
    first_generate = next(g for g in sim.generates if g.gid == 10)
    assert first_generate.n == 1  # only the missing sample of the pending group was generated


@pytest.mark.parametrize("done_idx,version", [([0, 0], 0), ([2], 0), ([1], 3)])
def test_a_buffered_group_that_does_not_fit_the_run_is_dropped_as_invalid(tmp_path, monkeypatch, done_idx, version):
    """A checkpoint is our own file, but a pending group with a sample index twice or past group_size, or
    tokens newer than the resumed version (2), is dropped with a reason (invalid), never trained; a ready
    group with such tokens likewise."""
    cfg = make_cfg(tmp_path)
    done = [P.Result(gid=3, attempt=0, idx=i, output_ids=[5, 2], logprobs=[-0.1, -0.2], versions=[0, version],
                     finish_reason="stop") for i in done_idx]
    future = P.Sample(output_ids=[5], logprobs=[-0.1], versions=[3], finish_reason="stop", reward=1.0)
    buffer = P.ControllerBuffer(pending=[P.PendingGroup(gid=3, prompt_index=3, prompt_ids=[1, 5], done=done)],
                                ready=[P.Group(gid=2, prompt_index=2, prompt_ids=[1, 5], samples=[future, future])],
                                next_gid=4)
    state = P.ControllerState(data_position=4, accepted=2 * 2 + 1, running=1)
    sim = Sim(cfg, monkeypatch, version=2, hello=P.TrainerHello(version=2, resume_state=state, resume_buffer=buffer))
    try:
        c = sim.ctrl.counts
        assert (c.running, c.accepted) == (0, 4) and 3 not in sim.ctrl.rollouts.inflight
        assert not sim.ctrl.rollouts.ready
        assert c.take_dropped() == {"invalid": [2, 3]}
    finally:
        sim.ctrl.close()
