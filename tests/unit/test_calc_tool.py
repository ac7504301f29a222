"""calc_tool (issue 21): the reward's final-answer rule, the cold-start targets, and the cold start's rows that keep
the tool's result in the context but out of the loss."""
from __future__ import annotations

import random

from areal_py.models import build_char_tokenizer, eos_token_id
from areal_py.tasks.base import Prompt, SegmentedSftTask, build_task, recipe_of
from areal_py.tasks.calc_tool import CalcToolConfig, CalcToolTask, final_answer
from trainer.cold_start import _sft_rows


def test_reward_reads_the_answer_after_the_last_result():
    p = Prompt(0, "347*86=", "29842")
    task = CalcToolTask()
    assert task.reward(p, "<calc>347*86</calc><result>29842</result>29842", True) == 1.0
    assert task.reward(p, "<calc>347*86</calc><result>29842</result>29842", False) == 0.0  # no EOS
    assert task.reward(p, "<calc>347*86</calc><result>29842</result>29843", True) == 0.0  # miscopied
    assert task.reward(p, "29842", True) == 1.0  # a direct answer counts when right
    # without the tool's output (single_turn) the call is part of the answer: wrong
    assert task.reward(p, "<calc>347*86</calc>29842", True) == 0.0
    assert final_answer("<result>1</result>x<result>2</result>3") == "3"


def test_prompts_are_deterministic_and_the_recipe_rebuilds_the_task():
    task = build_task(CalcToolConfig(min_operand=10, max_operand=99, direct_share=0.25), seed=3)
    p = task.prompt(5)
    a, b = task.operands(5)
    assert p.text == f"{a}*{b}=" and p.answer == str(a * b) and 10 <= a <= 99 and 10 <= b <= 99
    again = build_task(recipe_of(task).config, recipe_of(task).seed)
    assert [again.prompt(i) for i in range(10)] == [task.prompt(i) for i in range(10)]
    assert task.reward(p, task.reference_response(5), True) == 1.0
    assert task.reward(p, task.wrong_response(5, random.Random(0)), True) == 0.0


def test_sft_segments_share_and_noise():
    task = CalcToolTask(min_operand=10, max_operand=999, direct_share=0.3)
    assert isinstance(task, SegmentedSftTask)
    rng = random.Random(0)
    direct = miscopied = 0
    n = 4000
    for _ in range(n):
        prompt, segs = task.sft_segments(rng, label_noise=0.2)
        a, b = (int(x) for x in prompt[:-1].split("*"))
        if len(segs) == 1:
            direct += 1
            assert segs == [(str(a * b), True)]
            continue
        (call, t1), (result, t2), (answer, t3) = segs
        assert (t1, t2, t3) == (True, False, True)
        left, right = call[len("<calc>"):-len("</calc>")].split("*")
        assert not left.startswith("0") and not right.startswith("0")
        assert result == f"<result>{int(left) * int(right)}</result>"  # the tool computes what the call says
        miscopied += (answer != str(a * b))
    assert abs(direct / n - 0.3) < 0.03
    assert abs(miscopied / (n - direct) - 0.2) < 0.03  # every noisy example ends wrong (call or answer miscopied)


def test_cold_start_rows_mask_the_tool_result():
    tok = build_char_tokenizer()
    eos = eos_token_id(tok)

    class One(CalcToolTask):
        def sft_segments(self, rng, label_noise):
            return "12*34=", [("<calc>12*34</calc>", True), ("<result>408</result>", False), ("408", True)]

    [(ids, labels)] = _sft_rows(tok, One(), random.Random(0), 1, 0.0)
    prompt = tok("12*34=", add_special_tokens=False).input_ids
    assert ids[-1] == eos and len(ids) == len(labels)
    text = tok.decode(ids[:-1]).replace(" ", "")
    assert text.endswith("12*34=<calc>12*34</calc><result>408</result>408")
    n_prompt, n_call, n_result, n_answer = len(ids) - 1 - 18 - 20 - 3, 18, 20, 3
    assert ids[n_prompt - len(prompt):n_prompt] == prompt
    expect = ([-100] * n_prompt + ids[n_prompt:n_prompt + n_call] + [-100] * n_result
              + ids[n_prompt + n_call + n_result:-1] + [eos])
    assert labels == expect
    assert sum(x != -100 for x in labels) == n_call + n_answer + 1
