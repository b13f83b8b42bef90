"""The continuous scheduler's request lifecycle on a tiny hybrid student (Mamba-2 + one attention layer: both cache
kinds): every admitted request ends whatever raises where, the loop survives a bad request and reports unhealthy
when it cannot go on, a cancelled request leaves the queue at once, a lone request's prefill stays within the token
budget and a burst within the cache budget, stop strings that are special tokens match (both schedulers), bf16 (the
dtype serve uses on CUDA) runs on CPU, and serving does not import the training package."""

import asyncio
import json
import sys

import pytest

from tests.test_continuous import Forwards, _scheduler
from tests.test_serve import reference
from tests.tiny_models import tiny_hybrid, tiny_tokenizer

@pytest.fixture(scope="module")
def hybrid(tmp_path_factory):
    from app.models import load_causal_lm

    return load_causal_lm(tiny_hybrid(str(tmp_path_factory.mktemp("lc") / "m"), attention=0.5))


def _rows(sch, text, n=1, max_tokens=4, **kw):
    from app.serve.generate import Row, SamplingParams

    return [Row(sch.engine.encode(text), SamplingParams(max_tokens=max_tokens, temperature=0, **kw))
            for _ in range(n)]


class Unmeasurable(list):
    """A prompt whose length cannot be taken: it breaks scheduling."""

    def __len__(self):
        raise RuntimeError("cannot measure this prompt (test)")


def _serve(sch, *requests, timeout=10.0):
    """Each request in turn, each within ``timeout`` (a request that never ends fails the test)."""
    async def go():
        for rows in requests:
            await asyncio.wait_for(sch.generate(rows), timeout)
    asyncio.run(go())


@pytest.mark.parametrize("where", ["merge", "start"])
def test_a_failure_while_admitting_ends_that_request_and_the_next_is_served(hybrid, monkeypatch, where):
    """``merge`` (an OOM copying the batch's cache rows) or ``Engine.start`` raises once, after the request was
    taken off the queue: that request ends with the error (it does not hang) and the next request is served."""
    import app.serve.scheduler as S

    sch = _scheduler(hybrid)
    calls = []
    if where == "merge":
        real = S.merge

        def flaky(a, b):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("CUDA out of memory (test)")
            return real(a, b)
        monkeypatch.setattr(S, "merge", flaky)
    else:
        real_start = sch.engine.start

        def flaky(rows):
            calls.append(1)
            if len(calls) == 1:
                raise RuntimeError("CUDA out of memory (test)")
            return real_start(rows)
        monkeypatch.setattr(sch.engine, "start", flaky)
    first, second = _rows(sch, "the cat sat", ignore_eos=True), _rows(sch, "a dog in the park")
    try:
        _serve(sch, first, second)
    finally:
        sch.close()
    assert first[0].finish_reason == "error" and "out of memory" in str(first[0].error)
    ref = reference(hybrid, second[0].prompt_ids, 4)
    assert (second[0].text, second[0].finish_reason, second[0].completion_tokens) == ref
    assert (sch.running, sch.waiting) == (0, 0) and sch.metrics.counts["requests"] == 2


def test_the_loop_survives_a_bad_request_and_reports_unhealthy_when_it_cannot_go_on(hybrid, monkeypatch):
    """A request that breaks scheduling (its prompt cannot be measured) ends with an error, and the next one is
    served: the decode thread did not die. When every step fails (a broken device), the loop stops after a few,
    each request held ends with an error, ``check_health`` (Serve's, through the replica) raises, and ``submit``
    refuses at once (a 503) instead of queueing requests nobody will serve."""
    import app.serve.scheduler as S
    from app.serve.generate import Row, SamplingParams
    from app.serve.server import Replica

    sch = _scheduler(hybrid)
    rep = Replica({"model": "unused", "model_name": "t", "api_key_env": None,
                   "batch": {"scheduler": "continuous"}}, engine=sch.engine)
    rep.scheduler.close()
    rep.scheduler = sch
    bad = [Row(Unmeasurable([5, 6, 7]), SamplingParams(max_tokens=3))]
    good = _rows(sch, "the cat sat", ignore_eos=True)
    try:
        _serve(sch, bad, good)
        assert bad[0].finish_reason == "error" and good[0].finish_reason == "length"
        rep.check_health()  # still healthy

        def broken(model, batch):
            raise RuntimeError("CUDA error: device-side assert triggered (test)")
        monkeypatch.setattr(S, "decode", broken)
        held = [_rows(sch, "a dog") for _ in range(S._MAX_FAILURES)]
        _serve(sch, *held)
        assert all(r[0].finish_reason == "error" for r in held)
        sch._thread.join(5)
        with pytest.raises(RuntimeError, match="decode loop has stopped"):
            rep.check_health()
        health = asyncio.run(rep.health())  # /health says so too, for load balancers and people
        assert health.status_code == 503 and json.loads(health.body)["status"] == "unhealthy"

        async def late():
            sch.submit(_rows(sch, "the end"))
        with pytest.raises(S.QueueFull):
            asyncio.run(late())
    finally:
        sch.close()


