"""Run the synchronous Engine's step loop in a background thread and stream its outputs to asyncio.

Only the engine thread touches the Engine. The event loop talks to it through one ordered command queue
(add, abort, stop), so an abort sent right after an add always finds the request, and outputs come back to
each request's asyncio.Queue via `call_soon_threadsafe`. Leaving a stream early (client gone, task cancelled)
aborts the request, which frees its cache slots at the next step boundary.

    aengine = AsyncEngine(engine); aengine.start()
    async for out in aengine.stream(prompt_ids, params, "req-1"):   # StepOutputs
        ...
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

log = logging.getLogger("nanoseek.serve")


@dataclass
class RequestStats:
    """Timings of one handle (all its prompts and samples), for /metrics. Seconds from time.perf_counter."""

    prompt_tokens: int = 0
    t_start: float = field(default_factory=time.perf_counter)
    t_first: float | None = None  # first token of any sample
    t_end: float | None = None
    tokens: dict = field(default_factory=dict)  # (prompt_index, sample index) -> generated tokens
    finish_reasons: dict = field(default_factory=dict)  # (prompt_index, sample index) -> reason


class Handle:
    """The requests of one API call (one per prompt, each with n samples). Iterate for (prompt_index, StepOutput)."""

    def __init__(self, aengine: AsyncEngine, request_ids: list[str], n: int, prompt_tokens: int):
        self._aengine = aengine
        self.request_ids = request_ids
        self.remaining = n * len(request_ids)  # samples not finished yet
        self.stats = RequestStats(prompt_tokens=prompt_tokens)
        self._queue: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._closed = False

    def _put(self, item) -> None:  # called from the engine thread
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:  # the event loop is gone (shutdown): nobody is listening
            pass

    async def __aiter__(self) -> AsyncIterator[tuple[int, object]]:
        while self.remaining > 0:
            item = await self._queue.get()
            if isinstance(item, BaseException):
                self.close()
                raise item
            prompt_index, out = item
            key = (prompt_index, out.index)
            if out.token_ids:
                if self.stats.t_first is None:
                    self.stats.t_first = time.perf_counter()
                self.stats.tokens[key] = self.stats.tokens.get(key, 0) + len(out.token_ids)
            if out.finished:
                self.stats.finish_reasons[key] = out.finish_reason
                self.remaining -= 1
            yield prompt_index, out
        self.close()

    def close(self) -> None:
        """Abort whatever has not finished (idempotent); report the request's stats once."""
        if self._closed:
            return
        self._closed = True
        self.stats.t_end = time.perf_counter()
        if self.remaining > 0:
            self._aengine._cmds.put(("abort", self.request_ids))
        if self._aengine.on_done is not None:
            try:
                self._aengine.on_done(self)
            except Exception:  # metrics must never break a response
                log.exception("on_done callback failed")


class AsyncEngine:
    def __init__(self, engine, on_done: Callable[[Handle], None] | None = None):
        self.engine = engine
        self.on_done = on_done
        self._cmds: queue.Queue = queue.Queue()
        self._routes: dict[str, list] = {}  # request_id -> [handle, prompt_index, samples left]
        self._thread: threading.Thread | None = None
        self.snapshot = dict(engine.stats())  # refreshed by the engine thread after every step
        self.steps = 0

    # ---- event-loop side ----

    @property
    def ready(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        if not self.ready:
            self._thread = threading.Thread(target=self._run, name="nanoseek-engine", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        if self._thread is not None:
            self._cmds.put(("stop",))
            self._thread.join(timeout)
            self._thread = None

    async def add(self, prompts: list[list[int]], params, request_id: str) -> Handle:
        """Admit one request per prompt (ids `request_id` or `request_id-i`); raises the Engine's error if any is
        rejected (then none runs)."""
        if not self.ready:
            raise RuntimeError("the engine thread is not running")
        ids = [request_id] if len(prompts) == 1 else [f"{request_id}-{i}" for i in range(len(prompts))]
        handle = Handle(self, ids, params.n, sum(len(p) for p in prompts))
        done = asyncio.get_running_loop().create_future()
        self._cmds.put(("add", handle, prompts, params, done))
        try:
            await asyncio.shield(done)
        except asyncio.CancelledError:
            handle.close()  # queued after the add, so the abort finds the requests
            raise
        return handle

    async def stream(self, prompt_ids: list[int], params, request_id: str) -> AsyncIterator:
        """Yield the StepOutputs of one request; leaving early aborts it and frees its cache slots."""
        handle = await self.add([prompt_ids], params, request_id)
        try:
            async for _, out in handle:
                yield out
        finally:
            handle.close()

    # ---- engine thread ----

    def _run(self) -> None:
        while True:
            block = not self.engine.has_unfinished()
            try:
                cmds = [self._cmds.get(block=block)]
            except queue.Empty:
                cmds = []
            while True:
                try:
                    cmds.append(self._cmds.get_nowait())
                except queue.Empty:
                    break
            for cmd in cmds:
                if cmd[0] == "stop":
                    self._fail_all(RuntimeError("the engine is shutting down"))
                    return
                if cmd[0] == "add":
                    self._add(*cmd[1:])
                elif cmd[0] == "abort":
                    self._abort(cmd[1])
            if self.engine.has_unfinished():
                try:
                    outs = self.engine.step()
                except Exception as e:  # a bug in a step must not kill the server: fail the running requests
                    log.exception("engine step failed")
                    self._fail_all(e)
                    outs = []
                self.steps += 1
                for out in outs:
                    route = self._routes.get(out.request_id)
                    if route is None:
                        continue  # aborted by its client already
                    route[0]._put((route[1], out))
                    if out.finished:
                        route[2] -= 1
                        if route[2] == 0:
                            del self._routes[out.request_id]
            self.snapshot = dict(self.engine.stats())

    def _add(self, handle: Handle, prompts, params, done: asyncio.Future) -> None:
        added = []
        try:
            for rid, prompt in zip(handle.request_ids, prompts):
                self.engine.add_request(prompt, params, request_id=rid)
                added.append(rid)
                self._routes[rid] = [handle, len(added) - 1, params.n]
        except Exception as e:
            self._abort(added)
            handle._loop.call_soon_threadsafe(_set_exception, done, e)
            return
        handle._loop.call_soon_threadsafe(_set_result, done, None)

    def _abort(self, request_ids: list[str]) -> None:
        for rid in request_ids:
            if self._routes.pop(rid, None) is not None:
                try:
                    self.engine.abort(rid)
                except Exception:  # finished in the meantime
                    log.debug("abort of %s ignored", rid, exc_info=True)

    def _fail_all(self, error: BaseException) -> None:
        handles = {id(r[0]): r[0] for r in self._routes.values()}
        self._abort(list(self._routes))
        for h in handles.values():
            h._put(error)


def _set_result(fut: asyncio.Future, value) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exception(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
