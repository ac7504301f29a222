"""Tokenizer faults are loud before a run: no EOS at load naming the directory, characters a character
tokenizer cannot spell counted with their rate."""
from __future__ import annotations

import json

import pytest

from areal_py.models import build_char_tokenizer, load_tokenizer
from areal_py.tokenizer_checks import TokenizerError, unknown_token_report


def test_a_tokenizer_without_eos_is_refused_at_load_naming_model_path(tmp_path):
    build_char_tokenizer().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert load_tokenizer(tmp_path).eos_token == "<eos>"
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    cfg.pop("eos_token")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(TokenizerError, match=f"model.path={tmp_path} has no EOS token: set \"eos_token\" in "
                                             f"{tmp_path}/tokenizer_config.json"):
        load_tokenizer(tmp_path)


def test_unknown_characters_are_reported_with_their_rate():
    # "What is 3+4?" -> 12 tokens, W unknown; "ok" -> 2 tokens; "XaX" -> 3 tokens, two X unknown
    r = unknown_token_report(build_char_tokenizer(), ["What is 3+4?", "ok", "XaX"])
    assert (r.texts, r.texts_affected, r.total_tokens, r.unknown_tokens) == (3, 2, 17, 3)
    assert r.unknown_chars == (("X", 2), ("W", 1))
    assert r.rate == pytest.approx(3 / 17)
    assert r.message() == ("unknown tokens: 3 of 17 tokens (17.65%) are <unk> in 2 of 3 texts; characters the "
                           "tokenizer cannot spell: 'X' x2, 'W' x1")


def test_covered_data_reports_none():
    r = unknown_token_report(build_char_tokenizer(), ["3+4=", "what is 1+1?"])
    assert r.unknown_tokens == 0 and r.unknown_chars == () and r.rate == 0.0 and r.total_tokens == 16
    assert r.message() == "unknown tokens: none in 16 tokens of 2 texts"
