"""The OpenAI-compatible HTTP server: a Ray Serve deployment with a FastAPI ingress.

    POST /v1/completions        POST /v1/chat/completions   (both: ``"stream": true`` for server-sent events)
    GET  /v1/models             GET  /v1/models/{id}        GET  /health        GET  /metrics (Prometheus text)

Requests are batched by one of two schedulers (``batch.scheduler``). ``continuous``: the replica's decode loop
(``scheduler.ContinuousScheduler``) admits requests into the running batch at every step and retires each row as
soon as it ends, so throughput follows load and a request that comes alone waits for nobody. ``static`` (the
default for now): Ray Serve's ``@serve.batch`` (size and wait from ``batch``); one batch's rows (requests x n) are
decoded together by ``generate.Engine.run`` to the end of the batch. Either way each request gets its rows back,
or its text as it comes.
Errors are OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``): 400 a value the server cannot
honour, 401 a missing or wrong API key, 404 an unknown model or route, 413 a body over ``limits.max_body_bytes``,
422 a body that does not fit the schema, 500 a failure while generating, 503 the replica's queue is full
(``batch.max_waiting``, either scheduler; with ``Retry-After``; Serve's router answers 503 too past
``deployment.max_queued_requests``); the replica carries on after each.
A 500 says only that generation failed, with the request's id; what failed goes to the replica's log.

One request cannot fail or stall the others: its values are checked before it joins a batch (seed, temperature,
stop strings, counts before any tokenizing, which runs off the event loop; each prompt + ``max_tokens`` against
the model's context, ``model_context``), a row that fails in the batch ends
only its own request (``generate``), and a request whose client went away (streaming or not: Serve cancels it)
has its rows stopped at the next step.

Start it with ``distillery serve MODEL`` (``start`` below), ``serve run cluster/serve.yaml`` (``build_app``) or
``ray job submit -- python jobs/serve.py``. The API key is read where the app is built (``application``) and handed
to every replica as a constructor argument, so a replica on a node without the key's variable still requires it;
an app whose host reaches beyond loopback is not built without a key (``APIKeyRequired``).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.serve import protocol as P
from app.serve.config import ServeConfig
from app.serve.generate import Engine, Row, model_context
from app.serve.metrics import ServeMetrics
from app.serve.scheduler import ContinuousScheduler, QueueFull

log = logging.getLogger(f"ray.serve.{__name__}")  # under Serve's logger: the lines land in the replica's log

APP_NAME = "distillery"
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
api = FastAPI(title="Distillery", description="OpenAI-compatible inference for distilled students",
              docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(P.APIError)
async def _api_error(request: Request, exc: P.APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


@api.exception_handler(RequestValidationError)
async def _schema_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    where = [".".join(str(x) for x in e.get("loc", ())[1:]) or "body" for e in errors]
    msg = "; ".join(f"{w}: {e.get('msg')}" for w, e in zip(where[:5], errors[:5])) or "invalid request body"
    return JSONResponse(P.error_body(msg, param=where[0] if where else None, code="invalid_schema"), status_code=422)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
    return JSONResponse(P.error_body(str(exc.detail), type=kind), status_code=exc.status_code)


def _is_health(scope: Scope) -> bool:
    """Whether a request is for this app's /health (the one path open without the key): the path below the app's
    route prefix (ASGI's root_path, which the path may or may not carry) is exactly /health."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root):
        path = path[len(root):]
    return path.rstrip("/") == "/health"


class Gate:
    """ASGI middleware, before any route: the API key (every path but /health), the body size counted as the
    bytes arrive (a chunked body has no Content-Length), and a generic 500 for anything a route let escape.

    The body (at most ``max_body_bytes``) is read here and handed on whole; later ``receive`` calls go to the
    client's, so the app still hears a disconnect. Pure ASGI rather than ``@app.middleware``: Starlette's
    BaseHTTPMiddleware runs the route in another task, which breaks cancellation and disconnect detection."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        state = api.state  # this module's app: the replica's __init__ sets it (Serve runs a copy of the app)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        key = getattr(state, "api_key", None)
        if key and not _is_health(scope):
            auth = headers.get("authorization", "")
            given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
            if not hmac.compare_digest(given.encode(), key.encode()):
                return await JSONResponse(P.error_body("Incorrect or missing API key (Authorization: Bearer ...)",
                                                       code="invalid_api_key"), 401)(scope, receive, send)
        limit = getattr(state, "max_body_bytes", None)
        size = headers.get("content-length", "")
        if limit and size.isdigit() and int(size) > limit:
            return await JSONResponse(_too_large(size, limit), 413)(scope, receive, send)
        chunks, seen, more = [], 0, True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return  # the client went away before its body came
            body = msg.get("body", b"")
            seen += len(body)
            if limit and seen > limit:
                return await JSONResponse(_too_large(f"more than {limit}", limit), 413)(scope, receive, send)
            chunks.append(body)
            more = msg.get("more_body", False)
        whole: Optional[Message] = {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        async def replay() -> Message:
            nonlocal whole
            if whole is not None:
                msg, whole = whole, None
                return msg
            return await receive()

        started = False

        async def tracked(msg: Message) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, replay, tracked)
        except Exception:  # noqa: BLE001 - the replica answers and carries on; the client gets no internals
            log.exception("request to %s failed", scope.get("path"))
            if not started:
                await JSONResponse(P.error_body("internal error (see the server log)", type="server_error"),
                                   500)(scope, receive, send)


def _too_large(size: str, limit: int) -> dict:
    return P.error_body(f"request body of {size} bytes is over the limit of {limit}", code="request_too_large")


api.add_middleware(Gate)


class APIKeyRequired(ValueError):
    """The API would be reachable beyond loopback (or ``require_api_key`` is set) and no key was given."""


@dataclass(frozen=True)
class APIKey:
    """The API key on its way from where the app is built to the replicas (a constructor argument, pickled with the
    deployment): its repr hides it, so a log line or ``serve status`` that prints arguments shows no key."""

    value: str = dataclasses.field(repr=False)


def read_api_key(cfg: ServeConfig) -> Optional[str]:
    """The API key from ``api_key_file`` or the ``api_key_env`` variable (None: no key, the API is open)."""
    if cfg.api_key_file:
        with open(cfg.api_key_file) as f:
            key = f.read().strip()
        if not key:
            raise ValueError(f"api_key_file {cfg.api_key_file} is empty")
        return key
    key = os.environ.get(cfg.api_key_env or "", "").strip() if cfg.api_key_env else ""
    return key or None


def builder_api_key(cfg: ServeConfig) -> Optional[APIKey]:
    """The key where the app is built (the driver of ``distillery serve`` / ``jobs/serve.py``, or the build task of
    ``serve run`` / ``serve deploy``), to hand to every replica. An ``api_key_file`` that is not on this machine is
    left to the replicas (mounted where they run; a replica without it fails to start). Refuses
    (``APIKeyRequired``) an API that needs a key (``cfg.needs_api_key``: a host beyond loopback, or
    ``require_api_key``) when none is given."""
    file_elsewhere = bool(cfg.api_key_file) and not os.path.exists(cfg.api_key_file)
    key = None if file_elsewhere else read_api_key(cfg)
    if cfg.needs_api_key and key is None and not file_elsewhere:
        why = f"host {cfg.host} reaches beyond this machine" if cfg.exposed else "require_api_key is set"
        raise APIKeyRequired(f"{why}, and no API key was given: set {cfg.api_key_env or 'api_key_env'} in this "
                             "environment or api_key_file (a file holding the key), or keep host 127.0.0.1")
    return APIKey(key) if key else None


@dataclass
class Job:
    """One request's rows, as one item of a static batch; it holds a place among the replica's waiting requests
    (``batch.max_waiting``) from ``_submit`` until its batch starts or it ends without one (``Replica._unqueue``)."""

    rows: list[Row]
    t_arrival: float
    started: bool = False
    queued: bool = True


def _rows_in(jobs: list[Job]) -> int:
    return sum(len(j.rows) for j in jobs)


# on every stream: no cache may keep it, no proxy (nginx) may buffer it
STREAM_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def _sse(obj: Union[dict, str]) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


def _replica_id() -> str:
    """This replica's id in Serve (a label of its metrics), or "local" outside a replica."""
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # noqa: BLE001 - not in a replica (a test builds the class itself)
        return "local"


def pin_replica_grpc() -> None:
    """Ray Serve 2.60's replica starts its inter-deployment gRPC server on ``[::]:0``, every interface, after the
    deployment's constructor (``ray.serve._private.replica``, ``_on_initialized``). Called from the constructor,
    this rebinds that one address to the node's Ray address (127.0.0.1 on a loopback session; the node's cluster
    address on a real cluster, where the other replicas and proxies reach it by that address and the port)."""
    import ray
    from ray.serve._private import replica as serve_replica

    add = serve_replica.add_port_to_grpc_server
    if getattr(add, "pinned", False):
        return
    node = ray.util.get_node_ip_address()
    host = f"[{node}]" if ":" in node else node

    def pinned(server, address: str):
        return add(server, host + address[len("[::]"):] if address.startswith("[::]:") else address)

    pinned.pinned = True
    serve_replica.add_port_to_grpc_server = pinned


class Replica:
    """One replica: the model loaded once; requests decoded by the continuous scheduler's loop, or batched into
    ``Engine.run`` on a worker thread (static). (``StudentServer`` below is this class as a Serve deployment;
    ``engine`` lets a test give its own.)"""

    def __init__(self, config: dict, engine: Optional[Engine] = None, api_key: Optional[APIKey] = None):
        from app.config import _build

        if engine is None:  # in a Serve replica
            pin_replica_grpc()
        self.cfg: ServeConfig = _build(ServeConfig, config)
        key = api_key.value if api_key is not None else read_api_key(self.cfg)  # handed over, or this node's
        if self.cfg.needs_api_key and not key:
            raise RuntimeError(f"an API key is required (host {self.cfg.host}, require_api_key "
                               f"{self.cfg.require_api_key}) but none was given or found (api_key_file "
                               f"{self.cfg.api_key_file!r}, environment variable {self.cfg.api_key_env!r})")
        if not key:
            log.warning("no API key: every /v1 request is served without authentication (set %s where the server "
                        "starts, or api_key_file)", self.cfg.api_key_env or "api_key_env")
        api.state.api_key = key
        api.state.max_body_bytes = self.cfg.limits.max_body_bytes
        self.engine = engine or Engine.load(self.cfg.model, self.cfg.device, self.cfg.dtype)
        self.name = self.cfg.served_name
        self.context = self.engine.context  # prompt + completion, per sequence (None: no limit)
        self.created = int(time.time())
        # ids a prompt may hold: known to the tokenizer and inside the embedding (either may be padded)
        self.vocab = min(len(self.engine.tok), self.engine.model.get_input_embeddings().num_embeddings)
        b = self.cfg.batch
        self._static = {"running": 0, "waiting": 0}  # rows in the engine now, requests queued for a batch
        self.scheduler: Optional[ContinuousScheduler] = None
        self.metrics = ServeMetrics(_replica_id(), self._running, self._waiting)
        self._window = self._new_window()
        if b.scheduler == "continuous":
            self.scheduler = ContinuousScheduler(self.engine, max_num_seqs=b.max_num_seqs,
                                                 max_prefill_tokens=b.max_prefill_tokens, max_waiting=b.max_waiting,
                                                 metrics=self.metrics)
            how = f"continuous batching: {b.max_num_seqs} sequences, {b.max_waiting} waiting"
        else:
            self._batch.set_max_batch_size(b.max_batch_size)
            self._batch.set_batch_wait_timeout_s(b.batch_wait_timeout_s)
            how = f"static batching: batch {b.max_batch_size}, wait {b.batch_wait_timeout_s:.3f}s"
        log.info("serving %s as %r on %s (%s, api key %s)", self.cfg.model, self.name, self.engine.device, how,
                 "on" if key else "off")

    @property
    def stats(self) -> dict:
        return self.metrics.summary()

    def _running(self) -> int:
        """Sequences decoding now."""
        return self.scheduler.running if self.scheduler else self._static["running"]

    def _waiting(self) -> int:
        """Requests waiting for a place (continuous) or for a batch (static)."""
        return self.scheduler.waiting if self.scheduler else self._static["waiting"]

    def check_health(self) -> None:
        """Serve's health check: fails when the continuous scheduler's decode loop has stopped, so that Serve
        replaces this replica."""
        if self.scheduler is not None:
            self.scheduler.check_health()

    # -- routes

    @api.get("/health")
    async def health(self):
        """Liveness, and this replica's batching: totals so far (decode steps or batches, sequences, the largest
        batch, sequences stopped because their client went away, sequences that failed, requests refused),
        running and waiting now, and over the last minute tokens/s and median TTFT and time per output token.
        503 with status "unhealthy" and the reason when the decode loop has stopped (as ``check_health``)."""
        body = {"status": "ok", "model": self.name, "scheduler": self.cfg.batch.scheduler, **self.stats}
        try:
            self.check_health()
        except RuntimeError as e:
            return JSONResponse({**body, "status": "unhealthy", "reason": str(e)}, status_code=503)
        return body

    @api.get("/metrics")
    async def prometheus(self) -> Response:
        """This replica's metrics in Prometheus text format (``metrics.ServeMetrics``)."""
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(self.metrics.text(), media_type=CONTENT_TYPE_LATEST)

    def _card(self) -> dict:
        return P.model_card(self.name, self.created, self.context, self.cfg.limits.max_prompt_tokens)

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [self._card()]}

    @api.get("/v1/models/{model:path}")
    async def model(self, model: str) -> dict:
        self._check_model(model)
        return self._card()

    @api.post("/v1/completions")
    async def completions(self, req: P.CompletionRequest):
        self._check_model(req.model)
        P.check_completion(req)
        params = P.sampling(req, self.cfg.limits, min(16, self.cfg.limits.max_tokens), req.max_tokens)
        prompts = P.completion_prompts(req)
        self._check_count(len(prompts), req)  # before any tokenizing
        ids = await asyncio.to_thread(self._encode, prompts, params.stop)  # off the event loop
        params = self._fit_context(ids, params, req.max_tokens is not None, "prompt")
        return await self._answer(req, ids, params, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, req: P.ChatCompletionRequest):
        self._check_model(req.model)
        P.check_chat(req)
        if not self.engine.has_chat_template:
            raise P.APIError(400, f"model {self.name} has no chat template: use /v1/completions", param="messages",
                             code="no_chat_template")
        asked = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = P.sampling(req, self.cfg.limits, min(self.cfg.limits.default_max_tokens, self.cfg.limits.max_tokens),
                            asked)
        self._check_count(1, req)
        ids = await asyncio.to_thread(self._encode_chat, P.chat_messages(req), params.stop)
        params = self._fit_context([ids], params, asked is not None, "messages")
        return await self._answer(req, [ids], params, chat=True)

    # -- helpers

    def _check_model(self, model: str) -> None:
        if model != self.name:
            raise P.APIError(404, f"the model '{model}' does not exist; this server has '{self.name}'",
                             param="model", code="model_not_found", type="not_found_error")

    def _check_count(self, prompts: int, req: Any) -> None:
        n, most = P.choices_per_prompt(req), self.cfg.batch.capacity
        if prompts * n > most:
            raise P.APIError(400, f"{prompts} prompts x n={n} sequences is more than a batch holds ({most})", param="n")

    def _fit_context(self, prompts: list[list[int]], params, explicit: bool, param: str):
        """``params`` with each prompt + ``max_tokens`` inside the model's context (``P.fit_context``): before the
        request joins a batch, where a sequence past the model's positions would fail every row beside it."""
        mt = P.fit_context(max(len(p) for p in prompts), params.max_tokens, explicit=explicit, context=self.context,
                           param=param)
        return params if mt == params.max_tokens else dataclasses.replace(params, max_tokens=mt)

    def _check_length(self, ids: list[int], param: str = "prompt") -> list[int]:
        limit = self.cfg.limits.max_prompt_tokens
        if len(ids) > limit:
            raise P.APIError(400, f"the prompt has {len(ids)} tokens, over this server's limit of {limit}",
                             param=param, code="context_length_exceeded")
        return ids

    def _check_stop(self, stop: tuple[str, ...]) -> None:
        limit = self.cfg.limits.max_stop_tokens
        if any(len(self.engine.tok(s, add_special_tokens=False)["input_ids"]) > limit for s in stop):
            raise P.APIError(400, f"a stop string is longer than this server's limit of {limit} tokens", param="stop")

    def _encode(self, prompts: list[Union[str, list[int]]], stop: tuple[str, ...]) -> list[list[int]]:
        """The prompts as token ids, checked (runs on a worker thread)."""
        self._check_stop(stop)
        return [self._prompt_ids(p) for p in prompts]

    def _encode_chat(self, messages: list[dict], stop: tuple[str, ...]) -> list[int]:
        import jinja2

        self._check_stop(stop)
        try:
            ids = self.engine.encode_chat(messages)
        except jinja2.TemplateError as e:  # the template refuses these messages (roles, order): its own words
            raise P.APIError(400, f"the chat template rejected the messages: {e}", param="messages") from e
        return self._check_length(ids, "messages")

    def _prompt_ids(self, prompt: Union[str, list[int]]) -> list[int]:
        if isinstance(prompt, str):
            ids = self.engine.encode(prompt)
        else:
            bad = [t for t in prompt if not 0 <= t < self.vocab]
            if bad:
                raise P.APIError(400, f"token ids out of the vocabulary (0..{self.vocab - 1}): {bad[:5]}", param="prompt")
            ids = list(prompt)
        if not ids:
            bos = self.engine.tok.bos_token_id
            if bos is None:
                raise P.APIError(400, "the prompt is empty and the model has no BOS token to start from", param="prompt")
            ids = [bos]
        return self._check_length(ids)

    def _failed(self, rid: str, error: Optional[BaseException]) -> dict:
        """Log what failed (with the request id) and the body the client gets, which holds no internals."""
        if error is not None:
            log.error("request %s: generation failed: %s: %s", rid, type(error).__name__, error, exc_info=error)
        return P.error_body(f"generation failed (request {rid}); the server's log has the details",
                            type="server_error")

    async def _answer(self, req: Any, prompts: list[list[int]], params, chat: bool):
        n = P.choices_per_prompt(req)
        rows = [Row(ids, dataclasses.replace(params, seed=None if params.seed is None else params.seed + j))
                for ids in prompts for j in range(n)]
        rid, created = P.new_id("chatcmpl" if chat else "cmpl"), P.now()
        prompt_tokens = sum(len(p) for p in prompts)
        events: Optional[asyncio.Queue] = None
        if req.stream:  # the sinks are in place before the rows can start
            loop, events = asyncio.get_running_loop(), asyncio.Queue()
            for i, r in enumerate(rows):  # called on the engine's thread: hand each delta to this loop
                r.sink = lambda delta, finish, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, delta, finish))
        ticket = self._submit(rows)  # a full queue is refused here, before any response starts
        if req.stream:  # the rows go now, whether or not the client reads the stream; their place is freed either way
            task = asyncio.ensure_future(self._wait(rows, ticket))
            task.add_done_callback(lambda _: self._release(ticket))
            return StreamingResponse(self._stream(rows, task, events, rid, created, prompt_tokens, chat,
                                                  bool(req.stream_options and req.stream_options.include_usage)),
                                     media_type="text/event-stream", headers=STREAM_HEADERS)
        try:
            await self._wait(rows, ticket)
        except asyncio.CancelledError:  # the client went away (Serve cancels the request): stop its rows
            for r in rows:
                r.cancelled = True
            raise
        except Exception as e:  # noqa: BLE001 - the batch failed (the model's forward): every request in it
            return JSONResponse(self._failed(rid, e), status_code=500)
        failed = next((r for r in rows if r.error is not None), None)
        if failed is not None:  # a row of this request failed: this request only
            return JSONResponse(self._failed(rid, failed.error), status_code=500)
        use = P.usage(prompt_tokens, sum(r.completion_tokens for r in rows))
        if chat:
            return P.chat_completion(rid, self.name, created,
                                     [P.chat_choice(i, r.text, r.finish_reason) for i, r in enumerate(rows)], use)
        return P.completion(rid, self.name, created,
                            [P.completion_choice(i, r.text, r.finish_reason) for i, r in enumerate(rows)], use)

    def _submit(self, rows: list[Row]) -> Any:
        """Take the request, or refuse it at once with a 503 when ``batch.max_waiting`` requests already wait:
        continuous, the rows are queued in the scheduler now (its ticket); static, a ``Job`` that holds a waiting
        place until its batch starts (``_wait``)."""
        try:
            if self.scheduler is not None:
                return self.scheduler.submit(rows)
            waiting = self._static["waiting"]
            if waiting >= self.cfg.batch.max_waiting:
                self.metrics.rejected()
                raise QueueFull(f"{waiting} requests are waiting for a batch (batch.max_waiting)")
            self._static["waiting"] += 1
            return Job(rows, time.perf_counter())
        except QueueFull as e:
            raise P.APIError(503, f"the server is overloaded ({e}); retry later", type="server_error",
                             code="server_overloaded", headers={"Retry-After": "1"}) from e

    def _unqueue(self, job: Job) -> None:
        """``job`` no longer waits for a batch (its batch started, or it ended without one): free its place."""
        if job.queued:
            job.queued = False
            self._static["waiting"] -= 1

    def _release(self, ticket: Any) -> None:
        if isinstance(ticket, Job):
            self._unqueue(ticket)

    async def _wait(self, rows: list[Row], ticket: Any) -> None:
        """Until every row has ended: the continuous scheduler's ticket, or a static batch."""
        if not isinstance(ticket, Job):
            await self.scheduler.wait(ticket)
            return
        try:
            await self._batch(ticket)
        finally:  # cancelled (its client went away) or failed before its batch took it
            self._unqueue(ticket)

    async def _stream(self, rows: list[Row], task: asyncio.Future, events: asyncio.Queue, rid: str, created: int,
                      prompt_tokens: int, chat: bool, include_usage: bool):
        """Server-sent events of ``rows`` as they decode (``task``: their ``_wait``). A failure (a row of this
        request, or the batch) sends one error event and ends the stream there: no usage chunk, no ``[DONE]``.
        With ``include_usage`` every chunk says ``"usage": null`` and a last one, before ``[DONE]``, has it."""
        task.add_done_callback(lambda t: events.put_nowait(("end", None if t.cancelled() else t.exception(), None)))
        try:
            if chat:
                for i in range(len(rows)):
                    yield _sse(P.chat_chunk(rid, self.name, created, i, {"role": "assistant", "content": ""}, None,
                                            include_usage))
            while True:
                i, delta, finish = await events.get()
                if i == "end":
                    if delta is not None:
                        yield _sse(self._failed(rid, delta))
                        return
                    break
                if finish == "error":
                    yield _sse(self._failed(rid, rows[i].error))
                    return
                if chat:
                    if delta:
                        yield _sse(P.chat_chunk(rid, self.name, created, i, {"content": delta}, None, include_usage))
                    if finish is not None:
                        yield _sse(P.chat_chunk(rid, self.name, created, i, {}, finish, include_usage))
                else:
                    yield _sse(P.completion_chunk(rid, self.name, created, i, delta, finish, include_usage))
            if include_usage:
                yield _sse(P.usage_chunk(rid, self.name, created, "chat.completion.chunk" if chat else "text_completion",
                                         P.usage(prompt_tokens, sum(r.completion_tokens for r in rows))))
            yield _sse("[DONE]")
        finally:  # the client went away, a row failed, or all is done: stop this request's rows at the next step,
            for r in rows:  # and take it off the queue if it still waits there
                r.cancelled = True
            if not task.done():
                task.cancel()

    @staticmethod
    def _new_window() -> dict:
        return {"since": time.monotonic(), "batches": 0, "sequences": 0, "generated_tokens": 0, "busy": 0.0}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=_rows_in)
    async def _batch(self, jobs: list[Job]) -> list[None]:
        """The static scheduler: one batch of requests through ``Engine.run``, to its end."""
        rows = [r for j in jobs for r in j.rows]
        t0 = time.perf_counter()
        for j in jobs:
            j.started = True
            self._unqueue(j)
        self._static["running"] += len(rows)
        try:
            await asyncio.to_thread(self.engine.run, rows)
        except Exception:
            for j in jobs:
                self.metrics.request_done(j.rows, j.t_arrival, "failed")
            raise
        finally:
            self._static["running"] -= len(rows)
        dt = time.perf_counter() - t0
        self.metrics.step(len(rows))
        for j in jobs:
            self.metrics.request_done(j.rows, j.t_arrival, "failed" if any(r.error for r in j.rows) else "ok")
        tokens = sum(r.completion_tokens for r in rows)
        w = self._window
        w["batches"] += 1
        w["sequences"] += len(rows)
        w["generated_tokens"] += tokens
        w["busy"] += dt
        log.debug("batch: %d requests, %d sequences, %d tokens in %.2fs", len(jobs), len(rows), tokens, dt)
        span = time.monotonic() - w["since"]
        if span >= 10:  # one line per 10 s of traffic
            log.info("last %.0fs: %d batches, %.1f sequences per batch, %d tokens, %.1f tokens/s, busy %.0f%%", span,
                     w["batches"], w["sequences"] / w["batches"], w["generated_tokens"], w["generated_tokens"] / span,
                     100 * w["busy"] / span)
            self._window = self._new_window()
        return [None] * len(jobs)


