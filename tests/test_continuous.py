"""Continuous batching (app/serve/scheduler.py, app/serve/batching.py) on tiny Mamba-2 and hybrid students: rows
that join a running batch at different steps decode to what each would alone, sampled rows keep their own draws,
a row that fails or whose client leaves ends alone and frees its place, a full queue refuses at once."""

import asyncio
import random
import time

import pytest

from tests.test_serve import reference
from tests.tiny_models import WORDS, tiny_hybrid, tiny_llama, tiny_mamba2

# the students, and a plain attention model (its cache holds only keys and values)
MODELS = {"mamba2": lambda p: tiny_mamba2(p), "hybrid 1/2": lambda p: tiny_hybrid(p, attention=0.5),
          "hybrid 0": lambda p: tiny_hybrid(p, attention=0), "llama": lambda p: tiny_llama(p)}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request, tmp_path_factory):
    from app.models import load_causal_lm

    return load_causal_lm(MODELS[request.param](str(tmp_path_factory.mktemp("cb") / "m")))


def _scheduler(m, **kw):
    from app.serve.generate import Engine
    from app.serve.metrics import ServeMetrics
    from app.serve.scheduler import ContinuousScheduler

    eng = Engine(m.model, m.tokenizer)
    box = {}
    metrics = ServeMetrics("t", lambda: box["s"].running, lambda: box["s"].waiting)
    kw = {"max_num_seqs": 6, "max_prefill_tokens": 64, "max_waiting": 64, **kw}
    box["s"] = ContinuousScheduler(eng, metrics=metrics, **kw)
    return box["s"]


class Forwards:
    """Records the (B, T) of every forward of the model and sleeps ``delay`` in each (steps that take time)."""

    def __init__(self, model, delay: float = 0.0):
        self.shapes, self.delay = [], delay
        self.hook = model.register_forward_pre_hook(self._pre, with_kwargs=True)

    def _pre(self, mod, args, kwargs):
        self.shapes.append(tuple(kwargs["input_ids"].shape))
        if self.delay:
            time.sleep(self.delay)

    def joins(self) -> int:
        """Prefills whose rows then decoded beside rows that were already running (the next decode is larger)."""
        n = 0
        for i, (b, t) in enumerate(self.shapes):
            if t > 1:
                nxt = next((s for s in self.shapes[i + 1:] if s[1] == 1), None)
                n += nxt is not None and nxt[0] > b
        return n

    def remove(self):
        self.hook.remove()


def _run(sch, jobs):
    """Submit ``jobs`` [(delay_s, rows)] from one event loop, each after its delay; wait for all."""
    async def go():
        async def one(delay, rows):
            await asyncio.sleep(delay)
            await sch.generate(rows)
        await asyncio.gather(*(one(d, rows) for d, rows in jobs))
    asyncio.run(go())


def test_rows_joining_a_running_batch_equal_their_own_generate(model):
    """Greedy requests arriving while others decode (prompts of 1 to 30 tokens, 1 to 12 new tokens, one with
    n=2, one long prompt that ends after 2 tokens so the KV columns it alone used are cut) each equal
    ``model.generate`` on their prompt alone."""
    from app.serve.generate import Row, SamplingParams

    sch = _scheduler(model)
    rng = random.Random(1)
    prompts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12))) for _ in range(14)]
    prompts[3] = " ".join(rng.choice(WORDS) for _ in range(30))
    lengths = [rng.randint(1, 12) for _ in prompts]
    lengths[3] = 2
    jobs, rows = [], []
    for i, (p, n) in enumerate(zip(prompts, lengths)):
        req = [Row(sch.engine.encode(p), SamplingParams(max_tokens=n, temperature=0))
               for _ in range(2 if i == 5 else 1)]
        rows.append(req)
        jobs.append((0.012 * i, req))
    fw = Forwards(model.model, delay=0.004)
    try:
        _run(sch, jobs)
    finally:
        fw.remove()
        sch.close()
    for p, n, req in zip(prompts, lengths, rows):
        ref = reference(model, sch.engine.encode(p), n)
        for r in req:
            assert (r.text, r.finish_reason, r.completion_tokens) == ref, p
    assert fw.joins() >= 3, fw.shapes  # rows did join running batches
    assert max(b for b, t in fw.shapes if t == 1) >= 3
    assert sch.metrics.counts["sequences"] == 15 and (sch.running, sch.waiting) == (0, 0)


