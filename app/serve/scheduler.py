"""Continuous (iteration-level) batching: one decode loop per replica, on its own thread, as vLLM and TGI schedule.

The shape is vLLM V1's scheduler:

* ``Request`` holds one request's rows and its ``Status`` (WAITING, RUNNING, FINISHED); ``ContinuousScheduler.
  _finish`` is the one place that ends a request: its rows that are still open end (with the error, or
  "cancelled"), its metrics are recorded and its waiter is answered, whatever ended it;
* ``schedule(waiting, running, limits)`` only decides: a ``Plan`` of the requests to cancel and the rows to prefill
  this step. It is a plain function of plain values, tested with no model;
* the decode thread only executes plans: it ends the cancelled requests, prefills the admitted rows in a batch of
  their own and samples their first token (streamed at once: the time to first token), merges them into the running
  batch (``batching.merge``), decodes one token for every running row (``batching.decode``), and applies the output
  (``_update_from_output``: each row's token through ``RowStopper.step``, rows that ended leave the batch, requests
  whose rows have all ended are finished).

Admission (``schedule``), first come first served, row by row: a request's rows (its ``n`` copies x prompts) may be
admitted over several steps. Every step's prefill stays within ``max_prefill_tokens`` (counted padded: rows x the
longest prompt; one prompt longer than the budget is prefilled alone, the only exception), the running rows within
``max_num_seqs``, and the cache the running batch may grow to within ``max_cache_bytes`` (each row reserves
its fixed state plus ``per_token`` x (prompt + max_tokens) for every row of the batch, since rows share the
longest length of KV columns; measured once at start, ``CacheCost``), so a burst cannot OOM the running batch. With
nothing running, the head row is always admitted (else it could never run).

Isolation. A row that fails in sampling or detokenizing ends alone (``fail_row``); a prefill that fails ends only
the requests it was admitting; anything else that raises in a step (a decode, ``merge``, ``Engine.start``, a sink)
ends every request that was running or being admitted, each with its error, and the loop goes on with the next
requests. If the loop fails ``_MAX_FAILURES`` times in a row, or anything escapes it, it stops: every request still
held ends with an error, ``submit`` refuses (``LoopStopped``, a 503) and ``check_health`` raises, so Serve replaces
the replica. ``submit`` refuses a request at once (``QueueFull``) when ``max_waiting`` requests are already
waiting; ``cancel`` takes a request that has not started off the queue at once.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Iterable, NamedTuple, Optional, Sequence

from app.serve.batching import Batch, CacheCost, check_supported, decode, measure_cache_cost, merge, prefill
from app.serve.generate import Engine, Row, RowStopper, fail_row, pick_tokens
from app.serve.metrics import ServeMetrics

log = logging.getLogger(f"ray.serve.{__name__}")

_MAX_FAILURES = 3  # steps failing one after the other: the loop stops and the replica reports unhealthy
_CACHE_FRACTION = 0.8  # of the accelerator's free memory (half of the host's available memory on CPU) at start


class QueueFull(Exception):
    """The replica's waiting queue is full (``batch.max_waiting``): the request was not taken."""


class LoopStopped(QueueFull):
    """The replica's decode loop has stopped (``check_health`` fails; Serve replaces the replica): the request was
    not taken, and is refused as a full queue is (503)."""


class Status(enum.Enum):
    WAITING = "waiting"  # no row prefilled yet
    RUNNING = "running"  # some rows prefilled (the others, if any, wait for a later step)
    FINISHED = "finished"


_ids = iter(range(1 << 62))


@dataclass(eq=False)
class Request:
    """One request in the scheduler: its rows (``n`` x prompts, sinks set) and where it stands."""

    rows: list[Row]
    t_arrival: float = field(default_factory=time.perf_counter)
    future: Optional[asyncio.Future] = None
    loop: Optional[asyncio.AbstractEventLoop] = None
    status: Status = Status.WAITING
    admitted: int = 0
    """Rows handed to a prefill so far: ``rows[:admitted]`` are (or were) in the running batch."""
    id: int = field(default_factory=lambda: next(_ids))

    @property
    def unadmitted(self) -> list[Row]:
        return self.rows[self.admitted:]

    @property
    def cancelled(self) -> bool:
        return any(r.cancelled for r in self.rows)


class Limits(NamedTuple):
    """What one step may admit (``schedule``)."""

    max_num_seqs: int
    max_prefill_tokens: int
    max_cache_bytes: Optional[int] = None  # None: not bounded
    cost: CacheCost = CacheCost(0, 0)


