"""Distillation: losses against their references (values and gradients), the student and its attention
init, and Ray Train runs (2 workers, CPU) with a tiny Llama teacher: losses fall, resume after a failure gives
the same next-step loss, the exported student reloads and generates."""

import json
import math
import os

import pytest
import torch

from app.distill.losses import IGNORE, TeacherTopK, align_loss, align_loss_ref, kd_ce_loss, kd_ce_loss_ref
from tests.tiny_models import WORDS, tiny_llama


def _grads(fn, *tensors):
    for t in tensors:
        t.grad = None
    out = fn()
    sum(out).backward()
    return [o.detach() for o in out], [t.grad.clone() for t in tensors]


@pytest.mark.parametrize("topk", [False, True])
def test_kd_ce_loss_matches_reference_values_and_gradients(topk):
    torch.manual_seed(0)
    b, t, d, v = 2, 7, 16, 50
    h = torch.randn(b, t, d, requires_grad=True)
    w = torch.randn(v, d, requires_grad=True)
    th, tw = torch.randn(b, t, 12), torch.randn(v, 12)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 5:] = False  # padding
    labels = torch.randint(0, v, (b, t))
    labels[0, -1] = IGNORE  # no next token
    teacher = {"teacher_topk": TeacherTopK(torch.randint(0, v, (b, t, 5)), torch.randn(b, t, 5))} if topk else \
              {"teacher_hidden": th, "teacher_head": tw}
    for temp in (1.0, 2.5):
        fast, gf = _grads(lambda: kd_ce_loss(h, w, mask, labels, temperature=temp, chunk_tokens=3, **teacher), h, w)
        ref, gr = _grads(lambda: kd_ce_loss_ref(h, w, mask, labels, temperature=temp, **teacher), h, w)
        for a, r in zip(fast + gf, ref + gr):
            assert torch.allclose(a, r, atol=1e-5, rtol=1e-4), (float((a - r).abs().max()))
        assert float(fast[0]) > 0
    # without a teacher: CE only, the reference's CE
    kd0, ce0 = kd_ce_loss(h, w, mask, labels, chunk_tokens=4)
    assert float(kd0) == 0 and torch.allclose(ce0, kd_ce_loss_ref(h, w, mask, labels, **teacher)[1], atol=1e-5)
    # KD of a student identical to the teacher is zero
    if not topk:
        kd, _ = kd_ce_loss(th, tw, mask, labels, teacher_hidden=th, teacher_head=tw, temperature=2.0, chunk_tokens=4)
        assert abs(float(kd)) < 1e-5


