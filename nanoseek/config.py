"""Configs: dataclasses with defaults that work, TOML presets, `--set key=value` overrides.

ModelConfig uses the field names and defaults of Hugging Face `DeepseekV3Config` (so the defaults are the real
DeepSeek-V3 shape). A preset is a TOML file with one table per section (`[model]`, `[pretrain]`, `[rl]`, ...);
each section is validated against its dataclass, registered in SECTIONS. `--preset NAME` resolves to
`configs/NAME.toml`; a path to a .toml file also works.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import json
import math
import typing
from dataclasses import dataclass, field
from pathlib import Path

import tomllib

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


class ConfigError(ValueError):
    """A config that cannot work; the message names the field and the fix."""


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the file and the problem. (Here, with ConfigError, so
    the CLI can catch it without importing torch; nanoseek.checkpoint raises it.)"""


@dataclass
class ModelConfig:
    vocab_size: int = 129280
    hidden_size: int = 7168
    intermediate_size: int = 18432
    moe_intermediate_size: int = 2048
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int = 128
    n_shared_experts: int = 1
    n_routed_experts: int = 256
    routed_scaling_factor: float = 2.5
    kv_lora_rank: int = 512
    q_lora_rank: int | None = 1536
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    qk_nope_head_dim: int = 128
    n_group: int = 8
    topk_group: int = 4
    num_experts_per_tok: int = 8
    first_k_dense_replace: int = 3
    norm_topk_prob: bool = True
    hidden_act: str = "silu"
    max_position_embeddings: int = 4096
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    pad_token_id: int | None = None
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    tie_word_embeddings: bool = False
    rope_theta: float = 10000.0
    # YaRN as in DeepSeek's config.json: {"type": "yarn", "factor", "original_max_position_embeddings",
    # "beta_fast", "beta_slow", "mscale", "mscale_all_dim"}; None for plain RoPE.
    rope_scaling: dict | None = None
    rope_interleave: bool = True
    attention_bias: bool = False
    attention_dropout: float = 0.0
    num_nextn_predict_layers: int = 1  # MTP depth D (HF calls it num_mtp_layers)

    def __post_init__(self):
        self.validate()

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        # 1/sqrt(d_qk), times YaRN's mscale^2 (DeepSeek-V3 inference/model.py; HF yarn_apply_mscale).
        scale = self.qk_head_dim**-0.5
        rs = self.rope_scaling
        if rs and rs.get("mscale_all_dim") and rs.get("factor", 1.0) > 1:
            m = 0.1 * rs["mscale_all_dim"] * math.log(rs["factor"]) + 1.0
            scale = scale * m * m
        return scale

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace

    def validate(self) -> None:
        def bad(name, why, fix):
            raise ConfigError(f"model.{name}: {why}; {fix}")

        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "kv_lora_rank",
                     "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim", "intermediate_size",
                     "moe_intermediate_size", "n_routed_experts", "n_group", "topk_group", "num_experts_per_tok"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                bad(name, f"must be a positive integer, got {v!r}", "set it to an integer >= 1")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank < 1):
            bad("q_lora_rank", f"must be a positive integer or None, got {self.q_lora_rank!r}",
                "set it to an integer >= 1, or leave it out for a plain query projection")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", f"must be even (rotary pairs), got {self.qk_rope_head_dim}",
                "use an even number such as 64")
        if self.num_key_value_heads != self.num_attention_heads:
            bad("num_key_value_heads", f"MLA has one key/value head per query head, got {self.num_key_value_heads} "
                f"for {self.num_attention_heads} heads", f"set it to {self.num_attention_heads}")
        if self.n_routed_experts % self.n_group:
            bad("n_routed_experts", f"{self.n_routed_experts} is not divisible by n_group={self.n_group}",
                "make n_routed_experts a multiple of n_group")
        per_group = self.n_routed_experts // self.n_group
        if per_group < 2 and self.n_group > 1:
            bad("n_group", f"each group needs >= 2 experts (a group's score is its top-2 sum), got {per_group}",
                f"use n_group <= {self.n_routed_experts // 2}")
        if self.topk_group > self.n_group:
            bad("topk_group", f"{self.topk_group} groups kept out of n_group={self.n_group}",
                f"set topk_group <= {self.n_group}")
        if self.num_experts_per_tok > self.topk_group * per_group:
            bad("num_experts_per_tok", f"top-{self.num_experts_per_tok} cannot be chosen from the "
                f"{self.topk_group * per_group} experts of topk_group={self.topk_group} groups",
                f"set num_experts_per_tok <= {self.topk_group * per_group} or raise topk_group")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            bad("first_k_dense_replace", f"{self.first_k_dense_replace} is outside [0, num_hidden_layers="
                f"{self.num_hidden_layers}]", "choose how many leading layers are dense")
        if self.n_shared_experts < 0 or self.num_nextn_predict_layers < 0:
            bad("n_shared_experts" if self.n_shared_experts < 0 else "num_nextn_predict_layers",
                "must be >= 0", "set it to 0 or more")
        if self.hidden_act != "silu":
            bad("hidden_act", f"only 'silu' (SwiGLU) is supported, got {self.hidden_act!r}", "set it to 'silu'")
        rs = self.rope_scaling
        if rs is not None:
            kind = rs.get("type", rs.get("rope_type"))
            if kind not in ("yarn", "default", None):
                bad("rope_scaling", f"type {kind!r} is not supported", "use {type = 'yarn', ...} or leave it out")
            if kind == "yarn":
                for k in ("factor", "original_max_position_embeddings"):
                    if k not in rs:
                        bad("rope_scaling", f"YaRN needs '{k}'", f"add {k} to rope_scaling")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict, source: str = "model") -> ModelConfig:
        return build(cls, d, source)

    # ---- HF config.json --------------------------------------------------------------------------------------
    def to_hf_dict(self) -> dict:
        d = self.to_dict()
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling:
            rope = {k: v for k, v in self.rope_scaling.items() if k != "type"}
            rope.update(rope_type=self.rope_scaling.get("type", self.rope_scaling.get("rope_type", "yarn")),
                        rope_theta=self.rope_theta)
        d.pop("rope_scaling")
        d.pop("rope_theta")
        d.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", rope_parameters=rope,
                 num_mtp_layers=self.num_nextn_predict_layers, torch_dtype="float32", use_cache=True)
        return d

    @classmethod
    def from_hf_dict(cls, d: dict, source: str = "config.json") -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        out = {k: v for k, v in d.items() if k in names}
        rope = d.get("rope_parameters")
        if rope:  # transformers 5 format
            out["rope_theta"] = rope.get("rope_theta", out.get("rope_theta", 10000.0))
            if rope.get("rope_type", "default") != "default":
                out["rope_scaling"] = {("type" if k == "rope_type" else k): v for k, v in rope.items()
                                       if k != "rope_theta"}
        if out.get("rope_scaling") and "rope_type" in out["rope_scaling"]:
            rs = dict(out["rope_scaling"])
            rs["type"] = rs.pop("rope_type")
            out["rope_scaling"] = None if rs["type"] == "default" else rs
        if "num_mtp_layers" in d and "num_nextn_predict_layers" not in d:
            out["num_nextn_predict_layers"] = d["num_mtp_layers"]
        if isinstance(out.get("eos_token_id"), list):
            out["eos_token_id"] = out["eos_token_id"][0]
        cfg = build(cls, out, source)
        # transformers also writes the derived head dims; a file where they disagree has no consistent shape.
        for key, want in (("qk_head_dim", cfg.qk_head_dim), ("head_dim", cfg.qk_rope_head_dim)):
            if d.get(key) is not None and d[key] != want:
                raise ConfigError(f"{source}: model.{key} = {d[key]} does not add up: qk_nope_head_dim + "
                                  f"qk_rope_head_dim = {cfg.qk_nope_head_dim} + {cfg.qk_rope_head_dim} implies "
                                  f"{key} = {want}; fix the head dims so they agree")
        return cfg