StudentServer = serve.deployment(name="StudentServer")(serve.ingress(api)(Replica))


# ----------------------------------------------------------------------------------------------- starting


def application(cfg: ServeConfig):
    """The bound Serve application for ``cfg`` (replicas or autoscaling, resources per replica, Serve's queue bound
    and graceful shutdown). The API key is read here (``builder_api_key``: refused when the API needs one and has
    none) and bound as each replica's constructor argument; the served name is fixed here too, so every replica
    answers to the same one."""
    key = builder_api_key(cfg)
    d = cfg.deployment
    opts: dict[str, Any] = {"ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus},
                            "max_ongoing_requests": d.max_ongoing_requests,
                            "max_queued_requests": d.max_queued_requests,
                            "backpressure_config": {"status_code": 503, "retry_after_s": 1},
                            "graceful_shutdown_timeout_s": d.graceful_shutdown_timeout_s}
    if d.autoscale.enabled:
        a = d.autoscale
        opts["autoscaling_config"] = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                      "initial_replicas": max(a.min_replicas, 1),
                                      "target_ongoing_requests": a.target_ongoing_requests,
                                      "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s}
    else:
        opts["num_replicas"] = d.replicas
    named = dataclasses.replace(cfg, model_name=cfg.served_name)
    return StudentServer.options(**opts).bind(dataclasses.asdict(named), api_key=key)


