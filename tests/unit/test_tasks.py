"""Tasks: deterministic prompts, exact-match and math-verify rewards."""

import json
import threading
from pathlib import Path

import math_verify
import pytest

from areal_py.tasks.base import ArithTask, JsonlTask, Prompt, Task, make_task


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
    p = make_task("jsonl", path=path, prompt_key="q", answer_key="a").prompt(0)
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
        ("\\boxed{4}", "4", 1.0),
        ("4", "so the answer is \\boxed{4}", 1.0),
        ("0.5", "1/2", 1.0),
        ("1/2", "$\\frac{1}{2}$", 1.0),
        ("4", "5", 0.0),
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
    worker = threading.Thread(target=lambda: out.append(task.reward(task.prompt(0), "0.5", True)))
    worker.start()
    worker.join()
    assert out == [1.0]


def test_jsonl_reward_verifier_exception_is_zero(tmp_path: Path, monkeypatch) -> None:
    task = JsonlTask(_write(tmp_path / "d.jsonl", [json.dumps({"prompt": "p", "answer": "4"})]))

    def boom(*args, **kwargs):
        raise RuntimeError("verifier crashed")

    monkeypatch.setattr(math_verify, "verify", boom)
    assert task.reward(task.prompt(0), "4", stopped=True) == 0.0


def test_make_task() -> None:
    task = make_task("arith", max_operand=5)
    assert isinstance(task, ArithTask) and task.max_operand == 5
    with pytest.raises(ValueError, match=r"'arith'.*'jsonl'"):
        make_task("gsm8k")
