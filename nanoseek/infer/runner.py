"""The decode step of the engine: T new tokens per running sequence over the latent cache, written for speed.

The model's own cached forward (model/transformer.py) is the reference; this is the same math in fewer ops and
without host synchronisation. At the sizes we run on a CPU a decode step costs its op count (1-3 us of dispatch
each), not its FLOPs, so every trick here removes ops:
- absorbed MLA (DeepSeek-V2 §2.1, "W_UK can be absorbed into W_UQ, and W_UV into W_O"): the query weights are
  folded with W_UK (and the softmax scale), the output projection with W_UV, and the two score terms become ONE
  matmul over the cached row [c_kv ‖ k_pe]: (W_UK^T q_nope ‖ q_pe) · (c_kv ‖ k_pe) = q_nope·k_nope + q_pe·k_pe;
  the query down-projection and kv_a_proj_with_mqa (both read the block input) are one matmul;
- RoPE as one matmul per step shape: a block matrix diag(I_r, R[pos]) [r+dr, r+dr] rotates the rope part of every
  head's [latent query ‖ rope query] and of the new cache row [c_kv ‖ k_pe] while passing the latent part through
  exactly (x·1 + Σ y·0 = x), so the query is used as it comes out of its projection, without splits and concats;
- RMSNorm weights folded into the next matmul (input_layernorm into the fused input projection,
  post_attention_layernorm into the router and experts, the final norms into the heads), and the norm factor
  rsqrt(mean(x²) + eps) as a matmul with a [d, 1] column of 1/d; the q_a and kv_a norms of one row are ONE grouped
  norm (a [width, groups] averaging matrix and a [groups, width] matrix that spreads the factors, with the norm
  weights in it); F.rms_norm on CPU is a composite of ~8 dispatched ops;
- the cache pool is read as a view when the batch's slots are one contiguous range (the engine's usual case), else
  gathered with one index_select; new rows are written with one index_copy_ per layer into a flat view of the pool;
  no causal mask when every row attends to the whole of its cache (T = 1, equal lengths);
- MoE for the few tokens of a decode step without the sort/count dispatch: run every expert (shared ones
  included) as two matmuls with a zero gate for the unchosen ones (the same weighted sum the model computes), or,
  at one token (tokens x experts per token x 3 <= all experts), copy out that token's experts' rows and run only
  those: a batch-1 step is memory-bound, and on cpu-tiny reading 3 of 9 experts beats reading all 9 (8% of a step),
  while at 2+ tokens the copies cost more than they save (the model's sorted grouped matmuls measured 1.3 ms a
  layer here against 0.1-0.5 ms for all experts, at 8-64 tokens);
- constants as tensors: a Python float in an op costs one more dispatch (a wrapped-number copy);
- no MoE load statistics are counted: generating must not move the balance bias (V3 eq. 16) of a model in training.
The folded weights are derived from the live parameters and re-derived whenever those change (an optimizer step
bumps their version counters), so one engine serves a model that RL keeps training. In `dtype` bf16 they are
bf16 copies (slower than fp32 on cpu-tiny: bench/decode.py --dtype bfloat16). Prefill runs the model itself
(expanded MLA). tests/test_engine.py and tests/test_fast_paths.py check every path against the full forward.
torch.compile of the layer stack (fixed shapes, batch 1) measured no faster with inductor's Python wrapper and 20%
faster with its C++ wrapper (0.75 vs 0.93 ms CPU a step, loaded machine) after a 50 s compile per shape, so the
step stays eager.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanoseek.model.moe import MoE, grouped_mm_ok, sort_by_expert
from nanoseek.model.rope import rope_cos_sin


class Runner:
    def __init__(self, model, cache, dtype: torch.dtype = torch.float32):
        self.model, self.cache, self.dtype = model, cache, dtype
        self.cfg = cfg = model.config
        self.L = cfg.num_hidden_layers
        # the tensors whose version counters tell that the weights changed (listed once: walking the module tree
        # every step costs more than a tiny model's decode step). Not the MoE load counters: prefill restores them
        # with copy_, which bumps their versions, and nothing derived depends on them.
        counters = {id(mod.load) for mod in model.modules() if isinstance(mod, MoE)}
        self._watched = list(model.parameters()) + [t for t in model.buffers() if id(t) not in counters]
        self._versions = None
        self.w: dict = {}
        # per layer, the pool as rows [slots * max_len, r + dr]: one index_copy_ writes a step's new latents
        self._flat = [cache.buf[i].view(-1, cache.buf.shape[-1]) for i in range(cache.n_layers)]
        self._arange = torch.arange(cache.max_len)
        self._ctx = None  # the last step context and its key (slots, start positions, T, S)
        self._tiny = torch.tensor(1e-20)
        # RoPE by block matrices diag(I, R) up to this many rows a step, else R on the rope parts in place
        # (measured: equal at 8 rows; at 64 rows the block matrices cost 4x the time)
        self.rope_block_rows = 8  # tensors, not Python floats: a Python scalar costs one more dispatch
        # MoE path: gather each token's experts when tokens x experts-per-token x gather_ratio <= all experts
        # (measured on cpu-tiny: gathering 3 of 9 experts pays at 1 token, not at 2)
        self.gather_ratio = 3.0
        # from this many tokens on, routed experts run on their own tokens only (sorted, grouped matmuls) instead of
        # every expert on every token (measured on cpu-tiny, one thread, per MoE layer: 16 tokens 0.41 vs 0.34 ms,
        # 32 0.47 vs 0.52, 64 0.66 vs 0.96, 256 1.45 vs 7.55: the all-expert form's [N, E' 2h] activations leave
        # the cache)
        self.grouped_rows = 32

    # ---- derived weights -----------------------------------------------------------------------------------
    def sync(self) -> None:
        """Re-derive the folded weights if any live parameter or buffer changed since the last call."""
        versions = [t._version for t in self._watched]
        if versions != self._versions:
            with torch.no_grad():
                self.w = self._derive()
            self._ctx = None
            self._versions = versions

    def _derive(self) -> dict:
        m, dt, cfg = self.model, self.dtype, self.cfg
        d = cfg.hidden_size

        def c(t):
            return t.detach().to(dt).contiguous()

        blocks = list(m.model.layers) + [mod.block for mod in m.mtp]
        head = m.lm_head.weight.detach().float()
        w = dict(embed=c(m.model.embed_tokens.weight), head=c(head * m.model.norm.weight.float()),
                 norm=c(m.model.norm.weight),
                 eps=torch.tensor([cfg.rms_norm_eps], dtype=dt), mean_col=torch.full((d, 1), 1.0 / d, dtype=dt),
                 blocks=[self._derive_block(b, c) for b in blocks], rope=c(self._rope_matrices()))
        if len(m.mtp):
            mod = m.mtp[0]
            # enorm(emb) ‖ hnorm(h_prev) as one grouped norm over [emb ‖ h_prev]; the norm weights go in the
            # spreading matrix, the MTP module's final norm into its copy of the shared head
            G, eps, GT = _group_norm_mats([(d, mod.enorm.weight, mod.enorm.eps), (d, mod.hnorm.weight, mod.hnorm.eps)])
            w["mtp"] = dict(G=c(G), eps=c(eps), GT=c(GT), eh=c(mod.eh_proj.weight),
                            head=c(head * mod.norm.weight.float()), norm_eps=torch.tensor([mod.norm.eps], dtype=dt),
                            norm=c(mod.norm.weight))
        return w

    def _rope_matrices(self) -> torch.Tensor:
        """RoPE of every cache position as a [dr, dr] matrix, [max_len, dr, dr] (fp32): x @ R[pos] equals
        model.rope.apply_rope (its pairing, its [first halves, second halves] output layout, YaRN's scale)."""
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
        ln1 = blk.input_layernorm.weight.float()
        ln2 = blk.post_attention_layernorm.weight.float()
        kvb = mla.kv_b_proj.weight.float().view(H, dn + dv, r)
        w_uk, w_uv = kvb[:, :dn], kvb[:, dn:]  # [H, dn, r], [H, dv, r]
        qb = (mla.q_proj if cfg.q_lora_rank is None else mla.q_b_proj).weight.float()
        qb = qb.view(H, dn + dr, qb.shape[-1])
        q_lat = torch.einsum("hdr,hdc->hrc", w_uk, qb[:, :dn])  # W_UK^T W_UQ: [H, r, q_in]
        # rows per head [latent query (r) ‖ rope query (dr)], the row layout of a cache row; softmax scale folded in
        w_q = torch.cat([q_lat, qb[:, dn:]], dim=1).reshape(H * (r + dr), -1) * mla.scale
        kva = mla.kv_a_proj_with_mqa.weight.float()
        o = mla.o_proj.weight.float()
        w_o = torch.einsum("dhv,hvr->dhr", o.view(o.shape[0], H, dv), w_uv).reshape(o.shape[0], H * r)  # W_O W_UV
        kv_norm = (r, mla.kv_a_layernorm.weight, mla.kv_a_layernorm.eps)
        b = dict(w_o=c(w_o), eps=torch.tensor([blk.input_layernorm.eps], dtype=self.dtype),
                 eps2=torch.tensor([blk.post_attention_layernorm.eps], dtype=self.dtype))
        if cfg.q_lora_rank is None:  # one matmul gives the query and the kv latent
            w_in, q_rows = torch.cat([w_q * ln1, kva * ln1]), H * (r + dr)
            segs = [(q_rows, None, 0.0), kv_norm, (dr, None, 0.0)]
            b["w_q"] = None
        else:
            w_in, q_rows = torch.cat([mla.q_a_proj.weight.float() * ln1, kva * ln1]), cfg.q_lora_rank
            segs = [(q_rows, mla.q_a_layernorm.weight, mla.q_a_layernorm.eps), kv_norm, (dr, None, 0.0)]
            b["w_q"] = c(w_q)
        b["w_in"], b["q_rows"] = c(w_in), q_rows
        b["G"], b["G_eps"], b["GT"] = (c(t) for t in _group_norm_mats(segs))
        if cfg.attention_bias:  # q_a_proj, kv_a_proj_with_mqa and o_proj carry biases (q_proj never does)
            q_bias = torch.zeros(q_rows) if cfg.q_lora_rank is None else mla.q_a_proj.bias
            b["b_in"] = c(torch.cat([q_bias, mla.kv_a_proj_with_mqa.bias]))
            b["b_o"] = c(mla.o_proj.bias)
        mlp = blk.mlp
        if isinstance(mlp, MoE):
            ex = mlp.experts
            E, h, d = ex.gate_proj.shape
            b["moe"] = mlp
            b["router"] = mlp.gate.weight.detach().float() * ln2  # fp32 like the model's router
            b["router_bias"] = mlp.gate.e_score_correction_bias.detach().float()
            gate_up = torch.cat([ex.gate_proj, ex.up_proj], dim=1).float() * ln2  # [E, 2h, d]
            # routed_scaling_factor (V3 eq. 12's gates are scaled) goes into the routed experts' down projections
            down_r = ex.down_proj.float() * cfg.routed_scaling_factor
            # All-expert form: the shared experts' SwiGLU splits by hidden unit into n_shared extra experts of width
            # h with gate 1, so routed + shared run as two matmuls: [E', 2h, d] and [d, E' h], E' = E + n_shared.
            gu, down = [gate_up], [down_r]
            sh = mlp.shared_experts
            n_sh = 0 if sh is None else sh.gate_proj.weight.shape[0] // h
            if n_sh:
                sg, su = sh.gate_proj.weight.float() * ln2, sh.up_proj.weight.float() * ln2
                gu.append(torch.cat([sg.view(n_sh, h, d), su.view(n_sh, h, d)], 1))
                down.append(sh.down_proj.weight.float().view(d, n_sh, h).transpose(0, 1))  # [n_sh, d, h]
            # expert tables, routed then shared: [E', 2h, d] (rows [gate; up]) and [E', h, d] (down transposed). The
            # all-expert path reads them whole as [E' 2h, d] and [E' h, d]; the gather path copies out a token's rows
            b["gu_tab"] = c(torch.cat(gu))
            b["dn_tab"] = c(torch.cat(down).transpose(1, 2))
            b["gate_row"] = torch.cat([torch.zeros(E), torch.ones(n_sh)]).to(self.dtype)[None]  # [1, E']
            b["sh_ids"], b["sh_ones"] = torch.arange(E, E + n_sh)[None], torch.ones(1, n_sh, dtype=self.dtype)
        else:
            b["moe"] = None
            b["mlp"] = (c(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]).float() * ln2),
                        c(mlp.down_proj.weight))
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

    def mtp(self, h_prev, next_ids, slots, start_pos, S: int, last_only: bool = False, return_hidden: bool = False):
        """MTP module 1 over its cache layer: h_prev [B, T, d] (main hidden at positions start_pos..), next_ids
        [B, T] (the tokens one ahead). Returns logits [B, T, V] (fp32) of the tokens two ahead; with last_only,
        [B, 1, V] of the last position only (the others' cache rows are still written: a draft needs only the
        last position's logits, so attention output, MoE and head run for one row). With return_hidden, also the
        module's hidden state after its final norm (what its head reads; chained drafting feeds it back as h_prev)."""
        return self._mtp_impl(h_prev, next_ids, slots, start_pos, S, last_only, return_hidden)

    # ---- implementation ------------------------------------------------------------------------------------
    def _step_context(self, slots, start_pos, T: int, S: int) -> dict:
        """What every layer of one step shares: positions, the rope block matrix, the causal mask (if any), where
        the new rows go and where the batch's cache rows are."""
        sl, sp = slots.tolist(), start_pos.tolist()
        key = (sl, sp, T, S)
        if self._ctx is not None and self._ctx[0] == key:  # e.g. MTP over the positions the main model just verified
            return self._ctx[1]
        B, cfg = len(sl), self.cfg
        r, dr = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        pos = start_pos[:, None] + self._arange[:T]  # [B, T]
        R = self.w["rope"][pos.view(-1)]  # [B*T, dr, dr]
        if B * T <= self.rope_block_rows:  # diag(I_r, R[pos]): [B*T, r+dr, r+dr]
            M = torch.zeros(B * T, r + dr, r + dr, dtype=self.dtype)
            M.diagonal(dim1=-2, dim2=-1)[:, :r] = 1
            M[:, r:, r:] = R
            R = None
        else:
            M = None
        mask = None
        if T > 1 or any(p + 1 != S for p in sp):  # some row must not see some of the S cached positions
            allowed = self._arange[:S] <= pos[:, :, None]  # [B, T, S]
            mask = torch.zeros(allowed.shape).masked_fill_(~allowed, float("-inf"))[:, :, None]  # [B, T, 1, S]
        flat = (slots[:, None] * self.cache.max_len + pos).view(-1)  # [B*T] rows of the flat pool
        ctx = dict(M=M, R=R, mask=mask, S=S, B=B, T=T, slots=slots, flat=flat)
        s0 = sl[0]
        if sl == list(range(s0, s0 + B)):  # one contiguous range of slots: every layer's rows are views of the pool
            lat = self.cache.buf[:, s0 : s0 + B, :S]  # [layers, B, S, r+dr]
            ctx["lat"] = (lat.transpose(2, 3).unbind(0), lat[..., :r].unbind(0))  # per layer: keys^T, values
        self._ctx = (key, ctx)
        return ctx

    def _decode_impl(self, input_ids, slots, start_pos, S: int):
        w = self.w
        ctx = self._step_context(slots, start_pos, input_ids.shape[1], S)
        B, T = input_ids.shape
        x = F.embedding(input_ids.reshape(-1), w["embed"])  # [N, d], N = B*T (blocks run on 2-D rows)
        for i in range(self.L):
            x = self._block(w["blocks"][i], i, x, ctx)
        h = x * _rms_factor(x, w["mean_col"], w["eps"])  # the final norm's weight is folded into the head
        # the hidden state MTP reads is the model's: after the final norm, its weight included
        return _cast(F.linear(h, w["head"]), torch.float32).view(B, T, -1), (h * w["norm"]).view(B, T, -1)

    def _mtp_impl(self, h_prev, next_ids, slots, start_pos, S: int, last_only=False, return_hidden=False):
        w = self.w
        mw = w["mtp"]
        ctx = self._step_context(slots, start_pos, next_ids.shape[1], S)
        B, T = next_ids.shape
        emb = F.embedding(next_ids.reshape(-1), w["embed"])  # [N, d]
        # h_prev is the main model's normed hidden, [emb ‖ h_prev] gets enorm ‖ hnorm as one grouped norm
        eh = torch.cat([emb, _cast(h_prev.reshape(B * T, -1), emb.dtype)], -1)  # [N, 2d]
        h = F.linear(eh * _group_factor(eh, mw["G"], mw["eps"], mw["GT"]), mw["eh"])
        h = self._block(w["blocks"][self.L], self.L, h, ctx, last_only)
        h = h * _rms_factor(h, w["mean_col"], mw["norm_eps"])  # its norm's weight is folded into the head copy
        logits = _cast(F.linear(h, mw["head"]), torch.float32).view(B, 1 if last_only else T, -1)
        return (logits, (h * mw["norm"]).view(B, logits.shape[1], -1)) if return_hidden else logits

    def _block(self, b, layer, x, ctx, last_only: bool = False):
        """x [N, d] -> [N, d] (last_only: [B, d], the last position of each row; every row's latent is cached)."""
        mc = self.w["mean_col"]
        attn = self._attention(b, x * _rms_factor(x, mc, b["eps"]), layer, ctx, last_only)
        if last_only:
            x = x.view(ctx["B"], ctx["T"], -1)[:, -1]
        x = x + attn
        h = x * _rms_factor(x, mc, b["eps2"])  # post_attention_layernorm's weight is in the router and experts
        return x + (self._moe(b, h) if b["moe"] is not None else _swiglu(h, *b["mlp"]))

    def _attention(self, b, x, layer, ctx, last_only: bool = False):
        """x [N, d] (normed, weight folded into w_in), N = B*T rows -> [N, d] ([B, d] of the last positions)."""
        cfg, S, B, T = self.cfg, ctx["S"], ctx["B"], ctx["T"]
        H, dr, r = cfg.num_attention_heads, cfg.qk_rope_head_dim, cfg.kv_lora_rank
        a = F.linear(x, b["w_in"], b.get("b_in"))  # [N, q_rows + r + dr]
        a = a * _group_factor(a, b["G"], b["G_eps"], b["GT"])  # q_a norm, kv_a norm (k_pe passes through)
        q = a[..., : b["q_rows"]] if b["w_q"] is None else F.linear(a[..., : b["q_rows"]], b["w_q"])
        M, R, mask, N = ctx["M"], ctx["R"], ctx["mask"], B * T
        # (bmm, not matmul: matmul's broadcasting costs several more dispatches)
        if M is not None:  # few rows: the block matrix rotates whole rows, no splitting
            row = torch.bmm(a[:, b["q_rows"] :].view(N, 1, r + dr), M).view(N, r + dr)  # new cache rows [c_kv ‖ k_pe]
        else:  # many rows: rotate k_pe in place with R (the block matrices would be ((r+dr)/dr)² times the memory)
            a[:, -dr:] = torch.bmm(a[:, None, -dr:], R).view(N, dr)
            row = a[:, b["q_rows"] :]
        self._flat[layer].index_copy_(0, ctx["flat"], _cast(row, self.cache.buf.dtype))
        if last_only and T > 1:  # queries of the last position only
            q, T = q.view(B, T, -1)[:, -1], 1
            M = None if M is None else M.view(B, -1, r + dr, r + dr)[:, -1]
            R = None if R is None else R.view(B, -1, dr, dr)[:, -1]
            mask = None if mask is None else mask[:, -1:]
        q = q.reshape(B * T, H, r + dr)
        if M is not None:
            q = torch.bmm(q, M)  # rope on each head's rope part
        else:
            q[..., r:] = torch.bmm(q[..., r:], R)
        qc = q.reshape(B, T * H, r + dr)
        if "lat" in ctx:  # views of the pool (written above, so they include the new rows)
            lat_t, lat_v = ctx["lat"][0][layer], ctx["lat"][1][layer]
        else:
            lat = self.cache.buf[layer, :, :S].index_select(0, ctx["slots"])  # [B, S, r+dr]
            lat_t, lat_v = lat.transpose(1, 2), lat[..., :r]
        # [B, T*H, S]; the scale is in q (a bf16 cache is read in the runner's dtype, which is the cache's)
        scores = _cast(torch.bmm(qc, _cast(lat_t, qc.dtype)), torch.float32)
        if mask is not None:
            scores = scores.view(B, T, H, S) + mask
        p = _cast(scores.softmax(dim=-1), qc.dtype)
        o_lat = torch.bmm(p.view(B, T * H, S), _cast(lat_v, qc.dtype))  # [B, T*H, r]
        return F.linear(o_lat.view(B * T, H * r), b["w_o"], b.get("b_o"))  # W_UV folded into W_O

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
        if cfg.norm_topk_prob:  # routed_scaling_factor is in the experts' down weights
            w = w / w.sum(-1, keepdim=True).add_(self._tiny)
        return w, idx

    def _moe(self, b, x):
        """x [N, d] (normed, weight folded into the router and experts) -> [N, d]: routed + shared experts."""
        w, idx = self._route(b, x)
        w = _cast(w, x.dtype)
        N, d = x.shape
        gu, dn = b["gu_tab"], b["dn_tab"]
        E_all, h = dn.shape[0], dn.shape[1]  # E' = routed + shared
        J = idx.shape[1] + b["sh_ids"].shape[1]  # experts a token runs
        if N >= self.grouped_rows and grouped_mm_ok(x, dn):
            return self._moe_grouped(b, x, w, idx)
        if N * J * self.gather_ratio > E_all:
            # every expert, the shared ones included, as two matmuls; zero gate for the unchosen
            cw = b["gate_row"].expand(N, -1).scatter(1, idx, w)  # [N, E']
            g, u = F.linear(x, gu.view(-1, d)).view(N, E_all, -1).chunk(2, dim=-1)
            return torch.mm((F.silu(g) * u * cw[..., None]).view(N, -1), dn.view(-1, d))
        # few tokens: copy out only the rows of each token's J experts (at batch 1 a step is memory-bound, and
        # reading all E' experts' weights costs more than copying J of them)
        if J > idx.shape[1]:
            sh_ids, sh_ones = (b["sh_ids"], b["sh_ones"]) if N == 1 else (b["sh_ids"].expand(N, -1),
                                                                         b["sh_ones"].expand(N, -1))
            idx, w = torch.cat([idx, sh_ids], 1), torch.cat([w, sh_ones], 1)  # [N, J]
        sel = idx.view(-1)
        out = torch.bmm(gu.index_select(0, sel).view(N, J * 2 * h, d), x.view(N, d, 1))  # [N, J 2h, 1]
        g, u = out.view(N, J, 2, h).unbind(2)
        act = (F.silu(g) * u * w[..., None]).view(N, 1, J * h)
        return torch.bmm(act, dn.index_select(0, sel).view(N, J * h, d)).view(N, d)

    def _moe_grouped(self, b, x, w, idx):
        """Many tokens: each routed expert over its own tokens (sorted by expert, one grouped matmul per projection,
        as model/moe.py's Experts), the shared experts over all of them. x [N, d], w/idx [N, K] -> [N, d]."""
        N = idx.shape[0]
        gu, dn = b["gu_tab"], b["dn_tab"]  # [E', 2h, d] rows [gate; up], [E', h, d]; routed first
        E, h, d = self.cfg.n_routed_experts, dn.shape[1], dn.shape[2]
        order, tok, counts = sort_by_expert(idx, E)  # [N K] pairs grouped by expert, their tokens; [E]
        offs = counts.cumsum(0).to(torch.int32)
        g, u = F.grouped_mm(x.index_select(0, tok), gu[:E].transpose(1, 2), offs=offs).chunk(2, dim=-1)
        ys = F.grouped_mm(F.silu(g) * u * w.reshape(-1)[order, None], dn[:E], offs=offs)  # [N K, d]
        out = torch.zeros_like(x).index_add_(0, tok, ys)
        n_sh = dn.shape[0] - E
        if n_sh:  # gate 1: the shared experts as one SwiGLU of width n_sh h
            g, u = F.linear(x, gu[E:].reshape(-1, d)).view(N, n_sh, 2, h).unbind(2)
            out = out.addmm_((F.silu(g) * u).reshape(N, n_sh * h), dn[E:].reshape(-1, d))
        return out


