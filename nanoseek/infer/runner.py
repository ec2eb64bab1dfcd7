"""The decode step of the engine: T new tokens per running sequence over the latent cache, written for speed.

The model's own cached forward (model/transformer.py) is the reference; this is the same math with fewer ops and
no host synchronisation, so that a decode step is cheap in eager mode and one graph under torch.compile:
- absorbed MLA (DeepSeek-V2 §2.1, V3 inference/model.py): W_UK folded into the query, W_UV applied after the
  attention, and the two score terms fused into ONE matmul over the cached row [c_kv ‖ k_pe]:
  (W_UK^T q_nope ‖ q_pe) · (c_kv ‖ k_pe) = q_nope·k_nope + q_pe·k_pe;
- MoE for the few tokens of a decode step without the sort/bincount dispatch (which needs a host sync): gather
  the chosen experts' weights when tokens × top-k < experts, else run every expert with a zero gate for the
  unchosen ones (exact: the model's output is the same weighted sum);
- no MoE load statistics are counted: generating must not move the balance bias (V3 eq. 16) of a model in training.
tests/test_engine.py checks it against the model's full forward.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F

from nanoseek.model.moe import MoE
from nanoseek.model.rope import apply_rope, rope_cos_sin


class Runner:
    """Runs `model` (or a lower-precision copy of it, kept in sync with the live weights) over a LatentCache."""

    def __init__(self, model, cache, dtype: torch.dtype = torch.float32, compile: bool = False):
        self.src = model
        self.cache = cache
        self.dtype = dtype
        self.model = model
        if dtype != next(model.parameters()).dtype:
            # A copy in `dtype`; buffers (router bias, rope frequencies) stay fp32. Re-synced when the live
            # weights change (an optimizer step bumps the tensors' version counters), so RL can keep one engine.
            self.model = copy.deepcopy(model)
            for p in self.model.parameters():
                p.requires_grad_(False)
                p.data = p.data.to(dtype)
            self._versions = None
        cfg = model.config
        self.cfg = cfg
        self.L = cfg.num_hidden_layers
        self._decode = torch.compile(self._decode_impl, dynamic=True) if compile else self._decode_impl
        self._mtp = torch.compile(self._mtp_impl, dynamic=True) if compile else self._mtp_impl

    # ---- weights -------------------------------------------------------------------------------------------
    def sync(self) -> None:
        """Copy the live weights into the low-precision copy if they changed since the last call."""
        if self.model is self.src:
            return
        versions = tuple(p._version for p in self.src.parameters()) + tuple(b._version for b in self.src.buffers())
        if versions == self._versions:
            return
        with torch.no_grad():
            for p_lp, p in zip(self.model.parameters(), self.src.parameters(), strict=True):
                p_lp.copy_(p)
            for b_lp, b in zip(self.model.buffers(), self.src.buffers(), strict=True):
                b_lp.copy_(b)
        self._versions = versions

    # ---- full-model entry points ---------------------------------------------------------------------------
    def prefill(self, input_ids, slots):
        """Right-padded prompts [B, T] from position 0 through the model's expanded path; returns (logits, hidden).
        The model's MoE load counters are restored afterwards (inference does not count as training load)."""
        moes = self.model.moe_layers()
        loads = [m.load.clone() for m in moes]
        zeros = torch.zeros(input_ids.shape[0], dtype=torch.long)
        out = self.model(input_ids, cache=self.cache, slots=slots, start_pos=zeros)
        for m, load in zip(moes, loads):
            m.load.copy_(load)
        return out.logits, out.hidden

    def decode(self, input_ids, slots, start_pos, S: int):
        """input_ids [B, T] at positions start_pos[b].. (all > 0 or not: the absorbed form is exact either way);
        S = max(start_pos) + T, the cache length to read. Returns (logits [B, T, V] fp32, hidden [B, T, d])."""
        return self._decode(input_ids, slots, start_pos, S)

    def mtp(self, h_prev, next_ids, slots, start_pos, S: int):
        """MTP module 1 over its cache layer: h_prev [B, T, d] (main hidden at positions start_pos..), next_ids
        [B, T] (the tokens one ahead). Returns logits [B, T, V] of the tokens two ahead."""
        return self._mtp(h_prev, next_ids, slots, start_pos, S)

    # ---- implementation ------------------------------------------------------------------------------------
    def _rope(self, start_pos, T):
        positions = start_pos[:, None] + torch.arange(T)  # [B, T]
        return rope_cos_sin(self.model.inv_freq, self.model.rope_scale, positions), positions

    def _decode_impl(self, input_ids, slots, start_pos, S: int):
        m = self.model
        (cos, sin), pos = self._rope(start_pos, input_ids.shape[1])
        x = m.model.embed_tokens(input_ids)
        for i, blk in enumerate(m.model.layers):
            x = self._block(blk, i, x, cos, sin, slots, pos, S)
        h = m.model.norm(x)
        return m.lm_head(h).float(), h

    def _mtp_impl(self, h_prev, next_ids, slots, start_pos, S: int):
        m = self.model
        module = m.mtp[0]
        (cos, sin), pos = self._rope(start_pos, next_ids.shape[1])
        emb = m.model.embed_tokens(next_ids)
        h = module.eh_proj(torch.cat([module.enorm(emb), module.hnorm(h_prev.to(emb.dtype))], dim=-1))
        h = self._block(module.block, self.L, h, cos, sin, slots, pos, S)
        return m.lm_head(module.norm(h)).float()

    def _block(self, blk, layer, x, cos, sin, slots, pos, S):
        x = x + self._attention(blk.self_attn, blk.input_layernorm(x), self.cache.layer(layer), cos, sin, slots,
                                pos, S)
        h = blk.post_attention_layernorm(x)
        if isinstance(blk.mlp, MoE):
            return x + self._moe(blk.mlp, h.reshape(-1, h.shape[-1])).view_as(h)
        return x + blk.mlp(h)

    def _attention(self, mla, x, kv, cos, sin, slots, pos, S):
        B, T, _ = x.shape
        H, dn, dr, dv, r = mla.n_heads, mla.dn, mla.dr, mla.dv, mla.r
        q = mla.q_proj(x) if mla.cfg.q_lora_rank is None else mla.q_b_proj(mla.q_a_layernorm(mla.q_a_proj(x)))
        q_nope, q_pe = q.view(B, T, H, dn + dr).split([dn, dr], dim=-1)
        q_pe = apply_rope(q_pe, cos[:, :, None], sin[:, :, None], mla.cfg.rope_interleave)
        c_kv, k_pe = mla.kv_a_proj_with_mqa(x).split([r, dr], dim=-1)
        c_kv = mla.kv_a_layernorm(c_kv)
        k_pe = apply_rope(k_pe, cos, sin, mla.cfg.rope_interleave)
        kv[slots[:, None], pos] = torch.cat([c_kv, k_pe], dim=-1).to(kv.dtype)  # write the new latents

        w = mla.kv_b_proj.weight.view(H, dn + dv, r)
        q_lat = torch.einsum("bthd,hdr->bthr", q_nope, w[:, :dn])  # W_UK absorbed into the query
        qc = torch.cat([q_lat, q_pe], dim=-1).reshape(B, T * H, r + dr)  # [B, T*H, r+dr]
        lat = kv[slots, :S].to(qc.dtype)  # [B, S, r+dr]: the rows' cached latents
        scores = torch.bmm(qc, lat.transpose(1, 2)).view(B, T, H, S).float() * mla.scale
        allowed = torch.arange(S)[None, None, :] <= pos[:, :, None]  # [B, T, S], causal over each row's cache
        p = scores.masked_fill(~allowed[:, :, None], float("-inf")).softmax(dim=-1).to(qc.dtype)
        o_lat = torch.bmm(p.view(B, T * H, S), lat[..., :r]).view(B, T, H, r)
        out = torch.einsum("bthr,hvr->bthv", o_lat, w[:, dn:])  # W_UV after the attention
        return mla.o_proj(out.reshape(B, T, H * dv))

    def _moe(self, moe, x):
        """x [N, d] -> [N, d]: routed experts (gate from the model's router) + shared experts."""
        w, idx, _ = moe.gate(x)  # [N, K] gate values (already scaled), expert ids
        ex = moe.experts
        N, K = idx.shape
        E = ex.gate_proj.shape[0]
        w = w.to(x.dtype)
        if N * K >= E:  # every expert is likely busy: run them all, zero gate for the unchosen
            cw = torch.zeros(N, E, dtype=x.dtype).scatter(1, idx, w)  # [N, E]
            h = F.silu(torch.einsum("nd,ehd->neh", x, ex.gate_proj)) * torch.einsum("nd,ehd->neh", x, ex.up_proj)
            y = torch.einsum("neh,edh->nd", h * cw[..., None], ex.down_proj)
        else:  # few tokens, many experts: gather only the chosen experts' weights
            h = F.silu(torch.einsum("nd,nkhd->nkh", x, ex.gate_proj[idx])) * \
                torch.einsum("nd,nkhd->nkh", x, ex.up_proj[idx])
            y = torch.einsum("nkh,nkdh->nd", h * w[..., None], ex.down_proj[idx])
        return y + moe.shared_experts(x) if moe.shared_experts is not None else y
