"""Preference pairs: synthetic pairs are (right, wrong) by the task's own reward; the JSONL format's errors."""
import itertools
import json

import pytest

from areal_py.tasks.arith import ArithTask
from areal_py.tasks.base import ChatMessage
from areal_py.tasks.jsonl import JsonlTask
from areal_py.tasks.preference_pairs import PreferencePair, read_pairs, synthetic_pairs, write_pairs
from areal_py.tasks.sum_cot import SumCotTask


@pytest.mark.parametrize("task", [ArithTask(seed=1), SumCotTask(min_terms=3, max_terms=12, seed=1)])
def test_synthetic_pairs_chosen_right_rejected_wrong(task):
    pairs = synthetic_pairs(task, start=5, n=300, seed=1)
    assert len(pairs) == 300
    for i, p in enumerate(pairs, start=5):
        prompt = task.prompt(i)
        assert p.prompt == prompt.text
        assert task.reward(prompt, p.chosen, True) == 1.0
        assert task.reward(prompt, p.rejected, True) == 0.0
    assert synthetic_pairs(task, 5, 300, seed=1) == pairs  # deterministic
    assert synthetic_pairs(task, 5, 300, seed=2) != pairs


def test_arith_pair_by_hand():
    task = ArithTask(seed=0)
    a, b = task.operands(0)
    p = synthetic_pairs(task, 0, 1)[0]
    assert p.prompt == f"{a}+{b}=" and p.chosen == str(a + b)
    assert 1 <= abs(int(p.rejected) - (a + b)) <= 9 and int(p.rejected) >= 0


def test_sum_cot_wrong_response_is_consistent():
    # one term changed: the partial sums are a valid running total of the changed terms
    task = SumCotTask(min_terms=3, max_terms=12)
    for i in range(50):
        p = synthetic_pairs(task, i, 1)[0]
        sums, answer = p.rejected.split(";")
        totals = [int(s) for s in sums.split(",")]
        terms = [totals[0]] + [b - a for a, b in itertools.pairwise(totals)]
        assert all(0 <= t <= 9 for t in terms) and int(answer) == totals[-1]
        assert sum(x != y for x, y in zip(terms, task.terms(i))) == 1


def test_task_without_pairs_is_refused(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text('{"prompt": "q", "answer": "1"}\n')
    with pytest.raises(ValueError, match="no synthetic preference pairs"):
        synthetic_pairs(JsonlTask(str(f)), 0, 1)


def test_write_read_round_trip_with_chat_prompt(tmp_path):
    pairs = [PreferencePair("1+2=", "3", "4"),
             PreferencePair("sys\n\nhi", "ok", "no", (ChatMessage("system", "sys"), ChatMessage("user", "hi")))]
    path = write_pairs(tmp_path / "p.jsonl", pairs)
    assert json.loads(path.read_text().splitlines()[1])["prompt"][0] == {"role": "system", "content": "sys"}
    assert read_pairs(path) == pairs


def test_line_separator_inside_a_string_ends_no_line(tmp_path):
    # write_pairs keeps U+2028 raw (ensure_ascii=False); str.splitlines would cut the record there
    pairs = [PreferencePair("a\u2028b=", "1\x1c", "2\x85")]
    path = write_pairs(tmp_path / "p.jsonl", pairs)
    assert "\u2028" in path.read_text(encoding="utf-8")
    assert read_pairs(path) == pairs


def test_bad_lines_are_all_named(tmp_path):
    f = tmp_path / "p.jsonl"
    f.write_text('{"prompt": "a", "chosen": "1", "rejected": "2"}\n'
                 '{"prompt": "a", "chosen": "1"}\n'
                 "\n"
                 '{"prompt": "a", "chosen": "1", "rejected": "1"}\n'
                 "not json\n"
                 '{"prompt": [{"role": "assistant", "content": "x"}], "chosen": "1", "rejected": "2"}\n'
                 '{"prompt": "a", "chosen": "", "rejected": "2"}\n')
    with pytest.raises(ValueError) as e:
        read_pairs(f)
    msg = str(e.value)
    assert "5 bad line(s) of 6 non-empty" in msg
    for want in (":2: missing key 'rejected'", ":4: 'chosen' and 'rejected' are the same", ":5: invalid JSON",
                 ":6: 'prompt': the last message must be the user's", ":7: 'chosen' must be a non-empty string"):
        assert want in msg


def test_empty_or_missing_file(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no preference pairs"):
        read_pairs(tmp_path / "e.jsonl")
    with pytest.raises(FileNotFoundError, match="not found"):
        read_pairs(tmp_path / "missing.jsonl")