def test_a_request_that_breaks_scheduling_ends_alone_among_waiting_ones(hybrid):
    """A request whose prompt cannot be measured waits beside a good one (both queued before the loop plans):
    only it ends with an error; the good one is served."""
    from app.serve.generate import Row, SamplingParams

    sch = _scheduler(hybrid)
    bad = [Row(Unmeasurable([5, 6, 7]), SamplingParams(max_tokens=3))]
    good = _rows(sch, "the cat sat", ignore_eos=True)

    async def go():
        with sch._cv:  # the decode thread plans only once both wait
            handles = [sch.submit(bad), sch.submit(good)]
        for h in handles:
            await asyncio.wait_for(sch.wait(h), 10.0)
    try:
        asyncio.run(go())
        assert bad[0].finish_reason == "error" and good[0].finish_reason == "length"
        sch.check_health()
    finally:
        sch.close()


def test_a_cancelled_waiting_request_leaves_the_queue_at_once(hybrid):
    """With one place and two waiting places: a long request runs, two wait; the client of the second (not at the
    head) goes away: it no longer counts (waiting 1, a new request is taken instead of a 503), it ends "cancelled"
    with no token, and the others are served."""
    from app.serve.scheduler import QueueFull

    sch = _scheduler(hybrid, max_num_seqs=1, max_waiting=2)
    fw = Forwards(hybrid.model, delay=0.005)
    long, head, gone, late = (_rows(sch, "the cat", max_tokens=40, ignore_eos=True), _rows(sch, "a dog"),
                              _rows(sch, "the park"), _rows(sch, "good day"))

    async def go():
        t_long = asyncio.ensure_future(sch.generate(long))
        for _ in range(500):  # until it decodes (its prefill may be slow the first time)
            if sch.running:
                break
            await asyncio.sleep(0.01)
        t_head = asyncio.ensure_future(sch.generate(head))
        t_gone = asyncio.ensure_future(sch.generate(gone))
        await asyncio.sleep(0.02)
        assert (sch.running, sch.waiting) == (1, 2)
        with pytest.raises(QueueFull):
            sch.submit(_rows(sch, "one more"))
        t_gone.cancel()
        await asyncio.sleep(0.01)
        assert sch.waiting == 1
        await asyncio.wait_for(asyncio.gather(t_long, t_head, sch.generate(late)), 10)
    try:
        asyncio.run(go())
    finally:
        fw.remove()
        sch.close()
    assert gone[0].finish_reason == "cancelled" and gone[0].completion_tokens == 0
    assert [r[0].finish_reason for r in (long, head, late)] == ["length"] * 3
    assert sch.waiting == 0 and sch.metrics.counts["requests"] == 4


def test_a_lone_request_and_a_burst_stay_within_the_prefill_and_cache_budgets(hybrid):
    """A request alone with n=4 copies of a 12-token prompt and a 24-token prefill budget is prefilled 2 rows a
    step, never 4 x 12 in one forward; a burst of 4 requests under a cache budget of 2 rows decodes at most 2 rows
    at once. Every row still equals its own greedy generate."""
    prompt = "the quick brown fox jumps over the lazy dog and a cat"
    sch = _scheduler(hybrid, max_prefill_tokens=24)
    fw = Forwards(hybrid.model)
    rows = _rows(sch, prompt, n=4, max_tokens=3)
    assert len(rows[0].prompt_ids) == 12
    try:
        _serve(sch, rows)
    finally:
        fw.remove()
        sch.close()
    prefills = [(b, t) for b, t in fw.shapes if t > 1]
    assert prefills and all(b * t <= 24 for b, t in prefills), prefills
    ref = reference(hybrid, rows[0].prompt_ids, 3)
    assert all((r.text, r.finish_reason, r.completion_tokens) == ref for r in rows)

    from app.serve.scheduler import batch_cache_bytes

    probe = _scheduler(hybrid)
    probe.close()
    burst = [_rows(sch, w, max_tokens=6, ignore_eos=True) for w in ("the cat", "a dog", "the park", "good day")]
    budget = batch_cache_bytes([burst[0][0]] * 2, probe.limits.cost)
    assert probe.limits.cost.fixed > 0 and probe.limits.cost.per_token > 0  # both cache kinds measured
    sch = _scheduler(hybrid, max_cache_bytes=budget)
    fw = Forwards(hybrid.model)

    async def go():
        await asyncio.wait_for(asyncio.gather(*(sch.generate(r) for r in burst)), 10)
    try:
        asyncio.run(go())
    finally:
        fw.remove()
        sch.close()
    assert max(b for b, t in fw.shapes if t == 1) == 2
    assert all(r[0].completion_tokens == 6 for r in burst)


