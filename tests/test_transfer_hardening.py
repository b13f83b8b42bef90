"""delta transfer hardening (issue 31, section 4 and the span scorer's part of section 5): plain-text inputs, one
dtype for every compared score (bf16 forced on CPU), B in eval mode during the fit, a length-matched placebo,
the default general text split by near-duplicate family, the span pass in several actors with the windows
streamed to the fit, and logits through the model's own head path."""

import json
import math
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from app.delta.checkpoint import DeltaError
from tests import sublang


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return sublang.build_world(str(tmp_path_factory.mktemp("sublang")))


def _text_rows(texts, role="transfer"):
    return pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts,
                     "error": pa.nulls(len(texts), pa.string()), "role": [role] * len(texts)})


def _cache(tmp, world, b_ref, dtype, n=24):
    """A span cache written by the span scorer itself (no Ray): transfer, retain and eval windows."""
    from app.delta.spanscore import SpanScorer

    scorer = SpanScorer({"a0": (world["a0"], "a"), "a1": (world["a1"], "a"), "b": (b_ref, "b")}, max_tokens=48,
                        split={}, dtype=dtype)
    table = pa.concat_tables([scorer(_text_rows(sublang.texts(n, False, 11))),
                              scorer(_text_rows(sublang.texts(6, False, 12), "retain")),
                              scorer(_text_rows(sublang.texts(6, True, 13), "eval_domain"))])
    os.makedirs(os.path.join(tmp, "windows"), exist_ok=True)
    pq.write_table(table, os.path.join(tmp, "windows", "part-0.parquet"))
    return str(tmp), table


FIT = dict(rank=2, alpha=None, target_modules="all-linear", retain_weight=0.1, batch_tokens=512, seed=0, log_every=1)


# ---------------------------------------------------------------- 1. one text file


def test_plain_text_is_cut_into_blank_line_documents_within_the_size_cap():
    from app.delta.texts import text_documents

    text = "Title\n\nFirst paragraph, two lines\nof text.\n \t\n\n\nCafé 日本語 " * 3 + "\n\n" + "word " * 300 + "\n\n🙂" * 3
    for cap in (1, 7, 64, 4096):
        docs = text_documents(text, cap)
        assert all(d.strip() for d in docs)
        assert all(len(d.encode()) <= max(cap, 4) for d in docs)  # 🙂 is 4 bytes: a character is never split
        squeeze = lambda t: "".join(t.split())  # noqa: E731
        assert squeeze("".join(docs)) == squeeze(text)  # every non-blank byte, once, in order
    docs = text_documents(text, 4096)
    assert docs[:2] == ["Title", "First paragraph, two lines\nof text."] and len(docs) == 7 + 1 + 3


def test_one_text_file_is_enough_for_a_transfer(world, ray_local, tmp_path):
    from app.cli import main

    txt = tmp_path / "domain.txt"
    txt.write_text("\n\n".join(sublang.texts(60, False, 21)) + "\n")
    out = tmp_path / "t"
    code = main(["delta", "transfer", "--base-a", world["a0"], "--tuned-a", world["a1"], "--target", world["b"],
                 "--text", str(txt), "--retain-text", world["retain"], "--out", str(out), "--steps", "2",
                 "--no-placebo", "--max-tokens", "48"])
    assert code == 0
    rep = json.load(open(out / "transfer.json"))
    assert rep["alignment"]["texts_refused"] == 0 and rep["alignment"]["texts"] >= 60 + 100
    assert 0 < rep["measures"]["in_domain"]["windows"] and rep["train"]["windows"] > rep["measures"]["in_domain"]["windows"]


# ---------------------------------------------------------------- 2 + 5. one dtype, bf16 forced on CPU


def test_bf16_scores_the_fit_starts_at_zero_delta_and_adapters_score_in_the_same_dtype(world, tmp_path):
    from app.delta.transfer import _score_adapter
    from app.delta.transfer_train import fit_from_cache, read_rows

    cache, t16 = _cache(tmp_path / "c16", world, world["b"], "bfloat16")
    _, t32 = _cache(tmp_path / "c32", world, world["b"], "float32")
    for name in ("l_a0", "l_a1", "l_b"):  # the bf16 path runs, and scores like fp32 within bf16's precision
        a = np.concatenate([x for x in t16.column(name).to_pylist() if x is not None])
        b = np.concatenate([x for x in t32.column(name).to_pylist() if x is not None])
        assert np.isfinite(a).all() and not np.array_equal(a, b)
        assert np.abs(a - b).max() < 0.05 * np.abs(b).max()
    res = fit_from_cache(world["b"], cache, str(tmp_path / "ad"), beta=0.0, lr=1e-3, steps=2, dtype="bfloat16", **FIT)
    # β = 0: the target is 0, and Δℓ_B of a zero adapter is exactly 0 when ℓ_B comes from the same dtype and path
    assert res["curve"][0]["delta_mse"] == 0.0
    again = _score_adapter(world["b"], str(tmp_path / "ad"), cache, "bfloat16")
    np.testing.assert_allclose(np.concatenate(again["domain"]), np.concatenate(res["scores"]["domain"]), atol=1e-9)
    base = read_rows(cache, "eval_domain", tokens=False).scores["b"]
    # the adapted scores are bf16 scores: within bf16 noise of B's, not an fp32-vs-bf16 gap away
    assert np.abs(np.concatenate(res["scores"]["domain"]) - base).max() < 0.5