def build_app(args: dict):
    """Application builder for ``serve run`` / ``serve deploy`` (``import_path: app.serve.server:build_app``): the
    ``args`` of the config file are a ServeConfig (checked, errors name the key)."""
    from app.config import _build

    return application(_build(ServeConfig, dict(args or {})))


def check_model(reference: str) -> None:
    """Fail here, not in a replica, on a model that cannot be there: a missing path, a directory without
    config.json, a missing GGUF file (FileNotFoundError / ModelLoadError). Hub ids pass (the replica loads them)."""
    from app.models import SMOLLM2, resolve

    if not os.path.exists(reference) and not _HUB_ID.match(reference) and reference != SMOLLM2:
        raise FileNotFoundError(f"model not found: {reference} (a save_pretrained directory, a GGUF file, smollm2 "
                                "or a hub id org/name)")
    resolve(reference)


def start(cfg: ServeConfig) -> str:
    """Start Serve's HTTP proxy on ``cfg.host:cfg.port`` and deploy the model (Ray must be up); returns the API's
    base URL once every replica is ready."""
    check_model(cfg.model)
    app = application(cfg)  # before anything listens: an exposed API without a key is refused here
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(app, name=APP_NAME, route_prefix=cfg.route_prefix, blocking=False)
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}/v1"