def test_a_seeded_sampled_row_draws_the_same_whatever_runs_beside_it(model):
    from app.serve.generate import Row, SamplingParams

    sch = _scheduler(model)
    ids = sch.engine.encode("the cat sat on the mat")
    mk = lambda **kw: Row(ids, SamplingParams(max_tokens=10, ignore_eos=True, **kw))  # noqa: E731
    try:
        alone = mk(temperature=1.0, top_p=0.9, seed=42)
        _run(sch, [(0, [alone])])
        crowd = [mk(temperature=1.0, seed=s) for s in range(6)] + [mk(temperature=0) for _ in range(3)]
        again = mk(temperature=1.0, top_p=0.9, seed=42)
        jobs = [(0.004 * i, [r]) for i, r in enumerate(crowd[:5])] + [(0.01, [again])]
        jobs += [(0.02 + 0.004 * i, [r]) for i, r in enumerate(crowd[5:])]
        _run(sch, jobs)
    finally:
        sch.close()
    static = sch.engine.run([mk(temperature=1.0, top_p=0.9, seed=42)])[0]
    assert again.token_ids == alone.token_ids == static.token_ids  # and the static engine draws the same
    assert len({tuple(r.token_ids) for r in crowd[:6]}) > 1


def test_a_failing_row_ends_alone_and_a_cancelled_one_frees_its_place(model):
    """NaN logits for one row (its temperature) end it with "error" while the rows beside it decode as alone; with
    one place, a row whose client went away (its wait cancelled) ends "cancelled" at the next step and the request
    waiting behind it is admitted."""
    from app.serve.generate import Row, SamplingParams

    sch = _scheduler(model)
    ids = sch.engine.encode("a dog in the park")
    mk = lambda n=8, **kw: Row(ids, SamplingParams(max_tokens=n, ignore_eos=True, **kw))  # noqa: E731
    try:
        good, bad, seeded = mk(temperature=0), mk(temperature=float("nan")), mk(temperature=1.0, seed=5)
        _run(sch, [(0, [good, bad]), (0, [seeded])])
        assert bad.finish_reason == "error" and isinstance(bad.error, RuntimeError)
        assert good.text == sch.engine.run([mk(temperature=0)])[0].text
        assert seeded.text == sch.engine.run([mk(temperature=1.0, seed=5)])[0].text
        assert sch.metrics.counts["failed"] == 1
    finally:
        sch.close()

    sch = _scheduler(model, max_num_seqs=1)
    fw = Forwards(model.model, delay=0.005)
    long, nxt = mk(n=400), mk(n=4, temperature=0)

    async def go():
        task = asyncio.ensure_future(sch.generate([long]))
        await asyncio.sleep(0.15)
        follow = asyncio.ensure_future(sch.generate([nxt]))
        await asyncio.sleep(0.05)
        assert (sch.running, sch.waiting) == (1, 1)  # no place for it yet
        task.cancel()
        t0 = time.monotonic()
        await asyncio.wait_for(follow, 5)
        return time.monotonic() - t0
    try:
        waited = asyncio.run(go())
    finally:
        fw.remove()
        sch.close()
    assert long.finish_reason == "cancelled" and 0 < long.completion_tokens < 200
    assert nxt.finish_reason == "length" and waited < 2
    assert nxt.text == sch.engine.run([mk(n=4, temperature=0)])[0].text


def test_a_full_queue_is_refused_at_once_with_a_503_and_serving_goes_on(model):
    import json

    from app.serve import protocol as P
    from app.serve.server import Replica, _api_error

    rep = Replica({"model": "unused", "model_name": "t", "api_key_env": None,
                   "batch": {"scheduler": "continuous", "max_num_seqs": 1, "max_waiting": 1},
                   "limits": {"max_tokens": 400}},
                  engine=_scheduler(model).engine)
    fw = Forwards(model.model, delay=0.005)
    req = lambda n: P.CompletionRequest(model="t", prompt="the cat", max_tokens=n, temperature=0,  # noqa: E731
                                        ignore_eos=True)

    async def go():
        first = asyncio.ensure_future(rep.completions(req(60)))
        await asyncio.sleep(0.1)
        second = asyncio.ensure_future(rep.completions(req(2)))
        await asyncio.sleep(0.05)
        with pytest.raises(P.APIError) as e:
            await rep.completions(req(2))
        out = [await first, await second, await rep.completions(req(3))]
        return e.value, out
    try:
        err, out = asyncio.run(go())
    finally:
        fw.remove()
        rep.scheduler.close()
    resp = asyncio.run(_api_error(None, err))
    assert resp.status_code == 503 and resp.headers["retry-after"] == "1"
    body = json.loads(resp.body)["error"]
    assert (body["type"], body["code"]) == ("server_error", "server_overloaded")
    assert [o["usage"]["completion_tokens"] for o in out] == [60, 2, 3]
    assert rep.stats["rejected"] == 1 and rep.stats["requests"] == 3


