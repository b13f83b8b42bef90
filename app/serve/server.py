"""The OpenAI-compatible HTTP server: a Ray Serve deployment with a FastAPI ingress.

    POST /v1/completions        POST /v1/chat/completions   (both: ``"stream": true`` for server-sent events)
    GET  /v1/models             GET  /health

Requests are batched dynamically (``@serve.batch``; size and wait from ``batch``): one batch's rows (requests x n)
are decoded together by ``generate.Engine`` and each request gets its rows back, or its text as it comes.
Errors are OpenAI-shaped (``{"error": {"message", "type", "param", "code"}}``): 400 a value the server cannot
honour, 401 a missing or wrong API key, 404 an unknown model or route, 413 a body over ``limits.max_body_bytes``,
422 a body that does not fit the schema, 500 a failure while generating; the replica carries on after each.

Start it with ``distillery serve MODEL`` (``start`` below), ``serve run cluster/serve.yaml`` (``build_app``) or
``ray job submit -- python jobs/serve.py``.
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
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException

from app.serve import protocol as P
from app.serve.config import ServeConfig
from app.serve.generate import Engine, Row

log = logging.getLogger(f"ray.serve.{__name__}")  # under Serve's logger: the lines land in the replica's log

APP_NAME = "distillery"
_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")
api = FastAPI(title="Distillery", description="OpenAI-compatible inference for distilled students",
              docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(P.APIError)
async def _api_error(request: Request, exc: P.APIError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status)


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


@api.middleware("http")
async def _gate(request: Request, call_next):
    """The API key (every path but /health) and the body size, before the body is read or parsed."""
    state = request.app.state
    if not request.url.path.rstrip("/").endswith("/health") and getattr(state, "api_key", None):
        auth = request.headers.get("authorization", "")
        given = auth[7:].strip() if auth[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(given.encode(), state.api_key.encode()):
            return JSONResponse(P.error_body("Incorrect or missing API key (Authorization: Bearer ...)",
                                             code="invalid_api_key"), status_code=401)
    size = request.headers.get("content-length")
    limit = getattr(state, "max_body_bytes", None)
    if limit and size and size.isdigit() and int(size) > limit:
        return JSONResponse(P.error_body(f"request body of {size} bytes is over the limit of {limit}",
                                         code="request_too_large"), status_code=413)
    try:
        return await call_next(request)
    except Exception as e:  # noqa: BLE001 - the replica answers and carries on
        log.exception("request failed")
        return JSONResponse(P.error_body(f"internal error: {type(e).__name__}: {e}", type="server_error"),
                            status_code=500)


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


@dataclass
class Job:
    """One request's rows, as one item of a batch."""

    rows: list[Row]


def _rows_in(jobs: list[Job]) -> int:
    return sum(len(j.rows) for j in jobs)


def _sse(obj: Union[dict, str]) -> str:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n"


