"""Distillation hardening (issue 31, section 3 and section 5's distill part): packing that a stopped run cannot
corrupt, splits packed across batches (a small held-out split still makes rows, an empty one is refused before
training), teachers the copy cannot carry refused by model type, teacher logits through the model's own head
path, FSDP with one worker, the run key's strategy, a mamba2 shape refused at config time, and the GPU path's
bf16 teacher run on CPU."""

import json
import os
import random

import numpy as np
import pytest
import torch

from tests.tiny_models import WORDS, tiny_llama, tiny_tokenizer


def _docs(n, words, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        i = rng.randrange(len(WORDS))
        out.append(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(words)))
    return out


def _write_corpus(root, texts, shards=2):
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(root, exist_ok=True)
    for i in range(shards):
        part = texts[i::shards]
        pq.write_table(pa.table({"id": [f"doc-{i}-{j}" for j in range(len(part))], "text": part}),
                       os.path.join(root, f"part-{i:06d}.parquet"))
    return root


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    """The tiny Llama teacher (its tokenizer: one token per word)."""
    return tiny_llama(str(tmp_path_factory.mktemp("teacher") / "llama"))


def _data_cfg(data, **kw):
    from app.config import load_config
    from app.distill.config import DataConfig

    return load_config(DataConfig, None, [f"input={data}", *[f"{k}={v}" for k, v in kw.items()]])


def _rows_on_disk(packed):
    import pyarrow.parquet as pq

    return {s: sum(pq.ParquetFile(f).metadata.num_rows for f in files)
            for s, files in (("train", packed.train), ("eval", packed.eval))}


def _split_tokens(texts, ids, fraction):
    """Tokens (+ EOS) of each split, by the tiny tokenizer (one token per word)."""
    from app.distill.data import eval_split

    out = {"train": 0, "eval": 0}
    for doc_id, t in zip(ids, texts):
        out["eval" if eval_split(doc_id, fraction) else "train"] += len(t.split()) + 1
    return out


# ---- 1. an interrupted packing run

