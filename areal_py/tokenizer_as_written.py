"""The tokenizer a model directory wrote, not one transformers rebuilt from its vocabulary.

transformers 5 picks the tokenizer class from the model's architecture for some model types, whatever
`tokenizer_config.json` declares (for `qwen2` always `Qwen2Tokenizer`), and a family class with its own
`__init__` (Qwen2Tokenizer, LlamaTokenizer, BertTokenizer, ...) keeps only the vocabulary, merges and
post-processor of `tokenizer.json` and puts its own normalizer, pre-tokenizer, model and decoder around them.
A WordPiece vocabulary in a Qwen2 directory then becomes a byte-level BPE without merges (one token per
character), a GPT-2-style byte-level BPE loses its merges across a space and a digit; nothing says so.

`tokenizer.json` is the whole pipeline the tokenizer was made with, so it is the reference: the loaded
tokenizer must encode and decode the probe texts exactly as the file does, without special tokens (where
BOS/EOS go is the business of `tokenizer_config.json`, as it always was). When it does, it is kept as
loaded (every correct tokenizer loads exactly as before). When it does not, the file is loaded as written
(`PreTrainedTokenizerFast`, with the special tokens and chat template of `tokenizer_config.json`) and a
warning says what the rebuild would have done. Without `tokenizer.json` nothing settles which class
describes the files, so a declared family class other than the loaded one is refused (TokenizerError).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from areal_py.tokenizer_checks import TokenizerError

log = logging.getLogger(__name__)

GENERIC_CLASSES = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast", "PreTrainedTokenizer",
                             "PythonBackend"})
"""Class names that load tokenizer files as they are instead of rebuilding a family's pipeline."""

PROBES: tuple[str, ...] = (
    "The cats sat on the mat. It's 12 o'clock, isn't it? They're here; we'll see.",
    "Natalia sold 48 clips in April and 1234567 in May: $100.50 in total (2.5 hours), 3/4 = 0.75.",
    "  two  spaces,\ttab\nnew line\r\n\n   indented\n",
    "Café naïve résumé – ÜBER straße, ÉCOLE",
    "数学问题 1+1=2 × ÷ √ π ≈ 3.14159 ∑ αβγ",
    "emoji 🙂👍 <answer>42</answer> #### 42 \\boxed{7} {\"key\": [1, 2]}",
)
"""Texts every tokenizer of a language model should encode the same way as its tokenizer.json: words with
capitals and contractions, numbers of several lengths, runs of whitespace, accents, CJK, symbols, emoji."""


@dataclass(frozen=True)
class Rebuilt:
    """How a loaded tokenizer differs from its tokenizer.json: the first probe text it encodes (or decodes)
    differently, both token sequences, and both model types (`BPE`, `WordPiece`, `Unigram`, `WordLevel`)."""

    text: str
    loaded_tokens: tuple[str, ...]
    written_tokens: tuple[str, ...]
    loaded_model: str
    written_model: str
    decoded: str | None = None
    """Set when the ids agree and the decoding differs: the loaded tokenizer's text for the written ids."""

    def describe(self) -> str:
        """One line: the model types and the probe text, with both token sequences from just before where they
        first part (at most 10 tokens each)."""
        start = next((i for i, (a, b) in enumerate(zip(self.loaded_tokens, self.written_tokens)) if a != b),
                     min(len(self.loaded_tokens), len(self.written_tokens)))
        start = max(0, start - 2)

        def shown(tokens: tuple[str, ...]) -> str:
            window = tokens[start:start + 10]
            return ("[" + ("..., " if start else "") + ", ".join(repr(t) for t in window)
                    + (", ...]" if start + 10 < len(tokens) else "]"))

        head = (f"{self.written_model} in tokenizer.json, {self.loaded_model} as loaded"
                if self.loaded_model != self.written_model else f"both {self.written_model}")
        if self.loaded_tokens == self.written_tokens and self.decoded is None:
            return f"{head} (the probe texts encode alike)"
        if self.decoded is not None:
            return f"{head}; the ids of {self.text!r} decode as {self.decoded!r}"
        return (f"{head}; {self.text!r} becomes {len(self.loaded_tokens)} tokens {shown(self.loaded_tokens)} "
                f"instead of {len(self.written_tokens)} {shown(self.written_tokens)}")


def model_type(tokenizer: Tokenizer) -> str:
    """The `tokenizers` model behind a tokenizer: BPE, WordPiece, Unigram or WordLevel."""
    return type(tokenizer.model).__name__


