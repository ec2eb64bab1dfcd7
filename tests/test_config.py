"""Configs: HF field names and defaults, presets, --set overrides, and every config that cannot work fails at load
with a ConfigError that names the field (and the fix)."""

import dataclasses
import json
import os

import pytest
import tomllib

from nanoseek.config import CONFIG_DIR, ConfigError, ModelConfig, load_preset
from tests.tiny import BASE, tiny

os.environ["HF_HUB_OFFLINE"] = "1"


def test_defaults_are_hf_deepseek_v3():
    transformers = pytest.importorskip("transformers")
    hf = transformers.DeepseekV3Config().to_dict()
    ours = ModelConfig()
    for f in dataclasses.fields(ModelConfig):
        if f.name in hf:
            assert getattr(ours, f.name) == hf[f.name], f.name
    assert hf["rope_parameters"]["rope_theta"] == ours.rope_theta


def test_hf_dict_round_trip_through_transformers():
    transformers = pytest.importorskip("transformers")
    cfg = load_preset("deepseek-v3").model
    hf = transformers.DeepseekV3Config(**{k: v for k, v in cfg.to_hf_dict().items()
                                          if k not in ("architectures", "torch_dtype")})
    back = ModelConfig.from_hf_dict(hf.to_dict())
    assert back == cfg
    assert hf.qk_head_dim == cfg.qk_head_dim


@pytest.mark.parametrize("path", sorted(CONFIG_DIR.glob("*.toml")), ids=lambda p: p.stem)
def test_every_preset_loads(path):
    by_name, by_path = load_preset(path.stem), load_preset(str(path))
    assert by_name.model == by_path.model
    assert by_name.path == path


def test_set_overrides(tmp_path):
    p = load_preset("cpu-tiny", ["model.hidden_size=256", "model.num_hidden_layers=6", "model.q_lora_rank=none",
                                 "model.rope_scaling={type='yarn', factor=2.0, original_max_position_embeddings=512}"])
    m = p.model
    assert (m.hidden_size, m.num_hidden_layers, m.q_lora_rank) == (256, 6, None)
    assert m.rope_scaling["factor"] == 2.0
    # a bare key works where exactly one section of the preset has it, and is refused where several do
    (tmp_path / "one.toml").write_text("[model]\nhidden_size = 64\n")
    assert load_preset(str(tmp_path / "one.toml"), ["num_hidden_layers=5"]).model.num_hidden_layers == 5
    (tmp_path / "two.toml").write_text("[model]\nhidden_size = 64\n[student]\nhidden_size = 32\n")
    msg = _error(lambda: load_preset(str(tmp_path / "two.toml"), ["hidden_size=5"]))
    assert "model" in msg and "student" in msg and "section.hidden_size" in msg
    raw = tomllib.loads((CONFIG_DIR / "cpu-tiny.toml").read_text())["model"]
    assert load_preset("cpu-tiny").model.hidden_size == raw["hidden_size"]  # the preset file itself is untouched


def _error(fn) -> str:
    with pytest.raises(ConfigError) as e:
        fn()
    return str(e.value)


# (overrides, field the message must name) -- each is a config the model cannot run
INVALID = {
    "experts_not_divisible_by_groups": (dict(n_routed_experts=10, n_group=4), "n_routed_experts"),
    "topk_more_than_allowed_groups_hold": (dict(n_routed_experts=8, n_group=4, topk_group=1,
                                                num_experts_per_tok=3), "num_experts_per_tok"),
    "topk_more_than_experts": (dict(n_routed_experts=4, n_group=1, topk_group=1, num_experts_per_tok=5),
                               "num_experts_per_tok"),
    "topk_group_above_n_group": (dict(n_group=2, topk_group=3), "topk_group"),
    "odd_rope_dim": (dict(qk_rope_head_dim=15), "qk_rope_head_dim"),
    "zero_nope_dim": (dict(qk_nope_head_dim=0), "qk_nope_head_dim"),
    "zero_v_dim": (dict(v_head_dim=0), "v_head_dim"),
    "kv_heads_not_heads": (dict(num_key_value_heads=2), "num_key_value_heads"),
    "dense_layers_beyond_depth": (dict(first_k_dense_replace=9), "first_k_dense_replace"),
    "bad_q_lora": (dict(q_lora_rank=0), "q_lora_rank"),
    "yarn_without_factor": (dict(rope_scaling={"type": "yarn", "original_max_position_embeddings": 64}),
                            "rope_scaling"),
    "unknown_act": (dict(hidden_act="gelu"), "hidden_act"),
}


