"""OpenAI-compatible server: chat + completions (streaming or not), reasoning split, models, health, metrics, the
chat page, API-key auth, and errors in OpenAI's shape.

    nanoseek serve --model runs/x/r1 --port 8000 [--api-key KEY] [--served-model-name NAME]
    curl localhost:8000/v1/chat/completions -d '{"model":"nanoseek","messages":[{"role":"user","content":"hi"}]}'

`create_app(engine, tokenizer, served_model_name)` builds the app around an Engine (nanoseek.infer.engine) and a
tokenizer (nanoseek.tokenizer); the engine steps in a background thread (async_engine.py). The model's
`<think>…</think>` goes to `reasoning_content`, the rest to `content` (reasoning.py), as the DeepSeek API does.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import json
import logging
import re
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from nanoseek.serve import protocol as P
from nanoseek.serve.async_engine import AsyncEngine, Handle
from nanoseek.serve.reasoning import ReasoningStream, reasoning_token_count, split_reasoning

log = logging.getLogger("nanoseek.serve")
WEB_DIR = Path(__file__).resolve().parent / "web"
DEFAULT_MAX_BODY = 4 * 1024 * 1024


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
             413: "request_too_large", 503: "service_unavailable"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def response(self) -> JSONResponse:
        err = P.ErrorInfo(message=self.message, type=self.TYPES.get(self.status, "server_error"),
                          param=self.param, code=self.code)
        return JSONResponse(P.ErrorResponse(error=err).model_dump(), status_code=self.status)


# ---- metrics ----


class Metrics:
    """Prometheus metrics (vLLM's names with a nanoseek: prefix), one registry per app."""

    def __init__(self, snapshot):
        r = self.registry = CollectorRegistry()
        Gauge("nanoseek:num_requests_running", "Sequences in the running batch.", registry=r).set_function(
            lambda: snapshot().get("running", 0))
        Gauge("nanoseek:num_requests_waiting", "Sequences waiting for a cache slot.", registry=r).set_function(
            lambda: snapshot().get("waiting", 0))
        Gauge("nanoseek:kv_cache_usage_perc", "Fraction of latent-cache slots in use (0-1).",
              registry=r).set_function(
            lambda: snapshot().get("slots_used", 0) / max(1, snapshot().get("slots_total", 1)))
        self.prompt_tokens = Counter("nanoseek:prompt_tokens", "Prompt tokens processed.", registry=r)
        self.generation_tokens = Counter("nanoseek:generation_tokens", "Tokens generated.", registry=r)
        self.finished = Counter("nanoseek:request_success", "Finished samples by finish reason.",
                                ["finished_reason"], registry=r)
        b = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0)
        self.ttft = Histogram("nanoseek:time_to_first_token_seconds", "Time to first token.", buckets=b, registry=r)
        self.tpot = Histogram("nanoseek:time_per_output_token_seconds", "Time per output token after the first.",
                              buckets=b, registry=r)
        self.e2e = Histogram("nanoseek:e2e_request_latency_seconds", "End-to-end request latency.",
                             buckets=b + (60.0, 120.0), registry=r)

    def observe(self, handle: Handle) -> None:
        s = handle.stats
        self.prompt_tokens.inc(s.prompt_tokens)
        self.generation_tokens.inc(sum(s.tokens.values()))
        for reason in s.finish_reasons.values():
            self.finished.labels(finished_reason=reason or "abort").inc()
        aborted = handle.remaining
        if aborted:
            self.finished.labels(finished_reason="abort").inc(aborted)
        self.e2e.observe(s.t_end - s.t_start)
        if s.t_first is not None:
            self.ttft.observe(s.t_first - s.t_start)
            most = max(s.tokens.values())
            if most > 1:  # vLLM's TPOT: (e2e - ttft) / (output tokens - 1)
                self.tpot.observe((s.t_end - s.t_first) / (most - 1))


# ---- the server state ----