# ---- sections and presets -------------------------------------------------------------------------------------
# Section name -> "module:Dataclass". Each stage owns its dataclass; it is imported only when its section is used.
SECTIONS = {
    "model": "nanoseek.config:ModelConfig",
    "student": "nanoseek.config:ModelConfig",  # the small dense model that distillation trains
    "data": "nanoseek.data:DataConfig",
    "tokenizer": "nanoseek.tokenizer:TokenizerConfig",
    "pretrain": "nanoseek.train.pretrain:PretrainConfig",
    "rl": "nanoseek.train.grpo:GRPOConfig",
    "sft": "nanoseek.train.sft:SFTConfig",
    "distill": "nanoseek.train.distill:DistillConfig",
    "eval": "nanoseek.eval:EvalConfig",
    "engine": "nanoseek.infer.engine:EngineConfig",
    "speedrun": "nanoseek.speedrun:SpeedrunConfig",
    "parallel": "nanoseek.train.loop:ParallelConfig",
}


def section_class(name: str) -> type:
    if name not in SECTIONS:
        raise ConfigError(f"unknown section [{name}]; known sections: {', '.join(sorted(SECTIONS))}")
    mod, cls = SECTIONS[name].split(":")
    return getattr(importlib.import_module(mod), cls)


def _coerce(value, tp, where: str):
    """Check/convert a TOML or --set value against a dataclass field type."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        if value is None and type(None) in args:
            return None
        errs = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errs.append(str(e))
        raise ConfigError(errs[0] if errs else f"{where}: bad value {value!r}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: expected true/false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise ConfigError(f"{where}: expected an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise ConfigError(f"{where}: expected a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: expected a string, got {value!r}")
    if origin is list or tp is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        inner = args[0] if args else None
        return [(_coerce(v, inner, where) if inner else v) for v in value]
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a table, got {value!r}")
        return dict(value)
    return value


def build(cls: type, values: dict, source: str):
    """Make dataclass `cls` from `values`, rejecting unknown keys with a did-you-mean."""
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in values.items():
        if k not in fields:
            near = difflib.get_close_matches(k, fields, n=1)
            hint = f" (did you mean '{near[0]}'?)" if near else f"; known keys: {', '.join(sorted(fields))}"
            raise ConfigError(f"{source}: unknown key '{k}'{hint}")
        kwargs[k] = _coerce(v, hints[k], f"{source}.{k}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None


def resolve_preset(name: str | Path) -> Path:
    p = Path(name)
    if p.suffix == ".toml" or p.exists():
        if not p.is_file():
            raise ConfigError(f"preset file {p} does not exist")
        return p
    p = CONFIG_DIR / f"{name}.toml"
    if not p.is_file():
        names = sorted(q.stem for q in CONFIG_DIR.glob("*.toml"))
        raise ConfigError(f"no preset '{name}' (looked for {p}); presets: {', '.join(names)}; or pass a .toml path")
    return p


def parse_value(text: str):
    """A --set value: TOML syntax where it parses (numbers, true/false, strings, lists, tables), else a string."""
    if text in ("none", "None", "null"):
        return None
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        try:
            return json.loads(text)
        except json.JSONDecodeError:
            return text


def apply_overrides(raw: dict, sets: list[str]) -> dict:
    """Apply `--set key=value` overrides. `section.key=v`, or a bare `key=v` when exactly one section has it."""
    raw = {k: dict(v) for k, v in raw.items()}
    for item in sets or []:
        if "=" not in item:
            raise ConfigError(f"--set {item!r}: expected key=value, e.g. --set model.hidden_size=64")
        key, text = item.split("=", 1)
        key = key.strip()
        if "." in key:
            sec, k = key.split(".", 1)
            section_class(sec)
        else:
            owners = [s for s in SECTIONS if s in raw and key in raw[s]]
            if not owners:
                owners = [s for s in SECTIONS if key in {f.name for f in dataclasses.fields(section_class(s))}]
                owners = [s for s in owners if s in raw] or owners
            if len(owners) != 1:
                where = f"sections {', '.join(owners)}" if owners else "no section"
                raise ConfigError(f"--set {key}: found in {where}; write it as section.{key}")
            sec, k = owners[0], key
        raw.setdefault(sec, {})[k] = parse_value(text)
    return raw


@dataclass
class Preset:
    """A loaded preset: the raw tables, validated lazily per section."""

    path: Path | None
    raw: dict = field(default_factory=dict)

    def section(self, name: str):
        return build(section_class(name), self.raw.get(name, {}), f"[{name}] of {self.path or 'defaults'}")

    @property
    def model(self) -> ModelConfig:
        return self.section("model")


def load_preset(name: str | Path | None = "cpu-tiny", sets: list[str] | None = None, check: bool = True) -> Preset:
    raw = {}
    path = None
    if name is not None:
        path = resolve_preset(name)
        try:
            raw = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{path}: not valid TOML: {e}") from None
        for sec in raw:
            section_class(sec)
            if not isinstance(raw[sec], dict):
                raise ConfigError(f"{path}: '{sec}' must be a table [{sec}]")
    raw = apply_overrides(raw, sets or [])
    preset = Preset(path, raw)
    if check and "model" in raw:
        preset.model  # noqa: B018  (fail at load, naming the field)
    return preset
