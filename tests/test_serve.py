"""The OpenAI-compatible server: the batched engine against transformers' own generate, then the Ray Serve
application on 127.0.0.1 through the official openai client and raw HTTP (every error class, concurrency)."""

import asyncio
import os
import signal
import subprocess
import sys
import time

import pytest

from cluster.local import free_ports
from tests.tiny_models import tiny_hybrid, tiny_llama, tiny_mamba2

PROMPTS = ["the quick brown fox", "a cat sat on the mat it was very good day", "dog",
           "park with friends of mine who like reading books about history science art music the quick"]
KEY = "sk-test-0123456789"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """The engine's and the replica's model: a tiny hybrid student keeping half its attention layers (layer 1 of 2)."""
    return tiny_hybrid(str(tmp_path_factory.mktemp("serve") / "student"), attention=0.5)


SERVED = [(0.5, "continuous"), (0, "static")]


@pytest.fixture(scope="module", params=SERVED, ids=[f"hybrid {'1/2' if a else 0}, {s}" for a, s in SERVED])
def served(request, student, tmp_path_factory):
    """The server's model and scheduler: the tiny hybrid student keeping half its attention layers under the
    continuous scheduler, then one with no attention layer left under the static one (every server test runs on
    each: both models and both schedulers over HTTP; tests/test_continuous.py runs the continuous scheduler on
    every model kind, without Serve)."""
    attention, scheduler = request.param
    path = student if attention == 0.5 else tiny_hybrid(str(tmp_path_factory.mktemp("serve0") / "s"), attention=0)
    return {"model": path, "scheduler": scheduler}


@pytest.fixture(scope="module")
def hf(served):
    from app.models import load_causal_lm

    return load_causal_lm(served["model"])


def reference(hf, ids, max_tokens):
    """transformers' greedy generate for one prompt (no batch, no padding): (text, finish_reason, tokens)."""
    import torch

    from app.caches import generation_cache

    out = hf.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=max_tokens, do_sample=False, cache=generation_cache(hf.model))
    gen = out[0, len(ids):].tolist()
    eos = hf.tokenizer.eos_token_id
    finish = "length"
    if eos in gen:
        gen, finish = gen[: gen.index(eos) + 1], "stop"
    dec = lambda t: hf.tokenizer.decode(t, skip_special_tokens=True)  # noqa: E731
    return dec(ids + gen)[len(dec(ids)):], finish, len(gen)


# ------------------------------------------------------------------------------------------- the engine


def _engine(ref):
    from app.models import load_causal_lm
    from app.serve.generate import Engine

    m = load_causal_lm(ref)
    return Engine(m.model, m.tokenizer), m


def test_batched_greedy_equals_generate_one_prompt_at_a_time(student, tmp_path):
    _check_batched_greedy(student)
    _check_batched_greedy(tiny_hybrid(str(tmp_path / "h0"), attention=0))


@pytest.mark.parametrize("kind", ["mamba2", "llama"])
def test_batched_greedy_equals_generate_for_other_models(kind, tmp_path):
    _check_batched_greedy(tiny_mamba2(str(tmp_path / "m")) if kind == "mamba2" else tiny_llama(str(tmp_path / "m")))


def _check_batched_greedy(ref):
    from app.serve.generate import Row, SamplingParams

    eng, m = _engine(ref)
    rows = [Row(eng.encode(p), SamplingParams(max_tokens=12, temperature=0)) for p in PROMPTS]
    shapes = []
    hook = m.model.register_forward_pre_hook(lambda mod, a, kw: shapes.append(tuple(kw["input_ids"].shape)),
                                             with_kwargs=True)
    eng.run(rows)
    hook.remove()
    for p, r in zip(PROMPTS, rows):
        assert (r.text, r.finish_reason, r.completion_tokens) == reference(m, eng.encode(p), 12), p
    # one prefill of the left-padded batch, then one token per row per step: the cache carries the rest
    longest = max(len(r.prompt_ids) for r in rows)
    assert shapes[0] == (len(rows), longest)
    assert set(shapes[1:]) == {(len(rows), 1)} and len(shapes) <= 12


def test_nucleus_matches_transformers_warpers():
    import torch
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    from app.serve.generate import nucleus_probs

    g = torch.Generator().manual_seed(0)
    for t, p in [(1.0, 1.0), (0.7, 0.9), (1.3, 0.5), (0.5, 0.05)]:
        logits = torch.randn(1, 50, generator=g) * 3
        ref = TopPLogitsWarper(p)(None, TemperatureLogitsWarper(t)(None, logits.clone()))
        torch.testing.assert_close(nucleus_probs(logits[0], t, p), torch.softmax(ref[0], -1), rtol=1e-5, atol=1e-7)