def test_align_loss_matches_reference_values_and_gradients():
    torch.manual_seed(1)
    s = torch.randn(2, 5, 8, requires_grad=True)
    t = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    fast, gf = _grads(lambda: [align_loss(s, t, mask)], s)
    ref, gr = _grads(lambda: [align_loss_ref(s, t, mask)], s)
    assert torch.allclose(fast[0], ref[0], atol=1e-6) and torch.allclose(gf[0], gr[0], atol=1e-6)
    assert float(align_loss(t, t, mask)) == 0.0


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A tiny Llama trained briefly on the test's sentences: a teacher with something to teach."""
    from transformers import LlamaForCausalLM

    from app.models import load_causal_lm
    from tests.tiny_models import tiny_tokenizer

    path = tiny_llama(str(tmp_path_factory.mktemp("teacher") / "llama"))
    model, tok = LlamaForCausalLM.from_pretrained(path), tiny_tokenizer()
    data = torch.tensor([tok(s, add_special_tokens=False)["input_ids"][:33] for s in _sentences(64, seed=7)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(60):
        x = data[torch.randint(0, len(data), (16,), generator=g)]
        model(input_ids=x, labels=x).loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(path)
    return load_causal_lm(path)


def _sentences(n, seed=0, length=40):
    import random

    rng = random.Random(seed)
    out = []
    for _ in range(n):  # learnable: runs of the vocabulary in order, from random starting words
        i = rng.randrange(len(WORDS))
        out.append(" ".join(WORDS[(i + j) % len(WORDS)] for j in range(length)))
    return out


def _check_mixer_from_attention(mx, at, d=32, input_norm=None):
    from app.distill.init import GATE_BIAS, GATE_NORM_SCALE, repeat_heads

    rows = mx.in_proj.weight  # [z | x | B | C | dt]
    assert torch.equal(rows[d:2 * d], repeat_heads(at.v_proj.weight, 2, 4, 8))  # x <- V, GQA heads repeated
    assert torch.equal(rows[2 * d:3 * d], repeat_heads(at.k_proj.weight, 2, 4, 8))  # B <- K
    assert torch.equal(rows[3 * d:4 * d], at.q_proj.weight)  # C <- Q
    assert torch.equal(mx.out_proj.weight, at.o_proj.weight)
    conv = mx.conv1d.weight  # (C, 1, K): identity, the last tap
    assert torch.equal(conv[:, 0, -1], torch.ones(conv.shape[0])) and not conv[:, 0, :-1].any() and not mx.conv1d.bias.any()
    dt = torch.nn.functional.softplus(mx.dt_bias)  # MambaInLlama's dt, A, D
    assert float(dt.min()) >= 1e-3 * 0.999 and float(dt.max()) <= 0.1 * 1.001 and float(dt.max() / dt.min()) > 2
    a = mx.A_log.exp()
    assert float(a.min()) >= 1 and float(a.max()) <= 16 and torch.equal(mx.D, torch.ones_like(mx.D))
    if input_norm is not None:  # the constant gate: z = bias, the same for every token and channel
        assert not rows[:d].any() and torch.equal(mx.in_proj.bias[:d], torch.full((d,), GATE_BIAS))
        assert not mx.in_proj.bias[d:].any() and not mx.out_proj.bias.any()
        want = GATE_NORM_SCALE * (repeat_heads(at.v_proj.weight, 2, 4, 8) * input_norm[None, :]).norm(dim=1)
        assert torch.allclose(mx.norm.weight, want)


def test_hybrid_student_inherits_the_teacher_tensor_by_tensor(teacher):
    from app.distill.student import build_student

    t = teacher.model
    student, mapped = build_student(t, "hybrid", attention_layers=[1], init="attention")
    c = student.config
    assert type(student).__name__ == "BambaForCausalLM" and c.layers_block_type == ["linear_attention", "full_attention"]
    assert (c.mamba_n_heads, c.mamba_d_head, c.mamba_d_state, c.mamba_n_groups, c.mamba_expand) == (4, 8, 8, 4, 1)
    sm = student.model
    assert torch.equal(sm.embed_tokens.weight, t.model.embed_tokens.weight)
    assert torch.equal(sm.final_layernorm.weight, t.model.norm.weight)
    for sl, tl in zip(sm.layers, t.model.layers):  # both norms and the SwiGLU MLP of every layer
        assert torch.equal(sl.input_layernorm.weight, tl.input_layernorm.weight)
        assert torch.equal(sl.pre_ff_layernorm.weight, tl.post_attention_layernorm.weight)
        for n in ("gate_proj", "up_proj", "down_proj"):
            assert torch.equal(getattr(sl.feed_forward, n).weight, getattr(tl.mlp, n).weight)
    for n in ("q_proj", "k_proj", "v_proj", "o_proj"):  # the kept attention layer, verbatim
        assert torch.equal(getattr(sm.layers[1].self_attn, n).weight, getattr(t.model.layers[1].self_attn, n).weight)
    _check_mixer_from_attention(sm.layers[0].mamba, t.model.layers[0].self_attn,
                                input_norm=t.model.layers[0].input_layernorm.weight)
    assert "model.layers.0.mamba.in_proj.weight[x,B,C]" in mapped and "model.layers.1.self_attn" in mapped
    # random mixer init: the teacher's MLPs and norms all the same, the mixer transformers' own
    rnd, _ = build_student(t, "hybrid", attention_layers=[1], init="random")
    assert torch.equal(rnd.model.layers[0].feed_forward.up_proj.weight, t.model.layers[0].mlp.up_proj.weight)
    assert torch.equal(rnd.model.layers[0].mamba.dt_bias, torch.ones(4))
    # the conv at its default init, the projections still copied
    dflt, _ = build_student(t, "hybrid", attention_layers=[], conv_init="default")
    assert dflt.model.layers[0].mamba.conv1d.weight[:, 0, :-1].any()
    # repeat_heads: head h of the result is KV head h // 2
    from app.distill.init import repeat_heads

    w = torch.arange(2 * 8 * 3, dtype=torch.float32).view(16, 3)
    r = repeat_heads(w, 2, 4, 8).view(4, 8, 3)
    assert torch.equal(r[0], r[1]) and torch.equal(r[1], w.view(2, 8, 3)[0]) and torch.equal(r[3], w.view(2, 8, 3)[1])


def test_mamba2_student_shape_and_attention_init(teacher, tmp_path):
    from transformers import AutoModelForCausalLM

    from app.distill.student import StudentShape, build_student

    t = teacher.model
    student, mapped = build_student(t, "mamba2", shape=StudentShape(), init="attention")
    c = student.config
    assert (c.hidden_size, c.num_hidden_layers, c.vocab_size) == (32, 2, t.config.vocab_size)
    assert (c.num_heads, c.head_dim, c.state_size, c.n_groups, c.expand) == (4, 8, 8, 4, 1)
    _check_mixer_from_attention(student.backbone.layers[1].mixer, t.model.layers[1].self_attn)
    assert torch.equal(student.backbone.embeddings.weight, t.model.embed_tokens.weight)
    with pytest.raises(ValueError, match="num_heads \\* head_dim"):
        build_student(t, "mamba2", shape=StudentShape(num_heads=3))
    random_student, none = build_student(t, "mamba2", shape=StudentShape(), init="random")
    assert none == [] and not torch.equal(random_student.backbone.embeddings.weight, t.model.embed_tokens.weight)
    student.save_pretrained(tmp_path / "s")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "s")
    x = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(back(x).logits, student(x).logits, atol=1e-5)


def test_attention_layer_indices_are_spaced_as_mambainllama_places_them():
    from app.config import ConfigError, load_config
    from app.distill.config import DistillConfig
    from app.distill.student import attention_layer_indices as idx

    assert idx("1/4", 30) == [3, 7, 11, 15, 19, 23, 27] and idx(0.5, 6) == [1, 3, 5] and idx("1/8", 16) == [7, 15]
    assert idx(0, 30) == [] and idx(1, 4) == [0, 1, 2, 3] and idx([5, 2, 2], 8) == [2, 5]
    assert idx(0.3, 10) == [2, 5, 9]  # round(0.3 * 10) = 3 layers, evenly spread
    with pytest.raises(ValueError, match="outside"):
        idx([9], 4)
    with pytest.raises(ValueError, match="as a fraction"):  # YAML's .inf
        idx(float("inf"), 4)
    for bad in ("2/1", "x", [-1], True):
        with pytest.raises(ConfigError, match="student.attention_layers"):
            load_config(DistillConfig, None, [f"student.attention_layers={json.dumps(bad)}"])
    with pytest.raises(ConfigError, match="mamba2 student only"):
        load_config(DistillConfig, None, ["student.hidden_size=64"])


@pytest.mark.parametrize("theta", [10000.0, 123456.0])
def test_hybrid_with_every_attention_layer_is_the_teacher(teacher, tmp_path, theta):
    """The exact-copy invariant: every attention layer kept -> the teacher's logits (fp32), also after a save and
    AutoModelForCausalLM.from_pretrained; the teacher's RoPE, not BambaConfig's half-rotary default."""
    from transformers import AutoModelForCausalLM, LlamaForCausalLM

    from app.distill.student import build_student

    t = teacher.model
    if theta != 10000.0:  # a teacher with another RoPE base: the student must carry it
        cfg = t.config.to_dict()
        cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": theta}
        t = LlamaForCausalLM(type(t.config).from_dict(cfg))
        t.load_state_dict(teacher.model.state_dict())
    t.eval()
    student, _ = build_student(t, "hybrid", attention_layers=1.0)
    assert student.config.rope_parameters["rope_theta"] == theta
    assert student.config.rope_parameters["partial_rotary_factor"] == 1.0
    x = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]])
    student.save_pretrained(tmp_path / "s")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    with torch.no_grad():
        want = t(x).logits
        assert torch.allclose(student.eval()(x).logits, want, atol=1e-5, rtol=0)
        assert torch.allclose(back(x).logits, want, atol=1e-5, rtol=0)
        back.model.rotary_emb.inv_freq = back.model.rotary_emb.inv_freq[: 2]  # half-rotary heads: not the teacher
        back.config.rope_parameters["partial_rotary_factor"] = 0.5
        from transformers.models.bamba.modeling_bamba import BambaRotaryEmbedding

        back.model.rotary_emb = BambaRotaryEmbedding(back.config)
        assert not torch.allclose(back(x).logits, want, atol=1e-3)


