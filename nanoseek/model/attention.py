"""Multi-head Latent Attention (DeepSeek-V2 §2.1; V3 §2.1.1).

Keys and values come from a compressed latent c_kv = RMSNorm(W_DKV h) (kv_lora_rank numbers per token) plus one
rotary key shared by all heads. Two forms of the same function:
- expanded (training, prefill): c_kv is expanded by kv_b_proj into per-head keys/values, then plain attention;
- absorbed (decode): W_UK is folded into the query and W_UV into the output, so attention runs directly over the
  cached latents: q_nope·(W_UK c) = (W_UK^T q_nope)·c, and sum_s p_s W_UV c_s = W_UV (sum_s p_s c_s).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.rope import apply_rope


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.n_heads = cfg.num_attention_heads
        self.dn, self.dr, self.dv, self.r = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
        d, qd = cfg.hidden_size, cfg.num_attention_heads * cfg.qk_head_dim
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d, qd, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = nn.RMSNorm(cfg.q_lora_rank, eps=1e-6)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, qd, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.r + self.dr, bias=cfg.attention_bias)
        self.kv_a_layernorm = nn.RMSNorm(self.r, eps=1e-6)
        self.kv_b_proj = nn.Linear(self.r, self.n_heads * (self.dn + self.dv), bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.dv, d, bias=cfg.attention_bias)
        self.scale = cfg.softmax_scale

    def forward(self, x, cos, sin, kv_cache=None, slots=None, start_pos=None, prefill=True, packed=None):
        """x [B, T, d]; cos/sin [B, T, dr/2]. With kv_cache ([n_slots, max_len, r+dr] of this layer) the new
        latents are written at start_pos[b] + t of slot slots[b]; prefill=False attends over the cache.
        packed (nanoseek.model.packed.PackedRows): x is [1, S, d], the distinct tokens of packed rows (training)."""
        B, T, _ = x.shape
        H = self.n_heads
        q = self.q_proj(x) if self.cfg.q_lora_rank is None else self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, H, self.dn + self.dr)
        q_nope, q_pe = q.split([self.dn, self.dr], dim=-1)
        q_pe = apply_rope(q_pe, cos[:, :, None], sin[:, :, None], self.cfg.rope_interleave)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.r, self.dr], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # [B, T, r]
        k_pe = apply_rope(k_pe, cos, sin, self.cfg.rope_interleave)  # [B, T, dr], shared by all heads

        if kv_cache is not None:
            pos = start_pos[:, None] + torch.arange(T, device=x.device)  # [B, T]
            kv_cache[slots[:, None], pos] = torch.cat([c_kv, k_pe], dim=-1).to(kv_cache.dtype)
        if packed is not None:
            out = self._packed(q_nope, q_pe, c_kv, k_pe, packed)
        elif prefill:
            out = self._expanded(q_nope, q_pe, c_kv, k_pe)
        else:
            out = self._absorbed(q_nope, q_pe, kv_cache, slots, start_pos)
        return self.o_proj(out.reshape(B, T, H * self.dv))

    def _expanded(self, q_nope, q_pe, c_kv, k_pe):
        B, T, H, _ = q_nope.shape
        kv = self.kv_b_proj(c_kv).view(B, T, H, self.dn + self.dv)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # [B, H, T, dn+dr]
        k = torch.cat([k_nope, k_pe[:, :, None].expand(B, T, H, self.dr)], dim=-1).transpose(1, 2)
        return causal_attention(q, k, v.transpose(1, 2), self.scale).transpose(1, 2)  # [B, T, H, dv]

    def _packed(self, q_nope, q_pe, c_kv, k_pe, packed):
        """The expanded form over packed rows: q_nope/q_pe [1, S, H, *] and c_kv/k_pe [1, S, *] of the S distinct
        tokens -> [1, S, H, dv]. Two attentions: each distinct prompt's tokens over the prompt (causal), and each
        row's continuation tokens over the whole row, its prompt included (packed.mask; SDPA's fused CPU kernel
        takes masks too)."""
        _, S, H, _ = q_nope.shape
        kv = self.kv_b_proj(c_kv[0]).view(S, H, self.dn + self.dv)
        k_nope, v = kv.split([self.dn, self.dv], dim=-1)
        q = torch.cat([q_nope[0], q_pe[0]], dim=-1)  # [S, H, dn+dr]
        k = torch.cat([k_nope, k_pe[0, :, None].expand(S, H, self.dr)], dim=-1)

        # v padded with zero columns to q/k's width once here, not after gathering (see causal_attention)
        if self.dv < q.shape[-1]:
            v = F.pad(v, (0, q.shape[-1] - self.dv))
        w = v.shape[-1]

        def gather(t, index):  # [S, H, *] -> [n, H, len, *]
            return t.index_select(0, index.reshape(-1)).view(*index.shape, *t.shape[1:]).transpose(1, 2)

        pk, rows = packed.prompts, packed.rows
        out_p = F.scaled_dot_product_attention(gather(q, pk), gather(k, pk), gather(v, pk), is_causal=True,
                                               scale=self.scale)  # [P, H, Lp, w]
        out_c = F.scaled_dot_product_attention(gather(q, packed.queries), gather(k, rows), gather(v, rows),
                                               attn_mask=packed.mask, scale=self.scale)  # [N, H, Lc, w]
        out = torch.cat([out_p.transpose(1, 2).reshape(-1, H, w), out_c.transpose(1, 2).reshape(-1, H, w)])
        out = out.index_select(0, packed.first)[..., : self.dv]
        return out[None]  # [1, S, H, dv]

    def _absorbed(self, q_nope, q_pe, kv_cache, slots, start_pos):
        B, T, H, _ = q_nope.shape
        S = int((start_pos.max() + T).item())
        lat = kv_cache[slots, :S]  # [B, S, r+dr]
        c_kv, k_pe = lat[..., : self.r], lat[..., self.r :]
        w = self.kv_b_proj.weight.view(H, self.dn + self.dv, self.r)
        w_uk, w_uv = w[:, : self.dn], w[:, self.dn :]  # [H, dn, r], [H, dv, r]
        q_lat = torch.einsum("bthd,hdr->bthr", q_nope, w_uk.to(q_nope.dtype))
        scores = torch.einsum("bthr,bsr->bhts", q_lat, c_kv.to(q_lat.dtype))
        scores = scores + torch.einsum("bthd,bsd->bhts", q_pe, k_pe.to(q_pe.dtype))
        qpos = start_pos[:, None] + torch.arange(T, device=q_nope.device)  # [B, T]
        allowed = torch.arange(S, device=q_nope.device)[None, None, :] <= qpos[:, :, None]  # [B, T, S]
        scores = (scores.float() * self.scale).masked_fill(~allowed[:, None], float("-inf"))
        p = scores.softmax(dim=-1).to(q_lat.dtype)  # [B, H, T, S]
        o_lat = torch.einsum("bhts,bsr->bthr", p, c_kv.to(p.dtype))
        return torch.einsum("bthr,hvr->bthv", o_lat, w_uv.to(o_lat.dtype))  # [B, T, H, dv]


MATH_MAX_T = 512  # longest sequence for the explicit-scores path on CPU (its [B*H, T, T] scores live in memory)


def causal_attention(q, k, v, scale: float, pad_v: bool = True):
    """q, k [B, H, T, d_qk], v [B, H, T, d_v] -> [B, H, T, d_v]. MLA's values are narrower than its queries/keys
    (128 vs 192 in V3), and SDPA's fused CPU kernel (flash attention, no T x T score matrix) needs them equal; so
    v gets zero columns up to d_qk and the output is sliced back: the zeros only add zero outputs. pad_v=False
    lets SDPA pick its (unfused, T x T) math path instead."""
    B, H, T, dqk = q.shape
    dv = v.shape[-1]
    if q.device.type == "cpu" and T <= MATH_MAX_T:
        # Scores with the causal mask folded into one baddbmm, then softmax @ v: at these lengths on CPU this beats
        # SDPA's flash kernel (fwd+bwd 54 vs 66 ms at B 16, H 4, T 256, d 48/32, one thread; LOG.md, session 4).
        mask = torch.full((T, T), float("-inf"), device=q.device, dtype=q.dtype).triu_(1)
        s = torch.baddbmm(mask.expand(B * H, T, T), q.reshape(B * H, T, dqk),
                          k.reshape(B * H, T, dqk).transpose(1, 2), alpha=scale)  # [B*H, T, T]
        return (s.softmax(-1) @ v.reshape(B * H, T, dv)).view(B, H, T, dv)
    if pad_v and dv < dqk:
        out = F.scaled_dot_product_attention(q, k, F.pad(v, (0, dqk - dv)), is_causal=True, scale=scale)
        return out[..., :dv]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
