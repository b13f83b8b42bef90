"""Continuous (iteration-level) batching: one decode loop per replica, on its own thread, as vLLM and TGI schedule.

At every step the loop

1. drops the rows whose client went away (``Row.cancelled``: Serve cancelled the request) before any compute;
2. admits waiting requests, first come first served, while the running rows stay within ``max_num_seqs`` and the
   admitted prompts within ``max_prefill_tokens`` (counted padded: rows x the longest prompt; a request alone
   always goes in when there is room for its rows), prefills them in a batch of their own, samples their first
   token (streamed at once: that is the time to first token) and merges their cache rows into the running batch
   (``batching.merge``);
3. decodes one token for every running row (``batching.decode``), samples each row with its own parameters and
   generator (``generate.pick_tokens``), hands each row's text delta to its sink (``RowStopper.step``: EOS, stop
   strings, max_tokens, incremental detokenization, as in the static engine);
4. retires the rows that ended, freeing their state (``Batch.keep``), and answers each request whose rows have all
   ended.

Isolation. A row that fails in sampling or detokenizing ends alone (``fail_row``); a prefill that fails ends only
the requests it was admitting; a decode step that fails ends the rows running in it (each request gets its 500 or
its stream's error event) and the loop goes on with the next requests. ``submit`` refuses a request at once
(``QueueFull``) when ``max_waiting`` requests are already waiting: the server answers 503 and carries on.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Optional

from app.serve.batching import Batch, check_supported, decode, merge, prefill
from app.serve.generate import Engine, Row, RowStopper, fail_row, pick_tokens
from app.serve.metrics import ServeMetrics

log = logging.getLogger(f"ray.serve.{__name__}")


class QueueFull(Exception):
    """The replica's waiting queue is full (``batch.max_waiting``): the request was not taken."""


@dataclass
class _Request:
    rows: list[Row]
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    t_arrival: float
    left: int  # rows not ended yet


def _resolve(fut: asyncio.Future) -> None:
    if not fut.done():
        fut.set_result(None)


