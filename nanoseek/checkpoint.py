"""Checkpoints in the official DeepSeek-V3 / Hugging Face layout (safetensors + config.json), both ways.

The name mapping below is the whole contract with the format. nanoseek's module names already are the official
names, except:
- routed experts are stacked in memory (`mlp.experts.gate_proj` [E, h, d]) and split per expert on disk
  (`mlp.experts.{e}.gate_proj.weight`);
- MTP module k lives at `mtp.{k}` in memory and at `model.layers.{L+k}` on disk, its block's tensors flat in
  that layer, its head norm at `shared_head.norm`, plus copies of the shared embedding and head
  (`embed_tokens`, `shared_head.head`) as DeepSeek ships them.
Loading also reads FP8 (e4m3) weights with 128x128 block scales `weight_scale_inv` and dequantizes them.
Every write goes to a temporary directory that is fsynced and swapped in by rename: a crash never leaves a
half-written checkpoint where a good one stood.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import re
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from nanoseek.config import CheckpointError, ConfigError, ModelConfig

EXPERT_PROJ = ("gate_proj", "up_proj", "down_proj")
FP8_BLOCK = 128


# ---- name mapping -------------------------------------------------------------------------------------------
def to_official(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    L = cfg.num_hidden_layers
    out = {}
    for name, t in state.items():
        m = re.match(r"mtp\.(\d+)\.(.*)", name)
        if m:
            k, rest = int(m.group(1)), m.group(2)
            prefix = f"model.layers.{L + k}."
            rest = rest.removeprefix("block.")
            rest = "shared_head.norm.weight" if rest == "norm.weight" else rest
            name = prefix + rest
        m = re.match(r"(.*\.mlp\.experts)\.(gate_proj|up_proj|down_proj)$", name)
        if m:
            for e in range(t.shape[0]):
                out[f"{m.group(1)}.{e}.{m.group(2)}.weight"] = t[e]
            continue
        out[name] = t
    for k in range(cfg.num_nextn_predict_layers):
        out[f"model.layers.{L + k}.embed_tokens.weight"] = state["model.embed_tokens.weight"]
        out[f"model.layers.{L + k}.shared_head.head.weight"] = state["lm_head.weight"]
    return out


def from_official(tensors: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    L = cfg.num_hidden_layers
    out, experts = {}, {}
    for name, t in tensors.items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)", name)
        if m and int(m.group(1)) >= L:
            k, rest = int(m.group(1)) - L, m.group(2)
            if k >= cfg.num_nextn_predict_layers or rest.startswith(("embed_tokens.", "shared_head.head.")):
                continue  # MTP layers the config does not ask for; copies of the shared embedding/head
            if rest == "shared_head.norm.weight":
                name = f"mtp.{k}.norm.weight"
            elif rest.split(".")[0] in ("enorm", "hnorm", "eh_proj"):
                name = f"mtp.{k}.{rest}"
            else:
                name = f"mtp.{k}.block.{rest}"
        m = re.match(r"(.*\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$", name)
        if m:
            experts.setdefault((m.group(1), m.group(3)), {})[int(m.group(2))] = t
            continue
        out[name] = t
    for (prefix, proj), per in experts.items():
        missing = [e for e in range(cfg.n_routed_experts) if e not in per]
        if missing:
            raise CheckpointError(f"{prefix}: experts {missing[:5]} missing {proj} weights")
        out[f"{prefix}.{proj}"] = torch.stack([per[e] for e in range(cfg.n_routed_experts)])
    return out


# ---- FP8 -----------------------------------------------------------------------------------------------------
def dequant_fp8(w: torch.Tensor, scale_inv: torch.Tensor, block: int = FP8_BLOCK) -> torch.Tensor:
    """DeepSeek-V3 FP8 weights: e4m3 values times one fp32 scale per 128x128 block (`weight_scale_inv`)."""
    rows, cols = w.shape
    s = scale_inv.float().repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
    return w.float() * s


def quant_fp8(w: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """The inverse of dequant_fp8 (per-block absmax scaling to e4m3's range); used to write FP8 checkpoints."""
    rows, cols = w.shape
    br, bc = -(-rows // block), -(-cols // block)
    padded = torch.zeros(br * block, bc * block)
    padded[:rows, :cols] = w.float()
    blocks = padded.view(br, block, bc, block)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)
    scale_inv = amax / torch.finfo(torch.float8_e4m3fn).max  # [br, bc]
    q = (blocks / scale_inv[:, None, :, None]).view(br * block, bc * block)[:rows, :cols]
    return q.to(torch.float8_e4m3fn), scale_inv


# ---- atomic directories --------------------------------------------------------------------------------------
def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux renameat2 RENAME_EXCHANGE); False where unsupported."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    AT_FDCWD, RENAME_EXCHANGE = -100, 2
    return fn(AT_FDCWD, os.fsencode(a), AT_FDCWD, os.fsencode(b), RENAME_EXCHANGE) == 0


