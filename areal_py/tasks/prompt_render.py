"""Turning a task's prompt into the token ids the engine generates from: one function for every path.

`render_prompt` is the only place a prompt becomes ids (the controller's admission and length gate,
the `check` command, the embedded model's cold start), so what is checked is what is sent.

The rule, by `task.chat_template`:

- ``false``: never a template. A text prompt is ``tokenizer(text).input_ids`` (special tokens as the
  tokenizer adds them, e.g. BOS); a chat-message prompt or a `task.system_prompt` is an error, since
  neither has a plain-text form the model was trained on.
- ``auto``: the template when the tokenizer has one (``tokenizer.chat_template``), else as ``false``.
- ``true``: the template, required; a tokenizer without one is an error naming the setting.

With a template the messages are ``[system?] + prompt.messages`` (a text prompt is one user message)
and the ids are ``tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)``,
the template adding whatever BOS and turn markers the model expects. `task.system_prompt` is refused
on a prompt that carries its own system message: one of the two would be dropped.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from areal_py.tasks.base import ChatMessage, ChatTemplateMode, Prompt

CHAT_TEMPLATE_MODES: tuple[str, ...] = ("auto", "true", "false")
ROLES = ("system", "user", "assistant")


def chat_template_mode(value: Any) -> ChatTemplateMode:
    """`value` as one of auto|true|false; YAML's booleans (``chat_template: true``) count as their words."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and value.strip().lower() in CHAT_TEMPLATE_MODES:
        return value.strip().lower()  # type: ignore[return-value]
    raise ValueError(f"task.chat_template must be one of auto, true, false; got {value!r}")


def has_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer carries a chat template of its own."""
    return bool(getattr(tokenizer, "chat_template", None))


def uses_chat_template(tokenizer: Any, chat_template: str | bool = "auto") -> bool:
    """Whether `render_prompt` renders through the template: ``true``, or ``auto`` with a template at hand.

    Raises ValueError for ``true`` on a tokenizer without a template (naming task.chat_template)."""
    mode = chat_template_mode(chat_template)
    if mode == "false":
        return False
    if has_chat_template(tokenizer):
        return True
    if mode == "true":
        raise ValueError(f"task.chat_template=true but the tokenizer ({type(tokenizer).__name__}, "
                         f"{getattr(tokenizer, 'name_or_path', '') or 'no path'}) has no chat template: set "
                         f"task.chat_template=auto or false, or use a model directory whose tokenizer_config.json "
                         f"has a `chat_template`")
    return False


def parse_messages(value: Any, where: str) -> tuple[ChatMessage, ...]:
    """A chat-message prompt, validated: a non-empty list of ``{"role", "content"}`` objects, role one of
    system/user/assistant, content a string, ending with a user message (the turn the model answers).

    Errors start with `where` (e.g. ``"data.jsonl:7"``) and name the message and what is wrong; a key
    other than role and content is an error too (it would otherwise be dropped unseen)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"{where}: a chat prompt is a non-empty list of {{\"role\", \"content\"}} objects, "
                         f"got {type(value).__name__}")
    messages = []
    for i, m in enumerate(value):
        at = f"{where}: message {i}"
        if not isinstance(m, Mapping):
            raise ValueError(f"{at}: expected an object with \"role\" and \"content\", got {type(m).__name__}")
        missing = [k for k in ("role", "content") if k not in m]
        if missing:
            raise ValueError(f"{at}: missing key {missing[0]!r}")
        extra = sorted(set(m) - {"role", "content"})
        if extra:
            raise ValueError(f"{at}: unexpected key {extra[0]!r} (a message has only \"role\" and \"content\")")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise ValueError(f"{at}: role {role!r} is not one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"{at}: content must be a string, got {type(content).__name__}")
        messages.append(ChatMessage(role, content))
    if messages[-1].role != "user":
        raise ValueError(f"{where}: the last message must be the user's (the turn the model answers), "
                         f"got {messages[-1].role!r}")
    return tuple(messages)


def messages_text(messages: Sequence[ChatMessage]) -> str:
    """A chat prompt's plain text for text-only consumers (reward model, logs): contents joined by blank lines."""
    return "\n\n".join(m.content for m in messages)


def prompt_format(chat_template: str | bool = "false", system_prompt: str | None = None) -> dict:
    """What of the rendering shapes a model trained on rendered prompts (the embedded cold start's cache
    key): empty for plain text (``false``), so keys of raw-text models stay as they were."""
    mode = chat_template_mode(chat_template)
    return {} if mode == "false" else {"chat_template": mode, "system_prompt": system_prompt or None}


def render_prompt(tokenizer: Any, prompt: Prompt, chat_template: str = "auto",
                  system_prompt: str | None = None) -> list[int]:
    """The token ids of `prompt` as the engine receives them (the rule: this module's docstring).

    Raises ValueError naming the prompt index and the setting to change when the prompt cannot be
    rendered under `chat_template` (a chat prompt or system prompt without a template, a system prompt
    on a prompt with its own, ``true`` without a template)."""
    if uses_chat_template(tokenizer, chat_template):
        messages = list(prompt.messages) if prompt.messages else [ChatMessage("user", prompt.text)]
        if system_prompt:
            if any(m.role == "system" for m in messages):
                raise ValueError(f"prompt {prompt.index} has its own system message and task.system_prompt is set: "
                                 f"unset task.system_prompt or remove the prompt's system message")
            messages.insert(0, ChatMessage("system", system_prompt))
        ids = tokenizer.apply_chat_template([{"role": m.role, "content": m.content} for m in messages],
                                            add_generation_prompt=True, tokenize=True, return_dict=False)
        if isinstance(ids, Mapping):  # a transformers that ignores return_dict
            ids = ids["input_ids"]
        return [int(t) for t in ids]
    mode = chat_template_mode(chat_template)
    why = "task.chat_template=false" if mode == "false" else "the tokenizer has no chat template"
    if prompt.messages:
        raise ValueError(f"prompt {prompt.index} is a list of chat messages but {why}: set task.chat_template=auto "
                         f"or true with a tokenizer that has a template, or give the prompt as text")
    if system_prompt:
        raise ValueError(f"task.system_prompt is set but {why}, so it has nowhere to go: unset task.system_prompt "
                         f"or use a tokenizer with a chat template (task.chat_template=auto or true)")
    return list(tokenizer(prompt.text).input_ids)
