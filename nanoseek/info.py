"""`nanoseek info`: what a DeepSeek-V3 shape costs, computed from the config alone (nothing is allocated, so the
real 671B shape is instant).

- parameters: total, and active per token (the experts a token is routed to, not all of them; its one row of
  the embedding table; the whole output head), each also without the embedding and the output head; the main
  model and the MTP modules apart (MTP shares the embedding and the head, so its own count has neither);
- KV-cache bytes per token: MLA's latent (kv_lora_rank + qk_rope_head_dim per layer) against what standard
  multi-head attention would cache (per-head keys of qk_nope+qk_rope and values of v_head_dim);
- forward FLOPs per token, counted as 2 x (active matmul parameters: every Linear a token goes through, the
  router and the output head included, the embedding lookup and norms excluded) + attention: 2·H·(d_qk + d_v)
  per key attended per layer (QK^T and PV), in the expanded form, for a token attending over `context` keys.

    nanoseek info deepseek-v3              # a preset name (configs/NAME.toml), a .toml path or a checkpoint dir
    nanoseek info cpu-tiny --json --set model.num_hidden_layers=8
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nanoseek.config import ModelConfig, load_preset


@dataclass
class LayerParams:
    """Parameters of one decoder block, split by what a token touches."""

    attn: int  # MLA projections + their norms
    norms: int  # the block's two RMSNorms
    ffn_total: int  # dense MLP, or gate + all routed experts + shared experts
    ffn_active: int  # dense MLP, or gate + the top-k routed experts + shared experts
    attn_matmul: int  # attention Linear weights only (for FLOPs)
    ffn_matmul_active: int  # FFN Linear weights a token multiplies by (router included)

    @property
    def total(self) -> int:
        return self.attn + self.norms + self.ffn_total

    @property
    def active(self) -> int:
        return self.attn + self.norms + self.ffn_active


def layer_params(cfg: ModelConfig, moe: bool) -> LayerParams:
    d, H = cfg.hidden_size, cfg.num_attention_heads
    bias = cfg.attention_bias
    if cfg.q_lora_rank is None:
        q = d * H * cfg.qk_head_dim
        q_norm = 0
    else:
        q = d * cfg.q_lora_rank + (cfg.q_lora_rank if bias else 0) + cfg.q_lora_rank * H * cfg.qk_head_dim
        q_norm = cfg.q_lora_rank
    kv_a = d * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + ((cfg.kv_lora_rank + cfg.qk_rope_head_dim) if bias else 0)
    kv_b = cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    o = H * cfg.v_head_dim * d + (d if bias else 0)
    attn_matmul = q + kv_a + kv_b + o
    attn = attn_matmul + q_norm + cfg.kv_lora_rank
    if moe:
        expert = 3 * d * cfg.moe_intermediate_size
        gate = cfg.n_routed_experts * d
        shared = cfg.n_shared_experts * expert
        ffn_total = gate + cfg.n_routed_experts * expert + shared
        ffn_active = gate + cfg.num_experts_per_tok * expert + shared
    else:
        ffn_total = ffn_active = 3 * d * cfg.intermediate_size
    return LayerParams(attn=attn, norms=2 * d, ffn_total=ffn_total, ffn_active=ffn_active, attn_matmul=attn_matmul,
                       ffn_matmul_active=ffn_active)


def param_counts(cfg: ModelConfig) -> dict:
    """Parameter counts of the main model and of the MTP modules (nn.Parameters; buffers such as the routing
    correction bias are not parameters)."""
    d, V = cfg.hidden_size, cfg.vocab_size
    dense, moe = layer_params(cfg, False), layer_params(cfg, True)
    n_dense = cfg.first_k_dense_replace
    n_moe = cfg.num_hidden_layers - n_dense
    embed = V * d
    head = 0 if cfg.tie_word_embeddings else V * d
    body_total = n_dense * dense.total + n_moe * moe.total + d  # + final norm
    body_active = n_dense * dense.active + n_moe * moe.active + d
    # MTP module (V3 §2.2): enorm, hnorm, eh_proj (2d -> d), one MoE block, its head norm; embedding/head shared.
    mtp_one_total = 3 * d + 2 * d * d + moe.total
    mtp_one_active = 3 * d + 2 * d * d + moe.active
    D = cfg.num_nextn_predict_layers
    # A token uses ONE row of the embedding table (a lookup, no matmul) but the whole output head: the parameters
    # its loss sends gradients to. This is DeepSeek's count (V2-Lite 2.4B, V2 21B, V3 37B activated).
    return {
        "main": {
            "total": body_total + embed + head,
            "total_without_embeddings": body_total,
            "active": body_active + (0 if cfg.tie_word_embeddings else d) + V * d,
            "active_without_embeddings": body_active,
            "embedding": embed,
            "output_head": head,
        },
        "mtp": {"modules": D, "total": D * mtp_one_total, "active": D * mtp_one_active},
    }


def matmul_params_per_token(cfg: ModelConfig, mtp: bool = False) -> int:
    """Weights each token is multiplied by in a forward pass (no embedding lookup, no norms)."""
    dense, moe = layer_params(cfg, False), layer_params(cfg, True)
    n_dense = cfg.first_k_dense_replace
    n_moe = cfg.num_hidden_layers - n_dense
    head = cfg.vocab_size * cfg.hidden_size
    if mtp:  # one MTP depth: eh_proj + a MoE block + the shared head
        return 2 * cfg.hidden_size**2 + moe.attn_matmul + moe.ffn_matmul_active + head
    return n_dense * (dense.attn_matmul + dense.ffn_matmul_active) + n_moe * (moe.attn_matmul + moe.ffn_matmul_active) \
        + head


def attention_flops_per_token(cfg: ModelConfig, keys: float, layers: int | None = None) -> float:
    """QK^T (2·d_qk) and PV (2·d_v) multiply-adds for each head, layer and attended key (expanded MLA form)."""
    layers = cfg.num_hidden_layers if layers is None else layers
    return 2.0 * layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * keys


def forward_flops_per_token(cfg: ModelConfig, keys: float) -> float:
    """Main-model forward FLOPs for one token attending over `keys` keys: 2 x matmul params + attention."""
    return 2.0 * matmul_params_per_token(cfg) + attention_flops_per_token(cfg, keys)


def train_flops_per_token(cfg: ModelConfig, seq_len: int, mtp: bool = False) -> float:
    """Forward + backward (3x forward) FLOPs per token of a causal training step over sequences of `seq_len`:
    a token attends over (seq_len + 1) / 2 keys on average. With `mtp`, the MTP modules' FLOPs are added."""
    keys = (seq_len + 1) / 2
    f = forward_flops_per_token(cfg, keys)
    if mtp:
        D = cfg.num_nextn_predict_layers
        f += D * (2.0 * matmul_params_per_token(cfg, mtp=True) + attention_flops_per_token(cfg, keys, layers=1))
    return 3.0 * f


