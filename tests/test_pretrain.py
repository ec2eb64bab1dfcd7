"""Pretraining and the shared loop: schedule, optimizer groups, the V3 losses, balancing, compile fallback,
checkpoints that resume bit-for-bit, and the crash-safety test (SIGKILL a real run, resume, same losses)."""

import json
import math
import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

import nanoseek
from nanoseek.config import ConfigError
from nanoseek.model.transformer import Transformer
from nanoseek.train import loop
from nanoseek.train.loop import LoopConfig, Trainer, complete_checkpoints, lr_at, read_metrics
from nanoseek.train.pretrain import PretrainConfig, balance_hook, greedy_accuracy, pretrain_loss
from tests.tiny import tiny

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and the 2 shared cores are often busy."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# ---- schedule and optimizer ----------------------------------------------------------------------------------
def test_lr_schedules():
    c = LoopConfig(steps=100, lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule="cosine")
    lrs = [lr_at(c, s) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # linear warmup to the peak
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # then monotone down
    assert lrs[-1] == pytest.approx(0.1, abs=1e-3) and lrs[55] == pytest.approx(0.55, abs=0.02)  # cosine midpoint
    w = LoopConfig(steps=100, lr=1.0, min_lr_ratio=0.0, warmup_steps=10, schedule="wsd", decay_frac=0.2)
    assert [lr_at(w, s) for s in (10, 50, 79)] == [1.0, 1.0, 1.0]  # stable phase
    assert lr_at(w, 90) == pytest.approx(0.5) and lr_at(w, 100) == 0.0
    with pytest.raises(ConfigError, match="schedule"):
        LoopConfig(schedule="linear")


def test_weight_decay_groups():
    m = Transformer(tiny())
    decay, no_decay = loop.param_groups(m, 0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "model.embed_tokens.weight" in no_decay["names"]
    assert all("norm" in n for n in no_decay["names"] if n != "model.embed_tokens.weight")
    assert "lm_head.weight" in decay["names"] and "model.layers.1.mlp.experts.gate_proj" in decay["names"]
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(m.parameters()))


# ---- the V3 losses and balancing -----------------------------------------------------------------------------
def test_pretrain_loss_terms_by_hand():
    torch.manual_seed(0)
    m = Transformer(tiny()).train()
    x = torch.randint(0, 97, (2, 12))
    y = torch.roll(x, -1, 1)
    cfg = PretrainConfig(mtp_weight=0.3, aux_alpha=0.01)
    torch.manual_seed(1)
    loss, stats = pretrain_loss(m, (x, y), cfg)
    out = m(x, mtp=True)
    main = torch.nn.functional.cross_entropy(out.logits.reshape(-1, 97), y.reshape(-1))
    # MTP depth 1 at position i predicts t_{i+2} = y[i+1]
    mtp = torch.nn.functional.cross_entropy(out.mtp_logits[0].reshape(-1, 97), y[:, 1:].reshape(-1))
    main, mtp, loss = main.detach(), mtp.detach(), loss.detach()
    assert float(stats["loss"]) == pytest.approx(float(main), rel=1e-5)
    assert float(stats["mtp_loss"]) == pytest.approx(float(mtp), rel=1e-5)
    assert float(loss) == pytest.approx(float(main + 0.3 * mtp + 0.01 * out.aux_loss.detach()), rel=1e-5)
    _, off = pretrain_loss(m, (x, y), PretrainConfig(mtp_weight=0.0))
    assert "mtp_loss" not in off


def test_balance_hook_moves_bias_against_load():
    m = Transformer(tiny())
    layers = m.moe_layers()
    layers[0].load[:] = torch.tensor([10, 0, 0, 0, 0, 0, 0, 6])
    for other in layers[1:]:
        other.load[:] = 2
    record = {}
    balance_hook(0.01)(type("T", (), {"raw_model": m})(), record)
    b = layers[0].gate.e_score_correction_bias
    assert b[0] == pytest.approx(-0.01) and b[7] == pytest.approx(-0.01) and b[1] == pytest.approx(0.01)
    assert record["load_max_mean"]["layer1"] == pytest.approx(10 / 2)
    assert record["load_max_mean"]["mtp1"] == pytest.approx(1.0)
    assert all(int(m_.load.sum()) == 0 for m_ in layers)  # counters reset for the next step


# ---- the loop in-process -------------------------------------------------------------------------------------
class Stream:
    """A deterministic resumable token stream (stands in for the data loader)."""

    def __init__(self, seed=0):
        self.seed, self.step = seed, 0

    def __next__(self):
        g = torch.Generator().manual_seed(self.seed * 1000 + self.step)
        self.step += 1
        x = torch.randint(0, 97, (2, 16), generator=g)
        return x, torch.roll(x, -1, 1)

    def state_dict(self):
        return {"step": self.step}

    def load_state_dict(self, s):
        self.step = s["step"]


def _trainer(out, steps=6, **kw):
    torch.manual_seed(0)
    cfg = PretrainConfig(steps=steps, warmup_steps=2, eval_every=3, ckpt_every=3, progress=False, lr=1e-2,
                         bias_gamma=0.01, **kw)
    return Trainer(Transformer(tiny()), cfg, out, lambda m, b: pretrain_loss(m, b, cfg),
                   after_step=[balance_hook(cfg.bias_gamma)])


def test_resume_in_process_is_exact(tmp_path):
    val = [next(Stream(seed=9))]
    a = _trainer(tmp_path / "a")
    a.fit(Stream(), val)
    b = _trainer(tmp_path / "b", steps=3)
    b.fit(Stream(), val)
    c = _trainer(tmp_path / "b")  # a fresh process would do exactly this
    stream = Stream()
    assert c.resume(stream) and c.step == 3 and stream.step == 3
    c.fit(stream, val)
    ra, rb = read_metrics(tmp_path / "a"), read_metrics(tmp_path / "b")
    assert [r["step"] for r in rb] == list(range(1, 7))
    for k in ("loss", "mtp_loss", "grad_norm", "val_loss"):
        assert [r.get(k) for r in ra] == [r.get(k) for r in rb], k
    for ka, kb in zip(a.raw_model.state_dict().values(), c.raw_model.state_dict().values()):
        assert torch.equal(ka, kb)
    # the balancing biases moved and came back through the checkpoint
    assert c.raw_model.moe_layers()[0].gate.e_score_correction_bias.abs().sum() > 0
    # checkpoints are HF format: nanoseek.load reads them; only keep_checkpoints=2 are left
    ckpts = complete_checkpoints(tmp_path / "b")
    assert [p.name for p in ckpts] == ["step_000003", "step_000006"]
    m = nanoseek.load(ckpts[-1])
    assert torch.equal(m.lm_head.weight, c.raw_model.lm_head.weight)


def test_resume_ignores_incomplete_checkpoints(tmp_path):
    a = _trainer(tmp_path, steps=3)
    a.fit(Stream(), None)
    root = tmp_path / "checkpoints"
    (root / ".step_000009.tmp-dead").mkdir()  # an interrupted atomic write
    (root / "step_000012").mkdir()  # a directory without train state is not a checkpoint
    (root / "step_000012" / "config.json").write_text("{}")
    b = _trainer(tmp_path, steps=3)
    assert b.resume(Stream()) and b.step == 3


def test_compile_failure_falls_back_to_eager(tmp_path, monkeypatch):
    class Broken(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, *a, **k):
            self.inner(*a, **k)  # side effects on the buffers happen, then the "compiler" fails
            raise RuntimeError("backend exploded")

    def broken(model, enabled):
        return Broken(model) if enabled else model

    monkeypatch.setattr(loop, "apply_compile", broken)
    a = _trainer(tmp_path / "a", steps=2, compile=True)
    with pytest.warns(UserWarning, match="torch.compile failed"):
        a.fit(Stream(), None)
    b = _trainer(tmp_path / "b", steps=2)
    b.fit(Stream(), None)
    assert [r["loss"] for r in read_metrics(tmp_path / "a")] == [r["loss"] for r in read_metrics(tmp_path / "b")]


def test_greedy_accuracy_scores_the_answer_tag(monkeypatch):
    from nanoseek.infer import engine as engine_mod
    from nanoseek.tokenizer import train_tokenizer

    tok = train_tokenizer(["What is 2 + 3? <answer>5</answer> </think>"] * 4, vocab_size=300)
    replies = ["carry 1\n</think>\n<answer>5</answer>", "</think>\n<answer>6</answer>", "no answer tag 5",
               "</think>\n<answer>12</answer>"]

    def fake_generate(self, prompts, params):
        assert params.temperature == 0.0  # greedy
        return [[type("C", (), {"token_ids": tok.encode(r) + [tok.eos_id]})()] for r in replies[: len(prompts)]]

    monkeypatch.setattr(engine_mod.Engine, "generate", fake_generate)
    entries = [{"task": "add", "question": "What is 2 + 3?", "answer": "5"}] * 3 + \
        [{"task": "mul", "question": "What is 3 * 4?", "answer": "12"}]
    got = greedy_accuracy(Transformer(tiny(vocab_size=300)), tok, entries, max_new=8)
    assert got["add"] == {"acc": pytest.approx(1 / 3), "n": 3, "answer_rate": pytest.approx(2 / 3)}
    assert got["mul"]["acc"] == 1.0


# ---- crash safety: SIGKILL a real pretraining run, resume, compare -------------------------------------------
STEPS = 14
SETS = ["data.train_size=150", "data.val_size=10", "data.test_size=10", "data.ood_size=5",
        f"pretrain.steps={STEPS}", "pretrain.ckpt_every=2", "pretrain.keep_checkpoints=3", "pretrain.eval_every=5",
        "pretrain.eval_n=3", "pretrain.progress=false", "pretrain.warmup_steps=3"]


def _cmd(out, tok=None, resume=False):
    cmd = [sys.executable, "-m", "nanoseek", "pretrain", "--preset", "smoke", "--out", str(out)]
    for s in SETS:
        cmd += ["--set", s]
    if tok:
        cmd += ["--tokenizer", str(tok)]
    return cmd + (["--resume"] if resume else [])


class CheckpointWatcher(threading.Thread):
    """Loads every checkpoint visible on disk, over and over, while a run is going."""

    def __init__(self, out):
        super().__init__(daemon=True)
        self.out, self.stop, self.loaded, self.errors = out, threading.Event(), set(), []

    def run(self):
        from safetensors import safe_open

        while not self.stop.is_set():
            for p in complete_checkpoints(self.out):
                if p.name in self.loaded:
                    continue
                try:
                    nanoseek.load(p)
                    json.loads((p / "train_state.json").read_text())
                    with safe_open(p / "train_state.safetensors", framework="pt") as f:
                        assert "rng.torch" in f.keys()
                    self.loaded.add(p.name)
                except Exception as e:  # noqa: BLE001
                    if p.exists():  # pruned between listing and reading is fine; broken while present is not
                        self.errors.append(f"{p.name}: {type(e).__name__}: {e}")
            time.sleep(0.01)


def test_sigkill_then_resume_gives_identical_losses(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}  # one thread: fixed reduction order
    ref = tmp_path / "ref"
    subprocess.run(_cmd(ref), check=True, env=env, capture_output=True, timeout=300)
    tok = ref / "tokenizer"

    crash = tmp_path / "crash"
    kill_at = random.Random().randint(3, STEPS - 2)
    watcher = CheckpointWatcher(crash)
    watcher.start()
    proc = subprocess.Popen(_cmd(crash, tok), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if len(read_metrics(crash)) >= kill_at:
            time.sleep(random.random() * 0.05)  # land anywhere in the step, checkpoint writes included
            break
        time.sleep(0.005)
    assert proc.poll() is None, "the run finished before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_after = len(read_metrics(crash))
    assert killed_after < STEPS

    resumed = subprocess.run(_cmd(crash, tok, resume=True), env=env, capture_output=True, text=True, timeout=300)
    watcher.stop.set()
    watcher.join()
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed at step" in resumed.stderr or not complete_checkpoints(crash)
    assert not watcher.errors, watcher.errors
    assert watcher.loaded  # the watcher did see (and load) checkpoints

    a, b = read_metrics(ref), read_metrics(crash)
    assert [r["step"] for r in b] == list(range(1, STEPS + 1))
    for k in ("loss", "mtp_loss", "aux_loss", "grad_norm", "lr", "load_max_mean", "val_loss"):
        assert [r.get(k) for r in a] == [r.get(k) for r in b], f"{k} differs after kill at step ~{killed_after}"
    assert all(math.isfinite(r["loss"]) for r in a)
    ev = json.loads((crash / "eval.json").read_text())["greedy"]  # the base model's greedy eval ran, per task
    assert set(ev) == {"add", "sort", "countdown"} and all(v["n"] == 3 and 0 <= v["acc"] <= 1 for v in ev.values())
    ma, mb = nanoseek.load(ref / "model"), nanoseek.load(crash / "model")
    for (k, va), vb in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert torch.equal(va, vb), k


def test_threads_are_shared_by_torchrun_local_ranks(tmp_path, monkeypatch):
    """pretrain.threads is the job's CPU budget on this machine: under torchrun each local rank takes its share
    (2 threads, 2 ranks: 1 each), so two ranks on a 2-core CPU do not run four threads."""
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        _trainer(tmp_path / "a", threads=2)
        assert torch.get_num_threads() == 1
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
        _trainer(tmp_path / "b", threads=2)
        assert torch.get_num_threads() == 2
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
        _trainer(tmp_path / "c", threads=2)
        assert torch.get_num_threads() == 1  # never 0
    finally:
        torch.set_num_threads(before)