class Admit(NamedTuple):
    request: Request
    rows: list[Row]  # the request's next rows, prefilled this step


class Plan(NamedTuple):
    """One step's decisions: requests whose client went away (end before any compute), rows to prefill."""

    cancel: list[Request]
    admit: list[Admit]

    @property
    def rows(self) -> list[Row]:
        return [r for a in self.admit for r in a.rows]


def _reach(r: Row) -> int:
    """Tokens a row's cache holds at most: its prompt and every token it may generate."""
    return len(r.prompt_ids) + r.params.max_tokens


def batch_cache_bytes(rows: Sequence[Row], cost: CacheCost) -> int:
    """The cache a batch of ``rows`` may grow to: every row holds its fixed state and as many KV columns as the
    longest row reaches (left padding)."""
    if not rows:
        return 0
    return len(rows) * (cost.fixed + cost.per_token * max(_reach(r) for r in rows))


def schedule(waiting: Iterable[Request], running: Sequence[Request], limits: Limits) -> Plan:
    """The next step's plan (see the module doc): ``waiting`` in arrival order (the head may have rows admitted
    already), ``running`` the requests with rows in the batch. Decides only; changes nothing."""
    cancel = [q for q in running if q.cancelled and q.status is not Status.FINISHED]
    in_batch = [r for q in running if q not in cancel for r in q.rows[:q.admitted] if not r.done]
    admit: list[Admit] = []
    taken: list[Row] = []
    longest, blocked = 0, False
    for q in waiting:
        if q.status is Status.FINISHED:
            continue
        if q.cancelled:
            if q not in cancel:
                cancel.append(q)
            continue
        if blocked:
            continue  # first come first served: nothing passes a request that does not fit (cancelled ones leave)
        rows = []
        for r in q.unadmitted:
            longer = max(longest, len(r.prompt_ids))
            alone = not in_batch and not taken
            fits = (len(in_batch) + len(taken) < limits.max_num_seqs
                    and (not taken or (len(taken) + 1) * longer <= limits.max_prefill_tokens)
                    and (limits.max_cache_bytes is None
                         or batch_cache_bytes(in_batch + taken + [r], limits.cost) <= limits.max_cache_bytes))
            if not (fits or alone):
                blocked = True
                break
            rows.append(r)
            taken.append(r)
            longest = longer
        if rows:
            admit.append(Admit(q, rows))
    return Plan(cancel, admit)


def _schedulable(q: Request, running: Sequence[Request], limits: Limits) -> bool:
    """Whether ``schedule`` can plan with ``q`` waiting alone (a failed plan looks for the request that broke it)."""
    try:
        schedule([q], running, limits)
        return True
    except Exception:  # noqa: BLE001 - this one is the culprit
        return False


def admit(plan: Plan, waiting: deque, running: list) -> None:
    """Record ``plan``'s admissions: each admitted request is RUNNING, in ``running``, and leaves ``waiting`` once
    every row of it has been admitted."""
    for a in plan.admit:
        q = a.request
        q.admitted += len(a.rows)
        q.status = Status.RUNNING
        if q not in running:
            running.append(q)
        if not q.unadmitted:
            waiting.remove(q)


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


def default_cache_budget(device: Any) -> Optional[int]:
    """Bytes the running batch's cache may take: a share of the accelerator's free memory now (after the model
    loaded), or half of the host's available memory on CPU."""
    import torch

    try:
        if getattr(device, "type", str(device)) == "cuda":
            return int(_CACHE_FRACTION * torch.cuda.mem_get_info(device)[0])
        import psutil

        return int(0.5 * psutil.virtual_memory().available)
    except Exception:  # noqa: BLE001 - no reading: not bounded (max_num_seqs and the token budget still are)
        log.warning("could not read the free memory; the cache is not bounded", exc_info=True)
        return None


