"""Serving benchmark: C concurrent streams against nanoseek's OpenAI-compatible server (the real Engine behind
`nanoseek.serve.api.create_app`, uvicorn on 127.0.0.1) against sequential transformers `generate` of the same
requests with the same weights (saved by nanoseek.save, loaded by DeepseekV3ForCausalLM.from_pretrained), in one
run. Ends with ONE JSON line.

    python bench/serve.py                           # a random model of --preset cpu-tiny
    python bench/serve.py --model runs/x/r1/model   # a trained checkpoint (with its tokenizer files)

Requests: questions of the task generator's test split (nanoseek.data), asked with the R1 prompt through the chat
template (the server renders it from `messages`; transformers renders the same ids from tokenizer_config.json's
Jinja template, checked here), a fixed `max_tokens` with `ignore_eos`, so both sides generate exactly the same
number of tokens. Every request samples at --temperature (default 1.0, plain multinomial on both sides: top-k and
top-p off) with its own seed: a random model's greedy output tends to repeat one byte token that is not valid UTF-8
on its own, and the server streams text, so greedy would hold whole replies back and TTFT would mean nothing.

Metrics, as vLLM's benchmark_serving defines them, measured by the client:
- TTFT: time from sending the request to the first streamed chunk that carries text;
- TPOT: (end-to-end latency - TTFT) / (output tokens - 1), per request; output tokens from the usage chunk;
- aggregate output tokens/s: all output tokens / wall time from the first request sent to the last one finished;
- server_ttft_ms_mean: the server's own TTFT (its /metrics histogram, from the handler to the first token) over the
  timed requests, to tell queueing and prefill in the engine from the HTTP/SSE legs.
The transformers side runs the same requests one after another (batch 1, no server); its TTFT/TPOT are per request
from that request's own start (a streamer stamps the first token), i.e. without the queueing a sequential server
would add. The server and the engine share this process (the engine steps in its own thread, as in `nanoseek
serve`); the client, a plain httpx SSE reader, runs in a child process (--client thread: in this process).

Both sides use the same torch thread count (--threads, default 1: on a shared 2-core machine a second thread only
adds synchronisation at this size). Loopback only; the request count and every timeout are bounded.

A random model's vocabulary is cut to the tokenizer's (the cpu-tiny tokenizer has fewer tokens than the preset's
vocab_size, and ids it cannot decode would stream no text); a checkpoint is used as it is.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def percentile(xs: list[float], q: float) -> float:
    """Linear-interpolated percentile (numpy's default), as vLLM reports them."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(ttft: list[float], tpot: list[float], tokens: int, wall: float) -> dict:
    ms = 1000.0
    return dict(output_tok_s=round(tokens / wall, 1), wall_s=round(wall, 2), output_tokens=tokens,
                ttft_ms_p50=round(percentile(ttft, 50) * ms, 1), ttft_ms_p99=round(percentile(ttft, 99) * ms, 1),
                tpot_ms_p50=round(percentile(tpot, 50) * ms, 2), tpot_ms_p99=round(percentile(tpot, 99) * ms, 2))


# ---- the model, the tokenizer and the requests ----


def build(args, workdir: Path):
    """(nanoseek model, nanoseek tokenizer, HF-format directory with the tokenizer files, description)."""
    import torch

    import nanoseek
    from nanoseek.config import load_preset
    from nanoseek.model.transformer import Transformer
    from nanoseek.tokenizer import load_tokenizer, train_tokenizer

    preset = load_preset(args.preset)
    data_cfg = preset.section("data")
    if args.model:
        model, tok = nanoseek.load(args.model).eval(), load_tokenizer(args.model)
        return model, tok, Path(args.model), data_cfg, args.model
    from nanoseek.data import corpus_texts

    tcfg = preset.section("tokenizer")
    t0 = time.perf_counter()
    tok = train_tokenizer(corpus_texts(data_cfg, limit=tcfg.max_docs), tcfg.vocab_size, tcfg.min_frequency)
    log(f"tokenizer: {tok.vocab_size} tokens trained on the {args.preset} corpus in {time.perf_counter() - t0:.1f}s")
    mcfg = preset.model
    mcfg.vocab_size = min(mcfg.vocab_size, tok.vocab_size)
    torch.manual_seed(args.seed)
    model = Transformer(mcfg).eval()
    d = workdir / "ckpt"
    tok.save(d)
    nanoseek.save(model, d, extra_files={f.name: str(f) for f in d.glob("tokenizer*")})
    return model, tok, d, data_cfg, f"random {args.preset} (vocab cut to the tokenizer's {tok.vocab_size})"


def make_requests(data_cfg, n: int, seed: int) -> list[list[dict]]:
    """n chats, each asking one test-split question with the R1 prompt (tasks mixed, seeded order)."""
    from nanoseek.data import prompt_messages, splits

    entries = list(splits(data_cfg)["test"])
    random.Random(seed).shuffle(entries)
    return [prompt_messages(entries[i % len(entries)], r1=True) for i in range(n)]


# ---- nanoseek: the server and a streaming client ----


async def stream_one(client, url: str, body: dict, timeout: float) -> dict:
    """One streaming chat request: TTFT (first chunk with text), e2e latency, output tokens (usage chunk)."""
    t0 = time.perf_counter()
    ttft, usage, text = None, None, []
    async with client.stream("POST", url + "/v1/chat/completions", json=body, timeout=timeout) as r:
        if r.status_code != 200:
            raise RuntimeError(f"server answered {r.status_code}: {(await r.aread()).decode()[:300]}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(f"stream failed: {chunk['error']}")
            if chunk.get("usage"):
                usage = chunk["usage"]
            for c in chunk.get("choices", []):
                d = c.get("delta", {})
                piece = (d.get("reasoning_content") or "") + (d.get("content") or "")
                if piece:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    text.append(piece)
    e2e = time.perf_counter() - t0
    if usage is None:
        raise RuntimeError("the stream ended without a usage chunk (stream_options.include_usage was sent)")
    return dict(ttft=ttft, e2e=e2e, tokens=usage["completion_tokens"], text="".join(text))


async def run_clients(url: str, bodies: list[dict], concurrency: int, timeout: float) -> tuple[list[dict], float]:
    import httpx

    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(limits=limits, trust_env=False) as client:

        async def one(body):
            async with sem:
                return await stream_one(client, url, body, timeout)

        t0 = time.perf_counter()
        results = await asyncio.wait_for(asyncio.gather(*(one(b) for b in bodies)), timeout=timeout)
        return results, time.perf_counter() - t0


def _client_main(url, bodies, concurrency, timeout, conn) -> None:
    """The client process: the timed run; sends (results, wall) or the error text back."""
    try:
        conn.send(asyncio.run(run_clients(url, bodies, concurrency, timeout)))
    except BaseException as e:  # reported by the parent
        conn.send(f"{type(e).__name__}: {e}")
    finally:
        conn.close()


def client_process(url, bodies, args):
    """Run the client in its own process (as vLLM's benchmark client is), so that parsing 32 SSE streams does not
    take the server's GIL; the server and the engine stay in this process."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_client_main, args=(url, bodies, args.concurrency, args.timeout, child),
                       name="bench-client", daemon=True)
    proc.start()
    child.close()
    try:
        if not parent.poll(2 * args.timeout + 120):
            raise RuntimeError("the client process sent nothing in time")
        out = parent.recv()
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if isinstance(out, str):
        raise RuntimeError(f"client process failed: {out}")
    return out


def server_ttft(url: str) -> tuple[float, float]:
    """(sum, count) of the server's own TTFT histogram (/metrics): from the request's arrival in the handler to its
    first token, without the HTTP and SSE legs the client's TTFT adds."""
    import re

    import httpx

    text = httpx.get(url + "/metrics", timeout=30, trust_env=False).text

    def value(name):
        m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
        return float(m.group(1)) if m else 0.0

    return value("nanoseek:time_to_first_token_seconds_sum"), value("nanoseek:time_to_first_token_seconds_count")


def bench_nanoseek(model, tok, chats, args) -> dict:
    from nanoseek.infer.engine import Engine, EngineConfig
    from nanoseek.serve.api import ThreadedServer, create_app

    max_len = min(model.config.max_position_embeddings,
                  max(len(tok.encode_chat(c)) for c in chats) + args.max_tokens + 8)
    engine = Engine(model, tok, EngineConfig(max_batch=args.concurrency, max_model_len=max_len, dtype=args.dtype,
                                             threads=args.threads))
    app = create_app(engine, tok, "bench")

    def body(chat, i, max_tokens):
        return {"model": "bench", "messages": chat, "max_tokens": max_tokens, "ignore_eos": True,
                "temperature": args.temperature, "top_p": 1.0, "seed": args.seed * 1_000_003 + i, "stream": True,
                "stream_options": {"include_usage": True}}

    with ThreadedServer(app) as srv:
        log(f"server on {srv.url}; engine max_batch {args.concurrency}, max_model_len {max_len}, {args.dtype}")
        warm = [body(c, i, 8) for i, c in enumerate(chats[: min(4, len(chats))])]
        bodies = [body(c, i, args.max_tokens) for i, c in enumerate(chats)]
        asyncio.run(run_clients(srv.url, warm, args.concurrency, args.timeout))  # warm-up
        before = server_ttft(srv.url)
        if args.client == "process":
            results, wall = client_process(srv.url, bodies, args)
        else:
            results, wall = asyncio.run(run_clients(srv.url, bodies, args.concurrency, args.timeout))
        after = server_ttft(srv.url)
        stats = engine.stats()
    bad = [r["tokens"] for r in results if r["tokens"] != args.max_tokens]
    if bad:
        raise RuntimeError(f"{len(bad)} replies had {bad[:5]}... tokens instead of max_tokens={args.max_tokens}")
    if any(r["ttft"] is None for r in results):
        raise RuntimeError("a reply streamed no text at all; TTFT is undefined for it")
    if stats["slots_used"]:
        raise RuntimeError(f"the cache pool is not empty after the run: {stats}")
    ttft = [r["ttft"] for r in results]
    tpot = [(r["e2e"] - r["ttft"]) / (r["tokens"] - 1) for r in results if r["tokens"] > 1]
    n_server = after[1] - before[1]
    server_mean = (after[0] - before[0]) / n_server * 1000 if n_server else float("nan")
    return dict(summary(ttft, tpot, sum(r["tokens"] for r in results), wall),
                server_ttft_ms_mean=round(server_mean, 1))


# ---- transformers: the same requests one after another ----


class FirstTokenTimer:
    """A generate() streamer that stamps the first generated token (the first put() is the prompt)."""

    def __init__(self):
        self.puts, self.t_first = 0, None

    def put(self, value):
        self.puts += 1
        if self.puts == 2 and self.t_first is None:
            self.t_first = time.perf_counter()

    def end(self):
        pass


def bench_transformers(hf_dir: Path, tok, chats, args) -> dict:
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    hf = transformers.DeepseekV3ForCausalLM.from_pretrained(hf_dir, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(hf_dir)
    hf.generation_config.eos_token_id = None  # ignore_eos: exactly max_tokens tokens, like the server
    hf.generation_config.pad_token_id = tok.pad_id
    prompts = []
    for c in chats:
        ids = hf_tok.apply_chat_template(c, add_generation_prompt=True, tokenize=True)
        ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
        if ids != tok.encode_chat(c):
            raise RuntimeError("transformers' chat template gives other ids than nanoseek's; the requests differ")
        prompts.append(torch.tensor([ids]))

    def gen(ids, i, max_tokens, streamer=None):
        torch.manual_seed(args.seed * 1_000_003 + i)
        sample = dict(do_sample=True, temperature=args.temperature, top_k=0, top_p=1.0) if args.temperature > 0 \
            else dict(do_sample=False)
        return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                           streamer=streamer, **sample)

    n = len(prompts) if args.hf_requests <= 0 else min(args.hf_requests, len(prompts))
    ttft, tpot, tokens = [], [], 0
    with torch.inference_mode():
        gen(prompts[0], 0, 8)  # warm-up
        t_all = time.perf_counter()
        for i in range(n):
            timer = FirstTokenTimer()
            t0 = time.perf_counter()
            out = gen(prompts[i], i, args.max_tokens, timer)
            e2e = time.perf_counter() - t0
            k = out.shape[1] - prompts[i].shape[1]
            if k != args.max_tokens:
                raise RuntimeError(f"transformers generated {k} tokens instead of {args.max_tokens}")
            tokens += k
            ttft.append(timer.t_first - t0)
            tpot.append((e2e - ttft[-1]) / (k - 1))
            if time.perf_counter() - t_all > args.hf_time_budget and i + 1 < n:
                log(f"transformers: stopped after {i + 1} of {n} requests (--hf-time-budget {args.hf_time_budget}s)")
                break
        wall = time.perf_counter() - t_all
    return dict(summary(ttft, tpot, tokens, wall), requests=len(ttft))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint directory with tokenizer files (default: a random model of --preset)")
    src.add_argument("--preset", default="cpu-tiny", help="preset of the random model and of the prompts' tasks")
    p.add_argument("--concurrency", type=int, default=32, help="streams at once (= engine cache slots)")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=128, help="output tokens per request (ignore_eos)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy on both sides")
    p.add_argument("--threads", type=int, default=1, help="torch threads, both sides")
    p.add_argument("--dtype", default="float32", help="engine dtype (transformers runs fp32)")
    p.add_argument("--hf-requests", type=int, default=0, help="run only the first N requests on transformers "
                   "(0 = all); its tokens/s is per wall second of the requests it ran")
    p.add_argument("--hf-time-budget", type=float, default=900.0, help="stop transformers' sequential run after "
                   "this many seconds (its tokens/s stays per wall second of the requests it finished)")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds for the whole concurrent run")
    p.add_argument("--client", choices=("process", "thread"), default="process", help="where the streaming client "
                   "runs: its own process (default; it does not share the server's GIL) or this process's main thread")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.model:
        args.preset = "cpu-tiny"
    import torch

    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        model, tok, hf_dir, data_cfg, source = build(args, Path(tmp))
        chats = make_requests(data_cfg, args.num_requests, args.seed)
        plen = [len(tok.encode_chat(c)) for c in chats]
        log(f"model: {source}, {model.num_params() / 1e6:.2f}M params; {args.num_requests} requests "
            f"(prompt {min(plen)}-{max(plen)} tokens, mean {statistics.mean(plen):.1f}), {args.max_tokens} output "
            f"tokens each, {args.concurrency} concurrent; temperature {args.temperature}; torch threads "
            f"{torch.get_num_threads()}; load average {os.getloadavg()[0]:.1f}")
        ns = bench_nanoseek(model, tok, chats, args)
        log(f"nanoseek server:   {ns}")
        hf = bench_transformers(hf_dir, tok, chats, args)
        log(f"transformers seq.: {hf}")
    result = dict(bench="serve", model=source, requests=args.num_requests, concurrency=args.concurrency,
                  max_tokens=args.max_tokens, mean_prompt_tokens=round(statistics.mean(plen), 1),
                  temperature=args.temperature, threads=torch.get_num_threads(), dtype=args.dtype, client=args.client,
                  speedup_tok_s=round(ns["output_tok_s"] / hf["output_tok_s"], 2), nanoseek=ns, transformers=hf,
                  load_avg_1m=round(os.getloadavg()[0], 1), seconds=round(time.perf_counter() - t_start, 1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