def test_sampling_is_seeded_per_row_and_tiny_top_p_is_greedy(student):
    from app.serve.generate import Row, SamplingParams

    eng, _ = _engine(student)
    ids = eng.encode(PROMPTS[0])
    mk = lambda **kw: Row(ids, SamplingParams(max_tokens=10, **kw))  # noqa: E731
    rows = eng.run([mk(temperature=1.0, seed=7), mk(temperature=0), mk(temperature=1.0, seed=7),
                    mk(temperature=1.5, top_p=1e-9, seed=3), mk(temperature=1.0, seed=8)])
    assert rows[0].text == rows[2].text  # same seed, same draw, whatever else is in the batch
    assert rows[3].text == rows[1].text  # a nucleus of one token is the argmax
    alone = eng.run([mk(temperature=1.0, seed=7)])[0]
    assert alone.text == rows[0].text
    assert len({r.text for r in eng.run([mk(temperature=1.0, seed=s) for s in range(6)])}) > 1


def test_eos_ends_a_row_unless_ignore_eos(student):
    import torch

    from app.serve.generate import Row, SamplingParams

    eng, m = _engine(student)
    with torch.no_grad():  # EOS always wins
        m.model.lm_head.bias = torch.nn.Parameter(torch.zeros(m.model.config.vocab_size))
        m.model.lm_head.bias[eng.tok.eos_token_id] = 1e4
    ids = eng.encode(PROMPTS[0])
    stop, go = eng.run([Row(ids, SamplingParams(max_tokens=6, temperature=0)),
                        Row(ids, SamplingParams(max_tokens=6, temperature=0, ignore_eos=True))])
    assert (stop.finish_reason, stop.completion_tokens, stop.text) == ("stop", 1, "")
    assert (go.finish_reason, go.completion_tokens, go.text) == ("length", 6, "")  # EOS is special: no text


def test_stop_strings_are_cut_and_never_streamed(student):
    from app.serve.generate import Row, SamplingParams

    eng, _ = _engine(student)
    full = eng.run([Row(eng.encode(PROMPTS[1]), SamplingParams(max_tokens=12, temperature=0))])[0].text
    words = full.split()
    stop = f"{words[3]} {words[4]}"  # two words: its first word is held back until the second decides
    deltas = []
    r = Row(eng.encode(PROMPTS[1]), SamplingParams(max_tokens=12, temperature=0, stop=("zzz", stop)),
            sink=lambda d, f: deltas.append((d, f)))
    eng.run([r])
    assert r.text == full[: full.index(stop)] and r.finish_reason == "stop"
    assert "".join(d for d, _ in deltas) == r.text and deltas[-1][1] == "stop"
    assert all(f is None for _, f in deltas[:-1])
    assert not any(words[3] in d for d, _ in deltas)  # held back, then dropped with the stop string


def test_a_row_that_fails_ends_alone_and_out_of_range_values_do_not_fail(student):
    """NaN logits for one row (its temperature) end that row with "error"; the rows beside it decode as they would
    alone. A seed past 64 bits is taken modulo 2**63, a temperature of 1e-39 is greedy."""
    from app.serve.generate import Row, SamplingParams

    eng, _ = _engine(student)
    ids = eng.encode(PROMPTS[1])
    mk = lambda **kw: Row(ids, SamplingParams(max_tokens=8, ignore_eos=True, **kw))  # noqa: E731
    alone = [eng.run([mk(temperature=0)])[0].text, eng.run([mk(temperature=1.0, seed=5)])[0].text]
    rows = eng.run([mk(temperature=0), mk(temperature=float("nan")), mk(temperature=1.0, seed=(1 << 63) + 5),
                    mk(temperature=1e-39)])
    assert rows[1].finish_reason == "error" and isinstance(rows[1].error, RuntimeError)
    assert [rows[0].text, rows[2].text, rows[3].text] == [alone[0], alone[1], alone[0]]
    assert all(r.error is None and r.finish_reason == "length" for r in (rows[0], rows[2], rows[3]))


