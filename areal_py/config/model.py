"""The policy model: a Hugging Face directory or the embedded tiny Llama, and its cold start."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from areal_py.config.section import Section


class EmbeddedModelConfig(Section):
    hidden_size: int = Field(192, ge=8, description="Hidden size of the tiny Llama model.")
    num_layers: int = Field(4, ge=1, description="Decoder layers of the tiny model.")
    num_heads: int = Field(4, ge=1, description="Attention heads of the tiny model.")
    intermediate_size: int = Field(512, ge=8, description="MLP width of the tiny model.")
    max_position_embeddings: int = Field(64, ge=8, description="Longest sequence the tiny model handles.")


class ModelConfig(Section):
    path: str = Field("", description="Hugging Face causal LM directory; empty builds the embedded tiny model.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="Parameter dtype.")
    cache_dir: str = Field("~/.cache/areal-py", description="Where the embedded model is built and cached.")
    embedded: EmbeddedModelConfig = Field(default_factory=EmbeddedModelConfig, description="Tiny model shape.")


class ColdStartConfig(Section):
    steps: int = Field(120, ge=0, description="Supervised steps teaching the answer format to the embedded model.")
    batch_size: int = Field(64, ge=1, description="Cold-start batch size.")
    lr: float = Field(2e-3, gt=0, description="Cold-start learning rate.")
    final_lr_ratio: float = Field(1.0, ge=0, le=1, description="Cosine-decay the cold-start lr after warm-up to this "
                                  "fraction of `lr` by the last step; 1 keeps it constant.")
    label_noise: float = Field(0.2, ge=0, le=1, description="Fraction of corrupted labels, so RL has room to improve.")
    seed: int | None = Field(None, description="Seed of the embedded model's init and cold start; null = run.seed. "
                             "Fix it to compare RL runs of several seeds from one starting model.")
