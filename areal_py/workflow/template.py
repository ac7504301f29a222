"""Observation ids for a workflow's context: plain text, or one chat message through the model's template.

Both return ids to append to a context as they are; neither re-tokenises anything the model generated.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def text_ids(tokenizer: Any, text: str) -> list[int]:
    """`text` as ids with no special tokens added (no BOS): what goes inline after a model turn."""
    return [int(t) for t in tokenizer(text, add_special_tokens=False).input_ids]


def _render(tokenizer: Any, messages: list[dict], generation_prompt: bool) -> list[int]:
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt, tokenize=True,
                                        return_dict=False)
    if isinstance(ids, Mapping):  # a transformers that ignores return_dict
        ids = ids["input_ids"]
    return [int(t) for t in ids]


def chat_message_ids(tokenizer: Any, role: str, content: str, end_id: int) -> list[int]:
    """The ids that follow a finished assistant turn (whose last token, `end_id`, closed it) to add one
    message of `role` with `content` and open the next assistant turn, exactly as the tokenizer's chat
    template renders them.

    Rule: render a fixed two-message conversation C = [user, assistant] without and then with the new
    message (the second with the generation prompt). The template must be prefix-stable (render(C) a
    prefix of render(C + [m])); the answer is what render(C) puts after its last `end_id` (e.g. Qwen's
    newline after ``<|im_end|>``, which the model does not generate) followed by the new part. These are
    all scaffolding or observation tokens: a workflow appends them as one non-model segment.

    Raises ValueError, naming the template problem, when the template has no `end_id` after the assistant
    message or rewrites earlier messages when one is added (not prefix-stable).
    """
    convo = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]
    base = _render(tokenizer, convo, False)
    full = _render(tokenizer, [*convo, {"role": role, "content": content}], True)
    if full[:len(base)] != base:
        raise ValueError("the chat template renders earlier messages differently once a message is added (not "
                         "prefix-stable); a multi-turn context cannot be extended token-exactly with it")
    if end_id not in base:
        raise ValueError(f"the chat template's assistant message has no token {end_id} (the turn's last token): "
                         f"the turn did not end where the template closes an assistant message")
    last_end = len(base) - 1 - base[::-1].index(end_id)
    return base[last_end + 1:] + full[len(base):]
