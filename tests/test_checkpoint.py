"""Checkpoints: DeepSeek's block-scaled FP8 release format loads and equals the dequantized model; unreadable
checkpoints fail with a CheckpointError naming the file; a save that fails midway leaves the old checkpoint."""

import hashlib
import json

import pytest
import torch
from safetensors.torch import save_file

import nanoseek
import nanoseek.checkpoint as ckpt
from nanoseek.checkpoint import CheckpointError, from_official, quant_fp8, to_official
from nanoseek.model.transformer import Transformer
from tests.tiny import tiny

# hidden 160 and intermediate 272 are not multiples of 128: blocks at the edges are partial, as in real layers.
FP8_SHAPE = dict(hidden_size=160, intermediate_size=272, vocab_size=131, num_attention_heads=4, q_lora_rank=144)


def _model(cfg, seed=0):
    torch.manual_seed(seed)
    m = Transformer(cfg).eval()
    for moe in m.moe_layers():
        moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return m


def _is_fp8(name, t):
    # DeepSeek ships the 2-D projection weights (attention, dense MLP, shared and routed experts) in FP8;
    # embedding, head, router, norms and the correction bias stay in higher precision.
    return t.dim() == 2 and name.endswith("_proj.weight") and "eh_proj" not in name


def _dequant_reference(q, scale_inv, block=128):
    """Independent of checkpoint.dequant_fp8: loop over the blocks."""
    out = q.float().clone()
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            out[i * block:(i + 1) * block, j * block:(j + 1) * block] *= scale_inv[i, j]
    return out