def test_stop_string_hold_back_equals_the_brute_force_scan():
    import random

    from app.serve.generate import Row, RowStopper, SamplingParams

    rnd = random.Random(0)
    for _ in range(400):
        stop = tuple("".join(rnd.choice("ab ") for _ in range(rnd.randint(1, 6))) for _ in range(rnd.randint(1, 4)))
        r = Row([], SamplingParams(stop=stop))
        r._pending = "".join(rnd.choice("ab ") for _ in range(rnd.randint(0, 8)))
        brute = max((k for s in stop for k in range(1, len(s)) if r._pending.endswith(s[:k])), default=0)
        assert RowStopper._hold(r) == brute, (stop, r._pending)


@pytest.fixture(params=["continuous", "static"])
def replica(request, student, monkeypatch):
    """The server's replica class without Serve (``@serve.batch`` asks for a replica context: a stand-in) under
    each scheduler, its engine the tiny student's with a spy on tokenizing, an optional failure of marked rows as
    they start, and an optional delay per forward (``step_s``)."""
    from types import SimpleNamespace as NS

    import ray.serve

    from app.serve.generate import Engine, fail_row
    from app.serve.server import Replica

    # @serve.batch keeps one queue per decorated method, bound to the event loop it started in (a replica has one
    # loop); each test here runs its own loop, so each starts a new queue
    monkeypatch.setattr(Replica._batch.set_max_batch_size.__self__, "_queue", None)
    monkeypatch.setattr(ray.serve, "get_replica_context",
                        lambda: NS(_deployment_config=NS(max_ongoing_requests=32), app_name="t", deployment="d",
                                   replica_id=NS(unique_id="r")))

    class Spy(Engine):
        encoded: list = []  # (thread name) per prompt tokenized
        poison: set = set()  # rows with this first token fail (as a sampling error would)
        step_s: float = 0.0

        def encode(self, text):
            import threading

            Spy.encoded.append(threading.current_thread().name)
            return super().encode(text)

        def start(self, rows):
            super().start(rows)
            for r in rows:
                if r.prompt_ids[:1] and r.prompt_ids[0] in Spy.poison:
                    fail_row(r, RuntimeError("secret internals /etc/passwd"))

    m = _engine(student)[1]
    eng = Spy(m.model, m.tokenizer)
    Spy.encoded, Spy.poison, Spy.step_s = [], set(), 0.0
    def slow(*args):  # returns None: the output stays
        if Spy.step_s:
            time.sleep(Spy.step_s)

    hook = m.model.register_forward_hook(slow)
    rep = Replica({"model": student, "model_name": "t", "api_key_env": None,
                   "batch": {"scheduler": request.param, "max_batch_size": 8, "max_num_seqs": 8,
                             "batch_wait_timeout_s": 0.05}, "limits": {"max_tokens": 400}}, engine=eng)
    yield rep, Spy
    hook.remove()
    if rep.scheduler is not None:
        rep.scheduler.close()


async def _events(resp):
    import json

    out = []
    async for chunk in resp.body_iterator:
        for line in chunk.strip().split("\n\n"):
            data = line[len("data: "):]
            out.append(data if data == "[DONE]" else json.loads(data))
    return out


def test_counts_are_checked_before_tokenizing_which_runs_off_the_event_loop(replica):
    import threading

    from app.serve import protocol as P

    rep, spy = replica

    async def go():
        with pytest.raises(P.APIError) as e:  # 9 prompts x n=1 > a batch of 8: refused before any tokenizing
            await rep.completions(P.CompletionRequest(model="t", prompt=["the cat"] * 9, max_tokens=2))
        assert e.value.param == "n" and spy.encoded == []
        out = await rep.completions(P.CompletionRequest(model="t", prompt=["the cat", "a dog"], max_tokens=2))
        assert len(out["choices"]) == 2
        assert len(spy.encoded) == 2 and threading.current_thread().name not in spy.encoded

    asyncio.run(go())


