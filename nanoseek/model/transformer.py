"""The DeepSeek-V3 decoder: pre-norm blocks of MLA + (dense MLP | DeepSeekMoE), a final norm, an output head,
and MTP modules that share the embedding and the head.

Module names are the official checkpoint names (`model.layers.N.self_attn.q_a_proj`, ...), so the mapping to
the checkpoint format (nanoseek/checkpoint.py) only has to handle the stacked experts and the MTP layers.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from nanoseek.config import ModelConfig
from nanoseek.model.attention import MLA
from nanoseek.model.moe import MLP, Experts, Gate, MoE
from nanoseek.model.mtp import MTPModule
from nanoseek.model.rope import rope_cos_sin, rope_frequencies


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: bool):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = MLA(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if moe else MLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, cos, sin, **cache_kw):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, **cache_kw)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, cfg.is_moe_layer(i)) for i in range(cfg.num_hidden_layers))
        self.norm = nn.RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)


@dataclass
class ModelOutput:
    logits: torch.Tensor  # [B, T, vocab]
    hidden: torch.Tensor  # [B, T, d], after the final norm (what MTP module 1 reads)
    mtp_logits: list = field(default_factory=list)  # D tensors [B, T-k, vocab]
    aux_loss: torch.Tensor | None = None  # sequence-wise balance loss, summed over MoE layers


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        # MTP modules are always MoE blocks (HF get_mtp_config sets first_k_dense_replace = 0 for them).
        self.mtp = nn.ModuleList(MTPModule(cfg, Block(cfg, moe=True)) for _ in range(cfg.num_nextn_predict_layers))
        inv_freq, self.rope_scale = rope_frequencies(cfg)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(self._init_weights)

    def _init_weights(self, m):
        std = self.config.initializer_range
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, Gate):
            nn.init.normal_(m.weight, std=std)
        elif isinstance(m, Experts):
            for p in (m.gate_proj, m.up_proj, m.down_proj):
                nn.init.normal_(p, std=std)
        elif isinstance(m, nn.RMSNorm):
            nn.init.ones_(m.weight)

    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids, cache=None, slots=None, start_pos=None, mtp: bool = False, packed=None,
                logits_for=None) -> ModelOutput:
        """input_ids [B, T]. With `cache` (a LatentCache), the tokens of row b sit at positions start_pos[b]...;
        their latents go to slot slots[b]. Rows whose start_pos are all 0 take the expanded (prefill) form.

        Training-only options (nanoseek/model/packed.py): `packed` (a PackedRows): input_ids [1, S] are its
        distinct tokens and attention runs over its rows. `logits_for` [M]: indices into the flattened [B * T]
        positions; the head then runs on those positions only and logits are [M, vocab] (MTP not supported)."""
        B, T = input_ids.shape
        if start_pos is None:
            start_pos = torch.zeros(B, dtype=torch.long, device=input_ids.device)
        if packed is not None:
            if cache is not None or B != 1:
                raise ValueError("packed rows take input_ids [1, S] (their distinct tokens) and no cache")
            positions = packed.positions[None]  # [1, S]
        else:
            positions = start_pos[:, None] + torch.arange(T, device=input_ids.device)  # [B, T]
        cos, sin = rope_cos_sin(self.inv_freq, self.rope_scale, positions)
        prefill = cache is None or not bool(start_pos.any())
        x = self.model.embed_tokens(input_ids)
        # the MoE layers this call runs (not model.moe_layers(): walking modules() after they set aux_loss breaks
        # torch.compile graphs, and MTP blocks that do not run now must not add a stale loss)
        ran = [layer.mlp for layer in self.model.layers if isinstance(layer.mlp, MoE)]
        for i, layer in enumerate(self.model.layers):
            kw = {} if cache is None else dict(kv_cache=cache.layer(i), slots=slots, start_pos=start_pos)
            if packed is not None:
                kw = dict(packed=packed)
            x = layer(x, cos, sin, prefill=prefill, **kw)
        h = self.model.norm(x)
        if logits_for is not None:
            if mtp:
                raise ValueError("logits_for computes the main head only; call with mtp=False")
            out = ModelOutput(logits=self.lm_head(h.reshape(B * T, -1)[logits_for]), hidden=h)  # [M, vocab]
        else:
            out = ModelOutput(logits=self.lm_head(h), hidden=h)
        if mtp and self.mtp:
            # Depth k: h^{k-1}_i and Emb(t_{i+k}) predict t_{i+k+1}, for i < T - k (V3 eq. 21-23).
            h_prev = h
            for k, module in enumerate(self.mtp, start=1):
                if T - k < 1:
                    break
                emb = self.model.embed_tokens(input_ids[:, k:])
                c, s = cos[:, : T - k], sin[:, : T - k]
                h_prev = module(h_prev[:, : T - k], emb, c, s, prefill=True)
                if isinstance(module.block.mlp, MoE):
                    ran.append(module.block.mlp)
                out.mtp_logits.append(self.lm_head(module.norm(h_prev)))
        if self.training:
            losses = [m.aux_loss for m in ran if m.aux_loss is not None]
            out.aux_loss = torch.stack(losses).sum() if losses else None
        return out

    def mtp_step(self, h_prev, next_ids, cache, slots, start_pos, depth: int = 1):
        """One MTP module over a cache, for drafting: h_prev [B, T, d] are the hidden states of positions
        start_pos.., next_ids [B, T] the tokens one ahead of them. Returns (logits [B, T, vocab], h [B, T, d])."""
        module = self.mtp[depth - 1]
        T = next_ids.shape[1]
        positions = start_pos[:, None] + torch.arange(T, device=next_ids.device)
        cos, sin = rope_cos_sin(self.inv_freq, self.rope_scale, positions)
        layer = self.config.num_hidden_layers + depth - 1
        h = module(h_prev, self.model.embed_tokens(next_ids), cos, sin, kv_cache=cache.layer(layer), slots=slots,
                   start_pos=start_pos, prefill=not bool(start_pos.any()))
        return self.lm_head(module.norm(h)), h
