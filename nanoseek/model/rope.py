"""Rotary position embedding with YaRN scaling (DeepSeek-V3 uses YaRN to reach 128K context).

Frequencies follow YaRN (Peng et al. 2023, "YaRN: Efficient Context Window Extension"), as HF computes them:
dimensions that rotate fast keep their frequency, slow ones are interpolated by `factor`, with a linear ramp
between beta_fast and beta_slow rotations; cos/sin are scaled by the attention factor mscale/mscale_all_dim.
"""

from __future__ import annotations

import math

import torch

from nanoseek.config import ModelConfig


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_frequencies(cfg: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies [rope_dim/2] and the factor that scales cos/sin."""
    dim, base = cfg.qk_rope_head_dim, cfg.rope_theta
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    rs = cfg.rope_scaling
    if not rs or rs.get("type", rs.get("rope_type")) in (None, "default"):
        return 1.0 / pos_freqs, 1.0
    factor = rs["factor"]
    mscale, mscale_all = rs.get("mscale"), rs.get("mscale_all_dim")
    attn_factor = rs.get("attention_factor")
    if attn_factor is None:
        if mscale and mscale_all:
            attn_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all)
        else:
            attn_factor = _yarn_mscale(factor)
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
    orig = rs["original_max_position_embeddings"]

    def correction_dim(rotations):  # the dimension that makes `rotations` turns over the original context
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if rs.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp
    inv_freq = (1 / (factor * pos_freqs)) * (1 - extrapolate) + (1 / pos_freqs) * extrapolate
    return inv_freq, float(attn_factor)


def rope_cos_sin(inv_freq: torch.Tensor, scale: float, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions [B, T] -> cos, sin [B, T, rope_dim/2] (fp32)."""
    freqs = positions[..., None].float() * inv_freq
    return freqs.cos() * scale, freqs.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rotate x [..., rope_dim]; cos/sin broadcast to [..., rope_dim/2].

    DeepSeek's weights lay rotary pairs out interleaved (x0,x1),(x2,x3)...; without interleave the pairs are
    (x_i, x_{i+d/2}). Both give the rotated pairs back as [first halves, second halves], as HF does: q and k get
    the same layout, so their dot product (all attention sees) is the one of the original pairing.
    """
    x1, x2 = (x[..., 0::2], x[..., 1::2]) if interleave else x.chunk(2, dim=-1)
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
