"""Serve hardening (issue 31): a request over the model's context, load shedding of the static scheduler, the
API key on a cluster, OpenAI compatibility, and the serve path in bf16 on CPU. The replica class runs without
Serve here (as tests/test_serve.py's ``replica`` fixture); tests/test_serve.py checks the same over HTTP."""

import asyncio
import json
import logging
import os
import subprocess
import sys
import time

import pytest

from tests.test_serve import ROOT, reference
from tests.tiny_models import WORDS, tiny_gpt2, tiny_hybrid


@pytest.fixture
def make_replica(monkeypatch):
    """Replica(model, scheduler, engine=None, **config) without Serve (``@serve.batch`` asks for a replica context:
    a stand-in), with an optional delay per forward (``step_s``); the API key state is restored after."""
    from types import SimpleNamespace as NS

    import ray.serve

    from app.serve.generate import Engine
    from app.serve.server import Replica, api

    monkeypatch.setattr(Replica._batch.set_max_batch_size.__self__, "_queue", None)
    monkeypatch.setattr(ray.serve, "get_replica_context",
                        lambda: NS(_deployment_config=NS(max_ongoing_requests=64), app_name="t", deployment="d",
                                   replica_id=NS(unique_id="r")))
    made, hooks, saved = [], [], getattr(api.state, "api_key", None)

    def make(model, scheduler="static", engine=None, step_s=0.0, api_key=None, **config):
        from app.models import load_causal_lm

        if engine is None:
            m = load_causal_lm(model)
            engine = Engine(m.model, m.tokenizer)
        if step_s:
            hooks.append(engine.model.register_forward_hook(lambda *a: time.sleep(step_s)))
        batch = {"scheduler": scheduler, "max_batch_size": 8, "max_num_seqs": 8, "batch_wait_timeout_s": 0.02,
                 **config.pop("batch", {})}
        cfg = {"model": model, "model_name": "t", "api_key_env": None, "batch": batch, **config}
        rep = Replica(cfg, engine=engine, api_key=api_key) if api_key is not None else Replica(cfg, engine=engine)
        made.append(rep)
        return rep

    yield make
    for h in hooks:
        h.remove()
    for rep in made:
        if rep.scheduler is not None:
            rep.scheduler.close()
    api.state.api_key = saved


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return tiny_gpt2(str(tmp_path_factory.mktemp("gpt2") / "m"))


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return tiny_hybrid(str(tmp_path_factory.mktemp("hybrid") / "s"), attention=0.5)


