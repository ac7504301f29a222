"""The data check (`areal-py check`, and `areal-py run` refusing before anything starts): counts by hand."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from areal_py.app import cli
from areal_py.app.check import DataRefused, check_config, enforce
from areal_py.app.data_check import RenderedPrompt, build_report, format_report, refusal
from areal_py.config import load_config
from areal_py.model_dir import fits_context, fits_full_response
from areal_py.models import EmbeddedModelSpec, create_embedded_model
from areal_py.tasks.jsonl import BadLine, JsonlTask

# GSM8K-style word problems: with the embedded 64-token character model each is far too long.
LONG = [
    ("Natalia sold clips to 48 of her friends in april, and then she sold half as many clips in may. how many "
     "clips did natalia sell altogether in april and may?"),
    ("weng earns 12 dollars an hour for babysitting. yesterday, she just did 50 minutes of babysitting. how "
     "much did she earn?"),
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    """The embedded model's shape (64-token context, character tokenizer), random weights: no cold start."""
    return create_embedded_model(tmp_path_factory.mktemp("emb64"), EmbeddedModelSpec())


def _jsonl(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def _rec(prompt: str, answer: str = "1") -> str:
    return json.dumps({"prompt": prompt, "answer": answer})


def _ids(n: int, start: int = 10) -> tuple[int, ...]:
    return tuple(range(start, start + n))


def test_length_rules() -> None:
    # context 10: the engine needs room for one new token; a full response of 3 needs 3
    assert fits_context(9, 10) and not fits_context(10, 10) and fits_context(10**6, None)
    assert fits_full_response(7, 10, 3) and not fits_full_response(8, 10, 3) and fits_full_response(99, None, 3)


def test_report_counts_each_prompt_once_by_hand() -> None:
    unk = 0
    prompts = [
        RenderedPrompt("d:1", "1", _ids(7)),  # 7 + 3 = 10: fits exactly
        RenderedPrompt("d:2", "2", _ids(8)),  # fits the context, 2 tokens of room < 3: cut short
        RenderedPrompt("d:3", "3", _ids(10)),  # no room at all: the controller skips it
        RenderedPrompt("d:4", "", _ids(4)),  # empty answer (counted there only)
        RenderedPrompt("d:5", "5", None, "no template"),
        RenderedPrompt("d:6", "6", _ids(7)),  # same ids as d:1
        RenderedPrompt("d:7", "7", (unk, unk, 5)),  # two unknown tokens
    ]
    r = build_report("d", prompts, context=10, max_new_tokens=3, max_bad_fraction=0.5,
                     malformed=["d:8: invalid JSON"], missing_keys=["d:9: missing key 'answer'"], unk_id=unk)
    assert r.total == 9 and r.prompts == 7
    assert (len(r.malformed), len(r.missing_keys), len(r.unrenderable), len(r.empty_answers)) == (1, 1, 1, 1)
    assert r.no_room == ("d:3: 10 tokens",) and r.cut_short == ("d:2: 8 tokens",) and r.too_long == 2
    assert r.bad == 6 and r.usable == 3 and r.bad_fraction == pytest.approx(6 / 9)
    assert r.duplicates == ("d:6: same as d:1",)
    assert (r.unknown_tokens, r.prompt_tokens) == (2, 7 + 8 + 10 + 4 + 7 + 3)
    assert r.prompts_with_unknown == ("d:7: 2 unknown",)
    assert r.token_range == (3, 10) and r.max_prompt_tokens == 7
    assert r.refused  # 6/9 > 0.5
    why = refusal(r)
    assert "6 of 9 lines/prompts (66.7%)" in why and "task.max_bad_fraction to at least 0.667" in why
    assert "rollout.max_new_tokens=3, so at most 7 fit" in why
    assert "d:8: invalid JSON" in format_report(r)


def test_report_under_the_threshold_starts_and_says_what_it_skips() -> None:
    prompts = [RenderedPrompt(f"d:{i}", "1", _ids(5)) for i in range(9)] + [RenderedPrompt("d:9", "1", _ids(12))]
    r = build_report("d", prompts, context=10, max_new_tokens=3, max_bad_fraction=0.1)
    assert (r.usable, r.bad, r.refused, refusal(r)) == (10 - 1, 1, False, None)
    assert "1 prompt(s) too long for the context are skipped by the controller" in enforce(r)
    nothing = build_report("d", prompts[-1:], context=10, max_new_tokens=3, max_bad_fraction=1.0)
    assert nothing.refused and refusal(nothing).startswith("no usable prompt in 1:")


def test_jsonl_collects_every_bad_line_with_its_number(tmp_path: Path) -> None:
    path = _jsonl(tmp_path / "d.jsonl", [_rec("a"), "{oops", _rec("b"), "", "[1, 2]",
                                         json.dumps({"prompt": "c"}), _rec("d")])
    with pytest.raises(ValueError) as e:  # strict (direct construction): every bad line, not the first
        JsonlTask(path)
    assert "3 bad line(s) of 6 non-empty" in str(e.value)
    assert all(f"d.jsonl:{n}:" in str(e.value) for n in (2, 5, 6))
    task = JsonlTask(path, strict=False)  # as the config builds it
    assert [(b.line, b.kind) for b in task.bad_lines] == [(2, "malformed"), (5, "malformed"), (6, "missing_key")]
    assert task.bad_lines[2] == BadLine(6, "missing_key", f"{path}:6: missing key 'answer'")
    assert task.line_numbers == [1, 3, 7] and [task.record(i).text for i in range(3)] == ["a", "b", "d"]
    with pytest.raises(ValueError, match=r"no records; .*2 bad line\(s\) of 2"):
        JsonlTask(_jsonl(tmp_path / "e.jsonl", ["{", "[]"]), strict=False)


def _cfg(tiny_model: Path, data: Path, *extra: str):
    return load_config(None, ["task.name=jsonl", f"task.path={data}", f"model.path={tiny_model}", *extra])


def test_check_on_the_64_token_model_counts_long_duplicate_and_bad_lines(tiny_model: Path, tmp_path: Path) -> None:
    data = _jsonl(tmp_path / "gsm.jsonl", [_rec(LONG[0], "72"), _rec("1+2=", "3"), "not json", _rec(LONG[1], "10"),
                                           json.dumps({"question": "x", "answer": "1"}), _rec("1+2=", "3")])
    r = check_config(_cfg(tiny_model, data))
    assert r.context == 64 and r.max_new_tokens == 5
    assert r.total == 6 and r.usable == 2 and r.duplicates == (f"{data}:6: same as {data}:2",)
    assert [m.split(": ")[0] for m in r.no_room] == [f"{data}:1", f"{data}:4"]
    assert r.malformed == (f"{data}:3: invalid JSON: Expecting value",)
    assert r.missing_keys == (f"{data}:5: missing key 'prompt'",)
    assert r.unknown_tokens == 1 and r.prompts_with_unknown == (f"{data}:1: 1 unknown",)  # the capital N
    assert r.refused
    relaxed = check_config(_cfg(tiny_model, data, "task.max_bad_fraction=0.7"))
    assert not relaxed.refused


def test_check_and_run_refuse_when_every_prompt_is_too_long(tiny_model: Path, tmp_path: Path, capsys) -> None:
    data = _jsonl(tmp_path / "gsm.jsonl", [_rec(p, "1") for p in LONG])
    args = ["task.name=jsonl", f"task.path={data}", f"model.path={tiny_model}", "task.max_bad_fraction=1",
            f"run.output_dir={tmp_path / 'runs'}"]
    assert cli.main(["check", *args]) == 1
    out = capsys.readouterr()
    assert "verdict: refused: no usable prompt in 2" in out.out and "would refuse to start" in out.err
    assert cli.main(["run", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("areal-py: refusing to start: no usable prompt in 2: 2 prompt(s) leave no room")
    assert "use a model with a longer context" in err and "Traceback" not in err
    assert not (tmp_path / "runs").exists()  # refused before the run directory was made
    with pytest.raises(DataRefused):
        enforce(check_config(load_config(None, args)))


def test_check_exit_codes(tiny_model: Path, tmp_path: Path, capsys) -> None:
    data = _jsonl(tmp_path / "ok.jsonl", [_rec("1+2=", "3"), _rec("2+2=", "4")])
    assert cli.main(["check", "task.name=jsonl", f"task.path={data}", f"model.path={tiny_model}"]) == 0
    assert "verdict: the run may start; nothing is skipped" in capsys.readouterr().out
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    assert cli.main(["check", "task.name=jsonl", f"task.path={data}", f"model.path={not_a_model}"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no config.json" in err and f"model.path={not_a_model}" in err


def test_jsonl_without_model_path_is_one_clear_line(tmp_path: Path, capsys) -> None:
    data = _jsonl(tmp_path / "ok.jsonl", [_rec("1+2=", "3")])
    for command in ("check", "run"):
        assert cli.main([command, "task.name=jsonl", f"task.path={data}", f"run.output_dir={tmp_path}"]) == 2
        err = capsys.readouterr().err
        assert "Traceback" not in err
        assert "task.name=jsonl needs model.path" in err and len(err.strip().splitlines()) == 2  # header + reason


def test_bad_lines_past_the_threshold_refuse_before_the_model_is_loaded(tmp_path: Path, capsys) -> None:
    data = _jsonl(tmp_path / "d.jsonl", [_rec("1+2=", "3"), "{oops", "[]", _rec("2+2=", "4")])
    not_a_model = tmp_path / "empty"  # never read: the data refuses the run first
    not_a_model.mkdir()
    args = ["task.name=jsonl", f"task.path={data}", f"model.path={not_a_model}", f"run.output_dir={tmp_path / 'runs'}"]
    assert cli.main(["run", *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"areal-py: task.path: {data}: 2 bad line(s) of 4 non-empty:\n  {data}:2: invalid JSON")
    assert f"{data}:3: expected a JSON object" in err and "at least 0.5 to skip them" in err
    assert "model.path" not in err and not (tmp_path / "runs").exists()