def _group_norm_mats(segments):
    """RMSNorm of several consecutive segments of one row as matmuls. segments: (width, weight or None, eps); a
    None weight passes its segment through unchanged. Returns G [A, g] (1/width averaging columns), eps [g] and
    GT [g, A] (spreads each segment's rsqrt factor over its columns, times the norm weight), g = groups + 1: the
    last group is the pass-through one (a zero column, eps 1, so its factor is rsqrt(0 + 1) = 1 exactly)."""
    normed = [s for s in segments if s[1] is not None]
    A, g = sum(s[0] for s in segments), len(normed) + 1
    G, GT, eps = torch.zeros(A, g), torch.zeros(g, A), torch.ones(g)
    col, j = 0, 0
    for width, weight, e in segments:
        if weight is None:
            GT[g - 1, col : col + width] = 1.0
        else:
            G[col : col + width, j] = 1.0 / width
            GT[j, col : col + width] = weight.detach().float()
            eps[j] = e
            j += 1
        col += width
    return G, eps, GT


def _rms_factor(x, mean_col, eps):
    """x [N, d] -> rsqrt(mean(x²) + eps) [N, 1]: RMSNorm without its weight, as one addmm (eps a [1] tensor)."""
    return torch.addmm(eps, x.square(), mean_col).rsqrt_()


def _group_factor(x, G, eps, GT):
    """x [N, A] -> the per-column factor of a grouped RMSNorm (see _group_norm_mats), weights included: [N, A]."""
    return torch.mm(torch.addmm(eps, x.square(), G).rsqrt_(), GT)


def _swiglu(x, w_gate_up, w_down):
    g, u = F.linear(x, w_gate_up).chunk(2, dim=-1)
    return F.linear(F.silu(g) * u, w_down)


def _cast(t, dtype):
    return t if t.dtype == dtype else t.to(dtype)  # a no-op .to still costs a dispatch
