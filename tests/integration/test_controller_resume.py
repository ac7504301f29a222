"""A controller started by a resumed trainer goes on from the counters of the trainer's checkpoint, and a
malformed resume state is rejected and counted without stopping it."""
from __future__ import annotations

import msgpack
import pytest
import zmq
from conftest import net_overrides

from areal_py.config import load_config
from areal_py.models import build_char_tokenizer
from areal_py.tasks.arith import ArithTask
from areal_py.telemetry.metrics import rejected_count
from areal_py.wire import protocol as P
from areal_py.wire.transport import make_socket, send
from controller.controller import Controller

SAVED = {"data_position": 40, "accepted": 11, "running": 3, "dropped_stale": 1, "dropped_uniform": 2,
         "reward_timeouts": 4, "reward_errors": 5, "generated_tokens": 900, "skipped_too_long": 6,
         "dropped_aborted": 7}  # a checkpoint's controller_state, as state.json holds it


@pytest.fixture
def cfg(tmp_path):
    return load_config(None, [f"run.output_dir={tmp_path}", "run.name=s", *net_overrides(),
                              "controller.batch_size=2", "controller.group_size=2"])


def test_resume_state_restores_the_counts_and_a_malformed_one_is_rejected(cfg):
    ctrl = Controller(cfg, task=ArithTask(), tokenizer=build_char_tokenizer())
    push = make_socket(zmq.Context.instance(), zmq.DEALER, cfg.net.addr(cfg.net.trainer_port), bind=False, identity="trainer")
    before = rejected_count("controller", "invalid_body")
    try:
        bad = {"version": 3, "resume_state": {**SAVED, "generated_tokens": -1}}
        push.send_multipart([msgpack.packb({"type": "trainer_hello", "schema": P.SCHEMA_VERSION, "body": bad,
                                            "tensors": []})])
        send(push, P.TrainerHello(version=3, resume_state=P.ControllerState.model_validate(SAVED)))
        ctrl.start()
        assert rejected_count("controller", "invalid_body") - before == 1
        c = ctrl.counts
        assert (c.data_position, c.dropped_stale, c.dropped_uniform, c.generated_tokens, c.dropped_aborted) == \
            (40, 1, 2, 900, 7)
        assert c.base_version == c.next_batch_version == 3
        assert c.accepted == 6 and c.running == 0  # three trained batches of two; nothing in flight survives
        state = c.snapshot(reward_timeouts=ctrl.rewards.timeouts, reward_errors=ctrl.rewards.errors,
                           skipped_too_long=ctrl.rollouts.skipped_too_long)
        assert state.skipped_too_long == 6 and state.reward_timeouts == state.reward_errors == 0  # pool restarts
    finally:
        ctrl.close()
        push.close()