class Server:
    def __init__(self, served_model_name: str, api_key: str | None, max_body_bytes: int):
        self.name = served_model_name
        self.api_key = api_key
        self.max_body = max_body_bytes
        self.aengine: AsyncEngine | None = None
        self.tokenizer = None
        self.think_end_id: int | None = None
        self.load_error: str | None = None
        self.metrics = Metrics(lambda: self.aengine.snapshot if self.aengine else {})

    def set_engine(self, engine, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.think_end_id = _single_token_id(tokenizer, "</think>")
        aengine = AsyncEngine(engine, on_done=self.metrics.observe)
        aengine.start()
        self.aengine = aengine

    @property
    def ready(self) -> bool:
        return self.aengine is not None and self.aengine.ready

    def require_ready(self) -> AsyncEngine:
        if not self.ready:
            why = f"the model failed to load: {self.load_error}" if self.load_error else "the model is still loading"
            raise APIError(503, f"not ready: {why}; poll GET /health until it answers 200")
        return self.aengine

    def check_auth(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, key = header.partition(" ")
        # Constant-time compare, so the time taken does not tell how much of a guessed key was right.
        ok = hmac.compare_digest(key.strip().encode(), self.api_key.encode()) and scheme.lower() == "bearer"
        if not ok:
            why = "missing" if not header else "wrong"
            raise APIError(401, f"API key {why}: send the header 'Authorization: Bearer <key>' with the server's "
                                "--api-key", code="invalid_api_key")

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.name:
            raise APIError(404, f"model {model!r} does not exist; this server serves {self.name!r} "
                                "(see GET /v1/models)", param="model", code="model_not_found")

    async def read_json(self, request: Request) -> dict:
        size = request.headers.get("content-length")
        if size is not None and size.isdigit() and int(size) > self.max_body:
            raise self._too_large(int(size))
        chunks, total = [], 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > self.max_body:
                raise self._too_large(total)
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise APIError(400, f"the body is not valid JSON ({e}); send a JSON object") from None
        if not isinstance(body, dict):
            raise APIError(400, f"the body must be a JSON object, got {type(body).__name__}")
        return body

    def _too_large(self, size: int) -> APIError:
        return APIError(413, f"the body is {size} bytes or more, over the limit of {self.max_body} bytes; "
                             "send a shorter prompt")

    def sampling_params(self, req: P._Sampling, prompts: list[list[int]], max_tokens: int | None, prompt_param: str,
                        max_tokens_param: str = "max_tokens"):
        """`max_tokens_param` names the field the client sent the limit in (chat's max_completion_tokens or
        max_tokens), so that an error about it points at that field."""
        from nanoseek.infer.sampling import SamplingParams

        max_len = self.aengine.engine.max_model_len
        vocab = self.aengine.engine.vocab_size
        longest = max(len(p) for p in prompts)
        if min(len(p) for p in prompts) == 0:
            raise APIError(400, "the prompt is empty; send at least one token", param=prompt_param)
        if longest >= max_len:
            raise APIError(400, f"the prompt is {longest} tokens but the context holds {max_len} (prompt + "
                                "completion); shorten the prompt", param=prompt_param)
        for p in prompts:
            bad = [t for t in p if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"token id {bad[0]} is outside the vocabulary [0, {vocab})", param=prompt_param)
        for t in req.stop_token_ids:
            if not 0 <= t < vocab:
                raise APIError(400, f"stop token id {t} is outside the vocabulary [0, {vocab})", param="stop_token_ids")
        room = max_len - longest
        if max_tokens is None:
            max_tokens = room
        elif max_tokens > room:
            raise APIError(400, f"{max_tokens_param}={max_tokens} plus the {longest}-token prompt exceeds the "
                                f"context of {max_len} tokens; ask for at most {room}", param=max_tokens_param)
        return SamplingParams(max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                              top_k=max(0, req.top_k), min_p=req.min_p, seed=req.seed, stop=req.stop_list(),
                              stop_token_ids=list(req.stop_token_ids), ignore_eos=req.ignore_eos, n=req.n)

    async def submit(self, prompts, params, request_id: str) -> Handle:
        from nanoseek.infer.engine import EngineError

        try:
            return await self.aengine.add(prompts, params, request_id)
        except (EngineError, ValueError) as e:
            # The engine's messages start with the field they are about ("n=5 samples need ...", "top_k: ...").
            m = re.match(r"(\w+)\s*[=:]", str(e))
            param = m.group(1) if m and m.group(1) in P.ChatCompletionRequest.model_fields else None
            raise APIError(400, str(e), param=param) from None

    def usage(self, handle: Handle, reasoning_tokens: int | None) -> dict:
        completion = sum(handle.stats.tokens.values())
        u = {"prompt_tokens": handle.stats.prompt_tokens, "completion_tokens": completion,
             "total_tokens": handle.stats.prompt_tokens + completion}
        if reasoning_tokens is not None:
            u["completion_tokens_details"] = {"reasoning_tokens": reasoning_tokens}
        return u


def _single_token_id(tokenizer, text: str) -> int | None:
    for attr in ("token_id", "token_to_id"):
        fn = getattr(tokenizer, attr, None)
        if fn is not None:
            try:
                tid = fn(text)
                if tid is not None:
                    return int(tid)
            except Exception:
                pass
    try:
        ids = tokenizer.encode(text)
        return ids[0] if len(ids) == 1 else None
    except Exception:
        return None


def _parse(model, body: dict):
    try:
        return model.model_validate(body)
    except ValidationError as e:
        err = e.errors()[0]
        param = ".".join(str(x) for x in err["loc"]) or None
        msg = err["msg"].removeprefix("Value error, ")
        raise APIError(400, f"{param}: {msg}" if param else msg, param=param) from None


def _stream_failed(rid: str, e: Exception) -> str:
    """The SSE event that reports a generation failed after the 200 status line went out (OpenAI's error shape)."""
    log.exception("stream %s failed", rid)
    return _sse({"error": {"message": f"generation failed: {type(e).__name__}: {e}", "type": "server_error",
                           "param": None, "code": None}})


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _chunker(rid: str, obj: str, created: int, model: str, include_usage: bool):
    """One response's SSE chunk writer: the same id, object, created and model on every chunk; `usage` only when
    the client asked for it (stream_options.include_usage)."""

    def chunk(choices, usage=None) -> str:
        c = {"id": rid, "object": obj, "created": created, "model": model, "choices": choices}
        if include_usage:
            c["usage"] = usage
        return _sse(c)

    return chunk


class EngineStreamingResponse(StreamingResponse):
    """SSE that notices a client leaving even while no token is being sent, and always closes its Handle (which
    aborts the request and frees its cache slots) however the response ends."""

    def __init__(self, content, handle: Handle):
        super().__init__(content, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.handle = handle

    async def __call__(self, scope, receive, send) -> None:
        try:
            async with anyio.create_task_group() as tg:

                async def watch():
                    await self.listen_for_disconnect(receive)
                    tg.cancel_scope.cancel()

                tg.start_soon(watch)
                try:
                    await self.stream_response(send)
                except OSError:
                    pass  # the client is gone
                tg.cancel_scope.cancel()
        finally:
            self.handle.close()


async def _collect_unless_disconnected(request: Request, handle: Handle, collect):
    """Run `collect()`; if the client disconnects first, abort the request (a non-streaming client that gives up
    must not keep its cache slots busy)."""

    async def wait_disconnect():
        while (await request.receive())["type"] != "http.disconnect":
            pass

    work = asyncio.ensure_future(collect())
    watch = asyncio.ensure_future(wait_disconnect())
    try:
        done, _ = await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        if work in done:
            return work.result()
        work.cancel()
        return Response(status_code=499)  # nobody is listening; nginx's "client closed request"
    finally:
        watch.cancel()
        handle.close()


# ---- the app ----


def create_app(engine, tokenizer, served_model_name: str = "nanoseek", api_key: str | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY, loader=None) -> FastAPI:
    """The FastAPI app. Pass an Engine and its tokenizer, or engine=None and `loader` (a function returning
    (engine, tokenizer)) to load in the background while /health answers 503."""
    srv = Server(served_model_name, api_key, max_body_bytes)

    @asynccontextmanager
    async def lifespan(app):
        if engine is not None:
            srv.set_engine(engine, tokenizer)
        elif loader is not None:

            def load():
                try:
                    srv.set_engine(*loader())
                except Exception as e:
                    log.exception("model load failed")
                    srv.load_error = f"{type(e).__name__}: {e}"

            threading.Thread(target=load, name="nanoseek-load", daemon=True).start()
        yield
        if srv.aengine is not None:
            srv.aengine.stop()

    app = FastAPI(title="nanoseek", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = srv

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        return APIError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}").response()

    @app.exception_handler(Exception)
    async def _any_error(request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}").response()

    @app.get("/health")
    async def health():
        try:
            srv.require_ready()
        except APIError as e:
            return e.response()
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(srv.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def card() -> dict:
        max_len = srv.aengine.engine.max_model_len if srv.ready else None
        return P.ModelCard(id=srv.name, root=srv.name, max_model_len=max_len or 0).model_dump()

    @app.get("/v1/models")
    async def models(request: Request):
        srv.check_auth(request)
        srv.require_ready()
        return {"object": "list", "data": [card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        srv.check_auth(request)
        srv.check_model(model_id)
        srv.require_ready()
        return card()

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        srv.check_auth(request)
        req = _parse(P.ChatCompletionRequest, await srv.read_json(request))
        srv.check_model(req.model)
        srv.require_ready()
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in req.messages]
        try:
            prompt = srv.tokenizer.encode_chat(messages, add_generation_prompt=True)
        except ValueError as e:
            raise APIError(400, f"messages: {e}", param="messages") from None
        # max_completion_tokens (OpenAI's current name) wins over the deprecated max_tokens when both are sent.
        max_param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        params = srv.sampling_params(req, [prompt], getattr(req, max_param), "messages", max_param)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        handle = await srv.submit([prompt], params, rid)
        model_name = srv.name
        created = P.now()
        n = params.n

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            chunk = _chunker(rid, "chat.completion.chunk", created, model_name, include_usage)

            async def events():
                parsers = [ReasoningStream() for _ in range(n)]
                tokens = [[] for _ in range(n)]
                reasoning_seen = [False] * n
                try:
                    for i in range(n):
                        yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                      "logprobs": None, "finish_reason": None}])
                    async for _, out in handle:
                        i = out.index
                        tokens[i] += out.token_ids
                        r, c = parsers[i].feed(out.text)
                        if out.finished:
                            r2, c2 = parsers[i].flush()
                            r, c = _join(r, r2), _join(c, c2)
                        delta = {}
                        if r is not None:
                            delta["reasoning_content"] = r
                            reasoning_seen[i] = True
                        if c is not None:
                            delta["content"] = c
                        if delta or out.finished:
                            yield chunk([{"index": i, "delta": delta, "logprobs": None,
                                          "finish_reason": out.finish_reason if out.finished else None}])
                    if include_usage:
                        rt = sum(reasoning_token_count(t, srv.think_end_id, "x" if seen else None)
                                 for t, seen in zip(tokens, reasoning_seen))
                        yield chunk([], srv.usage(handle, rt))
                except Exception as e:  # the status line is sent already: report in-band, then end properly
                    yield _stream_failed(rid, e)
                yield "data: [DONE]\n\n"

            return EngineStreamingResponse(events(), handle)

        async def collect():
            texts, tokens, reasons = [""] * n, [[] for _ in range(n)], [None] * n
            async for _, out in handle:
                texts[out.index] += out.text
                tokens[out.index] += out.token_ids
                if out.finished:
                    reasons[out.index] = out.finish_reason
            choices, rt = [], 0
            for i in range(n):
                reasoning, content = split_reasoning(texts[i])
                rt += reasoning_token_count(tokens[i], srv.think_end_id, reasoning)
                choices.append(P.ChatChoice(index=i, finish_reason=reasons[i],
                                            message=P.AssistantMessage(content=content, reasoning_content=reasoning)))
            resp = P.ChatCompletionResponse(id=rid, created=created, model=model_name, choices=choices,
                                            usage=P.Usage(**srv.usage(handle, rt)))
            return JSONResponse(resp.model_dump())

        return await _collect_unless_disconnected(request, handle, collect)

    @app.post("/v1/completions")
    async def completions(request: Request):
        srv.check_auth(request)
        req = _parse(P.CompletionRequest, await srv.read_json(request))
        srv.check_model(req.model)
        srv.require_ready()
        raw = req.prompts()
        prompts = [srv.tokenizer.encode(p) if isinstance(p, str) else list(p) for p in raw]
        params = srv.sampling_params(req, prompts, req.max_tokens, "prompt")
        rid = f"cmpl-{uuid.uuid4().hex}"
        handle = await srv.submit(prompts, params, rid)
        model_name, created, n = srv.name, P.now(), params.n
        # Echo prepends the prompt text (token-id prompts are decoded first).
        echoes = [(p if isinstance(p, str) else srv.tokenizer.decode(list(p))) if req.echo else "" for p in raw]

        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)

            chunk = _chunker(rid, "text_completion", created, model_name, include_usage)

            async def events():
                started = set()
                try:
                    async for pi, out in handle:
                        idx = pi * n + out.index
                        text = out.text
                        if idx not in started:
                            started.add(idx)
                            text = echoes[pi] + text
                        if text or out.finished:
                            yield chunk([{"index": idx, "text": text, "logprobs": None,
                                          "finish_reason": out.finish_reason if out.finished else None}])
                    if include_usage:
                        yield chunk([], srv.usage(handle, None))
                except Exception as e:
                    yield _stream_failed(rid, e)
                yield "data: [DONE]\n\n"

            return EngineStreamingResponse(events(), handle)

        async def collect():
            k = len(prompts) * n
            texts, reasons = [""] * k, [None] * k
            async for pi, out in handle:
                texts[pi * n + out.index] += out.text
                if out.finished:
                    reasons[pi * n + out.index] = out.finish_reason
            choices = [P.CompletionChoice(index=i, text=echoes[i // n] + texts[i], finish_reason=reasons[i])
                       for i in range(k)]
            resp = P.CompletionResponse(id=rid, created=created, model=model_name, choices=choices,
                                        usage=P.Usage(**srv.usage(handle, None)))
            return JSONResponse(resp.model_dump())

        return await _collect_unless_disconnected(request, handle, collect)

    app.mount("/", StaticFiles(directory=WEB_DIR, html=True), name="web")
    return app


def _join(a: str | None, b: str | None) -> str | None:
    if a is None:
        return b
    return a if b is None else a + b


# ---- CLI ----


def add_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="checkpoint directory (HF format, with the tokenizer files)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0 for every interface)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on /v1/*")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: the dir name)")
    p.add_argument("--max-batch", type=int, default=32, help="concurrently running sequences (cache slots)")
    p.add_argument("--max-model-len", type=int, default=None, help="prompt + completion tokens (default: engine's)")
    p.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY)
    p.add_argument("--threads", type=int, default=0, help="torch threads for the engine (0 = torch's default)")
    p.add_argument("--log-level", default="info")