def test_the_span_cache_key_names_dtype_device_and_the_default_texts_content():
    from app.delta.transfer import TransferOptions, cache_key

    models, inputs = {"a0": "x", "a1": "y", "b": "z"}, {"transfer": [], "retain": [], "eval_general": []}
    key = lambda dtype="float32", device="cpu", general="g1": cache_key(  # noqa: E731
        models, inputs, [], TransferOptions(dtype=dtype), device=device, general_key=general)[0]
    assert key() == key()
    assert len({key(), key(dtype="bfloat16"), key(device="cuda"), key(general="g2")}) == 4


# ---------------------------------------------------------------- 3. B's dropout off during the fit


def test_the_fit_keeps_b_in_eval_mode(world, tmp_path):
    from transformers import AutoModelForCausalLM

    from app.delta.transfer_train import fit_from_cache, read_rows

    noisy = str(tmp_path / "b_dropout")
    model = AutoModelForCausalLM.from_pretrained(world["a0"])
    model.config.update(dict(resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1))
    model.save_pretrained(noisy)
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(world["a0"]).save_pretrained(noisy)
    cache, _ = _cache(tmp_path / "c", world, noisy, "float32", n=12)
    res = fit_from_cache(noisy, cache, str(tmp_path / "ad"), beta=0.0, lr=1e-30, steps=3, dtype="float32", **FIT)
    # with dropout on, ℓ_{B+LoRA} of a batch would be noisy: Δℓ_B would not be 0 even with a zero adapter
    assert [c["delta_mse"] for c in res["curve"]] == [0.0, 0.0, 0.0]
    base = read_rows(cache, "eval_domain", tokens=False).scores["b"]
    np.testing.assert_allclose(np.concatenate(res["scores"]["domain"]), base, rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------- 4. placebo by length; default text by family


def test_the_placebo_permutes_targets_among_spans_of_the_same_length():
    from app.delta.transfer_train import permute_targets

    rng = np.random.default_rng(0)
    lengths = rng.permutation(np.repeat([1, 12], 96))
    targets = lengths * 0.5 + rng.normal(0, 0.1, len(lengths))  # longer spans move more
    placebo = permute_targets(targets, lengths=lengths, seed=3)
    for L in (1, 12):
        sel = lengths == L
        assert sorted(placebo[sel]) == sorted(targets[sel])  # length-matched: each length keeps its values
        assert abs(np.corrcoef(placebo[sel], targets[sel])[0, 1]) < 0.35  # no link to the span itself
    assert not np.array_equal(placebo, targets)
    assert np.array_equal(permute_targets(targets, lengths=lengths, seed=3), placebo)


def _licence(k: int, holder: str) -> str:
    body = " ".join(sublang.texts(3, False, 100 + k))
    return f"Licence {k}. Copyright (c) 2024 {holder}. All rights reserved.\n\n{body}"


def test_the_default_general_text_is_split_by_near_duplicate_family(tmp_path, monkeypatch):
    from app.delta import texts as T
    from app.refine import sample

    families = {k: [_licence(k, h) for h in ("Ann", "Bob Ltd", "C. Dee", "the Foo Project")] for k in range(24)}
    found = sorted((f"pkg{k}-{i}:LICENSE", t) for k, ts in families.items() for i, t in enumerate(ts))
    monkeypatch.setattr(sample, "collect_texts", lambda: list(found))
    assert len(set(T.near_families([t for _, t in found]).tolist())) == 24
    g = T.default_general(str(tmp_path), 0.3)
    side = {}
    for name, path in (("retain", g.retain), ("held_out", g.held_out)):
        for line in open(path):
            side[json.loads(line)["text"]] = name
    assert len(side) == 96 and g.families == 24
    for members in families.values():
        assert len({side[t] for t in members}) == 1  # a family is on one side only
    assert set(side.values()) == {"retain", "held_out"}
    assert T.default_general(str(tmp_path), 0.3).key == g.key
    found[0] = (found[0][0], found[0][1] + " One more sentence.")
    assert T.default_general(str(tmp_path), 0.3).key != g.key  # keyed by content


# ---------------------------------------------------------------- 5. the span pass in the cluster's actors


def test_the_span_pass_in_two_actors_equals_one(world, ray_local, tmp_path, monkeypatch):
    import pyarrow.dataset as pads

    from app.delta.transfer import TransferOptions, span_actors, span_pass

    assert span_actors(TransferOptions(num_gpus=0), {"CPU": 8}) == 1
    assert span_actors(TransferOptions(num_gpus=1), {"CPU": 8, "GPU": 4}) == 4
    assert span_actors(TransferOptions(num_gpus=0.5, concurrency=3), {"GPU": 4}) == 3
    import ray

    asked = []
    map_batches = ray.data.Dataset.map_batches

    def recording(self, fn, *a, **k):  # what the span pass asks Ray Data for
        if getattr(fn, "__name__", "") == "SpanScorer":
            asked.append(k["concurrency"])
        return map_batches(self, fn, *a, **k)

    monkeypatch.setattr(ray.data.Dataset, "map_batches", recording)
    path = tmp_path / "t.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in sublang.texts(80, False, 31)))
    models = {"a0": (world["a0"], "a"), "a1": (world["a1"], "a"), "b": (world["b"], "b")}
    tables = {}
    for n in (1, 2):
        out = str(tmp_path / f"w{n}")
        span_pass({"transfer": [str(path)]}, [], models, out,
                  TransferOptions(num_gpus=0, concurrency=n, actor_cpus=0.5, max_tokens=48, heldout=0.2))
        tables[n] = pads.dataset(out).to_table().sort_by([("doc", "ascending"), ("window", "ascending")])
    assert asked == [1, 2]
    one, two = tables[1], tables[2]
    assert one.num_rows == two.num_rows > 80
    for c in ("doc", "role", "window", "ids_a", "ids_b", "span_a", "span_b", "span_bytes"):
        assert one.column(c).to_pylist() == two.column(c).to_pylist(), c
    for c in ("l_a0", "l_a1", "l_b"):
        a = np.concatenate([x for x in one.column(c).to_pylist() if x])
        np.testing.assert_allclose(np.concatenate([x for x in two.column(c).to_pylist() if x]), a, rtol=1e-5, atol=1e-5)


def test_fit_rows_stream_from_the_cache_in_arrow_batches(world, tmp_path):
    from app.delta.transfer_train import read_rows

    cache, table = _cache(tmp_path / "c", world, world["b"], "float32", n=12)
    whole = read_rows(cache, "transfer", beta=2.0)
    small = read_rows(cache, "transfer", beta=2.0, batch_rows=3)  # the same rows, read three windows at a time
    rows = [r for r in table.to_pylist() if r["role"] == "transfer" and r["n_spans"]]
    assert len(whole) == len(small) == len(rows)
    for w, r in enumerate(rows):
        assert whole.window_ids(w).tolist() == small.window_ids(w).tolist() == r["ids_b"]
        assert whole.window_spans(w).tolist() == r["span_b"]
        np.testing.assert_array_equal(whole.batch([w], whole.target), 2.0 * (np.array(r["l_a1"]) - np.array(r["l_a0"])))
    assert whole.ids.dtype == np.int32 and isinstance(whole.ids, np.ndarray)


# ---------------------------------------------------------------- 6. logits through the model's own head path


def _loss_sum(model, ids):
    x = torch.tensor([[0] + ids])
    with torch.no_grad():
        return -float(model(input_ids=x, labels=x).loss) * len(ids)


@pytest.mark.parametrize("arch", ["granite", "cohere"])
def test_span_scores_follow_the_models_own_logit_scaling(arch):
    from transformers import CohereConfig, CohereForCausalLM, GraniteConfig, GraniteForCausalLM

    from app.delta.spanscore import score_windows

    torch.manual_seed(0)
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    model = (GraniteForCausalLM(GraniteConfig(logits_scaling=4.0, embedding_multiplier=2.0, residual_multiplier=0.5,
                                              attention_multiplier=0.3, **common)) if arch == "granite"
             else CohereForCausalLM(CohereConfig(logit_scale=3.0, **common))).eval()
    rng = np.random.default_rng(1)
    wins = [rng.integers(2, 64, n).tolist() for n in (7, 12, 5)]
    got = score_windows(model, wins, [list(range(len(w))) for w in wins], [len(w) for w in wins], 0, 1)
    for w, ll in zip(wins, got):
        assert math.isclose(float(ll.sum()), _loss_sum(model, w), rel_tol=1e-5, abs_tol=1e-4)


def test_a_head_path_the_scorer_does_not_reproduce_is_refused(world):
    from transformers import AutoModelForCausalLM

    from app.delta.spanscore import check_head_path

    model = AutoModelForCausalLM.from_pretrained(world["b"]).eval()
    check_head_path(model, 0, 1)
    forward = model.forward

    def scaled(*a, **k):
        out = forward(*a, **k)
        out.logits = out.logits * 3.0
        return out

    model.forward = scaled
    with pytest.raises(DeltaError, match="head path"):
        check_head_path(model, 0, 1)
