"""A tokenizer transformers rebuilds as another family is not used silently: load_tokenizer uses tokenizer.json
as written (with a warning) or refuses, and a tokenizer that loads correctly loads exactly as before."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoTokenizer,
    BertTokenizer,
    BertTokenizerFast,
    LlamaConfig,
    LlamaTokenizer,
    MistralConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2Tokenizer,
)

from areal_py.models import build_char_tokenizer, load_tokenizer
from areal_py.tokenizer_as_written import PROBES, first_difference
from areal_py.tokenizer_checks import TokenizerError

SMALL = dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
             num_key_value_heads=1)
WORDPIECE_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "cat", "sat", "on", "mat", "##s",
                   "a", "c", "e", "h", "m", "n", "o", "s", "t"]
SENTENCE = "the cats sat on the mat"
LOGGER = "areal_py.tokenizer_as_written"


def _wordpiece() -> Tokenizer:
    """A BERT-style WordPiece tokenizer: lowercasing normalizer, [CLS] text [SEP]."""
    vocab = {t: i for i, t in enumerate(WORDPIECE_VOCAB)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2),
                                                                                             ("[SEP]", 3)])
    tok.decoder = decoders.WordPiece()
    return tok


def _save_wordpiece(directory: Path, declared: str, config) -> Path:
    wrapper = BertTokenizerFast if declared == "BertTokenizer" else PreTrainedTokenizerFast
    wrapper(tokenizer_object=_wordpiece(), unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]",
            sep_token="[SEP]", mask_token="[MASK]", eos_token="[SEP]").save_pretrained(directory)
    config.save_pretrained(directory)
    return directory


def _ours(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


@pytest.mark.parametrize("declared", ["TokenizersBackend", "BertTokenizer"])
def test_transformers_rebuilds_a_wordpiece_tokenizer_in_a_qwen2_dir_as_one_token_per_character(tmp_path, declared):
    d = _save_wordpiece(tmp_path, declared, Qwen2Config(**SMALL))
    tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert tok.tokenize(SENTENCE) == list("thecatssatonthemat")  # 18 characters, the spaces gone


@pytest.mark.parametrize("declared", ["TokenizersBackend", "BertTokenizer"])
def test_load_tokenizer_uses_the_wordpiece_tokenizer_as_written_and_says_so(tmp_path, declared, caplog):
    d = _save_wordpiece(tmp_path, declared, Qwen2Config(**SMALL))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        tok = load_tokenizer(d)
    assert tok.tokenize(SENTENCE) == ["the", "cat", "##s", "sat", "on", "the", "mat"]
    assert tok(SENTENCE).input_ids == [2, 5, 6, 10, 7, 8, 5, 9, 3]
    assert tok.decode([5, 6, 10, 7], skip_special_tokens=True) == "the cats sat"
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token_id) == ("[SEP]", 3, 0)
    (message,) = _ours(caplog)
    assert f"model.path={d}: transformers loads this tokenizer as Qwen2Tokenizer (model_type 'qwen2'" in message
    assert f"tokenizer_config.json declares {declared}" in message
    assert "WordPiece in tokenizer.json, BPE as loaded" in message
    assert "areal-py uses tokenizer.json as written" in message


@pytest.mark.parametrize("config", [LlamaConfig, MistralConfig])  # their declared class / tokenizer.json is honoured
def test_a_wordpiece_tokenizer_that_transformers_loads_right_is_kept_without_a_warning(tmp_path, config, caplog):
    d = _save_wordpiece(tmp_path, "BertTokenizer", config(**SMALL))
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        tok = load_tokenizer(d)
    assert type(tok) is type(AutoTokenizer.from_pretrained(d, local_files_only=True))
    assert tok(SENTENCE).input_ids == [2, 5, 6, 10, 7, 8, 5, 9, 3]
    assert _ours(caplog) == []


def test_without_tokenizer_json_a_declared_class_other_than_the_loaded_one_is_refused(tmp_path):
    (tmp_path / "vocab.txt").write_text("\n".join(WORDPIECE_VOCAB) + "\n")
    BertTokenizer(vocab=str(tmp_path / "vocab.txt"), eos_token="[SEP]").save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").unlink()
    Qwen2Config(**SMALL).save_pretrained(tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path, local_files_only=True).tokenize(SENTENCE) == []  # silently empty
    with pytest.raises(TokenizerError, match=rf"model.path={tmp_path}: tokenizer_config.json declares BertTokenizer, "
                                             r"but transformers loads Qwen2Tokenizer for model_type 'qwen2'"):
        load_tokenizer(tmp_path)


def test_a_char_tokenizer_in_a_qwen2_dir_now_round_trips(tmp_path, caplog):
    build_char_tokenizer().save_pretrained(tmp_path)
    Qwen2Config(**SMALL).save_pretrained(tmp_path)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        tok = load_tokenizer(tmp_path)
    assert tok("12 + 7 = 19").input_ids == [1, 5, 6, 20, 14, 20, 11, 20, 17, 20, 5, 13]  # <bos> then one per char
    assert tok.decode(tok("12 + 7 = 19").input_ids, skip_special_tokens=True) == "12 + 7 = 19"
    assert "WordLevel in tokenizer.json, BPE as loaded" in _ours(caplog)[0]


def test_a_gpt2_style_byte_level_bpe_keeps_its_merges_across_space_and_digit(tmp_path, caplog):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(["sold 48 clips", "48 of 48", "to 48 friends"] * 5,
                            trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_end|>"],
                                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>").save_pretrained(tmp_path)
    Qwen2Config(**SMALL).save_pretrained(tmp_path)
    text = "sold 48 clips"
    written = Tokenizer.from_file(str(tmp_path / "tokenizer.json")).encode(text, add_special_tokens=False)
    assert written.tokens == ["sold", "Ġ48", "Ġclips"]
    rebuilt = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert rebuilt.tokenize(text) == ["sold", "Ġ", "4", "8", "Ġclips"]  # Qwen2's regex splits digits one by one
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        assert load_tokenizer(tmp_path)(text).input_ids == written.ids
    assert "both BPE" in _ours(caplog)[0]


def _byte_level_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    merges = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("Ġ", "c"), ("a", "t"), ("Ġc", "at")]
    tokens = specials + sorted(pre_tokenizers.ByteLevel.alphabet()) + ["".join(m) for m in merges]
    return {t: i for i, t in enumerate(tokens)}, merges


def _qwen2_dir(d: Path) -> Path:
    vocab, merges = _byte_level_vocab()
    Qwen2Tokenizer(vocab=vocab, merges=merges, eos_token="<|im_end|>").save_pretrained(d)
    Qwen2Config(**SMALL).save_pretrained(d)
    return d


def _llama_dir(d: Path) -> Path:
    pieces = ["<unk>", "<s>", "</s>", "▁", *"abcdefghijklmnopqrstuvwxyz", "▁t", "he", "▁the", "at", "▁c", "▁cat"]
    merges = [("▁", "t"), ("h", "e"), ("▁t", "he"), ("a", "t"), ("▁", "c"), ("▁c", "at")]
    LlamaTokenizer(vocab={p: i for i, p in enumerate(pieces)}, merges=merges).save_pretrained(d)
    LlamaConfig(**SMALL).save_pretrained(d)
    return d


def _embedded_dir(d: Path) -> Path:
    build_char_tokenizer().save_pretrained(d)
    LlamaConfig(**SMALL).save_pretrained(d)
    return d


@pytest.mark.parametrize("make", [_embedded_dir, _qwen2_dir, _llama_dir], ids=["embedded", "qwen2", "llama"])
def test_a_correct_tokenizer_loads_exactly_as_before(tmp_path, make, caplog):
    d = make(tmp_path)
    before = AutoTokenizer.from_pretrained(d, local_files_only=True)
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        now = load_tokenizer(d)
    assert type(now) is type(before)
    for text in (*PROBES, "the cat", "<|im_start|>user\nthe cat<|im_end|>"):
        assert now(text).input_ids == before(text).input_ids
    assert _ours(caplog) == []


def test_the_bpe_fixtures_are_their_family_with_working_merges(tmp_path):
    tok = load_tokenizer(_qwen2_dir(tmp_path / "qwen2"))
    assert (type(tok).__name__, tok.tokenize("the cat")) == ("Qwen2Tokenizer", ["t", "he", "Ġcat"])
    tok = load_tokenizer(_llama_dir(tmp_path / "llama"))
    assert (type(tok).__name__, tok.tokenize("the cat")) == ("LlamaTokenizer", ["▁the", "▁cat"])


def _chars(decoder) -> Tokenizer:
    tok = Tokenizer(models.WordLevel(vocab={"a": 0, "b": 1, "[UNK]": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    if decoder is not None:
        tok.decoder = decoder
    return tok


def test_first_difference_names_the_probe_the_tokens_and_the_decoding():
    fused = _chars(decoders.Fuse())
    assert first_difference(fused, _chars(decoders.Fuse()), probes=("ab",)) is None
    diff = first_difference(_chars(None), fused, probes=("ab",))
    assert diff is not None and diff.decoded == "a b"  # no decoder: tokens joined with spaces; the file fuses them
    assert diff.describe() == "both WordLevel; the ids of 'ab' decode as 'a b'"
    wordpiece = Tokenizer(models.WordPiece(vocab={"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    wordlevel = Tokenizer(models.WordLevel(vocab={"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    diff = first_difference(wordlevel, wordpiece, probes=("a",))
    assert (diff.loaded_model, diff.written_model, diff.loaded_tokens) == ("WordLevel", "WordPiece", ("a",))
    assert diff.describe() == "WordPiece in tokenizer.json, WordLevel as loaded (the probe texts encode alike)"
