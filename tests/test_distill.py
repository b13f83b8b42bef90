"""Distillation: losses against their references (values and gradients), the student and its attention
init, and Ray Train runs (2 workers, CPU) with a tiny Llama teacher: losses fall, resume after a failure gives
the same next-step loss, the exported student reloads and generates."""

import json
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


def test_student_shape_and_attention_init(teacher, tmp_path):
    from transformers import Mamba2ForCausalLM

    from app.distill.init import repeat_heads
    from app.distill.student import StudentShape, build_student

    t = teacher.model
    student, mapped = build_student(t, StudentShape(), init="attention")
    c = student.config
    assert (c.hidden_size, c.num_hidden_layers, c.vocab_size) == (32, 2, t.config.vocab_size)
    assert (c.num_heads, c.head_dim, c.state_size, c.n_groups, c.expand) == (4, 8, 8, 4, 1)
    mx, at = student.backbone.layers[1].mixer, t.model.layers[1].self_attn
    d = 32
    rows = mx.in_proj.weight
    assert torch.equal(rows[d:2 * d], repeat_heads(at.v_proj.weight, 2, 4, 8))  # x <- V, GQA heads repeated
    assert torch.equal(rows[2 * d:3 * d], repeat_heads(at.k_proj.weight, 2, 4, 8))  # B <- K
    assert torch.equal(rows[3 * d:4 * d], at.q_proj.weight)  # C <- Q
    assert torch.equal(mx.out_proj.weight, at.o_proj.weight)
    assert torch.equal(student.backbone.embeddings.weight, t.model.embed_tokens.weight)
    # repeat_heads: head h of the result is KV head h // 2
    w = torch.arange(2 * 8 * 3, dtype=torch.float32).view(16, 3)
    r = repeat_heads(w, 2, 4, 8).view(4, 8, 3)
    assert torch.equal(r[0], r[1]) and torch.equal(r[1], w.view(2, 8, 3)[0]) and torch.equal(r[3], w.view(2, 8, 3)[1])
    with pytest.raises(ValueError, match="num_heads \\* head_dim"):
        build_student(t, StudentShape(num_heads=3))
    random_student, none = build_student(t, StudentShape(), init="random")
    assert none == [] and not torch.equal(random_student.backbone.embeddings.weight, t.model.embed_tokens.weight)
    student.save_pretrained(tmp_path / "s")
    back = Mamba2ForCausalLM.from_pretrained(tmp_path / "s")
    x = torch.tensor([[1, 5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(back(x).logits, student(x).logits, atol=1e-5)


def test_attention_init_starts_with_lower_kd_than_random(teacher):
    from app.distill.student import StudentShape, build_student

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
                s, _ = build_student(teacher.model, StudentShape(), init=init, seed=seed)
                h = s.backbone(input_ids=x).last_hidden_state
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


def _cfg(teacher_dir, corpus, out, **train):
    from app.config import load_config
    from app.distill.config import DistillConfig

    data, cache = corpus
    sets = [f"teacher={teacher_dir}", f"output={out}", f"data.input={data}", f"data.cache_dir={cache}",
            "data.seq_len=32", "data.eval_fraction=0.1", "stages.align_tokens=512", "stages.kd_tokens=1536",
            "stages.ce_tokens=512", "stages.kd_ce_weight=0.2", "train.batch_size=4", "train.num_workers=2",
            "train.lr=3e-3", "train.warmup_steps=2", "train.checkpoint_every=4", "train.eval_batches=2"]
    sets += [f"train.{k}={v}" for k, v in train.items()]
    return load_config(DistillConfig, None, sets)


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def uninterrupted(ray_local, teacher, corpus, tmp_path_factory):
    from app.distill.train import distill

    out = str(tmp_path_factory.mktemp("run"))
    result = distill(_cfg(teacher.reference, corpus, out))
    return out, result


def test_distill_on_ray_train_losses_fall_and_student_exports(uninterrupted, teacher):
    from transformers import AutoTokenizer, Mamba2ForCausalLM

    out, result = uninterrupted
    assert not [r for r in _metrics(out) if r.get("event") == "resumed"]  # no restart in an undisturbed run
    m = [r for r in _metrics(out) if "loss" in r]
    assert [r["step"] for r in m] == list(range(1, len(m) + 1)) and len(m) == 2 + 6 + 2  # 256 tokens per step
    stages = [r["stage"] for r in m]
    assert stages == ["align"] * 2 + ["kd"] * 6 + ["ce"] * 2
    kd = [r["kd"] for r in m if r["stage"] == "kd"]
    assert kd[-1] < kd[0], kd
    assert m[1]["align"] < m[0]["align"]
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in m)
    assert result["eval_student_ppl"] > 0 and result["eval_teacher_ppl"] > 0 and result["eval_tokens"] > 0
    assert os.listdir(os.path.join(out, "tensorboard"))
    student = Mamba2ForCausalLM.from_pretrained(result["student"])
    tok = AutoTokenizer.from_pretrained(result["student"])
    x = tok("the quick brown", return_tensors="pt", add_special_tokens=False)
    gen = student.generate(**x, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == x["input_ids"].shape[1] + 5
    with open(os.path.join(out, "config.yaml")) as f:
        assert "stages" in f.read()


def test_killed_worker_resumes_from_the_last_checkpoint_with_the_same_losses(uninterrupted, ray_local, teacher,
                                                                             corpus, tmp_path):
    """The rank-0 Train worker's process is killed (SIGKILL) at step 5; the group restarts from the checkpoint
    after step 4, finishes, and every step, before and after the restart, has the loss of the uninterrupted run."""
    from app.distill.train import distill

    ref = {r["step"]: r for r in _metrics(uninterrupted[0]) if "loss" in r}
    out = str(tmp_path / "run")
    result = distill(_cfg(teacher.reference, corpus, out, debug_fail_at_step=5, max_failures=1))
    assert os.path.exists(os.path.join(out, ".debug_failed"))  # the failure did happen
    events = _metrics(out)
    resumed = [i for i, r in enumerate(events) if r.get("event") == "resumed"]
    assert [events[i]["step"] for i in resumed] == [4]  # once, from the checkpoint after step 4
    assert [r["step"] for r in events[resumed[0]:] if "loss" in r] == list(range(5, 11)) and result["step"] == 10
    for r in (r for r in events if "loss" in r):  # every step of both attempts: the uninterrupted run's loss
        assert r["loss"] == pytest.approx(ref[r["step"]]["loss"], rel=1e-4, abs=1e-6), r["step"]


def test_teacher_topk_cache_matches_the_teacher_and_trains(ray_local, teacher, corpus, tmp_path):
    """The cached top-k logits are the teacher's own top k for those rows; a run reads them in stage kd."""
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
    cfg2 = _cfg(teacher.reference, corpus, str(tmp_path / "run"), batch_size=4)
    cfg2.cache.teacher_topk = 4
    cfg2.stages.align_tokens, cfg2.stages.kd_tokens, cfg2.stages.ce_tokens = 0, 1024, 0
    res = distill(cfg2)
    kd = [r["kd"] for r in _metrics(str(tmp_path / "run")) if "kd" in r]
    assert len(kd) == 4 and kd[-1] < kd[0] and res["eval_student_ppl"] > 0


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