def kv_cache_bytes(cfg: ModelConfig, bytes_per_value: int = 2, mtp: bool = False) -> dict:
    """Bytes cached per token over all layers: MLA's latent vs full per-head K and V of standard MHA."""
    layers = cfg.num_hidden_layers + (cfg.num_nextn_predict_layers if mtp else 0)
    latent = layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * bytes_per_value
    full = layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * bytes_per_value
    return {"latent": latent, "full_kv": full, "ratio": full / latent, "bytes_per_value": bytes_per_value}


def describe(cfg: ModelConfig, context: int | None = None, bytes_per_value: int = 2) -> dict:
    context = context or min(cfg.max_position_embeddings, 4096)
    return {
        "params": param_counts(cfg),
        "kv_cache_bytes_per_token": kv_cache_bytes(cfg, bytes_per_value),
        "flops": {
            "context": context,
            "matmul_params_per_token": matmul_params_per_token(cfg),
            "forward_per_token": forward_flops_per_token(cfg, context),
            "forward_per_token_no_attention": 2.0 * matmul_params_per_token(cfg),
            "attention_per_token": attention_flops_per_token(cfg, context),
            "how": "2 x matmul params a token goes through (router and output head included; embedding lookup "
                   "and norms excluded) + 2 x layers x heads x (d_qk + d_v) x context (QK^T and PV, expanded MLA)",
        },
    }


# ---- training estimate ----------------------------------------------------------------------------------------
GPU_BF16_TFLOPS = {"H100": 989.0, "A100": 312.0}  # dense bf16 peaks (vendor figures)


