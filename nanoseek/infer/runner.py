"""The decode step of the engine: T new tokens per running sequence over the latent cache, written for speed.

The model's own cached forward (model/transformer.py) is the reference; this is the same math in fewer ops and
without host synchronisation (at the sizes we run on a CPU a decode step costs its op count, not its FLOPs;
torch.compile of this step measured slower than eager here, 22 vs 12 ms a step on a loaded machine):
- absorbed MLA (DeepSeek-V2 §2.1, "W_UK can be absorbed into W_UQ, and W_UV into W_O"): the query weights are
  folded with W_UK (and the softmax scale), the output projection with W_UV, and the two score terms become ONE
  matmul over the cached row [c_kv ‖ k_pe]: (W_UK^T q_nope ‖ q_pe) · (c_kv ‖ k_pe) = q_nope·k_nope + q_pe·k_pe;
  the query down-projection and kv_a_proj_with_mqa (both read the block input) are one matmul;
- MoE for the few tokens of a decode step without the sort/count dispatch: run every expert as two matmuls with a
  zero gate for the unchosen ones (the same weighted sum the model computes), or, when experts far outnumber the
  routed tokens (8 x tokens x top-k <= experts), gather only the chosen experts' weights (the model's sorted
  grouped matmuls measured 1.3 ms a layer here against 0.1-0.5 ms for all experts, at 8-64 tokens);
- no MoE load statistics are counted: generating must not move the balance bias (V3 eq. 16) of a model in training.
The folded weights are derived from the live parameters and re-derived whenever those change (an optimizer step
bumps their version counters), so one engine serves a model that RL keeps training. In `dtype` bf16 they are
bf16 copies. Prefill runs the model itself (expanded MLA). tests/test_engine.py checks both against the full
forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanoseek.model.moe import MoE
from nanoseek.model.rope import rope_cos_sin


class Runner:
    def __init__(self, model, cache, dtype: torch.dtype = torch.float32):
        self.model, self.cache, self.dtype = model, cache, dtype
        self.cfg = cfg = model.config
        self.L = cfg.num_hidden_layers
        # the tensors whose version counters tell that the weights changed (listed once: walking the module tree
        # every step costs more than a tiny model's decode step)
        self._watched = list(model.parameters()) + list(model.buffers())
        self._versions = None
        self.w: dict = {}

    # ---- derived weights -----------------------------------------------------------------------------------
    def sync(self) -> None:
        """Re-derive the folded weights if any live parameter or buffer changed since the last call."""
        versions = [t._version for t in self._watched]
        if versions != self._versions:
            with torch.no_grad():
                self.w = self._derive()
            self._versions = versions

    def _derive(self) -> dict:
        m, dt = self.model, self.dtype

        def c(t):
            return t.detach().to(dt).contiguous()

        blocks = list(m.model.layers) + [mod.block for mod in m.mtp]
        w = dict(embed=c(m.model.embed_tokens.weight), norm=c(m.model.norm.weight), head=c(m.lm_head.weight),
                 blocks=[self._derive_block(b, c) for b in blocks], rope=c(self._rope_matrices()))
        if len(m.mtp):
            mod = m.mtp[0]
            w["mtp"] = dict(enorm=c(mod.enorm.weight), hnorm=c(mod.hnorm.weight), eh=c(mod.eh_proj.weight),
                            norm=c(mod.norm.weight))
        return w

    def _rope_matrices(self) -> torch.Tensor:
        """RoPE of every cache position as a [dr, dr] matrix, [max_len, dr, dr]: x @ R[pos] equals
        model.rope.apply_rope (its pairing, its [first halves, second halves] output layout, YaRN's scale), so a
        decode step rotates the H query heads and the shared key in one matmul."""
        m, dr = self.model, self.cfg.qk_rope_head_dim
        cos, sin = rope_cos_sin(m.inv_freq, m.rope_scale, torch.arange(self.cache.max_len)[None])  # [1, P, dr/2]
        cos, sin = cos[0], sin[0]
        half = dr // 2
        i = torch.arange(half)
        a, b = (2 * i, 2 * i + 1) if self.cfg.rope_interleave else (i, i + half)  # input dims of pair i
        R = torch.zeros(cos.shape[0], dr, dr)  # [P, in, out]
        R[:, a, i], R[:, b, i] = cos, -sin  # out_i        = x_a cos - x_b sin
        R[:, b, i + half], R[:, a, i + half] = cos, sin  # out_{i+h} = x_b cos + x_a sin
        return R

    def _derive_block(self, blk, c) -> dict:
        mla, cfg = blk.self_attn, self.cfg
        H, dn, dr, dv, r = mla.n_heads, mla.dn, mla.dr, mla.dv, mla.r
        kvb = mla.kv_b_proj.weight.float().view(H, dn + dv, r)
        w_uk, w_uv = kvb[:, :dn], kvb[:, dn:]  # [H, dn, r], [H, dv, r]
        qb = (mla.q_proj if cfg.q_lora_rank is None else mla.q_b_proj).weight.float()
        qb = qb.view(H, dn + dr, qb.shape[-1])
        q_lat = torch.einsum("hdr,hdc->hrc", w_uk, qb[:, :dn])  # W_UK^T W_UQ: [H, r, q_in]
        # rows: every head's latent query, then every head's rope query; the softmax scale folded in
        w_q = torch.cat([q_lat.reshape(H * r, -1), qb[:, dn:].reshape(H * dr, -1)]) * mla.scale
        kva = mla.kv_a_proj_with_mqa.weight.float()
        o = mla.o_proj.weight.float()
        w_o = torch.einsum("dhv,hvr->dhr", o.view(o.shape[0], H, dv), w_uv).reshape(o.shape[0], H * r)  # W_O W_UV
        b = dict(ln1=c(blk.input_layernorm.weight), ln2=c(blk.post_attention_layernorm.weight), w_o=c(w_o),
                 kv_norm=c(mla.kv_a_layernorm.weight), eps=blk.input_layernorm.eps, kv_eps=mla.kv_a_layernorm.eps)
        if cfg.q_lora_rank is None:  # one matmul gives the query and the kv latent
            b["w_in"], b["w_q"] = c(torch.cat([w_q, kva])), None
        else:
            b["w_in"], b["w_q"] = c(torch.cat([mla.q_a_proj.weight.float(), kva])), c(w_q)
            b["q_norm"], b["q_eps"] = c(mla.q_a_layernorm.weight), mla.q_a_layernorm.eps
        if cfg.attention_bias:  # q_a_proj, kv_a_proj_with_mqa and o_proj carry biases (q_proj never does)
            q_bias = torch.zeros(w_q.shape[0]) if cfg.q_lora_rank is None else mla.q_a_proj.bias
            b["b_in"] = c(torch.cat([q_bias, mla.kv_a_proj_with_mqa.bias]))
            b["b_o"] = c(mla.o_proj.bias)
        mlp = blk.mlp
        if isinstance(mlp, MoE):
            ex = mlp.experts
            E, h, d = ex.gate_proj.shape
            b["moe"] = mlp
            b["router"] = mlp.gate.weight.detach().float()  # fp32 like the model's router; live in fp32
            b["router_bias"] = mlp.gate.e_score_correction_bias
            b["gate_up"] = c(torch.cat([ex.gate_proj, ex.up_proj], dim=1))  # [E, 2h, d]
            b["down"] = c(ex.down_proj)  # [E, d, h]
            # All-expert form: the shared experts' SwiGLU splits by hidden unit into n_shared extra experts of width
            # h with gate 1, so routed + shared run as two matmuls: [E', 2h, d] and [d, E' h], E' = E + n_shared.
            gu, down = [b["gate_up"]], [ex.down_proj]
            sh = mlp.shared_experts
            n_sh = 0 if sh is None else sh.gate_proj.weight.shape[0] // h
            if n_sh:
                gu.append(c(torch.cat([sh.gate_proj.weight.view(n_sh, h, d), sh.up_proj.weight.view(n_sh, h, d)], 1)))
                down.append(sh.down_proj.weight.view(d, n_sh, h).transpose(0, 1))  # [n_sh, d, h]
                b["shared"] = (c(torch.cat([sh.gate_proj.weight, sh.up_proj.weight])), c(sh.down_proj.weight))
            else:
                b["shared"] = None
            b["all_gate_up"] = c(torch.cat(gu).view(-1, d))  # [E' 2h, d]
            b["all_down"] = c(torch.cat(down).permute(1, 0, 2).reshape(d, -1))  # [d, E' h]
            b["gate_row"] = torch.cat([torch.zeros(E), torch.ones(n_sh)]).to(self.dtype)[None]  # [1, E']
        else:
            b["moe"] = None
            b["mlp"] = (c(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])), c(mlp.down_proj.weight))
        return b

    # ---- entry points ----------------------------------------------------------------------------------------
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
        """input_ids [B, T] at positions start_pos[b]..; S = max(start_pos) + T, the cache length to read.
        Returns (logits [B, T, V] fp32, hidden [B, T, d])."""
        return self._decode_impl(input_ids, slots, start_pos, S)

    def mtp(self, h_prev, next_ids, slots, start_pos, S: int):
        """MTP module 1 over its cache layer: h_prev [B, T, d] (main hidden at positions start_pos..), next_ids
        [B, T] (the tokens one ahead). Returns logits [B, T, V] (fp32) of the tokens two ahead."""
        return self._mtp_impl(h_prev, next_ids, slots, start_pos, S)

    # ---- implementation ------------------------------------------------------------------------------------
    def _step_context(self, slots, start_pos, T: int, S: int) -> dict:
        """What every layer of one step shares: positions, rope matrices, the causal mask over the cache."""
        pos = start_pos[:, None] + torch.arange(T)  # [B, T]
        allowed = torch.arange(S)[None, None, :] <= pos[:, :, None]  # [B, T, S]: causal over each row's cache
        mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill_(~allowed, float("-inf"))
        return dict(pos=pos, rope=self.w["rope"][pos], mask=mask[:, :, None], rows=slots[:, None], slots=slots, S=S)

    def _decode_impl(self, input_ids, slots, start_pos, S: int):
        w = self.w
        ctx = self._step_context(slots, start_pos, input_ids.shape[1], S)
        x = F.embedding(input_ids, w["embed"])
        for i in range(self.L):
            x = self._block(w["blocks"][i], i, x, ctx)
        h = F.rms_norm(x, x.shape[-1:], w["norm"], self.cfg.rms_norm_eps)
        return _cast(F.linear(h, w["head"]), torch.float32), h

    def _mtp_impl(self, h_prev, next_ids, slots, start_pos, S: int):
        w, eps = self.w, self.cfg.rms_norm_eps
        mw = w["mtp"]
        ctx = self._step_context(slots, start_pos, next_ids.shape[1], S)
        emb = F.embedding(next_ids, w["embed"])
        h_prev = _cast(h_prev, emb.dtype)
        d = emb.shape[-1:]
        h = F.linear(torch.cat([F.rms_norm(emb, d, mw["enorm"], eps), F.rms_norm(h_prev, d, mw["hnorm"], eps)], -1),
                     mw["eh"])
        h = self._block(w["blocks"][self.L], self.L, h, ctx)
        return _cast(F.linear(F.rms_norm(h, d, mw["norm"], eps), w["head"]), torch.float32)

    def _block(self, b, layer, x, ctx):
        d = x.shape[-1:]
        x = x + self._attention(b, F.rms_norm(x, d, b["ln1"], b["eps"]), self.cache.layer(layer), ctx)
        h = F.rms_norm(x, d, b["ln2"], b["eps"])
        if b["moe"] is not None:
            return x + self._moe(b, h.reshape(-1, d[0])).view_as(h)
        return x + _swiglu(h, *b["mlp"])

    def _attention(self, b, x, kv, ctx):
        B, T, _ = x.shape
        cfg, S = self.cfg, ctx["S"]
        H, dr, r = cfg.num_attention_heads, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        a = F.linear(x, b["w_in"], b.get("b_in"))
        if b["w_q"] is None:
            q, lat_new = a.split([H * (r + dr), r + dr], dim=-1)
        else:
            c_q, lat_new = a.split([cfg.q_lora_rank, r + dr], dim=-1)
            q = F.linear(F.rms_norm(c_q, c_q.shape[-1:], b["q_norm"], b["q_eps"]), b["w_q"])
        q_lat, q_pe = q.split([H * r, H * dr], dim=-1)
        c_kv, k_pe = lat_new.split([r, dr], dim=-1)
        c_kv = F.rms_norm(c_kv, (r,), b["kv_norm"], b["kv_eps"])
        # one rotation for the H query heads and the shared key: [B, T, H+1, dr] @ [B, T, dr, dr]
        pe = torch.matmul(torch.cat([q_pe.view(B, T, H, dr), k_pe[:, :, None]], dim=2), ctx["rope"])
        kv[ctx["rows"], ctx["pos"]] = _cast(torch.cat([c_kv, pe[:, :, H]], dim=-1), kv.dtype)  # the new latents
        qc = torch.cat([q_lat.view(B, T, H, r), pe[:, :, :H]], dim=-1).view(B, T * H, r + dr)
        lat = _cast(kv[:, :S].index_select(0, ctx["slots"]), qc.dtype)  # [B, S, r+dr]: the rows' cached latents
        scores = _cast(torch.bmm(qc, lat.transpose(1, 2)).view(B, T, H, S), torch.float32)  # scale is in q
        p = _cast((scores + ctx["mask"]).softmax(dim=-1), qc.dtype)
        o_lat = torch.bmm(p.view(B, T * H, S), lat[..., :r])  # [B, T*H, r]
        return F.linear(o_lat.view(B, T, H * r), b["w_o"], b.get("b_o"))  # W_UV folded into W_O

    def _route(self, b, x):
        """The model's router (model/moe.py Gate) in fewer ops: x [N, d] -> gates [N, K], expert ids [N, K]."""
        cfg = self.cfg
        scores = F.linear(_cast(x, torch.float32), b["router"]).sigmoid()  # [N, E]
        choice = scores + b["router_bias"]
        if cfg.n_group > 1 and cfg.topk_group < cfg.n_group:  # keeping every group is no limit at all
            N = x.shape[0]
            grouped = choice.view(N, cfg.n_group, -1)  # [N, groups, E/groups]
            keep = grouped.topk(2, dim=-1).values.sum(-1).topk(cfg.topk_group, dim=-1).indices
            drop = torch.ones(N, cfg.n_group, dtype=torch.bool).scatter_(1, keep, False)
            choice = grouped.masked_fill(drop[..., None], float("-inf")).view(N, -1)
        idx = choice.topk(cfg.num_experts_per_tok, dim=-1).indices
        w = scores.gather(1, idx)  # gates from the raw s, not s + b
        if cfg.norm_topk_prob:
            return w * (cfg.routed_scaling_factor / (w.sum(-1, keepdim=True) + 1e-20)), idx
        return w * cfg.routed_scaling_factor, idx

    def _moe(self, b, x):
        """x [N, d] -> [N, d]: routed experts + shared experts."""
        w, idx = self._route(b, x)
        w = _cast(w, x.dtype)
        N, K = idx.shape
        E = b["gate_up"].shape[0]
        if 8 * N * K > E:  # every expert, the shared ones included, as two matmuls; zero gate for the unchosen
            cw = b["gate_row"].expand(N, -1).scatter(1, idx, w)  # [N, E']
            g, u = F.linear(x, b["all_gate_up"]).view(N, cw.shape[1], -1).chunk(2, dim=-1)
            return F.linear((F.silu(g) * u * cw[..., None]).view(N, -1), b["all_down"])
        # few tokens, many experts: copy out only the chosen experts' weights
        g, u = torch.einsum("nd,nkhd->nkh", x, b["gate_up"][idx]).chunk(2, dim=-1)
        y = torch.einsum("nkh,nkdh->nd", F.silu(g) * u * w[..., None], b["down"][idx])
        return y + _swiglu(x, *b["shared"]) if b["shared"] is not None else y


def _swiglu(x, w_gate_up, w_down):
    g, u = F.linear(x, w_gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(g) * u, w_down)


def _cast(t, dtype):
    return t if t.dtype == dtype else t.to(dtype)  # a no-op .to still costs a dispatch
