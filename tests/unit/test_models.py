"""Embedded model + char tokenizer: saved, reloaded through the Auto classes, intact."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, LlamaConfig, Qwen2Config

from areal_py.models import (
    EmbeddedModelSpec,
    build_char_tokenizer,
    create_embedded_model,
    eos_token_id,
    load_model_and_tokenizer,
    load_tokenizer,
)

TEXT = "12 + 7 = 19"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return create_embedded_model(tmp_path_factory.mktemp("embedded"), EmbeddedModelSpec())


def test_char_tokenizer_in_memory() -> None:
    tok = build_char_tokenizer()
    ids = tok(TEXT).input_ids
    assert ids[0] == tok.bos_token_id
    assert len(ids) == len(TEXT) + 1  # one token per character, spaces included
    assert tok(TEXT, add_special_tokens=False).input_ids == ids[1:]
    assert tok.decode(ids, skip_special_tokens=True) == TEXT
    assert tok.convert_tokens_to_ids(["<pad>", "<bos>", "<eos>", "<unk>"]) == [0, 1, 2, 3]
    assert tok("A").input_ids[1] == tok.unk_token_id


def test_tokenizer_round_trip_through_auto_with_llama_config(tmp_path: Path) -> None:
    build_char_tokenizer().save_pretrained(tmp_path)
    LlamaConfig(vocab_size=64).save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    ids = tok(TEXT).input_ids
    assert ids[0] == tok.bos_token_id == 1
    assert tok.decode(ids, skip_special_tokens=True) == TEXT
    assert tok.decode(tok(" a  b ", add_special_tokens=False).input_ids) == " a  b "
    assert eos_token_id(tok) == 2


def test_qwen2_config_swaps_tokenizer_class_and_drops_spaces(tmp_path: Path) -> None:
    """Why the embedded model is a Llama: a Qwen2 config makes AutoTokenizer swap classes."""
    build_char_tokenizer().save_pretrained(tmp_path)
    Qwen2Config(vocab_size=64).save_pretrained(tmp_path)
    tok = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert type(tok).__name__ == "Qwen2Tokenizer"
    assert tok.decode(tok(TEXT).input_ids, skip_special_tokens=True) != TEXT


def test_create_and_load_embedded_model(model_dir: Path) -> None:
    assert (model_dir / "model.safetensors").is_file()
    model, tok = load_model_and_tokenizer(model_dir)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert not model.training
    n_params = sum(p.numel() for p in model.parameters())
    assert 1.5e6 < n_params < 2.5e6
    assert model.config.tie_word_embeddings is False
    assert model.config.vocab_size == len(tok)
    assert model.config.eos_token_id == eos_token_id(tok) == tok.eos_token_id
    assert tok.decode(tok(TEXT).input_ids, skip_special_tokens=True) == TEXT
    enc = tok(["1+2=", "10+20="], return_tensors="pt", padding=True)
    with torch.no_grad():
        logits = model(**enc).logits
    assert logits.shape == (2, enc.input_ids.shape[1], len(tok))
    assert enc.attention_mask[0, 0] == 0  # left padding for generation


def test_creation_is_seeded(tmp_path: Path, model_dir: Path) -> None:
    other = create_embedded_model(tmp_path / "again", EmbeddedModelSpec())
    a, _ = load_model_and_tokenizer(model_dir)
    b, _ = load_model_and_tokenizer(other)
    for (na, pa), (nb, pb) in zip(a.state_dict().items(), b.state_dict().items()):
        assert na == nb and torch.equal(pa, pb)


def test_load_bf16(model_dir: Path) -> None:
    model, _ = load_model_and_tokenizer(model_dir, dtype="bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model_and_tokenizer(tmp_path / "missing")
    with pytest.raises(ValueError, match="not a Hugging Face model directory"):
        load_model_and_tokenizer(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")


def test_load_tokenizer_only(model_dir: Path) -> None:
    tok = load_tokenizer(model_dir)
    assert tok.decode(tok(TEXT).input_ids, skip_special_tokens=True) == TEXT
    assert tok.pad_token_id == 0