def _words(n: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


async def _settle(coro):
    """A route's answer as (status, body): a dict is a 200, a JSONResponse its own, an APIError its status."""
    from fastapi.responses import JSONResponse

    from app.serve import protocol as P

    try:
        out = await coro
    except P.APIError as e:
        return e.status, e.body(), e.headers or {}
    if isinstance(out, JSONResponse):
        return out.status_code, json.loads(out.body), dict(out.headers)
    return 200, out, {}


# ------------------------------------------------------------------------------------------- the context


@pytest.mark.parametrize("scheduler", ["static", "continuous"])
def test_a_request_over_the_models_context_gets_400_and_its_neighbours_200(scheduler, gpt2, make_replica):
    """GPT-2 with 64 positions: a 60-token prompt with max_tokens=40 (100 > 64) is refused before it joins a
    batch (400 context_length_exceeded, with the numbers); two short requests sent with it are served. A request
    that leaves max_tokens out gets what remains of the context; a prompt that fills the context is refused."""
    from app.serve import protocol as P

    rep = make_replica(gpt2, scheduler, limits={"max_tokens": 400})
    long = P.CompletionRequest(model="t", prompt=_words(60), max_tokens=40, temperature=0)
    short = [P.CompletionRequest(model="t", prompt=_words(k), max_tokens=8, temperature=0, ignore_eos=True)
             for k in (3, 5)]

    fits = P.CompletionRequest(model="t", prompt=_words(60), temperature=0, ignore_eos=True)  # default 16
    full = P.CompletionRequest(model="t", prompt=_words(64), max_tokens=1)

    async def go():  # one event loop per replica (``@serve.batch`` binds its queue to the first)
        together = await asyncio.gather(*(_settle(rep.completions(r)) for r in (long, *short)))
        return together, await _settle(rep.completions(fits)), await _settle(rep.completions(full))

    ((s_long, b_long, _), *rest), (s_fit, b_fit, _), (s_full, b_full, _) = asyncio.run(go())
    assert s_long == 400 and b_long["error"]["code"] == "context_length_exceeded", b_long
    assert all(str(n) in b_long["error"]["message"] for n in (64, 60, 40, 100)), b_long
    for status, body, _ in rest:
        assert status == 200 and body["choices"][0]["finish_reason"] == "length", body
        assert body["usage"]["completion_tokens"] == 8
    assert s_fit == 200 and b_fit["usage"] == {"prompt_tokens": 60, "completion_tokens": 4, "total_tokens": 64}
    assert s_full == 400 and b_full["error"]["code"] == "context_length_exceeded"


@pytest.mark.parametrize("scheduler", ["static", "continuous"])
def test_requests_that_fit_alone_are_served_together(scheduler, gpt2, make_replica):
    """GPT-2 with 64 positions: a 50-token prompt with max_tokens=12 and a 3-token prompt with max_tokens=40 each
    fit. A static batch runs every row for its largest max_tokens, so together the first row would reach position
    90: such rows run in generate calls of their own (``context_groups``), and both are served."""
    from app.serve import protocol as P

    rep = make_replica(gpt2, scheduler, limits={"max_tokens": 400})
    reqs = [P.CompletionRequest(model="t", prompt=_words(50), max_tokens=12, temperature=0, ignore_eos=True),
            P.CompletionRequest(model="t", prompt=_words(3), max_tokens=40, temperature=0, ignore_eos=True)]

    async def go():
        return await asyncio.gather(*(_settle(rep.completions(r)) for r in reqs))

    for (status, body, _), want in zip(asyncio.run(go()), (12, 40)):
        assert status == 200 and body["usage"]["completion_tokens"] == want, body


def test_context_groups_keep_every_row_within_the_context():
    from app.serve.generate import Row, SamplingParams, context_groups

    rows = [Row(list(range(p)), SamplingParams(max_tokens=m)) for p, m in
            [(50, 12), (3, 40), (10, 40), (60, 4), (20, 20), (1, 63)]]
    groups = context_groups(rows, 64)
    assert sorted(id(r) for g in groups for r in g) == sorted(id(r) for r in rows)  # each row once
    for g in groups:
        assert all(len(r.prompt_ids) + max(x.params.max_tokens for x in g) <= 64 for r in g)
    assert len(groups) <= 4
    assert context_groups(rows, None) == [rows] and context_groups([], 64) == []


def test_the_context_of_a_model_comes_from_its_config():
    from transformers import BambaConfig, GPT2Config, LlamaConfig, Mamba2Config

    from app.serve.server import model_context

    assert model_context(GPT2Config(n_positions=64)) == 64
    assert model_context(LlamaConfig(max_position_embeddings=512)) == 512
    assert model_context(BambaConfig(max_position_embeddings=1024)) == 1024
    assert model_context(Mamba2Config()) is None  # a pure SSM: no positions, no limit but the server's own


def test_fit_context_refuses_explicit_and_clamps_default_max_tokens():
    from app.serve import protocol as P

    assert P.fit_context(10, 20, explicit=True, context=None) == 20
    assert P.fit_context(10, 20, explicit=True, context=30) == 20
    assert P.fit_context(10, 256, explicit=False, context=30) == 20  # left out: what the context has left
    with pytest.raises(P.APIError) as e:
        P.fit_context(10, 21, explicit=True, context=30)
    assert (e.value.status, e.value.code, e.value.param) == (400, "context_length_exceeded", "max_tokens")
    with pytest.raises(P.APIError) as e:
        P.fit_context(30, 16, explicit=False, context=30, param="messages")  # no room for one token
    assert (e.value.code, e.value.param) == ("context_length_exceeded", "messages")


# ------------------------------------------------------------------------------------------- load shedding


def test_the_static_scheduler_sheds_load_with_503(student, make_replica):
    """One sequence per batch, at most 2 requests waiting for a batch: of 8 slow requests sent at once some are
    refused at once (503 server_overloaded, Retry-After; a stream before it starts), the others are all served,
    and the replica's waiting count returns to 0 (a refused or cancelled request holds no place)."""
    from app.serve import protocol as P

    rep = make_replica(student, "static", step_s=0.02, batch={"max_batch_size": 1, "max_waiting": 2},
                       limits={"max_tokens": 400})
    seen = []

    async def go():
        async def one(i):
            req = P.CompletionRequest(model="t", prompt="the cat", max_tokens=30, temperature=0, ignore_eos=True,
                                      stream=i % 2 == 1)
            status, body, headers = await _settle(rep.completions(req))
            if status == 200 and req.stream:
                body = [c async for c in body.body_iterator]
            return status, body, headers

        async def watch():
            while True:
                seen.append(rep._waiting())
                await asyncio.sleep(0.005)

        w = asyncio.ensure_future(watch())
        try:
            return await asyncio.gather(*(one(i) for i in range(8)))
        finally:
            w.cancel()

    out = asyncio.run(go())
    refused = [(b, h) for s, b, h in out if s == 503]
    assert refused and all(b["error"]["code"] == "server_overloaded" and h.get("Retry-After") for b, h in refused)
    assert all(s in (200, 503) for s, _, _ in out) and len(refused) < 8
    assert max(seen) <= 2 and rep._waiting() == 0 and rep._running() == 0
    assert rep.stats["rejected"] == len(refused)


def test_queue_bound_and_graceful_shutdown_reach_the_deployment():
    from app.config import ConfigError, load_config
    from app.serve.config import ServeConfig
    from app.serve.server import application

    cfg = load_config(ServeConfig, None, ["deployment.max_queued_requests=17",
                                          "deployment.graceful_shutdown_timeout_s=900"])
    dc = application(cfg)._bound_deployment._deployment_config
    assert (dc.max_queued_requests, dc.graceful_shutdown_timeout_s) == (17, 900)
    assert dc.backpressure_config.retry_after_s  # Serve's 503 says when to retry
    default = application(load_config(ServeConfig, None, []))._bound_deployment._deployment_config
    assert default.max_queued_requests > 0 and default.graceful_shutdown_timeout_s >= 300  # bounded, patient
    with pytest.raises(ConfigError, match="deployment.max_queued_requests"):
        load_config(ServeConfig, None, ["deployment.max_queued_requests=0"])


# ------------------------------------------------------------------------------------------- the API key


def test_the_api_key_in_the_drivers_environment_reaches_the_replicas(student, make_replica, monkeypatch):
    """``DISTILLERY_API_KEY=... distillery serve`` on a cluster: the key is read where the app is built and handed
    to each replica with its constructor arguments (its repr hides it), so a replica on a node without the
    variable still requires it."""
    from app.config import load_config
    from app.serve.config import ServeConfig
    from app.serve.server import api, application

    monkeypatch.setenv("DISTILLERY_API_KEY", "sk-driver-only")
    bound = application(load_config(ServeConfig, None, [f"model={student}"]))._bound_deployment
    assert "sk-driver-only" not in repr(bound.init_args) + repr(bound.init_kwargs)
    assert "sk-driver-only" not in json.dumps(bound.ray_actor_options, default=str)  # not in the dashboard
    monkeypatch.delenv("DISTILLERY_API_KEY")  # the replica's node has no such variable
    config, kwargs = bound.init_args[0], bound.init_kwargs
    rep = make_replica(student, "static", **{k: v for k, v in config.items() if k in ("api_key_env",)},
                       api_key=kwargs["api_key"])
    assert rep is not None and api.state.api_key == "sk-driver-only"
    assert _gate_status(None) == 401 and _gate_status("sk-driver-only") == 200


def _gate_status(key):
    from app.serve.server import Gate

    async def ok(scope, receive, send):
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b""})

    sent = []

    async def receive():
        return {"type": "http.request", "body": b"{}", "more_body": False}

    async def send(m):
        sent.append(m)

    headers = [(b"authorization", f"Bearer {key}".encode())] if key else []
    asyncio.run(Gate(ok)({"type": "http", "path": "/v1/models", "headers": headers}, receive, send))
    return sent[0]["status"]