def training_estimate(preset, gpus: int = 1, mfu: float = 0.2) -> dict | None:
    """Time and memory of the preset's pretraining on `gpus` GPUs: arithmetic, not a measurement.

    Time = train FLOPs (train_flops_per_token with MTP x steps x global batch x grad_accum x seq_len) / (gpus x
    peak x mfu). Memory per GPU = 16 bytes per parameter (fp32 weight + grad + two AdamW moments), divided by
    `gpus` under FSDP, plus activations of one micro-batch by Korthikanti et al. 2022 (per layer and token,
    bf16, flash attention so no s^2 term): 15h bytes for attention and norms + 19h x (ffn width / 4h) for the
    MLP (the active experts' width in MoE layers), and fp32 logits of the main and MTP heads."""
    if "pretrain" not in preset.raw:
        return None
    cfg, pre, data = preset.model, preset.section("pretrain"), preset.section("data")
    strategy = preset.section("parallel").strategy if "parallel" in preset.raw else "ddp"
    tokens = pre.steps * pre.batch_size * pre.grad_accum * data.seq_len
    flops = train_flops_per_token(cfg, data.seq_len, mtp=cfg.num_nextn_predict_layers > 0) * tokens
    p = param_counts(cfg)
    params = p["main"]["total"] + p["mtp"]["total"]
    states = 16 * params / (gpus if strategy == "fsdp" else 1)
    micro = max(pre.batch_size // gpus, 1) * data.seq_len  # tokens per micro-batch per GPU
    h = cfg.hidden_size
    moe_width = (cfg.num_experts_per_tok + cfg.n_shared_experts) * cfg.moe_intermediate_size
    per_token = 0.0
    for i in range(cfg.num_hidden_layers + cfg.num_nextn_predict_layers):
        width = moe_width if (i >= cfg.num_hidden_layers or cfg.is_moe_layer(i)) else cfg.intermediate_size
        per_token += 15 * h + 19 * h * width / (4 * h)
    acts = micro * (per_token + 4 * cfg.vocab_size * (1 + cfg.num_nextn_predict_layers))
    return {
        "tokens": tokens, "train_flops": flops, "gpus": gpus, "assumed_mfu": mfu, "strategy": strategy,
        "hours": {k: flops / (gpus * v * 1e12 * mfu) / 3600 for k, v in GPU_BF16_TFLOPS.items()},
        "memory_per_gpu_bytes": {"states": states, "activations": acts, "total": states + acts},
    }


# ---- CLI ------------------------------------------------------------------------------------------------------
def load_model_config(source: str, sets: list[str] | None = None) -> tuple[ModelConfig, str]:
    """A preset name, a .toml path, or a checkpoint directory (config.json) -> ModelConfig."""
    p = Path(source)
    if p.is_dir():
        from nanoseek.checkpoint import read_config

        if sets:
            from nanoseek.config import ConfigError

            raise ConfigError("--set applies to presets, not to checkpoint directories")
        return read_config(p), str(p)
    preset = load_preset(source, sets)
    return preset.model, str(preset.path)


def _human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def format_report(info: dict, source: str) -> str:
    p, kv, fl = info["params"], info["kv_cache_bytes_per_token"], info["flops"]
    m, t = p["main"], p["mtp"]
    lines = [
        f"model: {source}",
        f"parameters (main model)  total {_human(m['total'])} ({m['total']:,})"
        f"   without embedding+head {_human(m['total_without_embeddings'])}",
        f"active per token         {_human(m['active'])} ({m['active']:,})"
        f"   without embedding+head {_human(m['active_without_embeddings'])}",
        f"embedding {_human(m['embedding'])}, output head {_human(m['output_head'])}",
        f"MTP ({t['modules']} module{'s' if t['modules'] != 1 else ''}, embedding/head shared)"
        f"  total {_human(t['total'])}   active {_human(t['active'])}",
        f"KV cache per token ({kv['bytes_per_value']}-byte values, all layers): latent {_human(kv['latent'], 'B')}"
        f" vs full per-head K/V {_human(kv['full_kv'], 'B')} ({kv['ratio']:.1f}x smaller)",
        f"forward FLOPs per token at context {fl['context']}: {_human(fl['forward_per_token'])}"
        f" (matmuls {_human(fl['forward_per_token_no_attention'])} + attention {_human(fl['attention_per_token'])})",
        f"  counted as {fl['how']}",
    ]
    return "\n".join(lines)


def add_args(parser) -> None:
    parser.add_argument("source", nargs="?", default="cpu-tiny",
                        help="preset name (configs/NAME.toml), path to a .toml, or a checkpoint directory")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a preset field")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    parser.add_argument("--context", type=int, default=None,
                        help="keys a token attends over for the FLOPs count (default: min(max_position_embeddings, "
                             "4096))")
    parser.add_argument("--bytes-per-value", type=int, default=2, help="cache element size (2 = bf16)")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs for the training estimate of a preset")
    parser.add_argument("--mfu", type=float, default=0.2, help="assumed MFU for the training estimate")


def run(args) -> int:
    cfg, source = load_model_config(args.source, args.set)
    info = describe(cfg, args.context, args.bytes_per_value)
    if not Path(args.source).is_dir():
        est = training_estimate(load_preset(args.source, args.set), args.gpus, args.mfu)
        if est:
            info["training_estimate"] = est
    if args.json:
        print(json.dumps({"source": source, **info}))
        return 0
    print(format_report(info, source))
    est = info.get("training_estimate")
    if est:
        mem = est["memory_per_gpu_bytes"]
        hours = ", ".join(f"{v:.2f} h on {est['gpus']} x {k}" for k, v in est["hours"].items())
        print(f"pretraining estimate ({_human(est['tokens'])} tokens, {est['train_flops']:.3g} FLOP, "
              f"{est['strategy']}, assumed MFU {est['assumed_mfu']:.0%}): {hours}; memory per GPU "
              f"{mem['total'] / 2**30:.1f} GiB ({mem['states'] / 2**30:.1f} GiB weights+grads+AdamW, "
              f"{mem['activations'] / 2**30:.1f} GiB activations); arithmetic, not measured")
    return 0
