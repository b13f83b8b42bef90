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
from tests.tiny_models import tiny_llama, tiny_mamba2

PROMPTS = ["the quick brown fox", "a cat sat on the mat it was very good day", "dog",
           "park with friends of mine who like reading books about history science art music the quick"]
KEY = "sk-test-0123456789"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return tiny_mamba2(str(tmp_path_factory.mktemp("serve") / "student"))


@pytest.fixture(scope="module")
def hf(student):
    from app.models import load_causal_lm

    return load_causal_lm(student)


def reference(hf, ids, max_tokens):
    """transformers' greedy generate for one prompt (no batch, no padding): (text, finish_reason, tokens)."""
    import torch

    out = hf.model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=max_tokens, do_sample=False)
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


@pytest.mark.parametrize("kind", ["mamba2", "llama"])
def test_batched_greedy_equals_generate_one_prompt_at_a_time(kind, tmp_path, student):
    from app.serve.generate import Row, SamplingParams

    ref = student if kind == "mamba2" else tiny_llama(str(tmp_path / "llama"))
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


# ------------------------------------------------------------------------------------------- the server


@pytest.fixture(scope="module")
def serving(ray_local, student, tmp_path_factory):
    """``jobs/serve.py`` (= ``distillery serve``) in a subprocess joined to the test's Ray, as under ``ray job
    submit``: the tiny student on 127.0.0.1 with small limits, the API key from a file (a mounted secret)."""
    root = tmp_path_factory.mktemp("serving")
    (root / "key").write_text(KEY + "\n")
    (port,) = free_ports(1)
    sets = [f"api_key_file={root / 'key'}", "model_name=tiny-student", "deployment.num_cpus=1",
            "deployment.max_ongoing_requests=32", "batch.max_batch_size=8", "batch.batch_wait_timeout_s=0.05",
            "limits.max_prompt_tokens=40", "limits.max_tokens=32", "limits.default_max_tokens=12", "limits.max_n=4",
            "limits.max_body_bytes=4096"]
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    log_path = root / "serve.log"
    proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "jobs", "serve.py"), student, "--port", str(port),
                             *[a for x in sets for a in ("--set", x)]],
                            env=env, stdout=open(log_path, "w"), stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.time() + 240
        while "serving " not in log_path.read_text():
            assert proc.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        yield {"url": f"http://127.0.0.1:{port}/v1", "proc": proc, "log": log_path}
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


def test_models_and_health(server, client):
    import requests

    assert [m.id for m in client.models.list().data] == ["tiny-student"]
    h = requests.get(server[: -len("/v1")] + "/health", timeout=10)  # open: no key
    assert h.status_code == 200 and h.json()["status"] == "ok"


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
    ("/completions", {**OK, "top_p": 0}, KEY, 400, "top_p"),
    ("/completions", {**OK, "n": 5}, KEY, 400, "n"),
    ("/completions", {**OK, "prompt": ["the cat"] * 3, "n": 3}, KEY, 400, "n"),  # 9 sequences > a batch of 8
    ("/completions", {**OK, "stop": ["a", "b", "c", "d", "e"]}, KEY, 400, "stop"),
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


def test_concurrent_requests_are_batched_and_each_gets_its_own_answer(server, hf):
    import random

    import requests
    from openai import AsyncOpenAI

    from tests.tiny_models import WORDS

    rng = random.Random(0)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(64)]
    expected = [reference(hf, list(hf.tokenizer(p)["input_ids"]), 8)[:2] for p in prompts]
    before = requests.get(server[: -len("/v1")] + "/health", timeout=10).json()

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
    assert got == expected
    after = requests.get(server[: -len("/v1")] + "/health", timeout=10).json()
    assert after["sequences"] - before["sequences"] == 64
    assert after["batches"] - before["batches"] < 64 and after["largest_batch"] > 1  # batched, not one by one


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
    with pytest.raises(ConfigError, match="deployment.max_ongoing_requests"):
        load_config(ServeConfig, None, ["batch.max_batch_size=128"])


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