def _write_fp8_sharded(model, path, n_shards=3):
    cfg = model.config
    official = to_official({k: v.detach() for k, v in model.state_dict().items()}, cfg)
    tensors, expected = {}, {}
    for name, t in official.items():
        if _is_fp8(name, t):
            q, s = quant_fp8(t)
            assert q.dtype == torch.float8_e4m3fn and s.shape == (-(-t.shape[0] // 128), -(-t.shape[1] // 128))
            tensors[name], tensors[name + "_scale_inv"] = q, s
            expected[name] = _dequant_reference(q, s)
        elif "correction_bias" in name:
            tensors[name] = expected[name] = t.float().clone()
        else:
            tensors[name] = t.to(torch.bfloat16).clone()
            expected[name] = tensors[name].float()
    path.mkdir()
    names = sorted(tensors)
    weight_map = {}
    for i in range(n_shards):
        fname = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {k: tensors[k].contiguous() for k in names[i::n_shards]}
        save_file(part, path / fname, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, fname))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    hf = cfg.to_hf_dict()
    hf["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                 "weight_block_size": [128, 128]}
    (path / "config.json").write_text(json.dumps(hf))
    return expected


def test_fp8_block_scaled_sharded_checkpoint(tmp_path):
    cfg = tiny(**FP8_SHAPE)
    m = _model(cfg)
    expected_official = _write_fp8_sharded(m, tmp_path / "fp8")
    # the model the FP8 file stands for: the dequantized weights, built without checkpoint.load
    ref = Transformer(cfg).eval()
    ref.load_state_dict({**from_official(expected_official, cfg), "inv_freq": ref.inv_freq}, strict=False)
    ref.inv_freq = m.inv_freq
    loaded = nanoseek.load(tmp_path / "fp8")
    state, ref_state = loaded.state_dict(), ref.state_dict()
    assert set(state) == set(ref_state)
    for k in ref_state:
        assert torch.equal(state[k], ref_state[k]), k
    x = torch.randint(0, cfg.vocab_size, (2, 19))
    with torch.no_grad():
        out, want, orig = loaded(x).logits, ref(x).logits, m(x).logits
    assert (out - want).abs().max().item() <= 1e-5
    # and e4m3 with per-block scales is close to the full-precision model (ignoring the scales would not be);
    # the mean, not the max: a near-tie in routing may flip one token's expert
    assert (out - orig).abs().mean().item() < 0.1 * orig.abs().mean().item()
    w = loaded.model.layers[0].self_attn.q_b_proj.weight
    assert w.dtype == torch.float32 and (w - m.model.layers[0].self_attn.q_b_proj.weight).abs().max() < 0.01


def test_quant_fp8_round_trip_per_block():
    torch.manual_seed(0)
    w = torch.randn(300, 200)
    w[:128, :128] *= 1000  # one block far larger: per-block scales keep the others precise
    q, s = quant_fp8(w)
    back = ckpt.dequant_fp8(q, s)
    assert torch.equal(back, _dequant_reference(q, s))
    rel = ((back - w).abs() / w.abs().clamp(min=1e-3))[128:, 128:]
    assert rel.median() < 0.05


# ---- unreadable checkpoints -----------------------------------------------------------------------------------
def _saved(tmp_path, name="ckpt", seed=0, **kw):
    cfg = tiny()
    m = _model(cfg, seed)
    return m, nanoseek.save(m, tmp_path / name, **kw)


def _load_error(path) -> str:
    with pytest.raises(CheckpointError) as e:
        nanoseek.load(path)
    return str(e.value)


def test_not_a_checkpoint(tmp_path):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("hello")
    msg = _load_error(tmp_path / "notes")
    assert "config.json" in msg and "notes" in msg
    assert "nope" in _load_error(tmp_path / "nope")
    _, path = _saved(tmp_path)
    (path / "model.safetensors").unlink()
    assert "model.safetensors" in _load_error(path)


def test_truncated_safetensors(tmp_path):
    _, path = _saved(tmp_path)
    f = path / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    msg = _load_error(path)
    assert str(f) in msg and "truncated" in msg
    f.write_bytes(data[:5])  # not even a header
    assert str(f) in _load_error(path)


def test_missing_shard_named_in_index(tmp_path):
    m, path = _saved(tmp_path, max_shard_bytes=20_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2
    x = torch.randint(0, m.config.vocab_size, (1, 7))
    with torch.no_grad():
        assert torch.equal(nanoseek.load(path)(x).logits, m(x).logits)  # sharded and whole, it loads
    (path / shards[1]).unlink()
    msg = _load_error(path)
    assert shards[1] in msg and "index" in msg


def test_config_json_broken_or_inconsistent(tmp_path):
    _, path = _saved(tmp_path)
    good = (path / "config.json").read_text()
    (path / "config.json").write_text(good[:40])
    assert "config.json" in _load_error(path)
    (path / "config.json").write_text(json.dumps({**json.loads(good), "hidden_size": 96}))
    msg = _load_error(path)
    assert "shape" in msg
    (path / "config.json").write_text(json.dumps({**json.loads(good), "n_group": 3}))
    msg = _load_error(path)
    assert "config.json" in msg and "n_routed_experts" in msg


# ---- atomic save ----------------------------------------------------------------------------------------------
def _digest(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


@pytest.mark.parametrize("shards", [1, 3])
def test_failed_save_leaves_old_checkpoint(tmp_path, monkeypatch, shards):
    old, path = _saved(tmp_path, seed=0)
    before = _digest(path)
    new = _model(old.config, seed=1)
    real, calls = ckpt.save_file, []

    def save_then_crash(tensors, filename, metadata=None):
        real(tensors, filename, metadata=metadata)  # the file is (partly) written ...
        calls.append(filename)
        if len(calls) == shards:
            raise OSError("disk full")  # ... and then the save dies

    monkeypatch.setattr(ckpt, "save_file", save_then_crash)
    with pytest.raises(OSError, match="disk full"):
        nanoseek.save(new, path, max_shard_bytes=20_000 if shards > 1 else 2 << 30)
    assert calls and all(c.parent != path for c in calls)  # it wrote beside the live checkpoint, never into it
    assert _digest(path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]  # no temp dirs behind
    x = torch.randint(0, old.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(nanoseek.load(path)(x).logits, old(x).logits)


def test_successful_overwrite_replaces_whole_directory(tmp_path):
    old, path = _saved(tmp_path, max_shard_bytes=20_000)
    assert (path / "model.safetensors.index.json").exists()
    new = _model(old.config, seed=1)
    nanoseek.save(new, path)  # one file now: the stale shards and index must not survive
    assert not (path / "model.safetensors.index.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt"]
    x = torch.randint(0, old.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(nanoseek.load(path)(x).logits, new(x).logits)