def test_a_failing_request_ends_alone_with_a_generic_error_and_its_stream_stops_there(replica):
    import json

    from app.serve import protocol as P

    rep, spy = replica
    spy.poison = {rep.engine.encode("dog")[0]}

    async def go():
        good = P.CompletionRequest(model="t", prompt="the cat", max_tokens=4, temperature=0)
        bad = P.CompletionRequest(model="t", prompt="dog park", max_tokens=4, temperature=0)
        bad_stream = P.CompletionRequest(model="t", prompt="dog", max_tokens=4, temperature=0, stream=True,
                                         stream_options={"include_usage": True})
        good_stream = P.CompletionRequest(model="t", prompt="the cat", max_tokens=4, temperature=0, stream=True,
                                          stream_options={"include_usage": True})
        expected = (await rep.completions(good))["choices"][0]["text"]
        spy.step_s = 0.005
        before = dict(rep.stats)

        async def one(req):
            resp = await rep.completions(req)
            return await _events(resp) if req.stream else resp

        ok, fail, s_bad, s_good = await asyncio.gather(*(one(r) for r in (good, bad, bad_stream, good_stream)))
        if rep.scheduler is None:
            assert rep.stats["batches"] - before["batches"] == 1  # all four in one batch
        else:  # the good ones decoded together (the bad ones ended as they started)
            assert rep.stats["largest_batch"] >= 2
        assert ok["choices"][0]["text"] == expected
        assert fail.status_code == 500
        for body in (json.loads(fail.body), s_bad[-1]):
            assert body["error"]["type"] == "server_error" and "secret" not in body["error"]["message"]
            assert "generation failed (request c" in body["error"]["message"]
        assert "[DONE]" not in s_bad and not any("usage" in e for e in s_bad if isinstance(e, dict))
        assert s_good[-1] == "[DONE]" and s_good[-2]["usage"]["completion_tokens"] == 4
        assert "".join(e["choices"][0]["text"] for e in s_good if isinstance(e, dict) and e["choices"]) == expected
        assert rep.stats["failed"] - before["failed"] == 2

    asyncio.run(go())


def test_a_request_cancelled_by_its_client_stops_its_rows(replica):
    """Serve cancels a request whose HTTP client went away (its proxy watches for the disconnect): a non-streamed
    request's rows stop at the next step instead of running on to max_tokens."""
    from app.serve import protocol as P

    rep, spy = replica
    spy.step_s = 0.01

    async def go():
        task = asyncio.ensure_future(rep.completions(P.CompletionRequest(model="t", prompt="the cat", max_tokens=400,
                                                                         ignore_eos=True)))
        await asyncio.sleep(0.5)  # the batch is running
        task.cancel()
        t0 = time.monotonic()
        while rep.stats["sequences"] == 0:
            assert time.monotonic() - t0 < 3, "the rows ran on"
            await asyncio.sleep(0.02)
        assert rep.stats["cancelled"] == 1 and 0 < rep.stats["generated_tokens"] < 200

    asyncio.run(go())


def test_the_gate_counts_streamed_body_bytes_and_hides_internal_errors():
    import json

    from app.serve.server import Gate, api

    async def boom(scope, receive, send):
        body = (await receive())["body"]
        if body == b"raise":
            raise RuntimeError("secret internals")
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"got " + body})

    async def call(chunks):
        msgs = [{"type": "http.request", "body": c, "more_body": i < len(chunks) - 1} for i, c in enumerate(chunks)]
        sent = []

        async def receive():
            return msgs.pop(0) if msgs else {"type": "http.disconnect"}

        async def send(m):
            sent.append(m)

        scope = {"type": "http", "path": "/v1/completions", "headers": [(b"transfer-encoding", b"chunked")]}
        await Gate(boom)(scope, receive, send)
        return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])

    api.state.api_key, api.state.max_body_bytes = None, 100
    try:
        assert asyncio.run(call([b"x" * 60, b"y" * 30])) == (200, b"got " + b"x" * 60 + b"y" * 30)
        status, body = asyncio.run(call([b"x" * 60] * 40))  # chunked: no Content-Length to go by
        assert status == 413 and json.loads(body)["error"]["code"] == "request_too_large"
        status, body = asyncio.run(call([b"raise"]))
        assert status == 500 and b"secret" not in body and json.loads(body)["error"]["type"] == "server_error"
    finally:
        api.state.max_body_bytes = None


# ------------------------------------------------------------------------------------------- the server


def _serve(ray_local, student, root, scheduler):
    """``jobs/serve.py`` (= ``distillery serve``) in a subprocess joined to the test's Ray, as under ``ray job
    submit``: the tiny student on 127.0.0.1 with small limits. The API key: from a file (a mounted secret) for the
    static server; for the continuous one only in the driver's environment (``DISTILLERY_API_KEY=... distillery
    serve``), which the replicas, started by Serve's controller from this session's Ray, do not share."""
    (root / "key").write_text(KEY + "\n")
    (port,) = free_ports(1)
    by_env = scheduler == "continuous"
    sets = [] if by_env else [f"api_key_file={root / 'key'}"]
    sets += ["model_name=tiny-student", "deployment.num_cpus=1",
            "deployment.max_ongoing_requests=32", f"batch.scheduler={scheduler}", "batch.max_num_seqs=8",
            "batch.max_batch_size=8", "batch.batch_wait_timeout_s=0.05",
            "limits.max_prompt_tokens=40", "limits.max_tokens=32", "limits.default_max_tokens=12", "limits.max_n=4",
            "limits.max_body_bytes=4096"]
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    env.pop("DISTILLERY_API_KEY", None)
    if by_env:
        env["DISTILLERY_API_KEY"] = KEY
    log_path = root / "serve.log"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "jobs", "serve.py"), student, "--port", str(port),
                             *[a for x in sets for a in ("--set", x)]],
                            env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    return proc, port, log_path