class ContinuousScheduler:
    """The decode loop of one replica (see the module doc). ``generate(rows)`` is awaited from the event loop."""

    def __init__(self, engine: Engine, *, max_num_seqs: int, max_prefill_tokens: int, max_waiting: int,
                 metrics: Optional[ServeMetrics] = None, max_cache_bytes: Optional[int] = -1):
        """``max_cache_bytes``: what the running batch's cache may take (-1: ``default_cache_budget``; None: not
        bounded)."""
        self.engine, self.metrics = engine, metrics
        self.max_waiting = max_waiting
        self.attention = check_supported(engine.model)  # raises on a cache it cannot merge
        cost = measure_cache_cost(engine.model, engine.pad_id, self.attention)
        budget = default_cache_budget(engine.device) if max_cache_bytes == -1 else max_cache_bytes
        self.limits = Limits(max_num_seqs, max_prefill_tokens, budget, cost)
        log.info("cache: %d bytes per row + %d per token; budget %s bytes", cost.fixed, cost.per_token, budget)
        self._stopper = RowStopper([], engine.tok, engine.eos_ids)
        self._cv = threading.Condition(threading.RLock())
        self._waiting: deque[Request] = deque()  # requests with rows not yet admitted, in arrival order
        self._running: list[Request] = []  # requests with rows admitted, not finished
        self._batch: Optional[Batch] = None
        self._closed = False
        self._stopped: Optional[BaseException] = None  # why the loop stopped, if it did
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
        """Requests waiting for their first row to be admitted (a cancelled one no longer counts: it leaves the
        queue at the next step, if ``cancel`` has not taken it already)."""
        with self._cv:
            return sum(q.status is Status.WAITING and not q.cancelled for q in self._waiting)

    def submit(self, rows: list[Row]) -> Request:
        """Queue ``rows`` (one request's; their sinks already set), from the event loop. Raises QueueFull at once
        when ``max_waiting`` requests are already waiting, LoopStopped when the decode loop has stopped."""
        loop = asyncio.get_running_loop()
        req = Request(rows, future=loop.create_future(), loop=loop)
        with self._cv:
            if self._closed:
                raise RuntimeError("the scheduler is closed")
            if self._stopped is not None:
                raise LoopStopped(f"the decode loop has stopped ({type(self._stopped).__name__}: {self._stopped})")
            if self.waiting >= self.max_waiting:
                if self.metrics is not None:
                    self.metrics.rejected()
                raise QueueFull(f"{self.waiting} requests are waiting (batch.max_waiting)")
            self._waiting.append(req)
            self._cv.notify()
        return req

    def cancel(self, req: Request) -> None:
        """The client went away: a request that has not started leaves the queue now (it no longer counts against
        ``max_waiting``); a running one's rows stop at the next step. A finished request is left as it is."""
        with self._cv:
            if req.status is Status.FINISHED:
                return
            for r in req.rows:
                r.cancelled = True
            if req.status is Status.WAITING:
                self._finish(req)
            self._cv.notify()

    async def wait(self, req: Request) -> None:
        """Until ``req`` has finished. Cancelled (the client went away): ``cancel``."""
        try:
            await req.future
        except asyncio.CancelledError:
            self.cancel(req)
            raise

    async def generate(self, rows: list[Row]) -> None:
        """``submit`` then ``wait``."""
        await self.wait(self.submit(rows))

    def check_health(self) -> None:
        """Raises when the decode loop has stopped (Serve's health check: the replica is replaced)."""
        if self._stopped is not None:
            raise RuntimeError(f"the decode loop has stopped: {type(self._stopped).__name__}: {self._stopped}")
        if not self._closed and not self._thread.is_alive():
            raise RuntimeError("the decode loop has stopped")

    def close(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify()
        self._thread.join(timeout)

    # -- the request lifecycle

    def _finish(self, req: Request, error: Optional[BaseException] = None) -> None:
        """The one place a request ends: its open rows end (``error``, else "cancelled"), it leaves the queue and
        the running set, its metrics are recorded and its waiter is answered. Safe from either thread; a finished
        request is left as it is."""
        with self._cv:
            if req.status is Status.FINISHED:
                return
            req.status = Status.FINISHED
            if req in self._waiting:
                self._waiting.remove(req)
            if req in self._running:
                self._running.remove(req)
        for r in req.rows:
            if r.done:
                continue
            if error is not None:
                fail_row(r, error)
            else:  # ended before its rows did: only a cancelled request does
                try:
                    self._stopper.finish(r, "cancelled", flush=False)
                except Exception as e:  # noqa: BLE001 - its sink failed: the row has ended either way
                    fail_row(r, e)
        try:
            if self.metrics is not None:
                self.metrics.request_done(req.rows, req.t_arrival,
                                          "failed" if any(r.error is not None for r in req.rows) else "ok")
        except Exception:  # noqa: BLE001 - a metric must not keep a request open
            log.warning("recording a finished request failed", exc_info=True)
        if req.future is not None and req.loop is not None:
            try:
                req.loop.call_soon_threadsafe(_resolve, req.future)
            except RuntimeError:  # its event loop has closed: nobody waits for it
                pass

    def _finish_all(self, error: BaseException, waiting: bool = False) -> None:
        """End every request that is running or being admitted (and, ``waiting``, every queued one) with
        ``error``; the batch is dropped."""
        with self._cv:
            self._batch = None
            held = list(self._running) + (list(self._waiting) if waiting else [])
        for q in held:
            self._finish(q, error)

    # -- the decode thread

    def _run(self) -> None:
        import torch

        failures = 0
        try:
            while True:
                try:
                    plan = self._next_plan()
                    if plan is None:  # closed: nothing stays open
                        self._finish_all(RuntimeError("the scheduler is closed"), waiting=True)
                        return
                    with torch.inference_mode():
                        self._execute(plan)
                    failures = 0
                    if self._window.due():
                        self._window.report()
                except Exception as e:  # noqa: BLE001 - a bug here must not stop the replica's loop
                    failures += 1
                    log.exception("the decode loop failed (%d in a row); the requests running in it end with an "
                                  "error", failures)
                    self._finish_all(e)
                    if failures >= _MAX_FAILURES:
                        raise
        except BaseException as e:  # noqa: BLE001 - the loop stops: say so (check_health) and end what it held
            log.critical("the decode loop stopped; the replica reports unhealthy", exc_info=e)
            with self._cv:
                self._stopped = e
            self._finish_all(RuntimeError(f"the decode loop stopped: {type(e).__name__}: {e}"), waiting=True)

    def _next_plan(self) -> Optional[Plan]:
        """Wait for work, then decide the step (``schedule``) and record the admissions; None once closed."""
        with self._cv:
            while not self._closed and not self._waiting and not self._running:
                self._cv.wait()
            if self._closed:
                return None
            try:
                plan = schedule(self._waiting, self._running, self.limits)
            except Exception as e:  # noqa: BLE001 - a request that breaks scheduling ends alone, if it is one
                bad = [q for q in list(self._waiting) if not _schedulable(q, self._running, self.limits)]
                for q in bad:
                    log.exception("request %s cannot be scheduled; it ends with an error", q.id)
                    self._finish(q, e)
                try:
                    if not bad:
                        raise
                    plan = schedule(self._waiting, self._running, self.limits)
                except Exception as e2:  # no plan can be made: nothing held can go on (a bug)
                    log.exception("scheduling failed; every request held ends with an error")
                    self._finish_all(e2, waiting=True)
                    raise
            admit(plan, self._waiting, self._running)
            return plan

    def _execute(self, plan: Plan) -> None:
        for q in plan.cancel:  # rows whose client went away leave before any compute
            self._finish(q)
        self._retire()
        if plan.admit:
            self._prefill(plan)
        if self.running:
            batch, t0 = self._batch, time.perf_counter()
            logits = decode(self.engine.model, batch)
            if self.metrics is not None:
                self.metrics.step(len(batch))
            self._update_from_output(batch, logits)
            self._window.stepped(len(batch), time.perf_counter() - t0)

    def _prefill(self, plan: Plan) -> None:
        """The admitted rows' prompts in a batch of their own, their first token, then into the running batch. A
        prefill that fails ends only the requests it was admitting."""
        eng, rows = self.engine, plan.rows
        eng.start(rows)  # a seed the generator refuses ends its row here
        live = [r for r in rows if not r.done]
        if live:
            t0 = time.perf_counter()
            try:
                new, logits = prefill(eng.model, live, eng.pad_id, self.attention)
            except Exception as e:  # noqa: BLE001 - these requests end; the running ones go on
                log.error("prefill of %d rows failed: %s: %s", len(live), type(e).__name__, e, exc_info=e)
                for a in plan.admit:
                    self._finish(a.request, e)
                return
            if self.metrics is not None:
                self.metrics.prefill()
            self._advance(new, logits)
            self._batch = merge(self._batch, new)
            self._window.prefilled(len(live), time.perf_counter() - t0)
        self._retire()

    def _update_from_output(self, batch: Batch, logits: Any) -> None:
        """A decode step's output applied: each row's token, then the rows and requests that ended."""
        self._advance(batch, logits)
        self._retire()

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
        """Free the rows that ended and finish the requests whose rows have all ended."""
        b = self._batch
        if b is not None:
            if any(r.done for r in b.rows):
                b.keep([i for i, r in enumerate(b.rows) if not r.done])
            if not len(b):
                self._batch = None
        for q in list(self._running):
            if not q.unadmitted and all(r.done for r in q.rows):
                self._finish(q)