@pytest.mark.parametrize("attention", [0.0, 0.5])
def test_hybrid_student_generates_with_a_cache_as_without(teacher, tmp_path, attention):
    """Greedy generation with the cache equals recomputing the whole sequence at every step, for a hybrid with
    no attention layer (transformers' default cache cannot hold one: generation_cache) and one with half."""
    from transformers import AutoModelForCausalLM

    from app.caches import generation_cache
    from app.distill.student import build_student

    student, _ = build_student(teacher.model, "hybrid", attention_layers=attention)
    student.save_pretrained(tmp_path / "s")
    m = AutoModelForCausalLM.from_pretrained(tmp_path / "s").eval()
    x = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11, 12], [1, 20, 21, 22, 23, 24, 25, 26, 27]])
    cache = generation_cache(m)
    got = m.generate(x, max_new_tokens=8, do_sample=False, cache=cache, eos_token_id=None, pad_token_id=0)
    ids = x
    with torch.no_grad():
        m(x)  # a plain forward works too (a 0-attention student is saved with use_cache false)
        for _ in range(8):
            ids = torch.cat([ids, m(ids, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(got, ids)
    if attention == 0:  # one token fed per step, the last one not fed back
        assert cache.get_seq_length() == x.shape[1] + 7
    else:
        assert cache is None  # transformers' own cache


@pytest.mark.parametrize("attention", [0, 0.5])
def test_attention_init_starts_with_lower_kd_than_random(teacher, attention):
    """Before any training, the hybrid's mixers from Q/K/V/O (constant gate, scaled norm) leave the student nearer
    the teacher than transformers' own mixer init, for every seed (3 each)."""
    from app.distill.student import build_student

    tok = teacher.tokenizer
    x = torch.tensor([tok(s, add_special_tokens=False)["input_ids"][:32] for s in _sentences(8, seed=3)])
    mask = torch.ones_like(x, dtype=torch.bool)
    labels = torch.cat([x[:, 1:], torch.full((x.shape[0], 1), IGNORE)], 1)
    with torch.no_grad():
        th = teacher.model.model(input_ids=x).last_hidden_state
        kd = {}
        for init in ("attention", "random"):
            kd[init] = []
            for seed in range(3):
                s, _ = build_student(teacher.model, "hybrid", attention_layers=attention, init=init, seed=seed)
                h = s.model(input_ids=x, use_cache=False).last_hidden_state
                kd[init].append(float(kd_ce_loss(h, s.lm_head.weight, mask, labels, teacher_hidden=th,
                                                 teacher_head=teacher.model.lm_head.weight, temperature=2.0)[0]))
    assert max(kd["attention"]) < min(kd["random"]), kd


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("refined")
    texts = _sentences(240, seed=1)
    for i in range(2):  # two shards, as a refine run's kept/ has
        part = texts[i::2]
        pq.write_table(pa.table({"id": [f"doc-{i}-{j}" for j in range(len(part))], "text": part}),
                       root / f"part-{i:06d}.parquet")
    return str(root), str(tmp_path_factory.mktemp("cache"))


def _cfg(teacher_dir, corpus, out, attention="1/2", weighting="fixed", **train):
    from app.config import load_config
    from app.distill.config import DistillConfig

    data, cache = corpus
    sets = [f"teacher={teacher_dir}", f"output={out}", f"data.input={data}", f"data.cache_dir={cache}",
            "data.seq_len=32", "data.eval_fraction=0.1", "stages.align_tokens=512", "stages.kd_tokens=1536",
            "stages.ce_tokens=512", "stages.kd_ce_weight=0.2", "train.batch_size=4", "train.num_workers=2",
            "train.lr=3e-4", "stages.align_lr=1e-3", "train.warmup_steps=2", "train.checkpoint_every=4",
            "train.eval_batches=2", f"student.attention_layers={attention}", f"stages.weighting={weighting}"]
    sets += [f"train.{k}={v}" for k, v in train.items()]
    return load_config(DistillConfig, None, sets)


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def uninterrupted(ray_local, teacher, corpus, tmp_path_factory):
    """The hybrid student keeping half the attention layers (layer 1 of 2), align + kd + ce, loss weights auto (the
    learned log-variances travel in the checkpoints: the resume test below needs them back)."""
    from app.distill.train import distill

    out = str(tmp_path_factory.mktemp("run"))
    result = distill(_cfg(teacher.reference, corpus, out, weighting="auto"))
    return out, result


def test_distill_on_ray_train_losses_fall_and_student_exports(uninterrupted, teacher):
    out, result = uninterrupted
    assert not [r for r in _metrics(out) if r.get("event") == "resumed"]  # no restart in an undisturbed run
    m = [r for r in _metrics(out) if "loss" in r]
    assert [r["step"] for r in m] == list(range(1, len(m) + 1)) and len(m) == 2 + 6 + 2  # 256 tokens per step
    stages = [r["stage"] for r in m]
    assert stages == ["align"] * 2 + ["kd"] * 6 + ["ce"] * 2
    kd = [r["kd"] for r in m if r["stage"] == "kd"]
    assert kd[-1] < kd[0], kd
    assert m[1]["align"] < m[0]["align"]
    # weighting auto: stage kd's log-variances start at log of its first batch's terms (weights 1/KD and 1/CE,
    # averaged over the workers) and take no step there; then they move at stages.auto_lr (0.02) a step at most
    kd_steps = [r for r in m if r["stage"] == "kd"]
    first, second = kd_steps[0], kd_steps[1]
    assert abs(math.log(first["w_kd"] * first["kd"])) < 1e-5 and abs(math.log(first["w_ce"] * first["ce"])) < 1e-5
    assert 0 < abs(math.log(second["w_kd"] / first["w_kd"])) < 0.021
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in m)
    assert result["eval_student_ppl"] > 0 and result["eval_teacher_ppl"] > 0 and result["eval_tokens"] > 0
    assert os.listdir(os.path.join(out, "tensorboard"))
    with open(os.path.join(out, "config.yaml")) as f:
        assert "stages" in f.read()
    _check_exported(result["student"], [1])


def _check_exported(path, attention_layers):
    """The exported hybrid reloads with AutoModelForCausalLM, keeps these attention layers, its x/B/C bias is still 0
    and it generates with a cache exactly as recomputing every step."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.distill.init import xbc_bias_slice
    from app.caches import generation_cache
    from app.distill.student import ssm_mixers

    student = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(student).__name__ == "BambaForCausalLM"
    assert student.config.attn_layer_indices == attention_layers
    for mixer in ssm_mixers(student).values():  # trained, yet 0 where a bias would break left padding
        assert not mixer.in_proj.bias[xbc_bias_slice(mixer)].any()
        assert mixer.in_proj.bias[:mixer.intermediate_size].ne(4.0).any()  # the gate's bias did train
    tok = AutoTokenizer.from_pretrained(path)
    x = tok("the quick brown", return_tensors="pt", add_special_tokens=False)["input_ids"]
    gen = student.generate(x, max_new_tokens=5, do_sample=False, cache=generation_cache(student), eos_token_id=None,
                           pad_token_id=0)
    ids = x
    with torch.no_grad():  # with a cache, as recomputing every step
        for _ in range(5):
            ids = torch.cat([ids, student(ids, use_cache=False).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(gen, ids)


def test_killed_worker_resumes_from_the_last_checkpoint_with_the_same_losses(uninterrupted, ray_local, teacher,
                                                                             corpus, tmp_path):
    """The rank-0 Train worker's process is killed (SIGKILL) at step 5; the group restarts from the checkpoint
    after step 4, finishes, and every step, before and after the restart, has the loss of the uninterrupted run."""
    from app.distill.train import distill

    ref = {r["step"]: r for r in _metrics(uninterrupted[0]) if "loss" in r}
    out = str(tmp_path / "run")
    result = distill(_cfg(teacher.reference, corpus, out, weighting="auto", debug_fail_at_step=5, max_failures=1))
    assert os.path.exists(os.path.join(out, ".debug_failed"))  # the failure did happen
    events = _metrics(out)
    resumed = [i for i, r in enumerate(events) if r.get("event") == "resumed"]
    assert [events[i]["step"] for i in resumed] == [4]  # once, from the checkpoint after step 4
    assert [r["step"] for r in events[resumed[0]:] if "loss" in r] == list(range(5, 11)) and result["step"] == 10
    for r in (r for r in events if "loss" in r):  # every step of both attempts: the uninterrupted run's loss
        assert r["loss"] == pytest.approx(ref[r["step"]]["loss"], rel=1e-4, abs=1e-6), r["step"]


def test_teacher_topk_cache_matches_the_teacher_and_trains(ray_local, teacher, corpus, tmp_path):
    """The cached top-k logits are the teacher's own top k for those rows; a run of the hybrid with no attention
    layer left reads them in stage kd, and its student exports and generates with a cache."""
    import numpy as np

    from app.distill.cache import TopKRows, teacher_topk_cache
    from app.distill.data import PackedRows, prepare_data
    from app.distill.train import distill

    cfg = _cfg(teacher.reference, corpus, str(tmp_path / "run"))
    packed = prepare_data(cfg.data, cfg.teacher, corpus[1])
    cfg.cache.teacher_topk = 4
    top = teacher_topk_cache(cfg, packed, str(tmp_path))
    reader, rows = TopKRows(top["files"], 4), PackedRows(packed.train)
    assert len(reader.where) == packed.train_rows
    pick = np.array([0, packed.train_rows // 2, packed.train_rows - 1])
    ids, logits = reader.take(pick)
    with torch.no_grad():
        x = torch.from_numpy(rows.take(pick))[:, :-1]
        z = teacher.model(input_ids=x).logits
    want_v, _ = z.topk(4, dim=-1)
    assert ids.shape == (3, 32, 4)
    assert torch.allclose(torch.from_numpy(logits), want_v, atol=1e-4)
    assert torch.allclose(z.gather(-1, torch.from_numpy(ids)), want_v, atol=1e-4)  # ids point at those logits
    cfg2 = _cfg(teacher.reference, corpus, str(tmp_path / "run2"), attention=0, batch_size=4)
    cfg2.cache.teacher_topk = 4
    cfg2.stages.align_tokens, cfg2.stages.kd_tokens, cfg2.stages.ce_tokens = 0, 1024, 0
    res = distill(cfg2)
    kd = [r["kd"] for r in _metrics(str(tmp_path / "run2")) if "kd" in r]
    assert len(kd) == 4 and kd[-1] < kd[0] and res["eval_student_ppl"] > 0
    _check_exported(res["student"], [])  # the student without attention layers exports and generates too


def test_gpu_distill_script_runs_in_smoke_mode(teacher, tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "benchmarks", "gpu_distill.py"), "--smoke",
                           "--teacher", teacher.reference, "--out", str(tmp_path)], capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.load(open(tmp_path / "gpu_distill.json"))
    assert set(rep["throughput"]) == {"as_imported", "torch_path"}
    assert all(v["tokens_per_s"] > 0 for v in rep["throughput"].values())
    assert set(rep["throughput"]["torch_path"]["implementations"].values()) == {"torch"}
    assert len(rep["distill_losses"]) == 3


def test_local_paths_travel_as_absolute_ones(tmp_path, monkeypatch):
    from app.config import load_config
    from app.distill.config import DistillConfig
    from app.distill.train import absolute_paths

    monkeypatch.chdir(tmp_path)
    os.makedirs("teacher")
    cfg = load_config(DistillConfig, None, ["teacher=teacher", "output=run", "data.input=kept/*.parquet",
                                            "data.cache_dir=cache"])
    a = absolute_paths(cfg)
    assert a.teacher == str(tmp_path / "teacher") and a.output == str(tmp_path / "run")
    assert a.data.input == str(tmp_path / "kept" / "*.parquet") and a.data.cache_dir == str(tmp_path / "cache")
    assert cfg.output == "run"  # the caller's config is left alone
    hub = load_config(DistillConfig, None, ["teacher=HuggingFaceTB/SmolLM2-135M"])
    assert absolute_paths(hub).teacher == "HuggingFaceTB/SmolLM2-135M"


def test_fsdp_needs_gpus_and_says_so():
    from app.config import ConfigError, load_config
    from app.distill.config import DistillConfig

    with pytest.raises(ConfigError, match="fsdp needs train.use_gpu"):
        load_config(DistillConfig, None, ["train.strategy=fsdp"])
    assert load_config(DistillConfig, None, ["train.strategy=fsdp", "train.use_gpu=true"]).train.strategy == "fsdp"
    # one worker is never wrapped, so fsdp there is plain training, on CPUs too
    assert load_config(DistillConfig, None, ["train.strategy=fsdp", "train.num_workers=1"]).train.strategy == "fsdp"


def test_cli_distill_bad_config_is_exit_2(capsys):
    from app.cli import main

    assert main(["distill", "--set", "stages.kd_tokens=-1"]) == 2
    assert "stages.kd_tokens" in capsys.readouterr().err


def test_batches_cover_each_epoch_once_across_workers():
    from app.distill.data import batch_rows, eval_split

    rows, bs, world = 100, 4, 2  # 25 batches per epoch
    seen = []
    for step in range(13):  # 26 batches: one epoch and one batch of the next
        for rank in range(world):
            seen.append(tuple(batch_rows(step, rank, world, bs, rows, seed=0)))
    first = seen[:25]
    assert len(set(first)) == 25 and sorted(r for b in first for r in b) == list(range(100))
    assert seen == [tuple(batch_rows(s, r, world, bs, rows, seed=0)) for s in range(13) for r in range(world)]
    assert [tuple(batch_rows(s, 0, 1, bs, rows, seed=1)) for s in range(25)] != [tuple(batch_rows(s, 0, 1, bs, rows, seed=0)) for s in range(25)]
    with pytest.raises(ValueError, match="fewer than one batch"):
        batch_rows(0, 0, 1, 8, 5, 0)
    held = sum(eval_split(f"doc-{i}", 0.1) for i in range(5000))
    assert 400 < held < 600 and eval_split("doc-1", 0.1) == eval_split("doc-1", 0.1)


def test_uncertainty_weights_match_reference_values_and_gradients():
    from app.distill.losses import uncertainty_weighted, uncertainty_weighted_ref

    terms = torch.tensor([0.5, 2.0, 7.0], requires_grad=True)
    s = torch.tensor([0.0, -0.3, 1.2], requires_grad=True)
    fast, gf = _grads(lambda: [uncertainty_weighted(terms, s)], terms, s)
    ref, gr = _grads(lambda: [uncertainty_weighted_ref(terms, s)], terms, s)
    assert torch.allclose(fast[0], ref[0]) and all(torch.allclose(a, b) for a, b in zip(gf, gr))
    # at its optimum s_i = log L_i: a term's weight is 1 / L_i
    opt = torch.log(terms.detach())
    opt.requires_grad_(True)
    uncertainty_weighted(terms.detach(), opt).backward()
    assert torch.allclose(opt.grad, torch.zeros(3), atol=1e-6)


@pytest.mark.parametrize("auto", [False, True])
def test_align_stage_loss_and_gradients_match_a_plain_reference(teacher, auto):
    """Stage align through the trainer's module: each mixer on the teacher's normed layer input against the teacher's
    attention output; the loss and every gradient equal a plain loop's, and only mixer parameters (and the auto
    weights) get gradients."""
    from app.distill.losses import uncertainty_weighted_ref
    from app.distill.student import build_student, ssm_mixers
    from app.distill.train import TeacherTaps, _module

    t = teacher.model.eval()
    student, _ = build_student(t, "hybrid", attention_layers=0, seed=3)
    mod = _module()(student, 16, auto)
    if auto:
        with torch.no_grad():
            mod.log_vars["align"].copy_(torch.tensor([0.4, -0.2]))
    x = torch.tensor([[1, 5, 6, 7, 8, 9, 10, 11], [1, 12, 13, 14, 15, 16, 17, 18]])
    mask = torch.ones_like(x, dtype=torch.bool)
    taps = TeacherTaps(t, mod.mixer_layers)
    with torch.no_grad():
        t.model(input_ids=x, use_cache=False)
    ins, outs = taps.take()
    taps.remove()
    assert sorted(ins) == [0, 1] and ins[0].shape == (2, 8, 32)
    with torch.no_grad():  # the tap holds the normed input: the teacher's input_layernorm of the layer's input
        h0 = t.model.embed_tokens(x)
        assert torch.allclose(ins[0], t.model.layers[0].input_layernorm(h0), atol=1e-6)
    out = mod(x, None, mask, "align", {"align_weight": 1.5}, {"attn_inputs": ins, "attn_outputs": outs})
    raw = mod(x, None, mask, "align", {}, {"attn_inputs": ins, "attn_outputs": outs}, raw=True)["terms"]
    out["loss"].backward()
    got = {n: p.grad.clone() for n, p in mod.named_parameters() if p.grad is not None}
    assert got and all(".mamba." in n or "log_vars" in n for n in got), sorted(got)
    mod.zero_grad(set_to_none=True)
    mixers = ssm_mixers(student)
    parts = [align_loss_ref(mixers[i](ins[i]), outs[i], mask) for i in (0, 1)]
    ref = uncertainty_weighted_ref(parts, mod.log_vars["align"]) if auto else 1.5 * sum(parts) / 2
    ref.backward()
    assert torch.allclose(out["loss"], ref, atol=1e-6) and torch.allclose(out["align"], sum(parts) / 2, atol=1e-6)
    assert torch.allclose(raw, torch.stack(parts), atol=1e-6)  # what the auto weighting's start reads
    for n, p in mod.named_parameters():
        if n in got:
            assert torch.allclose(got[n], p.grad, atol=1e-6, rtol=1e-4), n


def test_a_rerun_with_other_settings_is_refused_before_anything_changes(ray_local, teacher, corpus, tmp_path):
    """A run's output directory resumes its checkpoints only under the settings that made them: other workers,
    batch size or stage budgets are refused with what differs, and config.yaml / run.json stay as they were."""
    from app.distill.train import _check_rerun, prepare, run_key_diff

    out = str(tmp_path / "run")
    prep = prepare(_cfg(teacher.reference, corpus, out))
    os.makedirs(os.path.join(out, "ray", "train"))  # as Ray Train leaves it when a run fails before a checkpoint:
    _check_rerun(out, {**prep.key, "batch_size": 2})  # other settings are welcome
    os.makedirs(os.path.join(out, "ray", "train", "checkpoint_2026-12-01_00-00-00.000000"))  # after a checkpoint
    before = {f: open(os.path.join(out, f)).read() for f in ("config.yaml", "run.json")}
    for sets, named in ((["train.batch_size=2"], "train.batch_size: 4 -> 2"),
                        (["stages.kd_tokens=4096"], "steps of stage kd: 6 -> 16"),
                        (["train.num_workers=1"], "train.num_workers: 2 -> 1")):
        cfg = _cfg(teacher.reference, corpus, out)
        for s in sets:
            k, v = s.split("=")
            sec, key = k.split(".")
            setattr(getattr(cfg, sec), key, type(getattr(getattr(cfg, sec), key))(v))
        with pytest.raises(ValueError, match="other settings") as e:
            prepare(cfg)
        assert named in str(e.value), str(e.value)
    assert before == {f: open(os.path.join(out, f)).read() for f in ("config.yaml", "run.json")}
    _check_rerun(out, prep.key)  # the same settings resume
    assert run_key_diff(None, prep.key) == ""


def test_memory_estimate_refuses_what_does_not_fit_and_names_what_to_lower(teacher):
    from app.config import load_config
    from app.distill.config import DistillConfig
    from transformers import LlamaConfig

    from app.distill.memory import GiB, check_fits, estimate, param_count
    from app.distill.student import build_student

    smol = LlamaConfig(hidden_size=576, num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                       intermediate_size=1536, vocab_size=49152, tie_word_embeddings=True)  # SmolLM2-135M's shape
    cfg = load_config(DistillConfig, None, [])
    est = estimate(cfg, smol)
    assert 1 * GiB < est.total < 12 * GiB and est.student > est.teacher * 3  # 16 bytes a parameter, vs 4
    big = load_config(DistillConfig, None, ["train.batch_size=64", "data.seq_len=2048"])
    assert estimate(big, smol).activations > 30 * est.activations
    with pytest.raises(ValueError, match="Lower train.batch_size \\(now 64\\) or data.seq_len \\(now 2048\\)"):
        check_fits(big, smol)
    kernels = estimate(cfg, smol, kernels=True)
    assert kernels.activations < est.activations  # the kernels keep no chunk x chunk tensors
    tiny = load_config(DistillConfig, None, ["train.batch_size=4", "data.seq_len=32"])
    assert check_fits(tiny, teacher.model.config).total < 1 * GiB
    # the parameter counts are exact: the models built on the meta device, as the real ones
    assert param_count(teacher.model.config) == sum(p.numel() for p in teacher.model.parameters())
    for arch, attention in (("hybrid", "1/2"), ("hybrid", "0"), ("mamba2", "0")):
        c = load_config(DistillConfig, None, [f"student.arch={arch}", f"student.attention_layers={attention}"])
        student, _ = build_student(teacher.model, arch, attention_layers=attention, shape=c.student.shape())
        assert estimate(c, teacher.model.config).student == 16 * sum(p.numel() for p in student.parameters())