@contextlib.contextmanager
def atomic_dir(path: str | Path):
    """Yield a fresh temporary directory beside `path`; on success fsync it and swap it in for `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        _fsync_dir(tmp)
        if path.exists() and _exchange(tmp, path):
            shutil.rmtree(tmp)  # tmp now holds the old checkpoint
        else:
            old = None
            if path.exists():
                old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
                os.rename(path, old)
            os.rename(tmp, path)
            if old is not None:
                shutil.rmtree(old)
        _fsync_dir(path.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


# ---- save / load ---------------------------------------------------------------------------------------------
def save(model, path: str | Path, max_shard_bytes: int = 2 << 30, dtype: torch.dtype | None = None,
         extra_files: dict[str, str] | None = None) -> Path:
    """Write `model` as an HF DeepseekV3 checkpoint: config.json (DeepseekV3ForCausalLM), model.safetensors or
    shards + index. `extra_files` (name -> source path) are copied in (e.g. tokenizer files)."""
    cfg: ModelConfig = model.config
    state = {k: v.detach() for k, v in model.state_dict().items()}
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    tensors = to_official(state, cfg)
    tensors = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() and "correction_bias" not in k else v)
               .contiguous().clone() for k, v in tensors.items()}
    if cfg.tie_word_embeddings:
        tensors.pop("lm_head.weight")
    shards, cur, size = [], {}, 0
    for k in sorted(tensors):
        n = tensors[k].numel() * tensors[k].element_size()
        if cur and size + n > max_shard_bytes:
            shards.append(cur)
            cur, size = {}, 0
        cur[k] = tensors[k]
        size += n
    shards.append(cur)
    path = Path(path)
    with atomic_dir(path) as tmp:
        if len(shards) == 1:
            save_file(shards[0], tmp / "model.safetensors", metadata={"format": "pt"})
        else:
            weight_map = {}
            for i, shard in enumerate(shards):
                fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, tmp / fname, metadata={"format": "pt"})
                weight_map.update(dict.fromkeys(shard, fname))
            total = sum(t.numel() * t.element_size() for t in tensors.values())
            write_json(tmp / "model.safetensors.index.json", {"metadata": {"total_size": total},
                                                              "weight_map": weight_map})
        hf = cfg.to_hf_dict()
        if dtype is not None:
            hf["torch_dtype"] = str(dtype).removeprefix("torch.")
        write_json(tmp / "config.json", hf)
        write_json(tmp / "generation_config.json", {"bos_token_id": cfg.bos_token_id, "eos_token_id":
                                                    cfg.eos_token_id, "do_sample": True, "temperature": 0.6,
                                                    "top_p": 0.95})
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
    return path


def model_dir(path: str | Path, flag: str = "--model") -> Path:
    """The checkpoint directory a command's `flag` names: the directory itself, or a stage directory's model/
    (runs/x/rl holds its final model in runs/x/rl/model). Raises CheckpointError naming the flag and the fix."""
    p = Path(path)
    for d in (p, p / "model"):
        if (d / "config.json").is_file():
            return d
    where = "no such directory" if not p.exists() else "no config.json there or in its model/"
    raise CheckpointError(f"{flag} {p}: {where}; point it at a checkpoint directory a stage wrote, such as "
                          "runs/NAME/rl/model (or the stage directory runs/NAME/rl)")


def read_config(path: Path) -> ModelConfig:
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"{path} is not a checkpoint directory: {cfg_file.name} is missing "
                              "(expected config.json + model.safetensors or shards with an index)")
    try:
        raw = json.loads(cfg_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{cfg_file}: not valid JSON ({e})") from None
    if raw.get("model_type", "deepseek_v3") not in ("deepseek_v3", "nanoseek"):
        raise CheckpointError(f"{cfg_file}: model_type {raw.get('model_type')!r} is not deepseek_v3")
    try:
        return ModelConfig.from_hf_dict(raw, source=str(cfg_file))
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint directory, FP8 blocks dequantized, official names."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as e:
            raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from None
        files = sorted(set(weight_map.values()))
        for f in files:
            if not (path / f).is_file():
                raise CheckpointError(f"{path / f}: shard named in {index.name} is missing")
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{path}: no model.safetensors and no model.safetensors.index.json")
    tensors = {}
    for f in files:
        try:
            with safe_open(path / f, framework="pt") as fh:
                for k in fh.keys():
                    tensors[k] = fh.get_tensor(k)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise CheckpointError(f"{path / f}: cannot read safetensors file, truncated or corrupt ({e})") from None
    for k in [k for k in tensors if k.endswith(".weight_scale_inv")]:
        wk = k.removesuffix("_scale_inv")
        if wk not in tensors:
            raise CheckpointError(f"{path}: {k} has no matching {wk}")
        tensors[wk] = dequant_fp8(tensors[wk], tensors.pop(k))
    return tensors


def load(path: str | Path, dtype: torch.dtype = torch.float32, device: str = "cpu", mtp: bool = True):
    """Load an HF DeepseekV3 checkpoint directory as a nanoseek Transformer in eval mode."""
    from nanoseek.model.transformer import Transformer

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    cfg = read_config(path)
    tensors = read_tensors(path)
    has_mtp = any(re.match(rf"model\.layers\.{cfg.num_hidden_layers}\.", k) for k in tensors)
    if not (mtp and has_mtp):
        cfg.num_nextn_predict_layers = 0
    if "lm_head.weight" not in tensors and "model.embed_tokens.weight" in tensors:
        cfg.tie_word_embeddings = True
    with torch.device("meta"):
        model = Transformer(cfg)
    state = from_official(tensors, cfg)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = model.state_dict()
    missing = [k for k in expected if k not in state and not (cfg.tie_word_embeddings and k == "lm_head.weight")]
    unexpected = [k for k in state if k not in expected]
    if missing or unexpected:
        raise CheckpointError(f"{path}: tensors do not match config.json: missing {missing[:5]}"
                              f"{'...' if len(missing) > 5 else ''}, unexpected {unexpected[:5]}")
    for k, v in state.items():
        if v.shape != expected[k].shape:
            raise CheckpointError(f"{path}: {k} has shape {tuple(v.shape)}, config.json implies "
                                  f"{tuple(expected[k].shape)}")
    state = {k: (v.to(dtype) if v.is_floating_point() and "correction_bias" not in k else v.float())
             for k, v in state.items()}
    model.load_state_dict(state, assign=True, strict=not cfg.tie_word_embeddings)
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    # Buffers that are not in the checkpoint (rope frequencies, load counters) are rebuilt off the meta device.
    from nanoseek.model.rope import rope_frequencies

    model.inv_freq = rope_frequencies(cfg)[0]
    for m in model.moe_layers():
        m.load = torch.zeros(cfg.n_routed_experts, dtype=torch.long)
    return model.to(device).eval()
