"""Multi-Token Prediction (V3 §2.2): module k combines RMSNorm(h^{k-1}_i) and RMSNorm(Emb(t_{i+k})) by a
linear projection (2d -> d), runs one transformer block, and predicts t_{i+k+1} with the SHARED embedding and
output head (after its own norm, `shared_head.norm` in the official checkpoint)."""

from __future__ import annotations

import torch
from torch import nn

from nanoseek.config import ModelConfig


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, block: nn.Module):
        super().__init__()
        d = cfg.hidden_size
        self.enorm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        self.hnorm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.block = block
        self.norm = nn.RMSNorm(d, eps=cfg.rms_norm_eps)  # shared_head.norm

    def forward(self, h_prev, emb_next, cos, sin, **cache_kw):
        """h_prev [B, T, d] (previous depth), emb_next [B, T, d] (embeddings of the tokens k ahead) -> h [B, T, d]
        (before the head norm: the next depth chains on it)."""
        h = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))
        return self.block(h, cos, sin, **cache_kw)