@pytest.fixture(scope="module")
def serving(ray_local, served, tmp_path_factory):
    proc, port, log_path = _serve(ray_local, served["model"], tmp_path_factory.mktemp("serving"), served["scheduler"])
    try:
        deadline = time.time() + 240
        while "serving " not in log_path.read_text():
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        yield {"url": f"http://127.0.0.1:{port}/v1", "proc": proc, "log": log_path, "scheduler": served["scheduler"]}
    finally:
        if proc.poll() is None:
            proc.kill()
            from ray import serve

            serve.shutdown()


@pytest.fixture(scope="module")
def server(serving):
    return serving["url"]


@pytest.fixture(scope="module")
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=60)


def test_models_and_health(serving, client):
    import requests

    assert [m.id for m in client.models.list().data] == ["tiny-student"]
    h = requests.get(serving["url"][: -len("/v1")] + "/health", timeout=10)  # open: no key
    assert h.status_code == 200 and h.json()["status"] == "ok" and h.json()["scheduler"] == serving["scheduler"]
    assert {"running", "waiting", "tokens_per_s", "ttft_p50_s", "tpot_p50_s"} <= set(h.json())
    root = serving["url"][: -len("/v1")]
    assert requests.get(root + "/metrics", timeout=10).status_code == 401  # behind the key, as the API


