"""Tokenizer faults found before a run starts, not deep inside a role: no EOS, data the tokenizer cannot spell.

`require_eos` is called by `models.load_tokenizer`, so every process that loads a tokenizer (the
`check` command and the launch first) stops with the same message naming model.path. `unknown_token_report`
counts what a tokenizer maps to its unknown token: a character tokenizer turns every character outside its
alphabet into `<unk>`, and the model then trains on prompts it cannot read, without a word.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any


class TokenizerError(ValueError):
    """A tokenizer that cannot serve a run; the message says which setting or file to change."""


def require_eos(tokenizer: Any, path: str) -> None:
    """Raise TokenizerError unless the tokenizer has an EOS token: without one no response ever stops, the
    rollout servers and the rewards need it."""
    eos = getattr(tokenizer, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None:
        raise TokenizerError(f"the tokenizer of model.path={path} has no EOS token: set \"eos_token\" in "
                             f"{path}/tokenizer_config.json to the token that ends the model's turn (e.g. "
                             f"\"<|im_end|>\" for Qwen2, \"</s>\" for Llama/Mistral), or point model.path at a "
                             f"directory whose tokenizer has one")


@dataclass(frozen=True)
class UnknownTokenReport:
    """What a tokenizer maps to its unknown token over some texts.

    `unknown_tokens / total_tokens` is `rate`; `unknown_chars` are the characters under those tokens, most
    frequent first, with their counts (empty when the tokenizer cannot give offsets); `texts_affected`
    counts the texts with at least one. A tokenizer with no unknown token (byte-level BPE) never has any."""

    texts: int
    texts_affected: int
    total_tokens: int
    unknown_tokens: int
    unknown_chars: tuple[tuple[str, int], ...]
    unk_token: str | None

    @property
    def rate(self) -> float:
        return self.unknown_tokens / self.total_tokens if self.total_tokens else 0.0

    def message(self, shown: int = 20) -> str:
        """One line for people: the count, rate, affected texts and the characters (the first `shown`)."""
        if not self.unknown_tokens:
            return f"unknown tokens: none in {self.total_tokens} tokens of {self.texts} texts"
        chars = ", ".join(f"{c!r} x{n}" for c, n in self.unknown_chars[:shown])
        more = f", ... {len(self.unknown_chars) - shown} more" if len(self.unknown_chars) > shown else ""
        return (f"unknown tokens: {self.unknown_tokens} of {self.total_tokens} tokens ({self.rate:.2%}) are "
                f"{self.unk_token} in {self.texts_affected} of {self.texts} texts"
                + (f"; characters the tokenizer cannot spell: {chars}{more}" if chars else ""))


def unknown_token_report(tokenizer: Any, texts: Iterable[str]) -> UnknownTokenReport:
    """Tokenize each text (no special tokens added) and count the ids equal to `tokenizer.unk_token_id`,
    recovering the characters behind them from the offset mapping of a fast tokenizer."""
    unk = getattr(tokenizer, "unk_token_id", None)
    fast = bool(getattr(tokenizer, "is_fast", False))
    n = affected = total = unknown = 0
    chars: Counter[str] = Counter()
    for text in texts:
        n += 1
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=fast)
        ids = list(enc["input_ids"])
        total += len(ids)
        hits = [i for i, t in enumerate(ids) if unk is not None and t == unk]
        if not hits:
            continue
        affected += 1
        unknown += len(hits)
        if fast:
            for i in hits:
                start, end = enc["offset_mapping"][i]
                chars.update(text[start:end])
    return UnknownTokenReport(texts=n, texts_affected=affected, total_tokens=total, unknown_tokens=unknown,
                              unknown_chars=tuple(sorted(chars.items(), key=lambda kv: (-kv[1], kv[0]))),
                              unk_token=getattr(tokenizer, "unk_token", None))
