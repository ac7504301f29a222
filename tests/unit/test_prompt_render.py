"""render_prompt: text and chat-message prompts, with and without a chat template, and the JSONL loading
of chat prompts; expected ids are computed by hand from the character tokenizer's vocabulary."""
from __future__ import annotations

import json

import pytest

from areal_py.config import load_config
from areal_py.models import DEFAULT_CHARSET, build_char_tokenizer
from areal_py.tasks.base import ChatMessage, Prompt
from areal_py.tasks.jsonl import JsonlTask
from areal_py.tasks.prompt_render import parse_messages, render_prompt, uses_chat_template

BOS = 1  # special tokens take ids 0..3: pad, bos, eos, unk; then DEFAULT_CHARSET in order


def char_ids(text: str) -> list[int]:
    return [4 + DEFAULT_CHARSET.index(c) for c in text]


@pytest.fixture(scope="module")
def tok():
    return build_char_tokenizer()


def test_text_prompt_without_template_is_the_plain_tokenization(tok):
    p = Prompt(0, "3+4=", "7")
    assert render_prompt(tok, p, "false") == [BOS, *char_ids("3+4=")]


def test_text_prompt_with_the_embedded_template(tok):
    p = Prompt(0, "3+4=", "7")
    want = [BOS, *char_ids("<user>3+4=</user><assistant>")]
    assert render_prompt(tok, p, "true") == want
    assert render_prompt(tok, p, "auto") == want  # auto: the tokenizer has a template
    assert render_prompt(tok, p, True) == want  # YAML's boolean
    sys = render_prompt(tok, p, "true", system_prompt="add")
    assert sys == [BOS, *char_ids("<system>add</system><user>3+4=</user><assistant>")]


def test_message_prompt_with_a_hand_written_template(tok):
    t = build_char_tokenizer()
    t.chat_template = "{% for m in messages %}{{ m.role[0] }}:{{ m.content }};{% endfor %}{% if add_generation_prompt %}a:{% endif %}"
    p = Prompt(0, "hi\n\n1+1=", "2", messages=(ChatMessage("system", "hi"), ChatMessage("user", "1+1=")))
    assert render_prompt(t, p, "auto") == char_ids("s:hi;u:1+1=;a:")


def test_auto_without_a_template_is_plain_and_true_is_an_error(tok):
    t = build_char_tokenizer()
    t.chat_template = None
    p = Prompt(3, "3+4=", "7")
    assert not uses_chat_template(t, "auto")
    assert render_prompt(t, p, "auto") == [BOS, *char_ids("3+4=")]
    with pytest.raises(ValueError, match="task.chat_template=true .* has no chat template"):
        render_prompt(t, p, "true")
    chat = Prompt(5, "1+1=", "2", messages=(ChatMessage("user", "1+1="),))
    with pytest.raises(ValueError, match="prompt 5 is a list of chat messages but the tokenizer has no chat template"):
        render_prompt(t, chat, "auto")
    with pytest.raises(ValueError, match="prompt 5 is a list of chat messages but task.chat_template=false"):
        render_prompt(tok, chat, "false")
    with pytest.raises(ValueError, match="task.system_prompt is set but task.chat_template=false"):
        render_prompt(tok, p, "false", system_prompt="be brief")


def test_system_prompt_and_the_prompts_own_system_message_conflict(tok):
    p = Prompt(9, "s\n\nq", "", messages=(ChatMessage("system", "s"), ChatMessage("user", "q")))
    with pytest.raises(ValueError, match="prompt 9 has its own system message and task.system_prompt is set"):
        render_prompt(tok, p, "true", system_prompt="other")


@pytest.mark.parametrize("value,error", [
    ("hi", "a chat prompt is a non-empty list"),
    ([], "a chat prompt is a non-empty list"),
    (["hi"], "message 0: expected an object"),
    ([{"role": "user"}], "message 0: missing key 'content'"),
    ([{"role": "user", "content": "a", "name": "x"}], "message 0: unexpected key 'name'"),
    ([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}], "message 1: role 'bot' is not one of"),
    ([{"role": "user", "content": 3}], "message 0: content must be a string, got int"),
    ([{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "the last message must be the user's"),
])
def test_bad_messages_are_rejected_naming_where(value, error):
    with pytest.raises(ValueError, match=f"^f.jsonl:4: .*{error}"):
        parse_messages(value, "f.jsonl:4")


def test_jsonl_loads_chat_prompts_and_keeps_text_prompts(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    msgs = [{"role": "system", "content": "add"}, {"role": "user", "content": "1+2="}]
    path.write_text(json.dumps({"prompt": "3+4=", "answer": 7}) + "\n" + json.dumps({"prompt": msgs, "answer": "3"}) + "\n")
    task = JsonlTask(path)
    by_answer = {p.answer: p for p in (task.prompt(i) for i in range(2))}
    assert by_answer["7"].text == "3+4=" and by_answer["7"].messages is None
    chat = by_answer["3"]
    assert chat.messages == (ChatMessage("system", "add"), ChatMessage("user", "1+2="))
    assert chat.text == "add\n\n1+2="
    assert render_prompt(tok, chat, "auto") == [BOS, *char_ids("<system>add</system><user>1+2=</user><assistant>")]


@pytest.mark.parametrize("prompt,error", [
    ([{"role": "user", "content": "a"}, {"role": "narrator", "content": "b"}], "d.jsonl:2: 'prompt': message 1: role"),
    ({"role": "user", "content": "a"}, "d.jsonl:2: 'prompt' must be a string or a list of chat messages"),
    (42, "d.jsonl:2: 'prompt' must be a string or a list of chat messages .*got int"),
])
def test_jsonl_bad_chat_prompts_name_the_line(tmp_path, prompt, error):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"prompt": "1+1=", "answer": "2"}) + "\n" + json.dumps({"prompt": prompt, "answer": "x"}) + "\n")
    with pytest.raises(ValueError, match=error):
        JsonlTask(path)


def test_config_chat_template_settings(tmp_path):
    assert load_config(None, []).task.chat_template == "false"  # arith: raw text, as its cold start
    cfg = load_config(None, ["task.chat_template=true", "task.system_prompt=add"])  # YAML true -> "true"
    assert cfg.task.chat_template == "true" and cfg.task.system_prompt == "add"
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "q", "answer": "1"}\n')
    jsonl = load_config(None, ["task.name=jsonl", f"task.path={data}", f"model.path={tmp_path}"])
    assert jsonl.task.chat_template == "auto" and jsonl.task.system_prompt is None
    with pytest.raises(Exception, match="task.chat_template"):
        load_config(None, ["task.chat_template=maybe"])