def test_an_api_beyond_loopback_refuses_to_start_without_a_key(student, monkeypatch, tmp_path):
    """--host beyond loopback without a key: the app is not built (serve run/deploy) and `distillery serve` exits 2
    before Ray starts (RAY_ADDRESS points nowhere: nothing could start anyway)."""
    from app.config import load_config
    from app.serve.config import ServeConfig
    from app.serve.server import APIKeyRequired, application, build_app

    monkeypatch.delenv("DISTILLERY_API_KEY", raising=False)
    with pytest.raises(APIKeyRequired, match="0.0.0.0"):
        build_app({"model": student, "host": "0.0.0.0"})
    with pytest.raises(APIKeyRequired, match="require_api_key"):
        application(load_config(ServeConfig, None, [f"model={student}", "require_api_key=true"]))
    monkeypatch.setenv("DISTILLERY_API_KEY", "sk-x")
    assert build_app({"model": student, "host": "0.0.0.0"}) is not None
    (tmp_path / "k").write_text("sk-file\n")  # or a file (here, or mounted where the replicas run)
    monkeypatch.delenv("DISTILLERY_API_KEY")
    assert build_app({"model": student, "host": "10.1.2.3", "api_key_file": str(tmp_path / "k")}) is not None
    env = {k: v for k, v in os.environ.items() if k != "DISTILLERY_API_KEY"}
    env["RAY_ADDRESS"] = "127.0.0.1:1"
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "serve.py"), student, "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=120, cwd=ROOT, env=env)
    assert bad.returncode == 2 and "API key" in bad.stderr, bad.stderr[-2000:]