def first_difference(loaded: Tokenizer, written: Tokenizer, probes: tuple[str, ...] = PROBES) -> Rebuilt | None:
    """The first probe on which `loaded` disagrees with `written`, or None when they agree on all.

    They agree on a text when `loaded.encode(text).ids == written.encode(text).ids` (no special tokens added)
    and `loaded.decode(ids) == written.decode(ids)` for those ids; a different model type is a difference even
    where no probe shows one."""
    for text in probes:
        a = loaded.encode(text, add_special_tokens=False)
        b = written.encode(text, add_special_tokens=False)
        if a.ids != b.ids:
            return Rebuilt(text, tuple(a.tokens), tuple(b.tokens), model_type(loaded), model_type(written))
        if (decoded := loaded.decode(b.ids)) != written.decode(b.ids):
            return Rebuilt(text, tuple(a.tokens), tuple(b.tokens), model_type(loaded), model_type(written),
                           decoded=decoded)
    if model_type(loaded) != model_type(written):
        tokens = tuple(written.encode(probes[0], add_special_tokens=False).tokens)
        return Rebuilt(probes[0], tokens, tokens, model_type(loaded), model_type(written))
    return None


def declared_class(path: Path) -> str | None:
    """`tokenizer_class` of path/tokenizer_config.json without a trailing `Fast`, or None when not declared."""
    file = path / "tokenizer_config.json"
    if not file.is_file():
        return None
    config = json.loads(file.read_text(encoding="utf-8"))  # AutoTokenizer has already read it
    name = config.get("tokenizer_class") if isinstance(config, dict) else None
    return name.removesuffix("Fast") if isinstance(name, str) and name else None


def _architecture(path: Path) -> str:
    try:
        return str(json.loads((path / "config.json").read_text(encoding="utf-8")).get("model_type") or "?")
    except (OSError, ValueError, AttributeError):
        return "?"


def as_written(tokenizer: PreTrainedTokenizerBase, path: str | Path) -> PreTrainedTokenizerBase:
    """`tokenizer` (what AutoTokenizer loaded from `path`) when it encodes as path/tokenizer.json does; else the
    file loaded as written, with a warning; TokenizerError where the directory does not say which is right."""
    path = Path(path)
    loaded = type(tokenizer).__name__
    declared = declared_class(path)
    file = path / "tokenizer.json"
    if not file.is_file():
        if declared and declared not in GENERIC_CLASSES and loaded not in GENERIC_CLASSES \
                and declared != loaded.removesuffix("Fast"):
            raise TokenizerError(
                f"model.path={path}: tokenizer_config.json declares {declared}, but transformers loads {loaded} "
                f"for model_type {_architecture(path)!r}, and without a tokenizer.json nothing says which one "
                f"the files are for. Save the tokenizer with the class it was made with "
                f"({declared}.from_pretrained(dir).save_pretrained(dir) writes tokenizer.json, which areal-py "
                f"then loads as written), or set \"tokenizer_class\" in {path}/tokenizer_config.json to {loaded} "
                f"if the files are that family's")
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    try:
        written = Tokenizer.from_file(str(file))
    except Exception as e:  # noqa: BLE001 - any parse failure means there is no reference to compare with
        log.warning("model.path=%s: tokenizer.json cannot be read by the tokenizers library (%s); the tokenizer "
                    "%s is used as transformers loads it, unchecked", path, e, loaded)
        return tokenizer
    if backend is None or (difference := first_difference(backend, written)) is None:
        return tokenizer
    try:
        kept = PreTrainedTokenizerFast.from_pretrained(path, local_files_only=True)
    except Exception as e:  # re-raised as TokenizerError with what to change
        raise TokenizerError(
            f"model.path={path}: transformers loads the tokenizer as {loaded}, which rebuilds it differently from "
            f"tokenizer.json ({difference.describe()}), and tokenizer.json cannot be loaded as written ({e}): "
            f"re-save the tokenizer with the class it was made with") from e
    if (again := first_difference(kept.backend_tokenizer, written)) is not None:
        raise TokenizerError(
            f"model.path={path}: neither {loaded} (what transformers picks) nor tokenizer.json as written "
            f"encodes as tokenizer.json ({again.describe()}): re-save the tokenizer with the class it was made with")
    log.warning(
        "model.path=%s: transformers loads this tokenizer as %s (model_type %r%s), which rebuilds tokenizer.json "
        "from its vocabulary: %s. areal-py uses tokenizer.json as written (%s); any other program that loads "
        "this directory with AutoTokenizer gets the rebuilt one", path, loaded, _architecture(path),
        f", tokenizer_config.json declares {declared}" if declared else "", difference.describe(),
        type(kept).__name__)
    return kept
