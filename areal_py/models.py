"""Model and tokenizer loading, plus the tiny embedded default model.

The embedded model is a ~2M-parameter Llama with a character tokenizer: small enough to
train by RL on 2 CPU cores in minutes, yet it goes through exactly the same Hugging Face
`Auto*` loading path as a real checkpoint (Qwen2.5, Llama, ...), so no code path is special.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
    PreTrainedTokenizerFast,
)

from areal_py.tokenizer_as_written import as_written
from areal_py.tokenizer_checks import require_eos

DEFAULT_CHARSET = "0123456789+-*=() abcdefghijklmnopqrstuvwxyz.,:;?!<>/"
PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
EMBEDDED_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
"""The embedded tokenizer's chat template: `<bos><role>content</role>...<assistant>`, only characters of
DEFAULT_CHARSET, so the chat path runs offline. The synthetic tasks use it only when task.chat_template
asks (their default is false)."""

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
}


def build_char_tokenizer(charset: str = DEFAULT_CHARSET) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per character, spaces kept as tokens.

    Special tokens take ids 0..3 (pad, bos, eos, unk). The decoder fuses tokens with no
    separator so that decode(encode(s)) == s, spaces included.
    """
    chars = list(dict.fromkeys(charset))  # dedupe, keep order
    if any(len(c) != 1 for c in chars) or not chars:
        raise ValueError("charset must be a non-empty string of single characters")
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    for ch in chars:
        vocab.setdefault(ch, len(vocab))

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    # Isolate every character (spaces included); WordLevel then maps each to its id.
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A",
        pair=f"{BOS} $A $B",
        special_tokens=[(BOS, vocab[BOS])],
    )
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        chat_template=EMBEDDED_CHAT_TEMPLATE,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
        padding_side="left",
        model_max_length=1 << 30,
    )


@dataclass(frozen=True)
class EmbeddedModelSpec:
    """Shape of the embedded Llama (defaults: ~2M parameters, 64-token context)."""

    hidden_size: int = 192
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 4
    intermediate_size: int = 512
    max_position_embeddings: int = 64
    seed: int = 0
    charset: str = DEFAULT_CHARSET
    # Untied head: weight transfer between trainer and rollout is a plain name->tensor map.
    tie_word_embeddings: bool = False

    def to_dict(self) -> dict:
        return asdict(self)


def create_embedded_model(directory: Path, spec: EmbeddedModelSpec | None = None) -> Path:
    """Build a seeded random-init Llama + char tokenizer and save both into `directory`."""
    spec = spec or EmbeddedModelSpec()
    directory = Path(directory)
    tokenizer = build_char_tokenizer(spec.charset)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=spec.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=spec.tie_word_embeddings,
    )
    # Seed a private generator state so creation is reproducible without leaking global RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    (directory / "embedded_spec.json").write_text(json.dumps(spec.to_dict(), indent=2))
    return directory


def _torch_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return _DTYPES[dtype.lower()]
    except KeyError:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {sorted(_DTYPES)}") from None


def _check_model_dir(path: Path) -> None:
    if not path.is_dir():
        raise FileNotFoundError(f"model directory does not exist: {path}")
    if not (path / "config.json").is_file():
        raise ValueError(f"not a Hugging Face model directory (no config.json): {path}")


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    """The tokenizer of a local model directory, offline; pad falls back to EOS.

    The tokenizer is the one tokenizer.json describes, not a rebuild by the class transformers picks for the
    architecture (tokenizer_as_written.as_written: kept as loaded when it encodes alike, else loaded as written).
    A tokenizer without EOS is refused here (tokenizer_checks.TokenizerError naming the directory), so the
    first process that loads it, the launch's check, says so before any role starts.

    For processes that only tokenize (the controller) and need not hold the weights.
    """
    path = Path(path)
    _check_model_dir(path)
    tokenizer = as_written(AutoTokenizer.from_pretrained(path, local_files_only=True), path)
    require_eos(tokenizer, str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model_and_tokenizer(
    path: str | Path, dtype: str = "float32", device: str = "cpu"
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load any local HF causal LM directory (embedded or real) offline, in eval mode.

    A missing pad token is set to EOS so batched, left-padded generation always works.
    """
    path = Path(path)
    _check_model_dir(path)
    tokenizer = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=_torch_dtype(dtype), local_files_only=True
    )
    model.to(device)
    model.eval()
    return model, tokenizer


def eos_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The single EOS id (the first one if the tokenizer declares several)."""
    eos = tokenizer.eos_token_id
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is None:
        raise ValueError(f"tokenizer {type(tokenizer).__name__} has no EOS token")
    return int(eos)