def test_batch_logits_equal_a_forward_over_each_row_alone(model):
    """The cache surgery against the plainest reference: at every step (prefill, rows merged at different steps,
    the oldest and longest row retired, the KV columns it alone used cut), each row's logits equal one forward of
    the model over that row's whole sequence, without cache or padding."""
    import torch

    from app.serve.batching import check_supported, decode, merge, prefill
    from app.serve.generate import Row, SamplingParams

    m, tok = model.model, model.tokenizer
    attention = check_supported(m)
    seqs = {}

    def rows(*prompts):
        out = [Row(tok(p)["input_ids"], SamplingParams()) for p in prompts]
        for r in out:
            seqs[id(r)] = list(r.prompt_ids)
        return out

    def check(batch, logits):
        for i, r in enumerate(batch.rows):
            ref = m(input_ids=torch.tensor([seqs[id(r)]])).logits[0, -1].float()
            torch.testing.assert_close(logits[i], ref, rtol=1e-4, atol=1e-4)

    def feed(batch, step):  # the next token of every row: fixed, not sampled, so that rows stay apart
        nxt = [(7 * step + 3 * i) % (len(tok) - 4) + 4 for i in range(len(batch))]
        for r, t in zip(batch.rows, nxt):
            seqs[id(r)].append(t)
        batch.last = torch.tensor(nxt)

    with torch.inference_mode():
        a, logits = prefill(m, rows(" ".join(WORDS[:14]), "the cat"), 0, attention)
        check(a, logits)
        for step in range(3):
            feed(a, step)
            check(a, decode(m, a))
        b, logits = prefill(m, rows("a dog in the park", "sun"), 0, attention)
        check(b, logits)
        feed(a, 3)
        feed(b, 9)
        batch = merge(a, b)
        for step in range(4, 7):
            check(batch, decode(m, batch))
            feed(batch, step)
        width = None if batch.mask is None else batch.mask.shape[1]
        batch.keep([3, 1, 2])  # the long first row retires; the others change places
        if width is not None:
            assert batch.mask.shape[1] < width  # the columns only it used are gone
        for step in range(7, 10):
            check(batch, decode(m, batch))
            feed(batch, step)


def test_a_stream_whose_client_leaves_frees_its_place_for_the_next_request(model):
    """Through the replica (no Serve): with one place, a streamed request read for two events and then dropped
    (Starlette closes the body iterator when the client disconnects) ends "cancelled", and the request waiting
    behind it gets the place and its answer."""
    from app.serve import protocol as P
    from app.serve.server import Replica

    rep = Replica({"model": "unused", "model_name": "t", "api_key_env": None,
                   "batch": {"scheduler": "continuous", "max_num_seqs": 1}, "limits": {"max_tokens": 400}},
                  engine=_scheduler(model).engine)
    fw = Forwards(model.model, delay=0.005)

    async def go():
        resp = await rep.completions(P.CompletionRequest(model="t", prompt="the cat", max_tokens=400, stream=True,
                                                         ignore_eos=True))
        body = resp.body_iterator
        got = [await body.__anext__(), await body.__anext__()]
        follow = asyncio.ensure_future(rep.completions(P.CompletionRequest(model="t", prompt="a dog", max_tokens=3,
                                                                           temperature=0, ignore_eos=True)))
        await asyncio.sleep(0.05)
        assert (rep.scheduler.running, rep.scheduler.waiting) == (1, 1)
        await body.aclose()  # the client went away
        out = await asyncio.wait_for(follow, 5)
        return got, out
    try:
        got, out = asyncio.run(go())
    finally:
        fw.remove()
        rep.scheduler.close()
    assert all(g.startswith("data: ") for g in got)
    assert out["choices"][0]["finish_reason"] == "length" and out["usage"]["completion_tokens"] == 3
    assert rep.stats["cancelled"] == 1 and rep.stats["generated_tokens"] < 200