def test_an_open_api_is_a_warning(student, make_replica):
    from app.serve import server

    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    server.log.addHandler(handler)
    try:
        make_replica(student, "static")
    finally:
        server.log.removeHandler(handler)
    assert any("no API key" in r.getMessage() for r in records if r.levelno == logging.WARNING)


# ------------------------------------------------------------------------------------------- OpenAI shapes


def test_openai_compatibility_of_the_routes(student, make_replica):
    """GET /v1/models/{id}; /v1/models names no path; top_p 0 is greedy; with include_usage every chunk has
    "usage": null but the last, which has the usage; streams say no-cache and no proxy buffering."""
    from app.serve import protocol as P

    rep = make_replica(student, "static")

    async def go():
        listed = await rep.models()
        one = await rep.model("t")
        with pytest.raises(P.APIError) as e:
            await rep.model("other")
        greedy = await rep.completions(P.CompletionRequest(model="t", prompt="the cat", max_tokens=6, temperature=0))
        top0 = await rep.completions(P.CompletionRequest(model="t", prompt="the cat", max_tokens=6, top_p=0,
                                                         temperature=1.0))
        resp = await rep.completions(P.CompletionRequest(model="t", prompt="the cat", max_tokens=6, stream=True,
                                                         stream_options={"include_usage": True}))
        chunks = [c async for c in resp.body_iterator]
        return listed, one, e.value, greedy, top0, resp, chunks

    listed, one, err, greedy, top0, resp, chunks = asyncio.run(go())
    assert [m["id"] for m in listed["data"]] == ["t"] and student not in json.dumps(listed)
    assert "/" not in json.dumps(listed["data"][0].get("root", ""))
    assert one["id"] == "t" and one["object"] == "model" and student not in json.dumps(one)
    assert (err.status, err.code) == (404, "model_not_found")
    assert top0["choices"][0]["text"] == greedy["choices"][0]["text"]
    assert resp.headers["cache-control"] == "no-cache" and resp.headers["x-accel-buffering"] == "no"
    events = [json.loads(c[len("data: "):]) for c in "".join(chunks).strip().split("\n\n") if c != "data: [DONE]"]
    assert all("usage" in e and e["usage"] is None for e in events[:-1]) and len(events) > 1
    assert events[-1]["choices"] == [] and events[-1]["usage"]["completion_tokens"] >= 1