class _Window:
    """What the loop did over the last 10 s, for one log line: decode steps and their rows, prefills and their
    rows, and the share of the time spent in each (the rest: idle, or the event loop's work)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.since = time.monotonic()
        self.steps = self.rows = self.prefills = self.prefill_rows = 0
        self.step_s = self.prefill_s = 0.0

    def stepped(self, rows: int, dt: float) -> None:
        self.steps, self.rows, self.step_s = self.steps + 1, self.rows + rows, self.step_s + dt

    def prefilled(self, rows: int, dt: float) -> None:
        self.prefills, self.prefill_rows, self.prefill_s = self.prefills + 1, self.prefill_rows + rows, \
            self.prefill_s + dt

    def due(self) -> bool:
        return time.monotonic() - self.since >= 10

    def report(self) -> None:
        span = time.monotonic() - self.since
        if self.steps:
            log.info("last %.0fs: %d steps of %.1f rows (%.1f ms each, %.0f%% of the time), %d prefills of %.1f rows "
                     "(%.1f ms each, %.0f%%), %.1f tokens/s decoded", span, self.steps, self.rows / self.steps,
                     1e3 * self.step_s / self.steps, 100 * self.step_s / span, self.prefills,
                     self.prefill_rows / max(self.prefills, 1), 1e3 * self.prefill_s / max(self.prefills, 1),
                     100 * self.prefill_s / span, (self.rows + self.prefill_rows) / span)
        self.reset()


class ContinuousScheduler:
    """The decode loop of one replica (see the module doc). ``generate(rows)`` is awaited from the event loop."""

    def __init__(self, engine: Engine, *, max_num_seqs: int, max_prefill_tokens: int, max_waiting: int,
                 metrics: Optional[ServeMetrics] = None):
        self.engine, self.metrics = engine, metrics
        self.max_num_seqs, self.max_prefill_tokens, self.max_waiting = max_num_seqs, max_prefill_tokens, max_waiting
        self.attention = check_supported(engine.model)  # raises on a cache it cannot merge
        self._stopper = RowStopper([], engine.tok, engine.eos_ids)
        self._cv = threading.Condition()
        self._waiting: deque[_Request] = deque()
        self._batch: Optional[Batch] = None
        self._owner: dict[int, _Request] = {}  # id(row) -> its request, until the row has ended
        self._closed = False
        self._window = _Window()
        self._thread = threading.Thread(target=self._run, name="distillery-decode", daemon=True)
        self._thread.start()

    # -- the event loop's side

    @property
    def running(self) -> int:
        b = self._batch
        return len(b) if b is not None else 0

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def submit(self, rows: list[Row]) -> _Request:
        """Queue ``rows`` (one request's; their sinks already set), from the event loop. Raises QueueFull at once
        when ``max_waiting`` requests are already waiting."""
        req = _Request(rows, asyncio.get_running_loop().create_future(), asyncio.get_running_loop(),
                       time.perf_counter(), len(rows))
        with self._cv:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            if len(self._waiting) >= self.max_waiting:
                if self.metrics is not None:
                    self.metrics.rejected()
                raise QueueFull(f"{len(self._waiting)} requests are waiting (batch.max_waiting)")
            for r in rows:
                self._owner[id(r)] = req
            self._waiting.append(req)
            self._cv.notify()
        return req

    async def wait(self, req: _Request) -> None:
        """Until every row of ``req`` has ended. Cancelled (the client went away): its rows stop at the next step,
        or never start."""
        try:
            await req.future
        except asyncio.CancelledError:
            for r in req.rows:
                r.cancelled = True
            with self._cv:
                self._cv.notify()
            raise

    async def generate(self, rows: list[Row]) -> None:
        """``submit`` then ``wait``."""
        await self.wait(self.submit(rows))

    def close(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout)

    # -- the decode thread

    def _run(self) -> None:
        import torch

        while True:
            with self._cv:
                while not self._closed and not self._waiting and not self.running:
                    self._cv.wait()
                if self._closed:
                    return
                admitted = self._admit()
            try:
                with torch.inference_mode():
                    self._iterate(admitted)
            except Exception:  # noqa: BLE001 - a bug here must not stop the replica's loop: end what was running
                log.exception("the decode loop failed; the rows running in it end with an error")
                self._fail_all(RuntimeError("the decode loop failed"))
            if self._window.due():
                self._window.report()

    def _admit(self) -> list[_Request]:
        """Requests to prefill this step (called holding the lock): first come first served, within the room left
        in the running batch and the prefill token budget. Requests cancelled while waiting are dropped here."""
        room, taken, rows, longest = self.max_num_seqs - self.running, [], 0, 0
        while self._waiting:
            req = self._waiting[0]
            if all(r.cancelled for r in req.rows):
                self._waiting.popleft()
                for r in req.rows:
                    self._stopper.finish(r, "cancelled", flush=False)
                self._settle(req.rows)
                continue
            n, longer = len(req.rows), max(longest, max(len(r.prompt_ids) for r in req.rows))
            if n > room or (taken and (rows + n) * longer > self.max_prefill_tokens):
                break
            self._waiting.popleft()
            taken.append(req)
            room, rows, longest = room - n, rows + n, longer
        return taken

    def _iterate(self, admitted: list[_Request]) -> None:
        eng = self.engine
        if self._batch is not None:  # rows whose client went away leave before any compute
            for r in self._batch.rows:
                if r.cancelled and not r.done:
                    self._stopper.finish(r, "cancelled", flush=False)
            self._retire()
        if admitted:
            rows = [r for q in admitted for r in q.rows]
            eng.start(rows)  # a seed the generator refuses ends its row here
            live = [r for r in rows if not r.done]
            if live:
                t0 = time.perf_counter()
                try:
                    new, logits = prefill(eng.model, live, eng.pad_id, self.attention)
                except Exception as e:  # noqa: BLE001 - these requests end; the running ones go on
                    log.error("prefill of %d rows failed: %s: %s", len(live), type(e).__name__, e, exc_info=e)
                    for r in live:
                        fail_row(r, e)
                else:
                    if self.metrics is not None:
                        self.metrics.prefill()
                    self._advance(new, logits)
                    self._batch = merge(self._batch, new)
                    self._window.prefilled(len(live), time.perf_counter() - t0)
            self._settle(rows)
            self._retire()
        if self.running:
            batch, t0 = self._batch, time.perf_counter()
            try:
                logits = decode(eng.model, batch)
            except Exception as e:  # noqa: BLE001 - the rows of this step end; the next requests are served
                log.error("a decode step of %d rows failed: %s: %s", len(batch), type(e).__name__, e, exc_info=e)
                self._fail_all(e)
                return
            if self.metrics is not None:
                self.metrics.step(len(batch))
            self._advance(batch, logits)
            self._retire()
            self._window.stepped(len(batch), time.perf_counter() - t0)

    def _advance(self, batch: Batch, logits: Any) -> None:
        """Sample each row's next token from ``logits`` (B, V), release its text, and make it the row's input for
        the next step."""
        import torch

        tokens = pick_tokens(batch.rows, logits)
        for r, t in zip(batch.rows, tokens):
            if t is not None and not r.done:
                try:
                    self._stopper.step(r, t)
                except Exception as e:  # noqa: BLE001 - a decode or sink error ends this row only
                    fail_row(r, e)
        batch.last = torch.tensor([t if t is not None else self.engine.pad_id for t in tokens], dtype=torch.long,
                                  device=batch.last.device)

    def _retire(self) -> None:
        """Free the rows that ended and answer the requests that are complete."""
        b = self._batch
        if b is None:
            return
        done = [r for r in b.rows if r.done]
        if done:
            b.keep([i for i, r in enumerate(b.rows) if not r.done])
            self._settle(done)
        if not len(b):
            self._batch = None

    def _settle(self, rows: list[Row]) -> None:
        """Count each ended row against its request; a request whose rows have all ended is answered."""
        for r in rows:
            if not r.done:
                continue
            req = self._owner.pop(id(r), None)
            if req is None:
                continue
            req.left -= 1
            if req.left == 0:
                if self.metrics is not None:
                    self.metrics.request_done(req.rows, req.t_arrival,
                                              "failed" if any(x.error is not None for x in req.rows) else "ok")
                try:
                    req.loop.call_soon_threadsafe(_resolve, req.future)
                except RuntimeError:  # its event loop has closed: nobody waits for it
                    pass

    def _fail_all(self, error: BaseException) -> None:
        b, self._batch = self._batch, None
        if b is not None:
            for r in b.rows:
                if not r.done:
                    fail_row(r, error)
            self._settle(b.rows)