def test_a_packing_run_stopped_before_its_meta_leaves_nothing_the_next_run_counts(ray_local, tok_dir, tmp_path,
                                                                                   monkeypatch):
    """The run stops between writing the rows and writing meta.json; the next run packs again from scratch: the rows
    of the text (each split's tokens // 17), none twice."""
    from types import SimpleNamespace

    from app.distill import data as data_mod

    texts = _docs(300, 12)
    corpus = _write_corpus(str(tmp_path / "kept"), texts)
    cfg = _data_cfg(corpus, seq_len=16, eval_fraction=0.1)
    ids = [f"doc-{i}-{j}" for i in range(2) for j in range(len(texts[i::2]))]
    tokens = _split_tokens([t for i in range(2) for t in texts[i::2]], ids, 0.1)
    fresh = SimpleNamespace(train_rows=tokens["train"] // 17, eval_rows=tokens["eval"] // 17)

    calls = {"n": 0}
    real = data_mod.PackedData.to_dict

    def stop_once(self):
        calls["n"] += 1
        if calls["n"] == 1:
            raise KeyboardInterrupt("stopped between the rows and meta.json")
        return real(self)

    monkeypatch.setattr(data_mod.PackedData, "to_dict", stop_once)
    cache = str(tmp_path / "cache")
    with pytest.raises(KeyboardInterrupt):
        data_mod.prepare_data(cfg, tok_dir, cache)
    again = data_mod.prepare_data(cfg, tok_dir, cache)
    assert (again.train_rows, again.eval_rows) == (fresh.train_rows, fresh.eval_rows)
    assert _rows_on_disk(again) == {"train": fresh.train_rows, "eval": fresh.eval_rows}
    rows_dir = os.path.join(again.root, "rows")  # every Parquet file under rows/ is listed: nothing stray is read
    on_disk = sorted(os.path.join(d, f) for d, _, fs in os.walk(rows_dir) for f in fs if f.endswith(".parquet"))
    assert on_disk == sorted(again.train + again.eval)
    with open(os.path.join(again.root, "meta.json")) as f:
        assert json.load(f)["train_rows"] == fresh.train_rows


# ---- 3. each split packed across batches; an empty held-out split refused

def test_each_split_is_packed_across_batches_and_loses_at_most_one_remainder(ray_local, tok_dir, tmp_path):
    """1,000 documents of 21 tokens, rows of 513, 5% held out: ~13 held-out documents (~270 tokens) per 256-document
    batch, never a row within a batch. Packed across batches, each split makes tokens // 513 rows."""
    from app.distill.data import PackedRows, prepare_data

    texts = _docs(1000, 20, seed=3)
    corpus = _write_corpus(str(tmp_path / "kept"), texts)
    ids = [f"doc-{i}-{j}" for i in range(2) for j in range(len(texts[i::2]))]
    ordered = [t for i in range(2) for t in texts[i::2]]
    want = _split_tokens(ordered, ids, 0.05)
    packed = prepare_data(_data_cfg(corpus, seq_len=512, eval_fraction=0.05), tok_dir, str(tmp_path / "cache"))
    assert want["eval"] >= 2 * 513  # the held-out split is big enough for rows, in total
    assert packed.eval_rows == want["eval"] // 513 and packed.train_rows == want["train"] // 513
    assert packed.eval_tokens == want["eval"]
    eos = tiny_tokenizer().eos_token_id
    rows = PackedRows(packed.eval).take(np.arange(packed.eval_rows))
    assert rows.shape == (packed.eval_rows, 513)
    # whole documents joined by EOS: every word run between two EOS is a stretch of the vocabulary in order
    assert (rows == eos).sum() >= packed.eval_rows * 513 // 21 - packed.eval_rows


def test_an_empty_held_out_split_is_refused_before_training(tok_dir, tmp_path, monkeypatch):
    """Packed data with no held-out row (too few held-out tokens for one): refused by prepare, before the run is set
    up and any worker starts, naming what to change."""
    from app.config import load_config
    from app.distill import data as data_mod
    from app.distill.config import DistillConfig
    from app.distill.train import prepare

    corpus = _write_corpus(str(tmp_path / "kept"), _docs(20, 20, seed=5))
    train = [str(tmp_path / "rows.parquet")]
    monkeypatch.setattr(data_mod, "prepare_data", lambda *a: data_mod.PackedData(
        root=str(tmp_path), train=train, eval=[], train_rows=64, eval_rows=0, seq_len=512))
    cfg = load_config(DistillConfig, None, [f"teacher={tok_dir}", f"output={tmp_path / 'run'}",
                                            f"data.input={corpus}", "data.seq_len=512", "data.eval_fraction=0.01",
                                            "stages.align_tokens=0", "stages.kd_tokens=1024", "train.num_workers=1",
                                            "train.batch_size=1", "student.init=random"])
    with pytest.raises(ValueError, match=r"held-out split has 0 rows of 513 tokens.*data\.eval_fraction"):
        prepare(cfg)
    assert not os.path.exists(tmp_path / "run" / "run.json")  # refused before the run was set up


# ---- 2. teachers the copy cannot carry; logits through the model's own head path

def _tiny(kind):
    from transformers import (CohereConfig, CohereForCausalLM, Gemma2Config, Gemma2ForCausalLM, GemmaConfig,
                              GemmaForCausalLM, GraniteConfig, GraniteForCausalLM)

    torch.manual_seed(0)
    common = dict(vocab_size=len(WORDS) + 4, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1,
                  eos_token_id=2, pad_token_id=0)
    if kind == "gemma":
        return GemmaForCausalLM(GemmaConfig(head_dim=8, **common)).eval()
    if kind == "gemma2":
        return Gemma2ForCausalLM(Gemma2Config(head_dim=8, final_logit_softcapping=3.0, **common)).eval()
    if kind == "granite":
        return GraniteForCausalLM(GraniteConfig(embedding_multiplier=4.0, residual_multiplier=0.5,
                                                attention_multiplier=0.2, logits_scaling=3.0, **common)).eval()
    return CohereForCausalLM(CohereConfig(logit_scale=0.3, **common)).eval()


@pytest.mark.parametrize("kind,why", [("gemma", r"\(1 \+ w\).*sqrt\(hidden_size\)"),
                                      ("granite", "multipliers.*logits_scaling")])
def test_teachers_the_copy_cannot_carry_are_refused_by_model_type(kind, why):
    """Gemma and Granite have Llama's parameter names and other math: the hybrid copy (and the mamba2 attention
    init) would build a wrong student silently. Refused by model type, from the config alone, with the reason."""
    from app.distill.student import StudentShape, build_student, hybrid_config

    t = _tiny(kind)
    with pytest.raises(ValueError, match=f"model_type '{kind}'.*{why}"):
        build_student(t, "hybrid", attention_layers=1.0)
    with pytest.raises(ValueError, match=f"model_type '{kind}'"):
        hybrid_config(t.config, [0, 1])  # the config alone: prepare() refuses before any worker starts
    with pytest.raises(ValueError, match=f"model_type '{kind}'"):
        build_student(t, "mamba2", shape=StudentShape(), init="attention")
    student, mapped = build_student(t, "mamba2", shape=StudentShape(), init="random")  # nothing copied: any teacher
    assert mapped == [] and student.config.vocab_size == t.config.vocab_size


@pytest.mark.parametrize("kind", ["llama", "granite", "gemma2", "cohere"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_teacher_logits_are_the_models_own(kind, dtype):
    """Chunks of final hidden states -> the logits the model's forward gives (Granite divides by logits_scaling,
    Gemma 2 soft-caps, Cohere scales): the dense KD target equals the one from the model's full logits."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from app.distill.losses import kd_ce_loss, kd_ce_loss_ref
    from app.distill.teacher import HeadLogits, body_hidden, nll_sum

    if kind == "llama":
        torch.manual_seed(0)
        t = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4)).eval()
    else:
        t = _tiny(kind)
    t = t.to(dtype)
    x = torch.randint(0, t.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = t(x).logits.float()  # (B, T, V)
        h = body_hidden(t, x)
        head = HeadLogits(t)
        got = torch.stack([head(h[b]) for b in range(2)])
        tol = 1e-5 if dtype == torch.float32 else 0.05  # bf16: the model rounds its logits, the head path does not
        assert got.dtype == torch.float32 and torch.allclose(got, want, atol=tol, rtol=0)
        mask = torch.ones(2, 9, dtype=torch.bool)
        labels = torch.randint(0, t.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(2))
        hs, ws = torch.randn(2, 9, 16), torch.randn(t.config.vocab_size, 16)
        kd, _ = kd_ce_loss(hs, ws, mask, labels, teacher_hidden=h, teacher_head=head, temperature=2.0,
                           chunk_tokens=5)
        ref, _ = kd_ce_loss_ref(hs, ws, mask, labels, teacher_hidden=h, teacher_head=head, temperature=2.0)
        # the KD target of the model's full logits (KL through log-softmax of want)
        log_p = torch.log_softmax(want / 2.0, -1)
        log_q = torch.log_softmax((hs @ ws.T) / 2.0, -1)
        full = (log_p.exp() * (log_p - log_q)).sum(-1).mean() * 4.0
        assert kd == pytest.approx(float(ref), rel=1e-5) and kd == pytest.approx(float(full), rel=1e-2 if dtype ==
                                                                                  torch.bfloat16 else 1e-5)
        nll = nll_sum(head, h, labels, chunk_tokens=4)
        want_nll = torch.nn.functional.cross_entropy(want.reshape(-1, want.shape[-1]), labels.reshape(-1),
                                                     reduction="sum")
        assert nll == pytest.approx(float(want_nll), rel=1e-2 if dtype == torch.bfloat16 else 1e-5)
    assert t.get_output_embeddings().weight.dtype == dtype and t.base_model is not None  # the model is left whole
    assert type(t.base_model).__name__.endswith("Model")


def test_the_topk_cache_holds_the_models_own_logits(tmp_path):
    """The cached top-k of a Granite teacher (logits_scaling 3) are its forward's, not lm_head(h)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from app.distill.cache import TopKTeacher

    t = _tiny("granite")
    path = str(tmp_path / "granite")
    t.save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    rows = np.random.default_rng(0).integers(4, t.config.vocab_size, (3, 11)).astype(np.int32)
    f = str(tmp_path / "rows.parquet")
    pq.write_table(pa.table({"ids": pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), 11)}), f)
    out = TopKTeacher(path, [f], 4, "cpu")({"row": np.arange(3)})
    with torch.no_grad():
        want, _ = t(torch.from_numpy(rows[:, :-1]).long()).logits.topk(4, dim=-1)
    assert np.allclose(out["logits"].reshape(3, 10, 4), want.numpy(), atol=1e-4)


# ---- 4. FSDP with one worker, the run key's strategy, a mamba2 shape at config time

def test_the_run_key_holds_the_strategy():
    from types import SimpleNamespace

    from app.config import load_config
    from app.distill.config import DistillConfig
    from app.distill.train import Plan, run_key, run_key_diff

    ddp = load_config(DistillConfig, None, ["train.use_gpu=true"])
    fsdp = load_config(DistillConfig, None, ["train.use_gpu=true", "train.strategy=fsdp"])
    packed, plan = SimpleNamespace(root="/packed"), Plan(1024, {"align": 0, "kd": 4, "ce": 0})
    assert "train.strategy: 'ddp' -> 'fsdp'" in run_key_diff(run_key(ddp, packed, plan), run_key(fsdp, packed, plan))


def test_a_mamba2_shape_of_its_own_is_refused_at_config_time():
    """Another width or depth with stage align or the attention init (both need the teacher's) fails when the
    config is read, not inside a worker."""
    from app.config import ConfigError, load_config
    from app.distill.config import DistillConfig

    base = ["student.arch=mamba2", "student.hidden_size=16"]
    with pytest.raises(ConfigError, match="stages.align_tokens"):
        load_config(DistillConfig, None, [*base, "student.init=random"])  # the default align budget
    with pytest.raises(ConfigError, match="student.init"):
        load_config(DistillConfig, None, [*base, "stages.align_tokens=0"])  # the default init: attention
    ok = load_config(DistillConfig, None, [*base, "stages.align_tokens=0", "student.init=random"])
    assert ok.student.hidden_size == 16


def test_a_mamba2_student_is_checked_against_the_teachers_config_before_the_run(tok_dir):
    from app.config import load_config
    from app.distill.config import DistillConfig
    from app.distill.train import check_student
    from app.models import load_model_config

    tcfg = load_model_config(tok_dir)  # width 32, 2 layers
    same = load_config(DistillConfig, None, ["student.arch=mamba2", "student.num_heads=8"])
    check_student(same, tcfg)  # the teacher's width and depth (heads of 4): align and the attention init work
    deep = load_config(DistillConfig, None, ["student.arch=mamba2", "student.num_heads=3"])
    with pytest.raises(ValueError, match="num_heads"):
        check_student(deep, tcfg)


def _run_cfg(teacher, corpus, cache, out, *sets):
    from app.config import load_config
    from app.distill.config import DistillConfig

    return load_config(DistillConfig, None, [
        f"teacher={teacher}", f"output={out}", f"data.input={corpus}", f"data.cache_dir={cache}", "data.seq_len=32",
        "data.eval_fraction=0.1", "train.num_workers=1", "train.batch_size=4", "train.warmup_steps=1",
        "train.eval_batches=2", "train.max_failures=0", "train.checkpoint_every=2", *sets])


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("small")
    return _write_corpus(str(root / "kept"), _docs(160, 40, seed=9)), str(root / "cache")


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_fsdp_with_one_worker_trains_checkpoints_and_exports(ray_local, tok_dir, small_corpus, tmp_path):
    """train.strategy fsdp with one worker: Ray Train wraps nothing then (on GPUs as here on CPU); the gradient clip
    and the checkpoint's state dicts follow the model as it is, and the run finishes and exports."""
    from transformers import AutoModelForCausalLM

    from app.distill.train import distill

    out = str(tmp_path / "run")
    cfg = _run_cfg(tok_dir, *small_corpus, out, "stages.align_tokens=0", "stages.kd_tokens=512",
                   "stages.ce_tokens=0", "student.attention_layers=1/2")
    cfg.train.strategy = "fsdp"  # (set after loading: the parent commit refuses fsdp without GPUs at any size)
    result = distill(cfg)
    steps = [r for r in _metrics(out) if "loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4] and all(np.isfinite(r["loss"]) for r in steps)
    assert result["eval_student_ppl"] > 0
    assert AutoModelForCausalLM.from_pretrained(result["student"]).config.attn_layer_indices == [1]


# ---- 5. the GPU path's bf16 teacher, on CPU

def test_distill_with_a_bf16_teacher_runs_on_cpu(ray_local, tok_dir, small_corpus, tmp_path):
    """train.teacher_dtype bfloat16 (what auto picks on GPUs) on CPU: stage align (the taps in bf16), stage kd with
    the live teacher, the teacher's held-out perplexity; every loss finite, the teacher's perplexity that of the bf16
    model's own logits; the top-k cache of the bf16 teacher, its logits."""
    from app.distill.data import PackedRows
    from app.distill.train import distill
    from app.models import load_causal_lm

    out = str(tmp_path / "run")
    cfg = _run_cfg(tok_dir, *small_corpus, out, "train.teacher_dtype=bfloat16", "stages.align_tokens=128",
                   "stages.kd_tokens=256", "stages.ce_tokens=128", "student.attention_layers=1/2")
    result = distill(cfg)
    steps = [r for r in _metrics(out) if "loss" in r]
    assert [r["stage"] for r in steps] == ["align", "kd", "kd", "ce"]
    assert all(np.isfinite(r["loss"]) for r in steps)
    with open(os.path.join(out, "run.json")) as f:
        assert json.load(f)["teacher_dtype"] == "bfloat16"
    # the teacher's held-out perplexity: the bf16 model's own, on the rows the run evaluated (the first 8)
    with open(_packed_meta(small_corpus[1])) as f:
        packed = json.load(f)
    rows = PackedRows(packed["eval"]).take(np.arange(min(8, packed["eval_rows"])))
    t = load_causal_lm(tok_dir, dtype=torch.bfloat16).model
    with torch.no_grad():
        x, y = torch.from_numpy(rows[:, :-1]), torch.from_numpy(rows[:, 1:])
        z = t(x).logits.float()
        ppl = float(torch.exp(torch.nn.functional.cross_entropy(z.reshape(-1, z.shape[-1]), y.reshape(-1))))
    assert result["eval_teacher_ppl"] == pytest.approx(ppl, rel=0.02)
    # the top-k cache of the bf16 teacher: the bf16 model's own logits, kept in fp32
    from app.distill.cache import TopKTeacher

    top = TopKTeacher(tok_dir, packed["train"], 4, "cpu", "bfloat16")({"row": np.arange(3)})
    with torch.no_grad():
        x = torch.from_numpy(PackedRows(packed["train"]).take(np.arange(3))[:, :-1])
        want, _ = t(x).logits.float().topk(4, dim=-1)
    assert top["logits"].dtype == np.float32
    assert np.allclose(top["logits"].reshape(3, 32, 4), want.numpy(), atol=0.05)


def _packed_meta(cache):
    metas = [os.path.join(cache, "packed", d, "meta.json") for d in os.listdir(os.path.join(cache, "packed"))
             if os.path.isfile(os.path.join(cache, "packed", d, "meta.json"))]
    assert len(metas) == 1
    return metas[0]
