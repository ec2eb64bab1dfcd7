"""`nanoseek info`: analytic counts agree with the real module tree and with a FLOP counter, and reproduce the
published DeepSeek sizes."""

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import nanoseek
from nanoseek.cli import main
from nanoseek.config import ModelConfig, load_preset
from nanoseek.infer.cache import LatentCache
from nanoseek.info import describe, forward_flops_per_token, kv_cache_bytes, matmul_params_per_token, param_counts
from nanoseek.model.transformer import Transformer
from tests.tiny import VARIANTS, tiny

# Published shapes (HF config.json of deepseek-ai/DeepSeek-V2-Lite and DeepSeek-V2).
V2_LITE = dict(vocab_size=102400, hidden_size=2048, intermediate_size=10944, moe_intermediate_size=1408,
               num_hidden_layers=27, num_attention_heads=16, num_key_value_heads=16, n_shared_experts=2,
               n_routed_experts=64, q_lora_rank=None, n_group=1, topk_group=1, num_experts_per_tok=6,
               first_k_dense_replace=1, num_nextn_predict_layers=0)
V2 = dict(vocab_size=102400, hidden_size=5120, intermediate_size=12288, moe_intermediate_size=1536,
          num_hidden_layers=60, num_attention_heads=128, num_key_value_heads=128, n_shared_experts=2,
          n_routed_experts=160, q_lora_rank=1536, n_group=8, topk_group=3, num_experts_per_tok=6,
          first_k_dense_replace=1, num_nextn_predict_layers=0)


def _meta_counts(cfg):
    """Counts from the real module tree, built on the meta device (no memory even for 671B)."""
    with torch.device("meta"):
        m = Transformer(cfg)
    main_p = {n: p for n, p in m.named_parameters() if not n.startswith("mtp.")}
    mtp = sum(p.numel() for n, p in m.named_parameters() if n.startswith("mtp."))
    total = sum(p.numel() for p in main_p.values())
    # Active = all of it minus the experts a token is not routed to and the embedding rows it does not look up.
    idle_experts = sum(p.numel() * (cfg.n_routed_experts - cfg.num_experts_per_tok) // cfg.n_routed_experts
                       for n, p in main_p.items() if ".mlp.experts." in n)
    emb = m.model.embed_tokens.weight
    idle_rows = 0 if cfg.tie_word_embeddings else emb.numel() - emb.shape[1]
    return total, total - idle_experts - idle_rows, mtp


@pytest.mark.parametrize("name", ["deepseek-v3", "cpu-tiny", "smoke", *VARIANTS])
def test_counts_match_module_tree(name):
    cfg = load_preset(name).model if name in ("deepseek-v3", "cpu-tiny", "smoke") else tiny(**VARIANTS[name])
    total, active, mtp = _meta_counts(cfg)
    c = param_counts(cfg)
    assert c["main"]["total"] == total
    assert c["main"]["active"] == active
    assert c["mtp"]["total"] == mtp
    assert c["main"]["total_without_embeddings"] == total - c["main"]["embedding"] - c["main"]["output_head"]
    assert c["main"]["active_without_embeddings"] < c["main"]["active"] < c["main"]["total"]


def test_deepseek_v3_published_sizes():
    c = param_counts(load_preset("deepseek-v3").model)
    assert abs(c["main"]["total"] - 671e9) / 671e9 < 0.01
    # 36.63B: DeepSeek's "37B activated" (one embedding row, the full output head); 1.01% under 37.0B.
    assert round(c["main"]["active"] / 1e9) == 37
    assert abs(c["main"]["active"] - 37e9) / 37e9 < 0.0102
    # the release is 685B: main model + MTP (its own module plus copies of embedding and head) + FP8 scales
    release = c["main"]["total"] + c["mtp"]["total"] + c["main"]["embedding"] + c["main"]["output_head"]
    assert abs(release - 685e9) / 685e9 < 0.01


def test_deepseek_v2_published_sizes():
    # The same counting reproduces the earlier papers: V2-Lite 15.7B / 2.4B, V2 236B / 21B.
    lite, v2 = param_counts(ModelConfig(**V2_LITE))["main"], param_counts(ModelConfig(**V2))["main"]
    assert round(lite["total"] / 1e8) == 157 and abs(lite["active"] - 2.4e9) / 2.4e9 < 0.025  # 2.45B
    assert round(v2["total"] / 1e9) == 236 and round(v2["active"] / 1e9) == 21  # 20.85B


