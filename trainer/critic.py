"""The critic for PPO with GAE: the policy's backbone with a scalar value head.

A separate model trained alongside the policy (not a shared trunk), so a value loss can never
disturb the policy's representation and the critic can be dropped by config.
"""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModel


class ValueModel(torch.nn.Module):
    def __init__(self, model_dir: str | Path, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        self.backbone = AutoModel.from_pretrained(Path(model_dir), dtype=dtype, local_files_only=True)
        hidden = self.backbone.config.get_text_config().hidden_size
        self.head = torch.nn.Linear(hidden, 1, dtype=dtype)
        torch.nn.init.zeros_(self.head.weight)  # start at V = 0: early advantages are plain returns
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """V(s_t) for t = 0..L-2, aligned with `token_logprobs`: the state before token t+1."""
        h = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return self.head(h[:, :-1]).squeeze(-1).float()