def load_engine(model_dir: str, max_batch: int = 32, max_model_len: int | None = None, threads: int = 0):
    """(Engine, tokenizer) for a checkpoint directory."""
    import nanoseek
    from nanoseek.checkpoint import model_dir as checkpoint_dir
    from nanoseek.infer.engine import Engine, EngineConfig
    from nanoseek.tokenizer import load_tokenizer

    model_dir = checkpoint_dir(model_dir)
    tokenizer = load_tokenizer(model_dir)
    model = nanoseek.load(model_dir)
    if max_model_len is None:  # the engine's default, within what the model's positions allow
        max_model_len = min(EngineConfig.max_model_len, model.config.max_position_embeddings)
    cfg = EngineConfig(max_batch=max_batch, max_model_len=max_model_len, threads=threads)
    return Engine(model, tokenizer, cfg), tokenizer


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port free on `host` right now (the OS picks it)."""
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ThreadedServer:
    """`with ThreadedServer(app) as srv:` serves `app` with uvicorn in a daemon thread on 127.0.0.1 (loopback only) at
    `srv.url`; for benchmarks, tests and notebooks that talk to a live server from the same process."""

    def __init__(self, app, start_timeout: float = 60.0):
        import uvicorn

        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.start_timeout = start_timeout
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning",
                                                    timeout_graceful_shutdown=2))
        self.thread = threading.Thread(target=self.server.run, name="uvicorn", daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + self.start_timeout
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"uvicorn did not start within {self.start_timeout:.0f} s (see its log above)")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


def run(args) -> int:
    import uvicorn

    from nanoseek.checkpoint import model_dir as checkpoint_dir

    checkpoint_dir(args.model)  # a wrong --model fails here, before the port opens, not in the background load
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    name = args.served_model_name or Path(args.model).resolve().name
    app = create_app(None, None, name, api_key=args.api_key, max_body_bytes=args.max_body_bytes,
                     loader=lambda: load_engine(args.model, args.max_batch, args.max_model_len, args.threads))
    t0 = time.perf_counter()
    log.info("serving %s on http://%s:%d (chat page at /, API at /v1)", name, args.host, args.port)
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    log.info("stopped after %.0f s", time.perf_counter() - t0)
    return 0
