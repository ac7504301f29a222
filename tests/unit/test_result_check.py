"""The controller's semantic checks on rollout messages, and the membership rules of its registry."""
from __future__ import annotations

import math
import time

import pytest

from areal_py.wire import protocol as P
from controller.result_check import MIN_LOGPROB, ResultLimits, check_result, check_version
from controller.servers import ServerRegistry

LIM = ResultLimits(group_size=2, max_new_tokens=4, vocab_size=10, newest_version=3)


def result(ids=(1, 2), lps=(-0.5, -1.0), vers=(2, 3), idx=0, finish="stop") -> P.Result:
    return P.Result(gid=0, attempt=0, idx=idx, output_ids=list(ids), logprobs=list(lps), versions=list(vers),
                    finish_reason=finish)


def reason(r: P.Result) -> str | None:
    bad = check_result(r, LIM)
    return None if bad is None else bad.reason


def test_a_plausible_result_passes():
    assert reason(result()) is None
    assert reason(result(ids=(), lps=(), vers=(), finish="abort")) is None  # a refused group: nothing generated
    assert reason(result(ids=(9,), lps=(0.0,), vers=(0,))) is None  # edges: last id, p = 1, version 0


@pytest.mark.parametrize("r, why", [
    (result(idx=2), "bad_index"),                                   # group of 2: indices 0, 1
    (result(ids=(1,) * 5, lps=(-1.0,) * 5, vers=(3,) * 5), "bad_length"),  # 5 > max_new_tokens 4
    (result(ids=(), lps=(), vers=()), "bad_length"),                # "stop" with no token
    (result(ids=(1, 10)), "bad_token"),                             # vocab is 0..9
    (result(ids=(-1, 2)), "bad_token"),
    (result(vers=(3, 1_000_000)), "bad_version"),                   # the absurd version
    (result(vers=(-1, 0)), "bad_version"),
    (result(vers=(3, 2)), "bad_version"),                           # versions never decrease
    (result(lps=(-0.5, math.nan)), "nonfinite_logprob"),
    (result(lps=(-math.inf, -1.0)), "nonfinite_logprob"),
    (result(lps=(-0.5, 0.5)), "bad_logprob"),                       # log p > 0
    (result(lps=(MIN_LOGPROB * 2, -1.0)), "bad_logprob"),
])
def test_each_rule_rejects_with_its_reason(r, why):
    assert reason(r) == why


def test_a_server_version_must_exist():
    assert check_version(3, 3, "hello") is None
    assert check_version(4, 3, "heartbeat from x").reason == "bad_version"


def test_only_the_avoided_server_left_still_gets_work():
    reg = ServerRegistry(timeout_s=10)
    reg.seen("a", 0)
    reg.seen("b", 0)
    reg.servers["a"].inflight[1] = 1  # a busier: b is least loaded
    assert reg.least_loaded().server_id == "b"
    assert reg.least_loaded(avoid="b").server_id == "a"
    reg.servers["a"].alive = False
    assert reg.least_loaded(avoid="b").server_id == "b"  # no other live: the avoided one rather than none


def test_an_evicted_server_rejoins_only_at_the_version_it_was_evicted_for():
    reg = ServerRegistry(timeout_s=10)
    s, fresh = reg.seen("a", 0)
    assert fresh and s.alive
    joined = s.joined
    reg.evict(s, until_version=2)
    assert reg.live() == []
    assert reg.seen("a", 1) == (s, False) and not s.alive  # heartbeats below 2 keep it out
    time.sleep(0.01)
    assert reg.seen("a", 2) == (s, True) and s.alive and s.evicted_until is None and s.joined > joined
