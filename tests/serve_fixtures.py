"""Helpers for the server tests: a live uvicorn server on 127.0.0.1, a tiny real engine with a tokenizer trained
on a tiny corpus, and a headless Chromium driven over the DevTools protocol through a pipe (no websocket
library needed: `--remote-debugging-pipe` speaks NUL-separated JSON on file descriptors 3 and 4)."""

from __future__ import annotations

import fcntl
import functools
import json
import os
import select
import shutil
import subprocess
import tempfile
import time

from nanoseek.serve.api import ThreadedServer as LiveServer  # noqa: F401  (the tests import it from here)
from nanoseek.serve.api import free_port  # noqa: F401

# ---- headless Chromium over the DevTools protocol ----


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def ensure_chromium() -> str:
    """Debian's chromium; installed with apt-get when missing (CI runs as root with the Debian mirror reachable)."""
    path = find_chromium()
    if path is None:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(["apt-get", "install", "-y", "-qq", "chromium"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
        path = find_chromium()
    if path is None:
        raise RuntimeError("chromium is not installed and apt-get could not install it")
    return path


def _dup_high(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class Browser:
    """One headless Chromium page, driven by DevTools protocol commands over a pipe."""

    def __init__(self, chromium: str):
        self.profile = tempfile.mkdtemp(prefix="nanoseek-chromium-")
        to_child_r, self._w = os.pipe()
        self._r, from_child_w = os.pipe()
        # Move the child's ends above 4, so that mapping them to 3 and 4 cannot overwrite one with the other.
        to_child_r, from_child_w = (_dup_high(fd) for fd in (to_child_r, from_child_w))
        args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-extensions", "--disable-dev-shm-usage", f"--user-data-dir={self.profile}",
                "--remote-debugging-pipe", "about:blank"]
        # bash (dash reads only one-digit fds) maps our pipe ends to fds 3 (commands in) and 4 (replies out),
        # where Chromium expects them.
        script = f'exec "$0" "$@" 3<&{to_child_r} 4>&{from_child_w}'
        self.proc = subprocess.Popen(["bash", "-c", script, chromium, *args], pass_fds=(to_child_r, from_child_w),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(to_child_r)
        os.close(from_child_w)
        self._buf = b""
        self._id = 0
        self.session = None
        targets = self.send("Target.getTargets")["targetInfos"]
        page = next(t for t in targets if t["type"] == "page")
        self.session = self.send("Target.attachToTarget", {"targetId": page["targetId"], "flatten": True})["sessionId"]
        self.send("Runtime.enable")

    def send(self, method: str, params: dict | None = None, timeout: float = 30.0) -> dict:
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if self.session is not None and not method.startswith("Target."):
            msg["sessionId"] = self.session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.time() + timeout
        while True:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    if "error" in reply:
                        raise RuntimeError(f"{method}: {reply['error']}")
                    return reply.get("result", {})
            left = deadline - time.time()
            if left <= 0 or not select.select([self._r], [], [], left)[0]:
                raise TimeoutError(f"chromium did not answer {method} in {timeout} s")
            chunk = os.read(self._r, 1 << 16)
            if not chunk:
                raise RuntimeError("chromium closed the DevTools pipe")
            self._buf += chunk

    def eval(self, expression: str):
        r = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        if "exceptionDetails" in r:
            raise RuntimeError(f"page script failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    def wait_for(self, expression: str, timeout: float = 60.0):
        deadline = time.time() + timeout
        while time.time() < deadline:
            value = self.eval(expression)
            if value:
                return value
            time.sleep(0.05)
        raise TimeoutError(f"page never satisfied {expression!r}")

    def goto(self, url: str) -> None:
        self.send("Page.navigate", {"url": url})
        self.wait_for("document.readyState === 'complete'")

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except Exception:
            pass
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        for fd in (self._r, self._w):
            try:
                os.close(fd)
            except OSError:
                pass
        shutil.rmtree(self.profile, ignore_errors=True)


# ---- a tiny real model that answers a few prompts exactly ----

# What the model writes after the generation prompt `<｜Assistant｜><think>\n`. "sing" never closes its thinking
# and never ends (no EOS in training), so it runs until max_tokens: the stop and disconnect tests need that.
SCRIPT = {
    "hi": "The user says hi.\n</think>\nHello! How can I help?",
    "What is 2+3?": "2+3=5\n</think>\n<answer>5</answer>",
    "sing": "la " * 24,
}
FOLLOW_UP = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "\nHello! How can I help?"},
             {"role": "user", "content": "What is 2+3?"}]


@functools.cache
def tiny_model_and_tokenizer(seed: int = 0):
    """A tokenizer trained on a tiny corpus and a tiny DeepSeek-V3 (MLA + MoE + MTP) overfit on SCRIPT, so that
    greedy decoding reproduces each reply exactly (asserted here). Shared by the test files of one session."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a tiny model trains faster on one thread, and much faster on a busy machine
    try:
        return _train_tiny(seed)
    finally:
        torch.set_num_threads(threads)


def _train_tiny(seed: int):
    import torch
    import torch.nn.functional as F

    from nanoseek.config import ModelConfig
    from nanoseek.model.transformer import Transformer
    from nanoseek.tokenizer import train_tokenizer

    corpus = [q + " " + a for q, a in SCRIPT.items()] * 20 + ["the quick brown fox jumps over the lazy dog 0123"] * 20
    tok = train_tokenizer(corpus, vocab_size=300, min_frequency=2)
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=tok.vocab_size, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2, n_shared_experts=1,
                      n_routed_experts=4, kv_lora_rank=32, q_lora_rank=48, qk_rope_head_dim=16, v_head_dim=16,
                      qk_nope_head_dim=16, n_group=2, topk_group=1, num_experts_per_tok=2, first_k_dense_replace=1,
                      max_position_embeddings=512, num_nextn_predict_layers=1)
    model = Transformer(cfg)
    seqs = []
    for q in SCRIPT:
        seqs.append((tok.encode_chat([{"role": "user", "content": q}]), script_ids(tok, q)))
    # The second turn of a conversation, with the first answer sent back without its thinking (as the chat page
    # and the terminal chat do): the same reply as on its own.
    seqs.append((tok.encode_chat(FOLLOW_UP), script_ids(tok, FOLLOW_UP[-1]["content"])))
    L = max(len(p) + len(r) for p, r in seqs)
    x = torch.zeros(len(seqs), L, dtype=torch.long)
    y = torch.full((len(seqs), L), -100)
    for i, (p, r) in enumerate(seqs):
        ids = p + r
        x[i, : len(ids)] = torch.tensor(ids)
        y[i, len(p) - 1 : len(ids) - 1] = torch.tensor(r)  # loss on the reply only
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    model.train()
    steps = 400
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: 1 - i / steps)
    mask = y != -100
    for _ in range(steps):
        logits = model(x).logits
        loss = F.cross_entropy(logits.flatten(0, 1), y.flatten())
        # Stop once every reply token is the argmax with a margin (loss < 0.02), before another step: Adam keeps
        # moving at full size near the optimum.
        if loss.item() < 0.02 and bool((logits.argmax(-1)[mask] == y[mask]).all()):
            break
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()
    with torch.no_grad():  # the full forward's greedy continuation must be the script (checked for the EOS ones)
        for (p, r), q in zip(seqs, [*SCRIPT, "follow-up"]):
            if q == "sing":
                continue
            ids = list(p)
            for _ in r:
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            assert ids[len(p) :] == r, f"the tiny model did not learn the reply to {q!r} (loss {loss.item():.4f})"
    return model, tok


def script_ids(tok, question: str) -> list[int]:
    """The reply tokens the tiny model produces for `question` (EOS included for the ones that end)."""
    return tok.encode(SCRIPT[question]) + ([] if question == "sing" else [tok.eos_id])


def make_engine(model, tok, max_batch: int = 8, max_model_len: int = 256):
    from nanoseek.infer.engine import Engine, EngineConfig

    return Engine(model, tok, EngineConfig(max_batch=max_batch, max_model_len=max_model_len))
