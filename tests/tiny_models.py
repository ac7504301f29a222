"""Tiny randomly initialised Llama models shared by tests in more than one layer (unit, integration, e2e)."""
from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_model(seed: int = 0, vocab_size: int = 32, max_positions: int = 64) -> LlamaForCausalLM:
    """Two layers of width 32: enough for packing, masking and weight-sync tests, milliseconds per step."""
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                        max_position_embeddings=max_positions))
