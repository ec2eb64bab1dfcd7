"""The OpenAI-compatible server against the official `openai` client, on 127.0.0.1, over the real Engine with a
tiny DeepSeek-V3 overfit on a few replies (tests/serve_fixtures.py), plus every bad request, disconnects, a
bounded load test, and the terminal chat."""

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from serve_fixtures import LiveServer, free_port, make_engine, script_ids, tiny_model_and_tokenizer

import nanoseek
from nanoseek.serve.api import create_app

MODEL = "tiny-r1"
MAX_LEN = 128
HI = [{"role": "user", "content": "hi"}]


@pytest.fixture(scope="module")
def tiny():
    return tiny_model_and_tokenizer()


@pytest.fixture(scope="module")
def engine(tiny):
    model, tok = tiny
    return make_engine(model, tok, max_batch=8, max_model_len=MAX_LEN)


@pytest.fixture(scope="module")
def server(tiny, engine):
    app = create_app(engine, tiny[1], MODEL, max_body_bytes=64 * 1024)
    with LiveServer(app) as srv:
        srv.app = app
        yield srv


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def wait_idle(engine, timeout=30.0) -> dict:
    """Poll until the engine holds no request (a freed request's slots are released at a step boundary)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = engine.stats()
        if s["running"] == 0 and s["waiting"] == 0 and s["slots_used"] == 0 and not engine.has_unfinished():
            return s
        time.sleep(0.02)
    raise AssertionError(f"engine still busy after {timeout} s: {engine.stats()}")


def scrape(server) -> dict:
    """Every sample of /metrics, parsed by prometheus_client: {(name, sorted label items): value}."""
    text = httpx.get(server.url + "/metrics").text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def metric(server, name: str, **labels) -> float:
    """One sample of /metrics; 0 while the series has none yet (a labelled counter before its first event)."""
    return scrape(server).get((name, tuple(sorted(labels.items()))), 0.0)


def val(samples: dict, name: str, **labels) -> float:
    key = (name, tuple(sorted(labels.items())))
    assert key in samples, f"{name}{labels or ''} is not in /metrics"
    return samples[key]


def reply(client, **kw) -> tuple:
    """(reasoning_content, content) of one chat reply to "hi"."""
    m = client.chat.completions.create(model=MODEL, messages=HI, **kw).choices[0].message
    return m.reasoning_content, m.content


# ---- happy paths with the official client ----


def test_chat_reasoning_split_and_usage(client, tiny):
    tok = tiny[1]
    r = client.chat.completions.create(model=MODEL, messages=HI, temperature=0)
    msg = r.choices[0].message
    assert msg.role == "assistant"
    assert msg.reasoning_content == "The user says hi.\n"  # the model's output starts inside <think>
    assert msg.content == "\nHello! How can I help?"
    assert r.choices[0].finish_reason == "stop"
    ids = script_ids(tok, "hi")
    assert r.usage.prompt_tokens == len(tok.encode_chat(HI))
    assert r.usage.completion_tokens == len(ids)
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    assert r.usage.completion_tokens_details.reasoning_tokens == ids.index(tok.token_id("</think>")) + 1
    assert r.id.startswith("chatcmpl-") and r.model == MODEL


def test_chat_streaming(client, tiny):
    stream = client.chat.completions.create(model=MODEL, messages=HI, temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1  # one id per response
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason]
    assert finishes == ["stop"]  # exactly one per choice
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == len(script_ids(tiny[1], "hi"))
    reasoning = "".join(getattr(ch.delta, "reasoning_content", None) or "" for c in chunks for ch in c.choices)
    content = "".join(ch.delta.content or "" for c in chunks for ch in c.choices)
    assert reasoning == "The user says hi.\n"
    assert content == "\nHello! How can I help?"
    assert chunks[-1].usage.completion_tokens_details.reasoning_tokens > 0


def test_a_failing_engine_step_ends_the_stream_with_an_error_event(tiny, monkeypatch):
    """A step that raises after the 200 went out: the stream gets one in-band error event (which the openai client
    raises as APIError) and [DONE]; the server goes on serving."""
    model, tok = tiny
    eng = make_engine(model, tok, max_batch=4, max_model_len=MAX_LEN)
    step, calls = eng.step, []

    def failing_step():
        calls.append(1)
        if len(calls) == 3:  # after the prefill and a decode step: some deltas are out already
            raise RuntimeError("boom")
        return step()

    monkeypatch.setattr(eng, "step", failing_step)
    with LiveServer(create_app(eng, tok, MODEL)) as srv:
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        got = []
        with pytest.raises(openai.APIError, match="generation failed: RuntimeError: boom"):
            for chunk in c.chat.completions.create(model=MODEL, messages=HI, temperature=0, stream=True):
                got.append(chunk)
        assert got  # the error came in-band, after chunks
        calls.clear()  # the same failure in the legacy completions stream
        with httpx.stream("POST", srv.url + "/v1/completions", timeout=60,
                          json={"model": MODEL, "prompt": "hi", "max_tokens": 20, "stream": True}) as r:
            assert r.status_code == 200
            events = [ln[len("data: "):] for ln in r.iter_lines() if ln.startswith("data: ")]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["message"] == "generation failed: RuntimeError: boom"
        assert all("choices" in json.loads(e) for e in events[:-2])
        r = c.chat.completions.create(model=MODEL, messages=HI, temperature=0)  # and the next request is served
        assert r.choices[0].message.content == "\nHello! How can I help?"


def test_raw_sse_framing_with_n(server):
    body = {"model": MODEL, "messages": HI, "n": 3, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert len({c["id"] for c in chunks}) == 1
    roles = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["delta"].get("role") == "assistant"]
    assert sorted(roles) == [0, 1, 2]
    finished = [c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert sorted(finished) == [0, 1, 2]
    assert "usage" not in chunks[-1]  # no usage chunk unless asked for
    for i in range(3):  # greedy: the three samples agree
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"][0]["index"] == i)
        assert text == "\nHello! How can I help?"


def test_sampling_params_n_seed_stop_and_max_completion_tokens(client):
    kw = dict(model=MODEL, messages=HI, temperature=1.5, top_p=0.9, n=3, seed=1234, max_tokens=12,
              extra_body={"top_k": 50, "min_p": 0.01})
    a = client.chat.completions.create(**kw)
    b = client.chat.completions.create(**kw)
    assert [c.index for c in a.choices] == [0, 1, 2]
    texts = [(c.message.reasoning_content, c.message.content) for c in a.choices]
    assert texts == [(c.message.reasoning_content, c.message.content) for c in b.choices]  # seed reproduces
    assert a.usage.completion_tokens <= 3 * 12
    # The seed must matter too: an overfit model could answer the same with any seed (or none), which would make
    # the reproducibility check above unable to fail. At a high temperature, different seeds must diverge.
    hot = dict(temperature=3.0, max_tokens=16)
    outs = [reply(client, seed=s, **hot) for s in range(6)]
    assert len(set(outs)) >= 2, f"six seeds gave one output: {outs[0]!r}"
    assert [reply(client, seed=s, **hot) for s in range(6)] == outs  # and each seed reproduces its own
    r = client.chat.completions.create(model=MODEL, messages=HI, temperature=0, max_completion_tokens=4)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 4
    r = client.chat.completions.create(model=MODEL, messages=HI, temperature=0, stop=["How"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == "\nHello! "  # the stop string is not included


def test_top_k_and_min_p_reach_the_engine(client):
    # top_k=1, or min_p=1 (keep only tokens as likely as the top one), leaves only the argmax: at a temperature
    # where free sampling leaves the greedy path, these must still give the greedy reply, for every seed.
    hot = dict(temperature=3.0, max_tokens=16)
    greedy = reply(client, temperature=0, max_tokens=16)
    free = [reply(client, seed=s, **hot) for s in range(6)]
    assert any(f != greedy for f in free), "control: sampling at this temperature never left the greedy path"
    for s in range(6):
        assert reply(client, seed=s, extra_body={"top_k": 1}, **hot) == greedy, f"top_k ignored (seed {s})"
        assert reply(client, seed=s, extra_body={"min_p": 1.0}, **hot) == greedy, f"min_p ignored (seed {s})"


def test_completions(client, tiny):
    tok = tiny[1]
    prompt = tok.decode(tok.encode_chat(HI))
    r = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    assert r.choices[0].text == tok.decode(script_ids(tok, "hi")[:5])  # raw text: no reasoning split
    ids = tok.encode_chat(HI)
    r2 = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)  # token-id prompt
    assert r2.choices[0].text == r.choices[0].text
    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == r.choices[0].text
    assert [ch.finish_reason for c in chunks for ch in c.choices if ch.finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 5
    # A batch of prompts with n=2: choice i*n+j is sample j of prompt i.
    two = tok.encode_chat([{"role": "user", "content": "What is 2+3?"}])
    r3 = client.completions.create(model=MODEL, prompt=[ids, two], n=2, max_tokens=40, temperature=0)
    assert [c.index for c in r3.choices] == [0, 1, 2, 3]
    assert r3.choices[0].text == r3.choices[1].text == "The user says hi.\n</think>\nHello! How can I help?"
    assert r3.choices[2].text == r3.choices[3].text == "2+3=5\n</think>\n<answer>5</answer>"
    assert r3.usage.prompt_tokens == len(ids) + len(two)


RUNNING, WAITING, KV = "nanoseek:num_requests_running", "nanoseek:num_requests_waiting", "nanoseek:kv_cache_usage_perc"
TTFT, TPOT, E2E = ("nanoseek:time_to_first_token_seconds", "nanoseek:time_per_output_token_seconds",
                   "nanoseek:e2e_request_latency_seconds")


def wait_metric(server, name: str, want: float, timeout: float = 10.0) -> dict:
    """Poll /metrics until `name` reads `want` (gauges follow the engine at step boundaries); the last scrape."""
    deadline = time.time() + timeout
    while True:
        samples = scrape(server)
        if val(samples, name) == want or time.time() > deadline:
            assert val(samples, name) == want, f"{name} = {val(samples, name)}, expected {want}"
            return samples
        time.sleep(0.05)


def test_models_health_metrics(client, server, engine):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert models.data[0].max_model_len == MAX_LEN
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(server.url + "/health").status_code == 200

    # The gauges follow the engine: one running request while a reply streams, all zero when idle.
    wait_idle(engine)
    e2e0 = val(scrape(server), E2E + "_count")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "sing"}], "max_tokens": 100, "stream": True,
            "temperature": 0, "ignore_eos": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        for _ in range(4):  # the role chunk and a few tokens: surely running now
            next(lines)
        busy = scrape(server)
    assert val(busy, RUNNING) == 1 and val(busy, WAITING) == 0
    assert 0 < val(busy, KV) <= 1
    wait_idle(engine)
    wait_metric(server, E2E + "_count", e2e0 + 1)  # the hung-up request is reported once, as an abort
    for name in (RUNNING, WAITING, KV):
        wait_metric(server, name, 0)

    # Completed requests move every counter and histogram by exactly what they did.
    before = scrape(server)
    rs = [client.chat.completions.create(model=MODEL, messages=HI, temperature=0),
          client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is 2+3?"}],
                                         temperature=0),
          client.chat.completions.create(model=MODEL, messages=HI, temperature=0, max_completion_tokens=1)]
    after = scrape(server)

    def delta(name, **labels):  # a labelled series is absent before its first event: it counted 0 then
        return val(after, name, **labels) - before.get((name, tuple(sorted(labels.items()))), 0.0)

    n = len(rs)
    assert [r.choices[0].finish_reason for r in rs] == ["stop", "stop", "length"]
    assert rs[2].usage.completion_tokens == 1 and min(r.usage.completion_tokens for r in rs[:2]) > 1
    assert delta(E2E + "_count") == n and delta(E2E + "_bucket", le="+Inf") == n
    assert delta(TTFT + "_count") == n and delta(TTFT + "_bucket", le="+Inf") == n
    assert delta(TPOT + "_count") == 2  # one observation per request with more than one token: not the third
    assert delta(TTFT + "_sum") > 0 and delta(TPOT + "_sum") > 0 and delta(E2E + "_sum") >= delta(TTFT + "_sum")
    assert delta("nanoseek:prompt_tokens_total") == sum(r.usage.prompt_tokens for r in rs)
    assert delta("nanoseek:generation_tokens_total") == sum(r.usage.completion_tokens for r in rs)
    assert delta("nanoseek:request_success_total", finished_reason="stop") == 2
    assert delta("nanoseek:request_success_total", finished_reason="length") == 1
    for name in (RUNNING, WAITING, KV):
        wait_metric(server, name, 0)


def test_chat_page_is_served(server):
    r = httpx.get(server.url + "/")
    assert r.status_code == 200 and "<title>nanoseek</title>" in r.text
    assert httpx.get(server.url + "/app.js").status_code == 200


# ---- every bad request: OpenAI's error shape, the right status, and the server keeps serving ----

LONG = "hi " * 400
BAD = [
    ({"model": MODEL, "messages": HI, "max_tokens": 0}, 400, "max_tokens"),
    ({"model": MODEL, "messages": HI, "max_tokens": MAX_LEN}, 400, "max_tokens"),
    ({"model": MODEL, "messages": HI, "max_completion_tokens": -3}, 400, "max_completion_tokens"),
    ({"model": MODEL, "messages": HI, "max_completion_tokens": MAX_LEN}, 400, "max_completion_tokens"),
    ({"model": MODEL, "messages": HI, "temperature": -0.1}, 400, "temperature"),
    ({"model": MODEL, "messages": HI, "top_p": 0}, 400, "top_p"),
    ({"model": MODEL, "messages": HI, "top_p": 1.5}, 400, "top_p"),
    ({"model": MODEL, "messages": HI, "n": 0}, 400, "n"),
    ({"model": MODEL, "messages": HI, "n": 9}, 400, "n"),  # more samples than the engine's 8 cache slots
    ({"model": MODEL, "messages": HI, "stop_token_ids": [10**6]}, 400, "stop_token_ids"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     400, "messages.0.content"),
    ({"model": MODEL, "messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ({"model": MODEL, "messages": []}, 400, "messages"),
    ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ({"model": MODEL, "messages": [{"role": "user", "content": "hi"},
                                   {"role": "assistant", "content": "x", "reasoning_content": "thoughts"}]},
     400, "messages.1"),
    ({"model": MODEL}, 400, "messages"),
    ({"model": "gpt-4", "messages": HI}, 404, "model"),
]
BAD_COMPLETIONS = [
    ({"model": MODEL, "prompt": [1, 2, 99999]}, 400, "prompt"),
    ({"model": MODEL, "prompt": [-1]}, 400, "prompt"),
    ({"model": MODEL, "prompt": LONG}, 400, "prompt"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ({"model": "nope", "prompt": "hi"}, 404, "model"),
]


def assert_error(r, status, param):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and err["type"]
    assert err["param"] == param


@pytest.mark.parametrize("body,status,param", BAD, ids=[f"chat{i}" for i in range(len(BAD))])
def test_bad_chat_requests(server, body, status, param):
    assert_error(httpx.post(server.url + "/v1/chat/completions", json=body), status, param)


@pytest.mark.parametrize("body,status,param", BAD_COMPLETIONS, ids=[f"cmpl{i}" for i in range(len(BAD_COMPLETIONS))])
def test_bad_completion_requests(server, body, status, param):
    assert_error(httpx.post(server.url + "/v1/completions", json=body), status, param)


@pytest.mark.parametrize("raw", [b"[1, 2]", b'"text"', b"{not json", b"", b"\xff\xfe"])
def test_body_not_a_json_object(server, raw):
    r = httpx.post(server.url + "/v1/chat/completions", content=raw, headers={"content-type": "application/json"})
    assert_error(r, 400, None)


def test_body_too_large(server):
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 70_000}]}).encode()
    assert_error(httpx.post(server.url + "/v1/chat/completions", content=body), 413, None)

    def chunks():  # no Content-Length: the limit is enforced while reading
        for _ in range(20):
            yield b" " * 8192

    assert_error(httpx.post(server.url + "/v1/completions", content=chunks()), 413, None)


def test_unknown_route_and_model_in_openai_shape(server, client):
    assert_error(httpx.get(server.url + "/v1/nothing"), 404, None)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("other")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HI, temperature=-1)
    assert "temperature" in str(e.value)


def test_server_still_serves_after_errors(client, engine):
    # Runs after the error tests (file order): nothing leaked, and a normal request works.
    wait_idle(engine)
    r = client.chat.completions.create(model=MODEL, messages=HI, temperature=0)
    assert r.choices[0].message.content == "\nHello! How can I help?"


def test_api_key(tiny):
    model, tok = tiny
    app = create_app(make_engine(model, tok, max_batch=2, max_model_len=MAX_LEN), tok, MODEL, api_key="s3cret")
    with LiveServer(app) as srv:
        url = srv.url + "/v1/chat/completions"
        body = {"model": MODEL, "messages": HI, "max_tokens": 3}
        r = httpx.post(url, json=body)
        assert_error(r, 401, None)
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert_error(httpx.post(url, json=body, headers={"Authorization": "Bearer s3cre"}), 401, None)
        assert_error(httpx.get(srv.url + "/v1/models", headers={"Authorization": "Basic s3cret"}), 401, None)
        assert httpx.get(srv.url + "/health").status_code == 200  # public
        good = openai.OpenAI(base_url=srv.url + "/v1", api_key="s3cret", max_retries=0)
        assert good.chat.completions.create(model=MODEL, messages=HI, max_tokens=3).usage.completion_tokens == 3
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=srv.url + "/v1", api_key="wrong", max_retries=0).models.list()


def test_health_is_503_until_loaded(tiny):
    model, tok = tiny
    go = threading.Event()

    def loader():
        go.wait(30)
        return make_engine(model, tok, max_batch=2, max_model_len=MAX_LEN), tok

    with TestClient(create_app(None, None, MODEL, loader=loader)) as c:
        assert c.get("/health").status_code == 503
        assert_error(c.post("/v1/chat/completions", json={"model": MODEL, "messages": HI}), 503, None)
        go.set()
        deadline = time.time() + 30
        while c.get("/health").status_code != 200:
            assert time.time() < deadline
            time.sleep(0.02)
        assert c.post("/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 2}).status_code == 200


# ---- disconnects free the cache ----


def test_streaming_client_disconnect_aborts(server, engine):
    wait_idle(engine)
    before = metric(server, "nanoseek:request_success_total", finished_reason="abort")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "sing"}], "max_tokens": 100, "stream": True,
            "temperature": 0, "ignore_eos": True}  # runs to max_tokens: surely unfinished when we hang up
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]  # role chunk + a few tokens, then hang up
    assert any("reasoning_content" in x for x in got)
    wait_idle(engine)
    deadline = time.time() + 10
    while metric(server, "nanoseek:request_success_total", finished_reason="abort") < before + 1:
        assert time.time() < deadline, "the disconnected request was not aborted"
        time.sleep(0.05)


def test_non_streaming_client_disconnect_aborts(server, engine):
    """Drive the ASGI app directly: the client hangs up right after sending its body."""
    wait_idle(engine)
    before = metric(server, "nanoseek:request_success_total", finished_reason="abort")
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "sing"}], "max_tokens": 100,
                       "temperature": 0, "ignore_eos": True}).encode()
    sent = []

    async def call():
        msgs = [{"type": "http.request", "body": body, "more_body": False}]

        async def receive():
            if msgs:
                return msgs.pop(0)
            return {"type": "http.disconnect"}  # asked for only once the request is admitted: then gone

        async def send(message):
            sent.append(message)

        scope = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"}, "http_version": "1.1",
                 "method": "POST", "scheme": "http", "path": "/v1/chat/completions", "raw_path": b"",
                 "query_string": b"",
                 "root_path": "", "headers": [(b"content-type", b"application/json"),
                                              (b"content-length", str(len(body)).encode())],
                 "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80), "state": {}}
        await server.app(scope, receive, send)

    asyncio.run(call())
    assert sent[0]["status"] == 499  # nobody to answer
    wait_idle(engine)
    deadline = time.time() + 10
    while metric(server, "nanoseek:request_success_total", finished_reason="abort") < before + 1:
        assert time.time() < deadline, "the abandoned request was not aborted"
        time.sleep(0.05)


def test_async_engine_stream_cancel_aborts_and_frees_slots(tiny):
    from nanoseek.infer.sampling import SamplingParams
    from nanoseek.serve.async_engine import AsyncEngine

    model, tok = tiny
    eng = make_engine(model, tok, max_batch=2, max_model_len=MAX_LEN)
    aengine = AsyncEngine(eng)
    aengine.start()
    params = SamplingParams(max_tokens=100, temperature=0, ignore_eos=True)
    prompt = tok.encode_chat(HI)

    async def main():
        # Full run: the tokens are the script's, then the last output says "length".
        outs = [o async for o in aengine.stream(prompt, SamplingParams(max_tokens=5, temperature=0), "a")]
        assert [t for o in outs for t in o.token_ids] == script_ids(tok, "hi")[:5]
        assert outs[-1].finished and outs[-1].finish_reason == "length"
        # Cancelling the consumer aborts the request.
        got = asyncio.Event()

        async def consume():
            async for o in aengine.stream(prompt, params, "b"):
                if o.token_ids:
                    got.set()

        task = asyncio.create_task(consume())
        await got.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    try:
        asyncio.run(main())
        wait_idle(eng)
        assert aengine.steps < 100  # "b" (100 tokens) did not run to the end
    finally:
        aengine.stop()
    assert not aengine.ready


# ---- bounded load test ----


def test_load_200_requests_32_concurrent_10pct_aborted(server, engine, tiny):
    wait_idle(engine)
    aborts_before = metric(server, "nanoseek:request_success_total", finished_reason="abort")
    tok = tiny[1]
    prompt_ids = tok.encode_chat(HI)
    # as long as the context allows: far past the 3 events read before hanging up
    long_run = engine.max_model_len - len(tok.encode_chat([{"role": "user", "content": "sing"}]))
    statuses, aborted, finished = [], [], []

    async def one(i: int, http: httpx.AsyncClient, sem: asyncio.Semaphore):
        async with sem:
            kind = i % 3
            abort = i % 10 == 7
            if kind == 0 or abort:  # streaming chat
                body = {"model": MODEL, "messages": [{"role": "user", "content": "sing" if abort else "hi"}],
                        "stream": True, "max_tokens": long_run if abort else 24, "temperature": 0.8, "seed": i,
                        "ignore_eos": abort}
                async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    statuses.append(r.status_code)
                    n = 0
                    async for line in r.aiter_lines():
                        n += bool(line)
                        if abort and n >= 3:
                            aborted.append(i)
                            return  # hang up mid-stream
                        if line == "data: [DONE]":
                            finished.append(i)
            elif kind == 1:
                r = await http.post("/v1/chat/completions", json={"model": MODEL, "messages": HI, "max_tokens": 16,
                                                                  "n": 2, "temperature": 1.0})
                statuses.append(r.status_code)
                assert len(r.json()["choices"]) == 2
                finished.append(i)
            else:
                r = await http.post("/v1/completions", json={"model": MODEL, "prompt": prompt_ids, "max_tokens": 12,
                                                             "ignore_eos": True, "temperature": 0})
                statuses.append(r.status_code)
                assert r.json()["usage"]["completion_tokens"] == 12
                finished.append(i)

    async def main():
        sem = asyncio.Semaphore(32)
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=server.url, timeout=120, limits=limits) as http:
            await asyncio.gather(*(one(i, http, sem) for i in range(200)))

    t0 = time.time()
    asyncio.run(main())
    took = time.time() - t0
    assert len(statuses) == 200 and all(s == 200 for s in statuses), sorted(set(statuses))  # zero 5xx (or 4xx)
    assert len(aborted) == 20 and len(finished) == 180
    s = wait_idle(engine)  # the cache pool is empty afterwards
    assert s["slots_used"] == 0
    # Each hung-up stream was aborted on the server (they would run to the end of the context, far past the 3
    # events we read, so a loaded machine cannot finish them before the hang-up is noticed).
    assert metric(server, "nanoseek:request_success_total", finished_reason="abort") == aborts_before + 20
    print(f"load: 200 requests in {took:.1f}s")


# ---- the terminal chat ----


class Out:
    def __init__(self, on_write=None):
        self.parts, self.on_write = [], on_write

    def write(self, s):
        self.parts.append(s)
        if self.on_write:
            self.on_write(s)

    def flush(self):
        pass

    def text(self):
        return "".join(self.parts)


def test_terminal_chat_streams_dims_thinking_and_strips_it_from_history(tiny):
    from nanoseek.chat import DIM, RESET, Chat

    model, tok = tiny
    eng = make_engine(model, tok, max_batch=1, max_model_len=MAX_LEN)
    out = Out()
    chat = Chat(eng, tok, {"temperature": 0}, out=out, color=True)
    inputs = iter(["hi", "What is 2+3?", "/exit"])
    chat.loop(read=lambda _: next(inputs))
    text = out.text().replace(RESET + DIM, "")  # merge consecutive dimmed deltas
    assert f"{DIM}The user says hi.\n{RESET}" in text  # thinking dimmed
    assert "Hello! How can I help?" in text and f"{DIM}Hello" not in text  # the answer plain
    assert "<answer>5</answer>" in text
    assert chat.messages == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "\nHello! How can I help?"},  # no thinking kept
        {"role": "user", "content": "What is 2+3?"},
        {"role": "assistant", "content": "\n<answer>5</answer>"},
    ]
    assert not eng.has_unfinished()


def test_terminal_chat_ctrl_c_stops_the_reply_not_the_program(tiny):
    from nanoseek.chat import Chat

    model, tok = tiny
    eng = make_engine(model, tok, max_batch=1, max_model_len=MAX_LEN)
    fired = []

    def ctrl_c_on_first_thought(s):
        if "la" in s and not fired:
            fired.append(1)
            os.kill(os.getpid(), signal.SIGINT)  # what the terminal sends on Ctrl-C

    chat = Chat(eng, tok, {"temperature": 0, "max_tokens": 100}, out=Out(ctrl_c_on_first_thought), color=False)
    handler = signal.getsignal(signal.SIGINT)
    r = chat.reply("sing")
    assert fired and r["finish_reason"] == "abort" and 0 < r["tokens"] < 100
    assert not eng.has_unfinished() and eng.stats()["slots_used"] == 0
    assert chat.messages == []  # stopped before any answer: the question is taken back
    assert chat.reply("hi")["content"] == "\nHello! How can I help?"  # and the program goes on
    assert signal.getsignal(signal.SIGINT) is handler  # Ctrl-C handling restored


def test_nanoseek_chat_command(tiny, tmp_path):
    """`nanoseek chat --model DIR` as a user runs it, with the questions on stdin: the reply streams to stdout
    (no colour codes when stdout is not a terminal), /reset and /exit work, and the exit code is 0. DIR may be a
    stage directory (its model/ is used); a wrong one is one error line naming it."""
    model, tok = tiny
    nanoseek.save(model, tmp_path / "stage" / "model")
    tok.save(tmp_path / "stage" / "model")
    proc = subprocess.run([sys.executable, "-m", "nanoseek", "chat", "--model", str(tmp_path / "stage"),
                           "--temperature", "0", "--threads", "1"], input="hi\n/reset\nWhat is 2+3?\n/exit\nhi\n",
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    assert out.startswith("nanoseek chat:") and "\033[" not in out
    assert "The user says hi." in out and "Hello! How can I help?" in out  # thinking and answer of the first
    assert "[new conversation]" in out and "<answer>5</answer>" in out
    assert out.count("Hello! How can I help?") == 1  # the "hi" after /exit was never read
    missing = subprocess.run([sys.executable, "-m", "nanoseek", "chat", "--model", str(tmp_path / "nope")],
                             input="", capture_output=True, text=True, timeout=60)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert missing.stderr.startswith(f"nanoseek chat: error: --model {tmp_path / 'nope'}: no such directory")


def test_nanoseek_serve_command(tiny, tmp_path):
    """`nanoseek serve --model DIR` end to end: loads in the background (/health 503, then 200), serves the
    client under --served-model-name with --api-key, and stops cleanly on Ctrl-C."""
    model, tok = tiny
    nanoseek.save(model, tmp_path / "ckpt")
    tok.save(tmp_path / "ckpt")
    host = "127.0.0.2"  # loopback too, but not the default 127.0.0.1: --host must reach the listening socket
    port = free_port(host)
    proc = subprocess.Popen([sys.executable, "-m", "nanoseek", "serve", "--model", str(tmp_path / "ckpt"),
                             "--host", host, "--port", str(port), "--served-model-name", "mine", "--api-key", "k",
                             "--max-model-len", "128", "--threads", "1", "--log-level", "warning"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        codes = []
        deadline = time.time() + 90
        while not codes or codes[-1] != 200:
            assert proc.poll() is None and time.time() < deadline, proc.stdout.read() if proc.poll() else codes
            try:
                codes.append(httpx.get(f"http://{host}:{port}/health").status_code)
            except httpx.TransportError:
                time.sleep(0.1)
        assert set(codes) <= {503, 200}
        with pytest.raises(httpx.ConnectError):  # nothing listens on the default address
            httpx.get(f"http://127.0.0.1:{port}/health")
        c = openai.OpenAI(base_url=f"http://{host}:{port}/v1", api_key="k", max_retries=0, timeout=60)
        assert c.models.list().data[0].max_model_len == 128
        r = c.chat.completions.create(model="mine", messages=HI, temperature=0)
        assert r.choices[0].message.content == "\nHello! How can I help?"
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(30) in (0, 130)
        finally:
            if proc.poll() is None:
                proc.kill()