@pytest.fixture(scope="module")
def im_end_model(tmp_path_factory):
    """A tiny Llama whose tokenizer has the special token <|im_end|> (not its EOS)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from app.models import load_causal_lm

    path = str(tmp_path_factory.mktemp("imend") / "m")
    tok = tiny_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_end|>"]})
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(path)
    tok.save_pretrained(path)
    return load_causal_lm(path)


class _ForceAt:
    """A forward hook: the ``at``-th forward (0: the prefill) makes ``token`` every row's argmax."""

    def __init__(self, model, token: int, at: int):
        self.n, self.token, self.at = 0, token, at
        self.hook = model.register_forward_hook(self._post)

    def _post(self, mod, args, out):
        if self.n == self.at:
            out.logits[..., self.token] = out.logits.max() + 100.0
        self.n += 1
        return out

    def remove(self):
        self.hook.remove()


@pytest.mark.parametrize("scheduler", ["static", "continuous"])
def test_a_stop_string_that_is_a_special_token_matches(im_end_model, scheduler):
    """The model emits <|im_end|> as its 3rd token: with stop ["<|im_end|>"] the row ends there ("stop", the text
    of the 2 tokens before it, without the stop string); without that stop string the special token is skipped in
    the text, as before."""
    from app.serve.generate import Engine, Row, SamplingParams

    eng = Engine(im_end_model.model, im_end_model.tokenizer)
    im_end = im_end_model.tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = eng.encode("the cat sat")

    def run(stop):
        row = Row(ids, SamplingParams(max_tokens=6, temperature=0, stop=stop, ignore_eos=True))
        force = _ForceAt(im_end_model.model, im_end, at=2)
        try:
            if scheduler == "static":
                eng.run([row])
            else:
                sch = _scheduler(im_end_model)
                force.n = 0  # the scheduler measured its cache with two forwards: count from its first prefill
                try:
                    _serve(sch, [row])
                finally:
                    sch.close()
        finally:
            force.remove()
        return row

    stopped, plain = run(("<|im_end|>",)), run(())
    assert stopped.token_ids[2] == im_end and stopped.completion_tokens == 3
    assert (stopped.finish_reason, "<|im_end|>" in stopped.text) == ("stop", False)
    before = eng.tok.decode(ids, skip_special_tokens=True)
    two = eng.tok.decode(ids + stopped.token_ids[:2], skip_special_tokens=True)[len(before):]
    assert stopped.text.rstrip() == two and plain.text.startswith(stopped.text)  # (this tokenizer joins by spaces)
    assert plain.finish_reason == "length" and plain.completion_tokens == 6 and "<|im_end|>" not in plain.text


def test_continuous_batching_in_bf16_on_cpu(tmp_path):
    """The dtype serve loads on CUDA (bf16), forced on CPU: the cache is measured and merged in bf16, rows joining
    a running batch decode, and a request alone equals the model's own bf16 greedy generate."""
    import torch

    from app.models import load_causal_lm

    m = load_causal_lm(tiny_hybrid(str(tmp_path / "m"), attention=0.5), dtype=torch.bfloat16)
    assert next(m.model.parameters()).dtype == torch.bfloat16
    sch = _scheduler(m)
    alone = _rows(sch, "the cat sat on the mat", max_tokens=5)
    crowd = [_rows(sch, w, max_tokens=5, ignore_eos=True) for w in ("a dog", "the park", "good day to be")]

    async def go():
        await asyncio.wait_for(sch.generate(alone), 10)
        await asyncio.wait_for(asyncio.gather(*(sch.generate(r) for r in crowd)), 10)
    try:
        asyncio.run(go())
    finally:
        sch.close()
    assert sch.limits.cost.fixed > 0 and sch.limits.cost.per_token > 0
    assert (alone[0].text, alone[0].finish_reason, alone[0].completion_tokens) == \
        reference(m, alone[0].prompt_ids, 5)
    assert all(r[0].finish_reason == "length" and r[0].completion_tokens == 5 for r in crowd)
    assert sch.metrics.counts["failed"] == 0


def test_serving_does_not_import_the_training_package(tmp_path, monkeypatch):
    """Both schedulers' cache (``app.caches.generation_cache``) comes from outside ``app.distill``: with every
    ``app.distill`` module made unimportable, a 0-attention student (the one that needs ``RecurrentCache``) still
    gets its cache and generates through both schedulers."""
    from app.models import load_causal_lm
    from app.serve.batching import new_cache
    from app.serve.generate import Engine, Row, SamplingParams

    m = load_causal_lm(tiny_hybrid(str(tmp_path / "m"), attention=0))
    for name in [k for k in sys.modules if k == "app.distill" or k.startswith("app.distill.")] + \
            ["app.distill", "app.distill.student", "app.distill.recurrent"]:
        monkeypatch.setitem(sys.modules, name, None)  # import app.distill... raises ImportError
    assert type(new_cache(m.model)).__name__ == "RecurrentCache"
    eng = Engine(m.model, m.tokenizer)
    static = eng.run([Row(eng.encode("the cat"), SamplingParams(max_tokens=3, temperature=0, ignore_eos=True))])[0]
    sch = _scheduler(m)
    rows = _rows(sch, "the cat", max_tokens=3, ignore_eos=True)
    try:
        _serve(sch, rows)
    finally:
        sch.close()
    assert static.completion_tokens == rows[0].completion_tokens == 3 and static.text == rows[0].text