def test_openai_compatibility_over_http(serving, client):
    """GET /v1/models/{id} (404 model_not_found for another id); no filesystem path in /v1/models; top_p 0 is
    greedy; a stream says no-cache and no proxy buffering, and with include_usage each chunk has "usage": null."""
    import json

    import requests

    auth = {"Authorization": f"Bearer {KEY}"}
    one = requests.get(serving["url"] + "/models/tiny-student", headers=auth, timeout=10)
    assert one.status_code == 200 and one.json()["id"] == "tiny-student" and one.json()["object"] == "model"
    other = requests.get(serving["url"] + "/models/org/other", headers=auth, timeout=10)
    assert other.status_code == 404 and other.json()["error"]["code"] == "model_not_found"
    assert requests.get(serving["url"] + "/models/tiny-student", timeout=10).status_code == 401
    listed = requests.get(serving["url"] + "/models", headers=auth, timeout=10).text
    assert "/" not in listed, listed  # no path of the student
    greedy = client.completions.create(model="tiny-student", prompt="the cat", max_tokens=6, temperature=0)
    top0 = client.completions.create(model="tiny-student", prompt="the cat", max_tokens=6, temperature=1.5, top_p=0)
    assert top0.choices[0].text == greedy.choices[0].text
    r = requests.post(serving["url"] + "/completions", headers=auth, stream=True, timeout=30,
                      json={**OK, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-cache" and r.headers["x-accel-buffering"] == "no"
    events = [json.loads(x[len("data: "):]) for x in r.text.strip().split("\n\n") if x != "data: [DONE]"]
    assert len(events) > 1 and all(e["usage"] is None for e in events[:-1]) and events[-1]["usage"]["total_tokens"]


def test_completions_greedy_streamed_and_not_equal_generate(client, hf):
    for p in PROMPTS[:3]:
        text, finish, n = reference(hf, list(hf.tokenizer(p)["input_ids"]), 10)
        r = client.completions.create(model="tiny-student", prompt=p, max_tokens=10, temperature=0)
        assert (r.choices[0].text, r.choices[0].finish_reason) == (text, finish)
        assert r.usage.completion_tokens == n and r.usage.prompt_tokens == len(hf.tokenizer(p)["input_ids"])
        chunks = list(client.completions.create(model="tiny-student", prompt=p, max_tokens=10, temperature=0,
                                                stream=True, stream_options={"include_usage": True}))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == finish
        assert chunks[-1].usage.completion_tokens == n


def test_completions_batch_of_prompts_n_and_seed(client):
    r = client.completions.create(model="tiny-student", prompt=PROMPTS[:2], max_tokens=8, temperature=1.0, n=3,
                                  seed=11)
    assert sorted(c.index for c in r.choices) == list(range(6))
    again = client.completions.create(model="tiny-student", prompt=PROMPTS[:2], max_tokens=8, temperature=1.0,
                                      n=3, seed=11)
    assert [c.text for c in again.choices] == [c.text for c in r.choices]
    assert 6 <= r.usage.completion_tokens <= 6 * 8
    assert r.usage.prompt_tokens == sum(len(p.split()) for p in PROMPTS[:2])  # once per prompt, not per choice


def test_chat_completions_streamed_and_not(client, hf):
    msgs = [{"role": "system", "content": "be very good"}, {"role": "user", "content": "the cat sat on the mat"}]
    ids = hf.tokenizer(hf.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                       add_special_tokens=False)["input_ids"]
    text, finish, n = reference(hf, list(ids), 12)  # limits.default_max_tokens
    r = client.chat.completions.create(model="tiny-student", messages=msgs, temperature=0)
    assert r.choices[0].message.role == "assistant"
    assert (r.choices[0].message.content, r.choices[0].finish_reason) == (text, finish)
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (len(ids), n)
    chunks = list(client.chat.completions.create(model="tiny-student", messages=msgs, temperature=0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason == finish


def _post(server, path, body=None, key=KEY, raw=None):
    import requests

    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    return requests.post(server + path, json=body if raw is None else None, data=raw, headers=headers, timeout=30)


OK = {"model": "tiny-student", "prompt": "the quick brown fox", "max_tokens": 4}
CHAT = {"model": "tiny-student", "messages": [{"role": "user", "content": "the cat"}]}


@pytest.mark.parametrize("path,body,key,status,param_or_code", [
    ("/completions", OK, None, 401, "invalid_api_key"),
    ("/completions", OK, "sk-wrong", 401, "invalid_api_key"),
    ("/completions", {**OK, "model": "gpt-4"}, KEY, 404, "model_not_found"),
    ("/completions", {**OK, "max_tokens": 33}, KEY, 400, "max_tokens"),
    ("/completions", {**OK, "max_tokens": 0}, KEY, 400, "max_tokens"),
    ("/completions", {**OK, "temperature": 2.5}, KEY, 400, "temperature"),
    ("/completions", {**OK, "top_p": 1.5}, KEY, 400, "top_p"),
    ("/completions", {**OK, "top_p": -0.1}, KEY, 400, "top_p"),
    ("/completions", {**OK, "n": 5}, KEY, 400, "n"),
    ("/completions", {**OK, "prompt": ["the cat"] * 3, "n": 3}, KEY, 400, "n"),  # 9 sequences > a batch of 8
    ("/completions", {**OK, "stop": ["a", "b", "c", "d", "e"]}, KEY, 400, "stop"),
    ("/completions", {**OK, "stop": ["x" * 257]}, KEY, 400, "stop"),  # limits.max_stop_chars
    ("/completions", {**OK, "stop": ["a " * 100]}, KEY, 400, "stop"),  # 200 characters, 100 tokens > max_stop_tokens
    ("/completions", {**OK, "seed": 1 << 64}, KEY, 400, "seed"),
    ("/completions", {**OK, "logprobs": 2}, KEY, 400, "unsupported_parameter"),
    ("/completions", {**OK, "presence_penalty": 0.5}, KEY, 400, "unsupported_parameter"),
    ("/completions", {**OK, "prompt": " ".join(["dog"] * 41)}, KEY, 400, "context_length_exceeded"),
    ("/completions", {**OK, "prompt": [1, 2, 99999]}, KEY, 400, "prompt"),
    ("/completions", {**OK, "prompt": "x" * 5000}, KEY, 413, "request_too_large"),
    ("/completions", {"model": "tiny-student"}, KEY, 422, "prompt"),
    ("/completions", {**OK, "max_tokens": "many"}, KEY, 422, "max_tokens"),
    ("/completions", "{not json", KEY, 422, "invalid_schema"),
    ("/chat/completions", {**CHAT, "messages": []}, KEY, 422, "messages"),
    ("/chat/completions", {**CHAT, "messages": [{"role": "wizard", "content": "hi"}]}, KEY, 422, "invalid_schema"),
    ("/chat/completions", {**CHAT, "tools": [{"type": "function"}]}, KEY, 400, "unsupported_parameter"),
    ("/nope", OK, KEY, 404, None),
])
def test_bad_requests_get_openai_errors(server, path, body, key, status, param_or_code):
    r = _post(server, path, body if isinstance(body, dict) else None, key=key,
              raw=body if isinstance(body, str) else None)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and err["message"]
    if param_or_code:
        assert param_or_code in (err["param"], err["code"]), err


def test_errors_reach_the_client_and_the_server_carries_on(server, client):
    import openai

    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model="tiny-student", prompt="the cat", max_tokens=1000)
    assert e.value.status_code == 400 and e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server, api_key="wrong", max_retries=0).models.list()
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="other", messages=[{"role": "user", "content": "hi"}])
    assert client.completions.create(model="tiny-student", prompt="the cat", max_tokens=3).choices[0].finish_reason


def test_one_bad_request_does_not_fail_the_others_in_its_batch(server, hf):
    """Six good requests sent together with one whose seed is past 64 bits and one at temperature 1e-39: the seed
    is refused alone (400), the tiny temperature decodes greedily, and the six get their own answers."""
    from concurrent.futures import ThreadPoolExecutor

    bodies = [{**OK, "prompt": p, "max_tokens": 8, "temperature": 0} for p in PROMPTS[:3] * 2]
    bodies += [{**OK, "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 1.0, "seed": 1 << 64},
               {**OK, "prompt": PROMPTS[1], "max_tokens": 8, "temperature": 1e-39}]
    expected = [reference(hf, list(hf.tokenizer(b["prompt"])["input_ids"]), 8)[0] for b in bodies]
    with ThreadPoolExecutor(len(bodies)) as pool:
        got = list(pool.map(lambda b: _post(server, "/completions", b), bodies))
    assert [r.status_code for r in got] == [200] * 6 + [400, 200], [r.text for r in got]
    assert got[6].json()["error"]["param"] == "seed"
    for i in (0, 1, 2, 3, 4, 5, 7):
        assert got[i].json()["choices"][0]["text"] == expected[i]


def test_a_chunked_body_over_the_limit_is_refused_as_it_arrives(server):
    import requests

    body = b'{"model": "tiny-student", "max_tokens": 1, "prompt": "' + b"dog " * 2500 + b'"}'  # 10 kB > 4096

    def chunks():  # a generator body: Transfer-Encoding chunked, no Content-Length
        for i in range(0, len(body), 1000):
            yield body[i:i + 1000]

    r = requests.post(server + "/completions", data=chunks(), timeout=30,
                      headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large", r.text


def _metrics(server) -> dict:
    """The replica's Prometheus text as {(name, labels other than replica): value}."""
    import requests
    from prometheus_client.parser import text_string_to_metric_families

    text = requests.get(server[: -len("/v1")] + "/metrics", headers={"Authorization": f"Bearer {KEY}"},
                        timeout=10).text
    return {(s.name, tuple(sorted((k, v) for k, v in s.labels.items() if k != "replica"))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(serving, hf):
    """64 requests, 16 at once, half streamed: each gets its reference answer; the batches held several rows;
    /metrics counted every request, its first token and its tokens."""
    import random

    import requests
    from openai import AsyncOpenAI

    from tests.tiny_models import WORDS

    server = serving["url"]
    rng = random.Random(0)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(64)]
    expected = [reference(hf, list(hf.tokenizer(p)["input_ids"]), 8) for p in prompts]
    before, m0 = requests.get(server[: -len("/v1")] + "/health", timeout=10).json(), _metrics(server)

    async def run():
        client = AsyncOpenAI(base_url=server, api_key=KEY, max_retries=0, timeout=120)
        gate = asyncio.Semaphore(16)

        async def one(i, p):
            async with gate:
                if i % 2:
                    r = await client.completions.create(model="tiny-student", prompt=p, max_tokens=8, temperature=0)
                    return r.choices[0].text, r.choices[0].finish_reason
                text, finish = "", None
                async for c in await client.completions.create(model="tiny-student", prompt=p, max_tokens=8,
                                                               temperature=0, stream=True):
                    text += c.choices[0].text
                    finish = c.choices[0].finish_reason or finish
                return text, finish

        try:
            return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))
        finally:
            await client.close()

    got = asyncio.run(run())
    assert got == [e[:2] for e in expected]
    after, m1 = requests.get(server[: -len("/v1")] + "/health", timeout=10).json(), _metrics(server)
    assert after["sequences"] - before["sequences"] == 64 and after["largest_batch"] > 1  # batched, not one by one
    if serving["scheduler"] == "static":
        assert after["batches"] - before["batches"] < 64
    else:  # requests joined running batches: fewer prefills than requests, more rows per step than one
        assert after["prefills"] - before["prefills"] < 64
        assert after["row_steps"] - before["row_steps"] > 1.5 * (after["batches"] - before["batches"])
    assert (after["running"], after["waiting"]) == (0, 0)
    delta = lambda key: m1.get(key, 0) - m0.get(key, 0)  # noqa: E731
    assert delta(("distillery_requests_total", (("outcome", "ok"),))) == 64
    assert delta(("distillery_time_to_first_token_seconds_count", ())) == 64
    assert delta(("distillery_generated_tokens_total", ())) == sum(e[2] for e in expected)


# ------------------------------------------------------------------------------------------- configs and the CLI


def test_serve_configs_are_valid():
    from pathlib import Path

    import yaml
    from ray.serve.schema import ServeDeploySchema

    from app.config import _build
    from app.serve.config import ServeConfig
    from app.serve.server import build_app

    root = Path(__file__).resolve().parents[1]
    data = yaml.safe_load((root / "cluster" / "serve.yaml").read_text())
    schema = ServeDeploySchema.model_validate(data) if hasattr(ServeDeploySchema, "model_validate") \
        else ServeDeploySchema.parse_obj(data)
    (app,) = schema.applications
    assert app.import_path == "app.serve.server:build_app"
    cfg = _build(ServeConfig, app.args)
    assert (data["http_options"]["host"], data["http_options"]["port"]) == (cfg.host, cfg.port)
    assert cfg.api_key_env and "key" not in {k.lower() for k in app.args if k not in ("api_key_env", "require_api_key")}
    assert build_app(app.args) is not None


def test_replicas_autoscaling_and_resources_reach_the_deployment():
    from app.config import ConfigError, load_config
    from app.serve.config import ServeConfig
    from app.serve.server import application

    fixed = application(load_config(ServeConfig, None, ["deployment.replicas=3"]))._bound_deployment
    assert fixed.num_replicas == 3 and fixed._deployment_config.autoscaling_config is None
    auto = application(load_config(ServeConfig, None, [
        "deployment.autoscale.enabled=true", "deployment.autoscale.max_replicas=6", "deployment.num_gpus=0.5",
        "deployment.max_ongoing_requests=40", "batch.max_batch_size=40"]))._bound_deployment
    a = auto._deployment_config.autoscaling_config
    assert (a.min_replicas, a.max_replicas, a.target_ongoing_requests) == (1, 6, 16.0)
    assert auto.ray_actor_options == {"num_cpus": 1.0, "num_gpus": 0.5} and auto.max_ongoing_requests == 40
    with pytest.raises(ConfigError, match="deployment.max_ongoing_requests.*batch.max_num_seqs"):
        load_config(ServeConfig, None, ["batch.scheduler=continuous", "batch.max_num_seqs=256"])
    with pytest.raises(ConfigError, match="deployment.max_ongoing_requests.*batch.max_batch_size"):
        load_config(ServeConfig, None, ["batch.max_batch_size=256"])  # static, the default
    load_config(ServeConfig, None, ["batch.scheduler=continuous", "batch.max_batch_size=256"])  # static's only


def test_a_missing_model_fails_before_ray_starts(tmp_path):
    bad = subprocess.run([sys.executable, os.path.join(ROOT, "jobs", "serve.py"), str(tmp_path / "no" / "model")],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert bad.returncode == 2 and "model not found" in bad.stderr


def test_api_key_from_env_or_file(tmp_path, monkeypatch):
    from app.config import load_config
    from app.serve.config import ServeConfig
    from app.serve.server import read_api_key

    cfg = load_config(ServeConfig, None, [])
    monkeypatch.delenv("DISTILLERY_API_KEY", raising=False)
    assert read_api_key(cfg) is None  # no key: the API is open (on 127.0.0.1 by default)
    monkeypatch.setenv("DISTILLERY_API_KEY", " sk-env \n")
    assert read_api_key(cfg) == "sk-env"
    (tmp_path / "k").write_text("sk-file\n")
    assert read_api_key(load_config(ServeConfig, None, [f"api_key_file={tmp_path / 'k'}"])) == "sk-file"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        read_api_key(load_config(ServeConfig, None, [f"api_key_file={tmp_path / 'empty'}"]))


def test_sigterm_stops_the_server_and_serve(serving):
    """Last of the server tests: ``ray job stop`` / kill end ``distillery serve`` as Ctrl-C does (exit 0, Serve down)."""
    import requests

    serving["proc"].send_signal(signal.SIGTERM)
    assert serving["proc"].wait(timeout=90) == 0, serving["log"].read_text()[-3000:]
    with pytest.raises(requests.ConnectionError):
        requests.get(serving["url"][: -len("/v1")] + "/health", timeout=5)
