"""The controller sends the engine exactly apply_chat_template(messages, add_generation_prompt=True) of a
chat prompt (driven in-process: admission, dispatch, the Generate messages it sends)."""
from __future__ import annotations

import json

import pytest
from conftest import net_overrides

import controller.controller as ctrl_mod
from areal_py.config import load_config
from areal_py.models import build_char_tokenizer
from areal_py.tasks.jsonl import JsonlTask
from areal_py.wire import protocol as P
from controller.controller import Controller

MESSAGES = [
    [{"role": "system", "content": "add"}, {"role": "user", "content": "1+2="}],
    [{"role": "user", "content": "what is 2+2?"}],
]


def sent_generates(tmp_path, monkeypatch, *overrides: str) -> list[P.Generate]:
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps({"prompt": m, "answer": "x"}) + "\n" for m in MESSAGES))
    cfg = load_config(None, [f"run.output_dir={tmp_path}", "run.name=c", *net_overrides(), "controller.batch_size=2",
                             "controller.group_size=2", "reward.workers=0", *overrides])
    ctrl = Controller(cfg, task=JsonlTask(data), tokenizer=build_char_tokenizer())
    sent: list = []
    monkeypatch.setattr(ctrl_mod, "send", lambda sock, body, *a, **k: sent.append(body))
    try:
        ctrl.registry.seen("a", 0)
        ctrl.rollouts.admit()
        ctrl.rollouts.dispatch()
        return [b for b in sent if isinstance(b, P.Generate)]
    finally:
        ctrl.close()


def test_the_ids_sent_to_the_engine_are_the_chat_template_of_the_messages(tmp_path, monkeypatch):
    work = sent_generates(tmp_path, monkeypatch, "task.chat_template=true")
    tok = build_char_tokenizer()
    want = [tok.apply_chat_template(m, add_generation_prompt=True, tokenize=True, return_dict=False) for m in MESSAGES]
    assert len(work) >= 2 and {tuple(g.prompt_ids) for g in work} == {tuple(w) for w in want}  # epochs repeat them
    # by hand: <bos> then the characters of the rendered turns
    assert tok.convert_ids_to_tokens(want[0]) == ["<bos>", *"<system>add</system><user>1+2=</user><assistant>"]


def test_chat_prompts_without_a_template_stop_the_controller_saying_why(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="is a list of chat messages but task.chat_template=false"):
        sent_generates(tmp_path, monkeypatch)  # arith's default: false
