"""nanoseek's model is DeepSeek-V3: logits equal transformers' DeepseekV3ForCausalLM, checkpoints both ways."""

import os

import pytest
import torch

import nanoseek
from nanoseek.infer.cache import LatentCache
from nanoseek.model.transformer import Transformer
from tests.tiny import VARIANTS, tiny

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")  # a test dependency: installed by test.sh, never skipped in CI


def _random_model(cfg, seed=0):
    torch.manual_seed(seed)
    m = Transformer(cfg).eval()
    for moe in m.moe_layers():  # a non-zero correction bias changes which experts are chosen
        moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return m


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_nanoseek_save_hf_load(variant, tmp_path):
    cfg = tiny(**VARIANTS[variant])
    m = _random_model(cfg)
    nanoseek.save(m, tmp_path / "ckpt")
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ckpt", dtype=torch.float32).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 33))
    with torch.no_grad():
        diff = (m(x).logits - hf(x).logits).abs().max().item()
    assert diff <= 1e-4, f"{variant}: max |logit diff| {diff}"


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_hf_save_nanoseek_load(variant, tmp_path):
    cfg = tiny(**VARIANTS[variant])
    hcfg = transformers.DeepseekV3Config(**{k: v for k, v in cfg.to_hf_dict().items()
                                            if k not in ("architectures", "torch_dtype")})
    torch.manual_seed(1)
    hf = transformers.DeepseekV3ForCausalLM(hcfg).eval()
    for layer in hf.model.layers[cfg.first_k_dense_replace:]:
        layer.mlp.gate.e_score_correction_bias.normal_(0, 0.05)
    hf.save_pretrained(tmp_path / "hf")
    m = nanoseek.load(tmp_path / "hf")
    x = torch.randint(0, cfg.vocab_size, (2, 33))
    with torch.no_grad():
        out = m(x)
        diff = (out.logits - hf(x).logits).abs().max().item()
    assert out.logits.shape == (2, 33, cfg.vocab_size)
    assert diff <= 1e-4, f"{variant}: max |logit diff| {diff}"


def test_mtp_round_trip_and_layout(tmp_path):
    cfg = tiny(num_nextn_predict_layers=2)
    m = _random_model(cfg)
    nanoseek.save(m, tmp_path / "c")
    from safetensors import safe_open

    with safe_open(tmp_path / "c" / "model.safetensors", "pt") as f:
        keys = set(f.keys())
    L = cfg.num_hidden_layers
    for k in range(2):  # the official MTP layout: extra layers after the last one
        for name in ("enorm.weight", "hnorm.weight", "eh_proj.weight", "shared_head.norm.weight",
                     "shared_head.head.weight", "embed_tokens.weight", "self_attn.kv_b_proj.weight",
                     "mlp.experts.0.gate_proj.weight", "mlp.gate.e_score_correction_bias"):
            assert f"model.layers.{L + k}.{name}" in keys
    m2 = nanoseek.load(tmp_path / "c")
    assert len(m2.mtp) == 2
    x = torch.randint(0, cfg.vocab_size, (2, 17))
    with torch.no_grad():
        a, b = m(x, mtp=True), m2(x, mtp=True)
    for la, lb in zip(a.mtp_logits, b.mtp_logits):
        assert la.shape == lb.shape
        assert torch.equal(la, lb)
    assert len(nanoseek.load(tmp_path / "c", mtp=False).mtp) == 0


@pytest.mark.parametrize("variant", ["q_lora", "no_q_lora", "yarn", "groups"])
def test_absorbed_decode_equals_expanded(variant):
    cfg = tiny(**VARIANTS[variant])
    m = _random_model(cfg, seed=3)
    B, T, P = 3, 24, 9
    x = torch.randint(0, cfg.vocab_size, (B, T))
    slots = torch.tensor([4, 0, 2])
    with torch.no_grad():
        full = m(x).logits
        cache = LatentCache(cfg, 5, 32)
        steps = [m(x[:, :P], cache=cache, slots=slots, start_pos=torch.zeros(B, dtype=torch.long)).logits]
        for t in range(P, T):  # token by token over the latent cache
            steps.append(m(x[:, t : t + 1], cache=cache, slots=slots, start_pos=torch.full((B,), t)).logits)
        inc = torch.cat(steps, dim=1)
        # several tokens at once after a prefill (the shape of a speculative verify step)
        cache2 = LatentCache(cfg, 3, 32)
        s = torch.arange(B)
        m(x[:, :10], cache=cache2, slots=s, start_pos=torch.zeros(B, dtype=torch.long))
        chunk = m(x[:, 10:14], cache=cache2, slots=s, start_pos=torch.full((B,), 10)).logits
    assert (inc - full).abs().max().item() <= 1e-4
    assert (chunk - full[:, 10:14]).abs().max().item() <= 1e-4
