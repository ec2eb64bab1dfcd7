"""The chat page in headless Chromium (Debian's, installed when missing), driven over the DevTools protocol,
against a live server running the real Engine and the tiny overfit model (tests/serve_fixtures.py)."""

import json
import re
import time

import pytest
from serve_fixtures import Browser, LiveServer, ensure_chromium, make_engine, script_ids, tiny_model_and_tokenizer

from nanoseek.serve.api import create_app


class RecordBodies:
    """ASGI wrapper that keeps the JSON bodies the page posts to /v1/chat/completions."""

    def __init__(self, app):
        self.app, self.bodies = app, []

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not scope["path"].endswith("/chat/completions"):
            return await self.app(scope, receive, send)
        parts = []

        async def recording_receive():
            message = await receive()
            if message["type"] == "http.request":
                parts.append(message.get("body", b""))
                if not message.get("more_body"):
                    self.bodies.append(json.loads(b"".join(parts)))
            return message

        return await self.app(scope, recording_receive, send)


@pytest.fixture(scope="module")
def page():
    chromium = ensure_chromium()
    model, tok = tiny_model_and_tokenizer()
    engine = make_engine(model, tok, max_batch=4, max_model_len=256)
    app = RecordBodies(create_app(engine, tok, "tiny-r1"))
    with LiveServer(app) as srv:
        browser = Browser(chromium)
        try:
            browser.goto(srv.url + "/")
            browser.wait_for("window.nanoseekModel === 'tiny-r1'")
            browser.eval("document.getElementById('temperature').value = '0'")  # greedy: the scripted replies
            yield browser, app, engine, tok
        finally:
            browser.close()


LAST = "document.querySelector('.msg.assistant:last-of-type')"
READ_LAST = f"""(() => {{ const m = {LAST}; return {{
    state: m.dataset.state, finish: m.dataset.finishReason || null, tokens: m.dataset.tokens,
    answer: m.querySelector('.answer').textContent, thinking: m.querySelector('.think-body').textContent,
    thinkHidden: m.querySelector('.think').hidden, thinkOpen: m.querySelector('.think').open,
    summary: m.querySelector('.think summary').textContent, stats: m.querySelector('.stats').textContent,
    count: document.querySelectorAll('.msg.assistant').length }}; }})()"""


def ask(browser, text: str) -> None:
    n = browser.eval("document.querySelectorAll('.msg.assistant').length")
    browser.eval(f"document.getElementById('input').value = {json.dumps(text)}; "
                 "document.getElementById('send').click()")
    browser.wait_for(f"document.querySelectorAll('.msg.assistant').length === {n + 1}")


def test_page_streams_folds_thinking_and_strips_it_from_history(page):
    browser, app, engine, tok = page
    ask(browser, "hi")
    browser.wait_for(f"{LAST}.dataset.state === 'done'")
    m = browser.eval(READ_LAST)
    assert m["answer"] == "Hello! How can I help?"  # shown without the newline after </think>
    assert m["thinking"] == "The user says hi.\n"
    assert not m["thinkHidden"] and not m["thinkOpen"]  # folded once the answer started
    assert re.fullmatch(r"Thought for \d+\.\d s", m["summary"]), m["summary"]
    n = len(script_ids(tok, "hi"))
    assert m["tokens"] == str(n) and m["finish"] == "stop"
    assert re.fullmatch(rf"{n} tokens · [0-9.]+ tokens/s", m["stats"]), m["stats"]

    ask(browser, "What is 2+3?")
    browser.wait_for(f"{LAST}.dataset.state === 'done'")
    m = browser.eval(READ_LAST)
    assert m["answer"] == "<answer>5</answer>" and m["thinking"] == "2+3=5\n"
    # What the page sent the second time: the earlier answer without its thinking.
    sent = app.bodies[-1]
    assert sent["stream"] is True and sent["temperature"] == 0
    assert sent["messages"] == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "\nHello! How can I help?"},
        {"role": "user", "content": "What is 2+3?"},
    ]


def test_stop_button_aborts_the_reply(page):
    browser, app, engine, tok = page
    browser.eval("document.getElementById('clear').click()")  # a new chat
    browser.eval("document.getElementById('max_tokens').value = '200'")
    step = engine.step

    def slow_step():  # a slower model: the reply (~30 tokens) takes about a second, so Stop lands mid-reply
        time.sleep(0.03)
        return step()

    engine.step = slow_step
    try:
        ask(browser, "sing")  # thinks "la la la ..." for a while
        browser.wait_for(f"{LAST}.querySelector('.think-body').textContent.length > 0")
        m = browser.eval(READ_LAST)
        assert m["state"] == "streaming" and m["thinkOpen"]  # open while thinking
        assert browser.eval("!document.getElementById('stop').hidden")
        browser.eval("document.getElementById('stop').click()")
        browser.wait_for(f"{LAST}.dataset.state === 'stopped'")
    finally:
        engine.step = step
        browser.eval("document.getElementById('max_tokens').value = ''")
    m = browser.eval(READ_LAST)
    assert m["stats"].endswith("· stopped") and m["answer"] == ""
    assert 0 < int(m["tokens"]) < 200
    deadline = time.time() + 30  # the server aborted the request and freed its cache slots
    while engine.has_unfinished() or engine.stats()["slots_used"]:
        assert time.time() < deadline, engine.stats()
        time.sleep(0.05)
    # The page still works after a stop, and the stopped question (no answer) was taken out of the history.
    ask(browser, "hi")
    browser.wait_for(f"{LAST}.dataset.state === 'done'")
    assert browser.eval(READ_LAST)["answer"] == "Hello! How can I help?"
    assert app.bodies[-1]["messages"] == [{"role": "user", "content": "hi"}]