@pytest.mark.parametrize("name", list(INVALID))
def test_invalid_model_config(name, tmp_path):
    overrides, field = INVALID[name]
    # directly
    msg = _error(lambda: tiny(**overrides))
    assert field in msg
    # from a preset file: fails at load, with the file and the field in the message
    lines = ["[model]"] + [f"{k} = {json.dumps(v) if not isinstance(v, dict) else _toml_table(v)}"
                           for k, v in {**BASE, **overrides}.items() if v is not None]
    (tmp_path / "bad.toml").write_text("\n".join(lines))
    msg = _error(lambda: load_preset(str(tmp_path / "bad.toml")))
    assert field in msg and "bad.toml" in msg
    # and through --set on a good preset
    sets = [f"model.{k}={_toml_value(v)}" for k, v in overrides.items()]
    assert field in _error(lambda: load_preset("cpu-tiny", sets))


def _toml_value(v):
    return _toml_table(v) if isinstance(v, dict) else json.dumps(v)


def _toml_table(d):
    return "{" + ", ".join(f"{k} = {json.dumps(v)}" for k, v in d.items()) + "}"


def test_fix_is_suggested():
    msg = _error(lambda: tiny(n_routed_experts=10, n_group=4))
    assert "multiple of n_group" in msg
    msg = _error(lambda: tiny(n_routed_experts=8, n_group=4, topk_group=1, num_experts_per_tok=3))
    assert "num_experts_per_tok <= 2" in msg


def test_unknown_keys_in_preset(tmp_path):
    (tmp_path / "typo.toml").write_text("[model]\nhidden_size = 64\nnum_expert_per_tok = 2\n")
    msg = _error(lambda: load_preset(str(tmp_path / "typo.toml")))
    assert "num_expert_per_tok" in msg and "did you mean 'num_experts_per_tok'" in msg and "typo.toml" in msg
    (tmp_path / "section.toml").write_text("[modle]\nhidden_size = 64\n")
    msg = _error(lambda: load_preset(str(tmp_path / "section.toml")))
    assert "modle" in msg and "model" in msg


def test_unknown_keys_via_set():
    msg = _error(lambda: load_preset("cpu-tiny", ["model.hiden_size=64"]))
    assert "hiden_size" in msg and "did you mean 'hidden_size'" in msg
    assert "no section" in _error(lambda: load_preset("cpu-tiny", ["not_a_field_anywhere=1"]))
    assert "key=value" in _error(lambda: load_preset("cpu-tiny", ["model.hidden_size"]))
    msg = _error(lambda: load_preset("cpu-tiny", ["model.hidden_size=wide"]))
    assert "hidden_size" in msg and "integer" in msg


def test_missing_preset_lists_the_known_ones():
    msg = _error(lambda: load_preset("no-such-preset"))
    assert "no-such-preset" in msg and "cpu-tiny" in msg
    msg = _error(lambda: load_preset("/nonexistent/x.toml"))
    assert "x.toml" in msg


def test_hf_config_json_head_dims_must_add_up():
    # transformers writes qk_head_dim (= nope + rope) and head_dim (= rope) into config.json: a file whose
    # head dims disagree with each other cannot be the shape its weights have.
    d = tiny().to_hf_dict()
    assert ModelConfig.from_hf_dict({**d, "qk_head_dim": 32, "head_dim": 16}) == tiny()
    assert "qk_head_dim" in _error(lambda: ModelConfig.from_hf_dict({**d, "qk_head_dim": 40}))
    assert "head_dim" in _error(lambda: ModelConfig.from_hf_dict({**d, "head_dim": 8}))
