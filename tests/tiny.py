"""Small random model configs shared by the tests."""

from nanoseek.config import ModelConfig

BASE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8, kv_lora_rank=32,
            q_lora_rank=48, qk_rope_head_dim=16, v_head_dim=24, qk_nope_head_dim=16, n_group=1, topk_group=1,
            num_experts_per_tok=2, first_k_dense_replace=1, max_position_embeddings=256)

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 0.707}

VARIANTS = {
    "q_lora": {},
    "no_q_lora": dict(q_lora_rank=None),
    "groups": dict(n_group=4, topk_group=2, num_experts_per_tok=3),
    "yarn": dict(rope_scaling=YARN),
    "no_norm_topk": dict(norm_topk_prob=False, routed_scaling_factor=1.7, n_shared_experts=2),
    "no_interleave_all_moe": dict(rope_interleave=False, first_k_dense_replace=0, num_nextn_predict_layers=2),
}


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**BASE, **kw})
