"""Tasks: deterministic prompts, exact-match and math-verify rewards, the registry."""

import json
import sys
import threading
from pathlib import Path

import math_verify
import pytest

import areal_py.tasks
from areal_py.config import ConfigError, dump_config, load_config
from areal_py.model_dir import embedded_model_request, task_identity
from areal_py.rewards.functions import build_reward_fn, task_from_recipe, task_recipe
from areal_py.tasks import base
from areal_py.tasks.arith import ArithConfig, ArithTask
from areal_py.tasks.base import (
    Prompt,
    Task,
    UnknownTask,
    build_task,
    recipe_of,
    register_task,
    task_names,
    task_spec,
)
from areal_py.tasks.jsonl import JsonlConfig, JsonlTask


def test_arith_prompts_are_deterministic() -> None:
    a, b = ArithTask(seed=3), ArithTask(seed=3)
    assert [a.prompt(i) for i in range(50)] == [b.prompt(i) for i in range(50)]
    assert [a.prompt(i) for i in range(50)] != [ArithTask(seed=4).prompt(i) for i in range(50)]
    p = a.prompt(7)
    assert p.index == 7
    x, y = p.text.removesuffix("=").split("+")
    assert p.answer == str(int(x) + int(y))
    assert all(0 <= int(v) <= 9 for v in (x, y))
    assert isinstance(a, Task)


def test_arith_operand_range() -> None:
    task = ArithTask(10, 12)
    ops = {v for i in range(200) for v in task.operands(i)}
    assert ops == {10, 11, 12}
    with pytest.raises(ValueError):
        ArithTask(5, 4)


def test_arith_reward_exact_match() -> None:
    task = ArithTask()
    p = Prompt(index=0, text="3+4=", answer="7")
    assert task.reward(p, "7", stopped=True) == 1.0
    assert task.reward(p, "7", stopped=False) == 0.0  # missing EOS
    assert task.reward(p, "77", stopped=True) == 0.0  # extra characters
    assert task.reward(p, "7 ", stopped=True) == 0.0
    assert task.reward(p, " 7", stopped=True) == 0.0  # leading space
    assert task.reward(p, "", stopped=True) == 0.0
    assert task.reward(p, "8", stopped=True) == 0.0


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_jsonl_task_cycles_epochs_with_shuffle(tmp_path: Path) -> None:
    recs = [json.dumps({"prompt": f"q{i}", "answer": str(i)}) for i in range(20)]
    task = JsonlTask(_write(tmp_path / "d.jsonl", recs + [""]), seed=1)
    assert len(task) == 20
    epoch0 = [task.prompt(i).text for i in range(20)]
    epoch1 = [task.prompt(i).text for i in range(20, 40)]
    assert sorted(epoch0) == sorted(epoch1) == sorted(f"q{i}" for i in range(20))
    assert epoch0 != epoch1
    again = JsonlTask(tmp_path / "d.jsonl", seed=1)
    assert [again.prompt(i) for i in range(45)] == [task.prompt(i) for i in range(45)]
    assert task.prompt(41).index == 41


def test_jsonl_custom_keys(tmp_path: Path) -> None:
    path = _write(tmp_path / "d.jsonl", [json.dumps({"q": "1+1?", "a": 2})])
    p = build_task(JsonlConfig(path=str(path), prompt_key="q", answer_key="a")).prompt(0)
    assert (p.text, p.answer) == ("1+1?", "2")


def test_jsonl_errors_name_file_and_line(tmp_path: Path) -> None:
    good = json.dumps({"prompt": "p", "answer": "1"})
    bad_json = _write(tmp_path / "bad.jsonl", [good, "{not json"])
    with pytest.raises(ValueError, match=r"bad\.jsonl:2: invalid JSON"):
        JsonlTask(bad_json)
    missing = _write(tmp_path / "missing.jsonl", [good, good, json.dumps({"prompt": "p"})])
    with pytest.raises(ValueError, match=r"missing\.jsonl:3: missing key 'answer'"):
        JsonlTask(missing)
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        JsonlTask(tmp_path / "nope.jsonl")