@serve.deployment(name="StudentServer")
@serve.ingress(api)
class StudentServer:
    """One replica: the model loaded once, requests batched into ``Engine.run`` on a worker thread."""

    def __init__(self, config: dict):
        from app.config import _build

        self.cfg: ServeConfig = _build(ServeConfig, config)
        key = read_api_key(self.cfg)
        if self.cfg.require_api_key and not key:
            raise RuntimeError(f"require_api_key is set but no key was found (api_key_file "
                               f"{self.cfg.api_key_file!r}, environment variable {self.cfg.api_key_env!r})")
        api.state.api_key = key
        api.state.max_body_bytes = self.cfg.limits.max_body_bytes
        self.engine = Engine.load(self.cfg.model, self.cfg.device, self.cfg.dtype)
        self.name = self.cfg.served_name
        self.created = int(time.time())
        # ids a prompt may hold: known to the tokenizer and inside the embedding (either may be padded)
        self.vocab = min(len(self.engine.tok), self.engine.model.get_input_embeddings().num_embeddings)
        self.stats = {"batches": 0, "sequences": 0, "largest_batch": 0, "generated_tokens": 0}
        self._window = self._new_window()
        self._batch.set_max_batch_size(self.cfg.batch.max_batch_size)
        self._batch.set_batch_wait_timeout_s(self.cfg.batch.batch_wait_timeout_s)
        log.info("serving %s as %r on %s (batch %d, wait %.3fs, api key %s)", self.cfg.model, self.name,
                 self.engine.device, self.cfg.batch.max_batch_size, self.cfg.batch.batch_wait_timeout_s,
                 "on" if key else "off")

    # -- routes

    @api.get("/health")
    async def health(self) -> dict:
        """Liveness, and this replica's batching so far (batches run, sequences in them, the largest)."""
        return {"status": "ok", "model": self.name, **self.stats}

    @api.get("/v1/models")
    async def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": self.created,
                                            "owned_by": "distillery", "root": self.cfg.model,
                                            "max_prompt_tokens": self.cfg.limits.max_prompt_tokens}]}

    @api.post("/v1/completions")
    async def completions(self, req: P.CompletionRequest):
        self._check_model(req.model)
        P.check_completion(req)
        params = P.sampling(req, self.cfg.limits, min(16, self.cfg.limits.max_tokens), req.max_tokens)
        prompts = [self._prompt_ids(p) for p in P.completion_prompts(req)]
        return await self._answer(req, prompts, params, chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, req: P.ChatCompletionRequest):
        self._check_model(req.model)
        P.check_chat(req)
        if not self.engine.has_chat_template:
            raise P.APIError(400, f"model {self.name} has no chat template: use /v1/completions", param="messages",
                             code="no_chat_template")
        params = P.sampling(req, self.cfg.limits, min(self.cfg.limits.default_max_tokens, self.cfg.limits.max_tokens),
                            req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens)
        try:
            ids = self.engine.encode_chat(P.chat_messages(req))
        except Exception as e:  # noqa: BLE001 - a template that rejects these messages (roles, order)
            raise P.APIError(400, f"the chat template rejected the messages: {e}", param="messages") from e
        return await self._answer(req, [self._check_length(ids, "messages")], params, chat=True)

    # -- helpers

    def _check_model(self, model: str) -> None:
        if model != self.name:
            raise P.APIError(404, f"the model '{model}' does not exist; this server has '{self.name}'",
                             param="model", code="model_not_found", type="not_found_error")

    def _check_length(self, ids: list[int], param: str = "prompt") -> list[int]:
        limit = self.cfg.limits.max_prompt_tokens
        if len(ids) > limit:
            raise P.APIError(400, f"the prompt has {len(ids)} tokens, over this server's limit of {limit}",
                             param=param, code="context_length_exceeded")
        return ids

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

    async def _answer(self, req: Any, prompts: list[list[int]], params, chat: bool):
        n = P.choices_per_prompt(req)
        if len(prompts) * n > self.cfg.batch.max_batch_size:
            raise P.APIError(400, f"{len(prompts)} prompts x n={n} sequences is more than a batch holds "
                                  f"({self.cfg.batch.max_batch_size})", param="n")
        rows = [Row(ids, dataclasses.replace(params, seed=None if params.seed is None else params.seed + j))
                for ids in prompts for j in range(n)]
        rid, created = P.new_id("chatcmpl" if chat else "cmpl"), P.now()
        prompt_tokens = sum(len(p) for p in prompts)
        if req.stream:
            return StreamingResponse(self._stream(rows, rid, created, prompt_tokens, chat,
                                                  bool(req.stream_options and req.stream_options.include_usage)),
                                     media_type="text/event-stream")
        try:
            await self._batch(Job(rows))
        except Exception as e:  # noqa: BLE001 - the error goes to the client; the replica carries on
            log.exception("generation failed")
            raise P.APIError(500, f"generation failed: {type(e).__name__}: {e}", type="server_error") from e
        use = P.usage(prompt_tokens, sum(r.completion_tokens for r in rows))
        if chat:
            return P.chat_completion(rid, self.name, created,
                                     [P.chat_choice(i, r.text, r.finish_reason) for i, r in enumerate(rows)], use)
        return P.completion(rid, self.name, created,
                            [P.completion_choice(i, r.text, r.finish_reason) for i, r in enumerate(rows)], use)

    async def _stream(self, rows: list[Row], rid: str, created: int, prompt_tokens: int, chat: bool,
                      include_usage: bool):
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        for i, r in enumerate(rows):  # called on the engine's thread: hand each delta to this loop
            r.sink = lambda delta, finish, i=i: loop.call_soon_threadsafe(events.put_nowait, (i, delta, finish))
        task = asyncio.ensure_future(self._batch(Job(rows)))
        task.add_done_callback(lambda t: events.put_nowait(("end", None if t.cancelled() else t.exception(), None)))
        try:
            if chat:
                for i in range(len(rows)):
                    yield _sse(P.chat_chunk(rid, self.name, created, i, {"role": "assistant", "content": ""}, None))
            while True:
                i, delta, finish = await events.get()
                if i == "end":
                    if delta is not None:
                        log.error("generation failed: %r", delta)
                        yield _sse(P.error_body(f"generation failed: {type(delta).__name__}: {delta}", type="server_error"))
                    break
                if chat:
                    if delta:
                        yield _sse(P.chat_chunk(rid, self.name, created, i, {"content": delta}, None))
                    if finish is not None:
                        yield _sse(P.chat_chunk(rid, self.name, created, i, {}, finish))
                else:
                    yield _sse(P.completion_chunk(rid, self.name, created, i, delta, finish))
            if include_usage:
                yield _sse(P.usage_chunk(rid, self.name, created, "chat.completion.chunk" if chat else "text_completion",
                                         P.usage(prompt_tokens, sum(r.completion_tokens for r in rows))))
            yield _sse("[DONE]")
        finally:  # the client went away (or all is done): stop its rows at the next step
            for r in rows:
                r.cancelled = True

    @staticmethod
    def _new_window() -> dict:
        return {"since": time.monotonic(), "batches": 0, "sequences": 0, "generated_tokens": 0, "busy": 0.0}

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.01, batch_size_fn=_rows_in)
    async def _batch(self, jobs: list[Job]) -> list[None]:
        rows = [r for j in jobs for r in j.rows]
        t0 = time.perf_counter()
        await asyncio.to_thread(self.engine.run, rows)
        dt = time.perf_counter() - t0
        tokens = sum(r.completion_tokens for r in rows)
        for d in (self.stats, self._window):
            d["batches"] += 1
            d["sequences"] += len(rows)
            d["generated_tokens"] += tokens
        self.stats["largest_batch"] = max(self.stats["largest_batch"], len(rows))
        w = self._window
        w["busy"] += dt
        log.debug("batch: %d requests, %d sequences, %d tokens in %.2fs", len(jobs), len(rows), tokens, dt)
        span = time.monotonic() - w["since"]
        if span >= 10:  # one line per 10 s of traffic
            log.info("last %.0fs: %d batches, %.1f sequences per batch, %d tokens, %.1f tokens/s, busy %.0f%%", span,
                     w["batches"], w["sequences"] / w["batches"], w["generated_tokens"], w["generated_tokens"] / span,
                     100 * w["busy"] / span)
            self._window = self._new_window()
        return [None] * len(jobs)


# ----------------------------------------------------------------------------------------------- starting


def application(cfg: ServeConfig):
    """The bound Serve application for ``cfg`` (replicas or autoscaling, resources per replica)."""
    d = cfg.deployment
    opts: dict[str, Any] = {"ray_actor_options": {"num_cpus": d.num_cpus, "num_gpus": d.num_gpus},
                            "max_ongoing_requests": d.max_ongoing_requests}
    if d.autoscale.enabled:
        a = d.autoscale
        opts["autoscaling_config"] = {"min_replicas": a.min_replicas, "max_replicas": a.max_replicas,
                                      "initial_replicas": max(a.min_replicas, 1),
                                      "target_ongoing_requests": a.target_ongoing_requests,
                                      "upscale_delay_s": a.upscale_delay_s, "downscale_delay_s": a.downscale_delay_s}
    else:
        opts["num_replicas"] = d.replicas
    return StudentServer.options(**opts).bind(dataclasses.asdict(cfg))


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
    serve.start(http_options={"host": cfg.host, "port": cfg.port})
    serve.run(application(cfg), name=APP_NAME, route_prefix=cfg.route_prefix, blocking=False)
    return f"http://{cfg.host}:{cfg.port}{cfg.route_prefix.rstrip('/')}/v1"
