"""docs/own-data.md stays true: its script builds the model and data, and `areal-py check` prints what it shows."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from transformers import AutoTokenizer

from areal_py.app import cli
from areal_py.models import load_tokenizer

DOC = Path(__file__).resolve().parents[2] / "docs" / "own-data.md"


def _blocks(kind: str) -> list[str]:
    return re.findall(rf"```{kind}\n(.*?)```", DOC.read_text(), flags=re.DOTALL)


def test_the_worked_example_prints_what_the_doc_shows(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    exec(compile(_blocks("python")[0], str(DOC), "exec"), {"__name__": "own_data_doc"})  # noqa: S102
    assert (tmp_path / "my-model" / "config.json").is_file()
    # The page's tokenizer is Qwen2's kind: load_tokenizer keeps what AutoTokenizer loads, with the same ids.
    loaded, auto = load_tokenizer("my-model"), AutoTokenizer.from_pretrained("my-model", local_files_only=True)
    assert type(loaded).__name__ == type(auto).__name__ == "Qwen2Tokenizer"
    questions = [json.loads(line)["question"] for line in Path("data/gsm8k-mini.jsonl").read_text().splitlines()[:-1]]
    assert [loaded(q).input_ids for q in questions] == [auto(q).input_ids for q in questions]
    command = shlex.split(_blocks("bash")[0].replace("\\\n", " "))
    assert command[:2] == ["areal-py", "check"]
    capsys.readouterr()
    assert cli.main(command[1:]) == 0
    shown, refused = _blocks("text")
    assert capsys.readouterr().out == shown
    assert cli.main([*command[1:], "rollout.max_new_tokens=200"]) == 1
    out = capsys.readouterr().out.splitlines()
    assert all(line in out for line in refused.splitlines())