def test_the_served_name_is_never_a_path(tmp_path):
    from app.config import load_config
    from app.serve.config import ServeConfig

    path = tmp_path / "out" / "student"
    path.mkdir(parents=True)
    name = lambda m, *s: load_config(ServeConfig, None, [f"model={m}", *s]).served_name  # noqa: E731
    assert name(str(path)) == "student" and name(str(path) + "/") == "student"
    assert name("HuggingFaceTB/SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M"  # a hub id is its own name
    assert name(str(path), "model_name=mine") == "mine"


# ------------------------------------------------------------------------------------------- bf16 on CPU


@pytest.mark.parametrize("scheduler", ["static", "continuous"])
def test_serving_in_bfloat16_on_cpu_equals_generate_in_bfloat16(scheduler, student, make_replica):
    """The dtype serve picks on CUDA (bf16), forced on CPU: the replica loads the student in bf16 and each of
    three concurrent greedy requests gets what transformers' generate gives in bf16 for its prompt alone."""
    import torch

    from app.models import load_causal_lm
    from app.serve import protocol as P
    from app.serve.generate import Engine

    engine = Engine.load(student, "cpu", "bfloat16")
    assert next(engine.model.parameters()).dtype == torch.bfloat16
    rep = make_replica(student, scheduler, engine=engine, dtype="bfloat16", device="cpu")
    hf = load_causal_lm(student, dtype=torch.bfloat16)
    prompts = ["the quick brown fox", "a cat sat on the mat it was very good day", "dog"]

    async def go():
        return await asyncio.gather(*(rep.completions(P.CompletionRequest(model="t", prompt=p, max_tokens=8,
                                                                          temperature=0)) for p in prompts))

    for p, out in zip(prompts, asyncio.run(go())):
        text, finish, n = reference(hf, list(hf.tokenizer(p)["input_ids"]), 8)
        assert (out["choices"][0]["text"], out["choices"][0]["finish_reason"]) == (text, finish), p
        assert out["usage"]["completion_tokens"] == n


def test_every_prompt_fits_one_prefill_step():
    """continuous: a prompt of limits.max_prompt_tokens must fit batch.max_prefill_tokens (with n rows admitted
    over steps, every prefill is then within the budget); a config where it cannot is refused when it loads."""
    from app.config import ConfigError, load_config
    from app.serve.config import ServeConfig

    with pytest.raises(ConfigError, match="batch.max_prefill_tokens.*max_prompt_tokens"):
        load_config(ServeConfig, None, ["batch.scheduler=continuous", "batch.max_prefill_tokens=1024",
                                        "limits.max_prompt_tokens=2048"])
    load_config(ServeConfig, None, ["batch.scheduler=continuous", "batch.max_prefill_tokens=2048",
                                    "limits.max_prompt_tokens=2048"])
    load_config(ServeConfig, None, ["batch.scheduler=static", "batch.max_prefill_tokens=1024"])  # continuous only


def test_only_the_apps_own_health_path_is_open_without_the_key():
    from app.serve.server import _is_health

    assert _is_health({"path": "/health"}) and _is_health({"path": "/api/health", "root_path": "/api"})
    assert not _is_health({"path": "/v1/models/x/health"})  # a model id ending in /health needs the key
    assert not _is_health({"path": "/api/v1/models/health", "root_path": "/api"})
