"""A replica's serving metrics: Prometheus text at ``/metrics`` (prometheus_client, a registry per replica), and a
summary of the last minute in ``/health``.

    distillery_running_sequences / distillery_waiting_requests   gauges, sampled at scrape time
    distillery_generated_tokens_total, distillery_sequences_total{finish_reason}, distillery_requests_total{outcome},
    distillery_steps_total (decode steps), distillery_prefills_total
    distillery_time_to_first_token_seconds, distillery_time_per_output_token_seconds,
    distillery_request_latency_seconds, distillery_batch_size (sequences per decode step)   histograms

Each replica answers for itself (Serve routes a scrape to any one replica; ``replica`` labels the series).
"""

from __future__ import annotations

import statistics
import threading
import time
from collections import deque
from typing import Callable

from app.serve.generate import Row

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_TOKEN = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28)
_BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256)
WINDOW_S = 60.0


class ServeMetrics:
    """Counters, gauges and histograms of one replica (thread-safe: the decode thread and the event loop both
    record)."""

    def __init__(self, replica: str, running: Callable[[], int], waiting: Callable[[], int]):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry(auto_describe=True)
        lab = {"labelnames": ["replica"], "registry": self.registry}
        self._running, self._waiting = running, waiting
        Gauge("distillery_running_sequences", "Sequences decoding now", **lab).labels(replica).set_function(running)
        Gauge("distillery_waiting_requests", "Requests waiting for a place in the running batch",
              **lab).labels(replica).set_function(waiting)
        self.tokens = Counter("distillery_generated_tokens", "Tokens generated", **lab).labels(replica)
        self.steps = Counter("distillery_steps", "Decode steps (continuous) or batches (static)", **lab).labels(replica)
        self.prefills = Counter("distillery_prefills", "Prefill forwards", **lab).labels(replica)
        self._seqs = Counter("distillery_sequences", "Sequences ended, by finish_reason",
                             labelnames=["replica", "finish_reason"], registry=self.registry)
        self._reqs = Counter("distillery_requests", "Requests, by outcome (ok, failed, rejected)",
                             labelnames=["replica", "outcome"], registry=self.registry)
        self.ttft = Histogram("distillery_time_to_first_token_seconds", "From a request's arrival in the replica to "
                              "its first token", buckets=_LATENCY, **lab).labels(replica)
        self.tpot = Histogram("distillery_time_per_output_token_seconds", "Per sequence, after the first token",
                              buckets=_TOKEN, **lab).labels(replica)
        self.latency = Histogram("distillery_request_latency_seconds", "From arrival in the replica to the last token",
                                 buckets=_LATENCY, **lab).labels(replica)
        self.batch = Histogram("distillery_batch_size", "Sequences per decode step", buckets=_BATCH,
                               **lab).labels(replica)
        self.replica = replica
        self._lock = threading.Lock()
        self._recent: deque = deque()  # (time, tokens, ttft, tpot) of requests ended in the last WINDOW_S
        self.counts = {"batches": 0, "row_steps": 0, "largest_batch": 0, "prefills": 0, "requests": 0,
                       "sequences": 0, "generated_tokens": 0, "cancelled": 0, "failed": 0, "rejected": 0}
        """Totals since the replica started, for /health: ``batches`` are decode steps (continuous) or engine
        batches (static), ``row_steps`` the sequences summed over them (row_steps / batches: the mean batch)."""
        self._started = time.perf_counter()

    def step(self, sequences: int) -> None:
        """One decode step (continuous) or one engine batch (static) of ``sequences`` rows."""
        self.steps.inc()
        self.batch.observe(sequences)
        with self._lock:
            c = self.counts
            c["batches"] += 1
            c["row_steps"] += sequences
            c["largest_batch"] = max(c["largest_batch"], sequences)

    def prefill(self) -> None:
        self.prefills.inc()
        with self._lock:
            self.counts["prefills"] += 1

    def request_done(self, rows: list[Row], t_arrival: float, outcome: str) -> None:
        """Record one request's rows once they have all ended (``outcome``: ok or failed)."""
        now = time.perf_counter()
        tokens = sum(r.completion_tokens for r in rows)
        self.tokens.inc(tokens)
        for r in rows:
            self._seqs.labels(self.replica, r.finish_reason or "none").inc()
        self._reqs.labels(self.replica, outcome).inc()
        firsts = [r.t_first for r in rows if r.t_first is not None]
        ttft = min(firsts) - t_arrival if firsts else None
        if ttft is not None:
            self.ttft.observe(ttft)
        tpots = [(r.t_done - r.t_first) / (r.completion_tokens - 1) for r in rows
                 if r.t_first is not None and r.t_done is not None and r.completion_tokens > 1]
        for t in tpots:
            self.tpot.observe(t)
        self.latency.observe(now - t_arrival)
        with self._lock:
            c = self.counts
            c["requests"] += 1
            c["sequences"] += len(rows)
            c["generated_tokens"] += tokens
            c["cancelled"] += sum(r.finish_reason == "cancelled" for r in rows)
            c["failed"] += sum(r.finish_reason == "error" for r in rows)
            self._recent.append((now, tokens, ttft, statistics.fmean(tpots) if tpots else None))
            self._trim(now)

    def rejected(self) -> None:
        self._reqs.labels(self.replica, "rejected").inc()
        with self._lock:
            self.counts["rejected"] += 1

    def _trim(self, now: float) -> None:
        while self._recent and self._recent[0][0] < now - WINDOW_S:
            self._recent.popleft()

    def summary(self) -> dict:
        """For /health: the totals (``counts``), running and waiting now; over the last minute, tokens/s and the
        medians of time to first token and time per output token."""
        now = time.perf_counter()
        with self._lock:
            self._trim(now)
            recent, counts = list(self._recent), dict(self.counts)
        med = lambda xs: round(statistics.median(xs), 4) if xs else None  # noqa: E731
        span = min(WINDOW_S, now - self._started)
        return {**counts, "running": self._running(), "waiting": self._waiting(),
                "tokens_per_s": round(sum(x[1] for x in recent) / span, 2) if span > 0 else 0.0,
                "ttft_p50_s": med([x[2] for x in recent if x[2] is not None]),
                "tpot_p50_s": med([x[3] for x in recent if x[3] is not None])}

    def text(self) -> bytes:
        from prometheus_client import generate_latest

        return generate_latest(self.registry)

