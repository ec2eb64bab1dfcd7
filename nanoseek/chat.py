"""Chat with a model in the terminal: streams the reply, the thinking dimmed and the answer plain.

    nanoseek chat --model runs/x/r1 [--temperature 0.6] [--max-tokens 512] [--system "..."]

The conversation is kept, but only the answers go back to the model: earlier thinking is stripped, as DeepSeek
recommends for R1 (and its API enforces). Ctrl-C stops the reply being generated and returns to the prompt;
Ctrl-D (or /exit) quits; /reset starts a new conversation.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time

from nanoseek.serve.reasoning import ReasoningStream

DIM, RESET = "\033[2m", "\033[0m"


class Chat:
    def __init__(self, engine, tokenizer, sampling: dict | None = None, system: str | None = None,
                 out=None, color: bool | None = None):
        self.engine = engine
        self.tokenizer = tokenizer
        self.sampling = dict(sampling or {})
        self.system = system
        self.out = out or sys.stdout
        if color is None:
            color = hasattr(self.out, "isatty") and self.out.isatty() and "NO_COLOR" not in os.environ
        self.color = color
        self.messages: list[dict] = []
        self._stop = False
        self.reset()

    def reset(self) -> None:
        self.messages = [{"role": "system", "content": self.system}] if self.system else []

    def write(self, text: str, dim: bool = False) -> None:
        if text:
            self.out.write(f"{DIM}{text}{RESET}" if dim and self.color else text)
            self.out.flush()

    def _on_sigint(self, signum, frame) -> None:
        # Only set a flag: the step loop aborts between steps, never in the middle of one.
        self._stop = True

    def reply(self, user_text: str) -> dict:
        """Generate and print one reply; returns {"reasoning", "content", "finish_reason", "tokens"}."""
        from nanoseek.infer.sampling import SamplingParams

        self.messages.append({"role": "user", "content": user_text})
        prompt = self.tokenizer.encode_chat(self.messages, add_generation_prompt=True)
        room = self.engine.max_model_len - len(prompt)
        if room < 1:
            self.messages.pop()
            self.write(f"[the conversation is {len(prompt)} tokens, over the context of {self.engine.max_model_len};"
                       " /reset to start again]\n")
            return {"reasoning": "", "content": "", "finish_reason": "length", "tokens": 0}
        kw = dict(self.sampling)
        kw["max_tokens"] = min(kw.get("max_tokens") or room, room)
        rid = self.engine.add_request(prompt, SamplingParams(**kw))
        parser = ReasoningStream()
        reasoning, content, reason, tokens = "", "", None, 0
        self._stop = False
        old = _install_sigint(self._on_sigint)
        t0 = time.perf_counter()
        aborted = False
        try:
            while reason is None:
                if self._stop and not aborted:
                    self.engine.abort(rid)  # frees the slots now; the next step reports finish_reason "abort"
                    aborted = True
                if not self.engine.has_unfinished():
                    reason = "abort"
                    break
                for out in self.engine.step():
                    if out.request_id != rid:
                        continue
                    tokens += len(out.token_ids)
                    r, c = parser.feed(out.text)
                    if out.finished:
                        r2, c2 = parser.flush()
                        r, c = (r or "") + (r2 or ""), (c or "") + (c2 or "")
                        reason = out.finish_reason
                    if r:
                        reasoning += r
                        self.write(r, dim=True)
                    if c:
                        shown = c
                        if not content:  # the answer starts on its own paragraph, after one blank line
                            shown = c.lstrip("\n")
                            if reasoning:
                                self.write("\n" if reasoning.endswith("\n") else "\n\n")
                        content += c
                        self.write(shown)
        finally:
            _install_sigint(old)
        secs = time.perf_counter() - t0
        status = f"{tokens} tokens, {tokens / max(secs, 1e-9):.1f} tokens/s"
        status += ", stopped" if reason == "abort" else ""
        self.write(f"\n[{status}]\n", dim=True)
        # Keep the conversation with the answer only (never the thinking). A reply stopped before any answer takes
        # its question back out, so that the next question does not follow an unanswered one.
        if content:
            self.messages.append({"role": "assistant", "content": content})
        else:
            self.messages.pop()
        return {"reasoning": reasoning, "content": content, "finish_reason": reason, "tokens": tokens}

    def loop(self, read=input) -> None:
        self.write("nanoseek chat: Ctrl-C stops a reply, /reset starts over, Ctrl-D or /exit quits.\n")
        while True:
            try:
                text = read("> ").strip()
            except EOFError:
                self.write("\n")
                return
            except KeyboardInterrupt:
                self.write("\n(Ctrl-D or /exit quits)\n")
                continue
            if not text:
                continue
            if text in ("/exit", "/quit"):
                return
            if text == "/reset":
                self.reset()
                self.write("[new conversation]\n")
                continue
            self.reply(text)


def _install_sigint(handler):
    """Swap the SIGINT handler (only possible in the main thread; elsewhere Ctrl-C cannot reach us anyway)."""
    try:
        return signal.signal(signal.SIGINT, handler)
    except ValueError:
        return None


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (HF format, with the tokenizer files)")
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (R1 recommends 0.5-0.7)")
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=None, help="per reply (default: what fits in the context)")
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None, help="a system prompt")
    p.add_argument("--threads", type=int, default=0, help="torch threads for the engine (0 = torch's default)")


def run(args) -> int:
    from nanoseek.serve.api import load_engine

    engine, tokenizer = load_engine(args.model, max_batch=1, max_model_len=args.max_model_len, threads=args.threads)
    sampling = dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, max_tokens=args.max_tokens,
                    seed=args.seed)
    Chat(engine, tokenizer, sampling, system=args.system).loop()
    return 0