def test_jsonl_non_utf8_byte_names_file_line_and_column(tmp_path: Path) -> None:
    good = json.dumps({"prompt": "p", "answer": "1"}).encode()
    # line 3 is '{"pro' + 0xff + ...: the bad byte is its 6th character; "é" before it on
    # line 2 is valid UTF-8 (2 bytes) and must not shift the count; \r\n counts as one break
    path = tmp_path / "data.jsonl"
    path.write_bytes(good + b"\r\n" + '{"prompt": "é", "answer": "2"}'.encode() + b"\n"
                     + b'{"pro\xffmpt": "p", "answer": "3"}\n')
    with pytest.raises(ValueError, match=r"data\.jsonl:3: not valid UTF-8 \(byte 0xff at column 6\)"):
        JsonlTask(path)
    path.write_bytes(b"caf\xe9\n")                 # Latin-1, line 1
    with pytest.raises(ValueError, match=r"data\.jsonl:1: not valid UTF-8 \(byte 0xe9 at column 4\)"):
        JsonlTask(path)


@pytest.mark.parametrize(
    ("gold", "response", "expected"),
    [
        ("\\boxed{4}", "<answer>4</answer>", 1.0),
        ("4", "so the answer is \\boxed{4}", 1.0),
        ("0.5", "#### 1/2", 1.0),
        ("1/2", "\\boxed{\\frac{1}{2}}", 1.0),
        ("4", "\\boxed{5}", 0.0),
        ("4", "4", 0.0),  # strict: no answer in a form (tests/unit/test_answer_extraction.py has the rules)
        ("4", "<think>\\boxed{4}</think>\\boxed{5}", 0.0),  # the think block is never graded
        ("4", "", 0.0),
    ],
)
def test_jsonl_reward_math_verify(tmp_path: Path, gold: str, response: str, expected: float) -> None:
    task = JsonlTask(_write(tmp_path / "d.jsonl", [json.dumps({"prompt": "p", "answer": gold})]))
    assert task.reward(task.prompt(0), response, stopped=True) == expected


def test_jsonl_reward_works_in_worker_thread(tmp_path: Path) -> None:
    """math-verify's signal timeouts would raise off the main thread; ours disables them there."""
    task = JsonlTask(_write(tmp_path / "d.jsonl", [json.dumps({"prompt": "p", "answer": "1/2"})]))
    out: list[float] = []
    worker = threading.Thread(target=lambda: out.append(task.reward(task.prompt(0), "\\boxed{0.5}", True)))
    worker.start()
    worker.join()
    assert out == [1.0]


def test_jsonl_reward_verifier_exception_is_zero(tmp_path: Path, monkeypatch) -> None:
    task = JsonlTask(_write(tmp_path / "d.jsonl", [json.dumps({"prompt": "p", "answer": "4"})]))

    def boom(*args, **kwargs):
        raise RuntimeError("verifier crashed")

    assert task.reward(task.prompt(0), "\\boxed{4}", stopped=True) == 1.0
    monkeypatch.setattr(math_verify, "verify", boom)
    assert task.reward(task.prompt(0), "\\boxed{4}", stopped=True) == 0.0


def test_build_task_by_name() -> None:
    task = build_task(ArithConfig(max_operand=5), seed=2)
    assert isinstance(task, ArithTask) and (task.max_operand, task.seed) == (5, 2)
    with pytest.raises(UnknownTask, match=r"'arith'.*'jsonl'"):
        task_spec("gsm8k")
    cfg = load_config(None, ["task.max_operand=5", "run.seed=4"])
    assert task_identity(build_task(cfg)) == task_identity(ArithTask(0, 5, seed=4))  # seed: run.seed
    assert build_task(cfg, seed=1).seed == 1


def test_every_registered_task_is_rebuilt_equal_from_its_recipe(tmp_path: Path) -> None:
    """Reward workers rebuild the controller's task from `recipe_of`: it must invert `build`."""
    data = _write(tmp_path / "d.jsonl", [json.dumps({"prompt": "p", "answer": "1"})])
    assert {"arith", "jsonl", "sum_cot"} <= set(task_names())
    for name in task_names():
        config = task_spec(name).config.model_validate({"name": name, **({"path": str(data)} if name == "jsonl" else {})})
        task = build_task(config, seed=7)
        again = build_task(recipe_of(task).config, recipe_of(task).seed)
        assert type(again) is type(task) and task_identity(again) == task_identity(task)
        assert again.prompt(3) == task.prompt(3)


def test_a_task_registered_twice_by_two_modules_is_refused(monkeypatch) -> None:
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))
    impostor = type("ArithConfig", (ArithConfig,), {"__module__": "somewhere.else"})
    with pytest.raises(ValueError, match="registered twice"):
        register_task(impostor, lambda c, seed: ArithTask(), lambda t: recipe_of(t))