def test_kv_cache_bytes():
    cfg = load_preset("deepseek-v3").model
    kv = kv_cache_bytes(cfg, bytes_per_value=2)
    assert kv["latent"] == 61 * (512 + 64) * 2
    assert kv["full_kv"] == 61 * 128 * (192 + 128) * 2
    small = tiny()
    for dtype in (torch.bfloat16, torch.float32):
        cache = LatentCache(small, 1, 4, dtype=dtype, mtp=False)
        assert kv_cache_bytes(small, dtype.itemsize)["latent"] == cache.bytes_per_token()


@pytest.mark.parametrize("variant", ["q_lora", "no_q_lora", "groups", "no_norm_topk"])
def test_flops_match_flop_counter(variant, monkeypatch):
    """torch's FLOP counter over a real forward (non-causal SDPA count: every token attends T keys) equals
    tokens x forward_flops_per_token(keys=T). The model's plain paths run, as the counter knows their ops: experts
    one matmul per expert (it has no formula for grouped_mm), and values not zero-padded for the fused kernel."""
    import functools

    import nanoseek.model.attention as attention

    monkeypatch.setattr(attention, "causal_attention", functools.partial(attention.causal_attention, pad_v=False))
    cfg = tiny(**VARIANTS[variant])
    m = Transformer(cfg).eval()
    for moe in m.moe_layers():
        moe.experts.grouped = False
    B, T = 2, 16
    x = torch.randint(0, cfg.vocab_size, (B, T))
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        m(x)
    assert fc.get_total_flops() == pytest.approx(B * T * forward_flops_per_token(cfg, keys=T), rel=1e-9)
    assert describe(cfg, context=T)["flops"]["forward_per_token"] == forward_flops_per_token(cfg, T)
    assert matmul_params_per_token(cfg) < param_counts(cfg)["main"]["active"]


def test_cli_preset_json(capsys):
    assert main(["info", "deepseek-v3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert abs(out["params"]["main"]["total"] - 671e9) / 671e9 < 0.01
    assert out["kv_cache_bytes_per_token"]["ratio"] > 50
    assert main(["info", "cpu-tiny", "--set", "model.num_hidden_layers=8", "--json"]) == 0
    eight = json.loads(capsys.readouterr().out)
    assert main(["info", "cpu-tiny", "--json"]) == 0
    four = json.loads(capsys.readouterr().out)
    assert eight["params"]["main"]["total"] > four["params"]["main"]["total"]
    assert main(["info", "cpu-tiny"]) == 0
    assert "active per token" in capsys.readouterr().out


def test_cli_checkpoint_dir_and_errors(tmp_path, capsys):
    cfg = tiny()
    nanoseek.save(Transformer(cfg), tmp_path / "ckpt")
    assert main(["info", str(tmp_path / "ckpt"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["params"]["main"]["total"] == param_counts(cfg)["main"]["total"]
    assert main(["info", "cpu-tiny", "--set", "model.hiden_size=3"]) == 2
    err = capsys.readouterr().err
    assert "hiden_size" in err and "hidden_size" in err


def test_training_estimate_is_the_stated_arithmetic():
    from nanoseek.config import load_preset
    from nanoseek.info import GPU_BF16_TFLOPS, param_counts, train_flops_per_token, training_estimate

    preset = load_preset("gpu-8")
    pre, data, cfg = preset.section("pretrain"), preset.section("data"), preset.model
    est = training_estimate(preset, gpus=8, mfu=0.25)
    tokens = pre.steps * pre.batch_size * pre.grad_accum * data.seq_len
    assert est["tokens"] == tokens
    flops = train_flops_per_token(cfg, data.seq_len, mtp=True) * tokens
    assert est["hours"]["H100"] == pytest.approx(flops / (8 * GPU_BF16_TFLOPS["H100"] * 1e12 * 0.25) / 3600)
    p = param_counts(cfg)
    params = p["main"]["total"] + p["mtp"]["total"]
    assert est["strategy"] == "fsdp"
    assert est["memory_per_gpu_bytes"]["states"] == pytest.approx(16 * params / 8)  # FSDP shards the states
    ddp = training_estimate(load_preset("gpu-8", ["parallel.strategy=ddp"]), gpus=8)
    assert ddp["memory_per_gpu_bytes"]["states"] == pytest.approx(16 * params)  # DDP replicates them
    assert training_estimate(load_preset("deepseek-v3")) is None  # no [pretrain]: nothing to estimate