def test_the_default_configs_cache_key_is_unchanged() -> None:
    """The embedded model's cache directory is named by this key: a change orphans every cached model."""
    request = embedded_model_request(load_config(None))
    assert request.settings.task == {"name": "arith", "min_operand": 0, "max_operand": 9, "seed": 0}
    assert request.settings.key() == "5ae0e4ea2bc1c60c"


NEW_TASK = """
from typing import Literal

from pydantic import Field

from areal_py.tasks.base import Prompt, RunLimits, TaskConfig, TaskRecipe, register_task


class EchoConfig(TaskConfig):
    name: Literal["echo_tmp"] = Field("echo_tmp", description="echo_tmp: repeat a numbered word.")
    word: str = Field("hi", description="echo_tmp: the word.")

    def check(self, limits: RunLimits) -> None:
        if len(self.word) + 3 > limits.max_new_tokens:
            raise ValueError("rollout.max_new_tokens is too small for task.word")


class EchoTask:
    name = "echo_tmp"

    def __init__(self, word: str, seed: int) -> None:
        self.word, self.seed = word, seed

    def prompt(self, index: int) -> Prompt:
        return Prompt(index=index, text=f"say {self.word}{index}:", answer=f"{self.word}{index}")

    def reward(self, prompt: Prompt, response_text: str, stopped: bool) -> float:
        return 1.0 if stopped and response_text == prompt.answer else 0.0


register_task(EchoConfig, lambda c, seed: EchoTask(c.word, seed), lambda t: TaskRecipe(EchoConfig(word=t.word), t.seed))
"""


def test_a_new_task_is_one_file(tmp_path: Path, monkeypatch) -> None:
    """Dropping one module into the task package makes the task configurable, buildable and scorable."""
    (tmp_path / "echo_tmp.py").write_text(NEW_TASK)
    monkeypatch.setattr(areal_py.tasks, "__path__", [*areal_py.tasks.__path__, str(tmp_path)])
    monkeypatch.setattr(base, "_REGISTRY", dict(base._REGISTRY))  # forgets the task afterwards
    try:
        cfg = load_config(None, ["task.name=echo_tmp", "task.word=yo", "run.seed=3"])
        assert "echo_tmp" in task_names() and cfg.task.word == "yo"
        task = build_task(cfg)
        assert isinstance(task, Task) and task.seed == 3
        p = task.prompt(4)
        assert (p.text, p.answer) == ("say yo4:", "yo4")
        reward = build_reward_fn({"accuracy": 1.0}, task)
        assert reward(p, "yo4", True) == 1.0 and reward(p, "yo5", True) == 0.0
        again = task_from_recipe(task_recipe(task))
        assert (again.word, again.seed, again.prompt(4)) == ("yo", 3, p)
        dump_config(cfg, tmp_path / "run" / "config.yaml")
        assert load_config(tmp_path / "run" / "config.yaml") == cfg
        with pytest.raises(ConfigError, match="too small for task.word"):  # its own config check runs
            load_config(None, ["task.name=echo_tmp", "task.word=yo", "rollout.max_new_tokens=2"])
        with pytest.raises(ConfigError, match=r"unknown key 'task.max_operand' for task.name=echo_tmp; "
                                              r"allowed here: name, chat_template, system_prompt, max_bad_fraction, word"):
            load_config(None, ["task.name=echo_tmp", "task.max_operand=3"])
    finally:
        sys.modules.pop(f"{areal_py.tasks.__name__}.echo_tmp", None)



def test_a_config_dumped_before_tasks_owned_their_config_still_loads(tmp_path) -> None:
    """Old run folders hold every task's fields, at their defaults; a foreign key with its own value is an error."""
    from areal_py.config import ConfigError, load_config

    old = tmp_path / "config.yaml"
    old.write_text("task:\n  name: arith\n  min_operand: 2\n  max_operand: 9\n  min_terms: 3\n  max_terms: 120\n"
                   "  tail_alpha: 1.1\n  sft_max_terms: 0\n  sft_tail_alpha: 0.0\n  path: ''\n"
                   "  prompt_key: prompt\n  answer_key: answer\n")
    cfg = load_config(str(old))
    assert cfg.task.name == "arith" and cfg.task.min_operand == 2
    assert "max_terms" not in cfg.task.model_dump()
    with pytest.raises(ConfigError, match="max_terms"):
        load_config(None, ["task.max_terms=40"])
