"""Delta transfer: extract (SVD -> PEFT LoRA), apply (merge / other checkpoint), verify; tiny models built here."""

import json
import os

import pytest
import torch

from app.delta.apply import apply, load_adapted
from app.delta.checkpoint import LAYOUTS, Checkpoint, DeltaError, layout_kinds, meta_kinds, module_kinds
from app.delta.extract import RankPolicy, extract, factorize, pick_rank
from tests.tiny_models import tiny_tokenizer

ARCHS = ["gpt2", "llama", "qwen2"]


def build(arch: str, seed: int = 0, vocab_extra: int = 0, tie: bool = True):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    tok = tiny_tokenizer()
    v = len(tok) + vocab_extra
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(vocab_size=v, n_embd=32, n_layer=2, n_head=4, n_positions=64, **ids)), tok
    common = dict(vocab_size=v, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=tie, **ids)
    if arch == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)), tok
    return Qwen2ForCausalLM(Qwen2Config(**common)), tok


def perturb(model, seed: int, rank: int = 3, scale: float = 0.05):
    """A 'fine-tune': low-rank + small full-rank changes to every matrix, and changed biases and norms."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2:
                a = torch.randn(p.shape[0], rank, generator=g)
                b = torch.randn(rank, p.shape[1], generator=g)
                p.add_(scale * a @ b / rank + 0.002 * torch.randn(p.shape, generator=g))
            else:
                p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model


def save(model, tok, path):
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module", params=ARCHS)
def pair(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    base, tok = build(request.param, tie=request.param != "llama")  # llama untied: exercises embedding LoRA
    b = save(base, tok, root / "base")
    t = save(perturb(base, 1), tok, root / "tuned")
    return request.param, b, t, root


def tokens(tok, n=4):
    words = "the quick brown fox jumps over lazy dog and a cat sat on mat".split()
    return torch.tensor([[tok.bos_token_id] + [tok.convert_tokens_to_ids(w) for w in words[i:] + words[:i]]
                         for i in range(n)])


def state(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def test_full_rank_round_trip_reproduces_every_module_kind(pair, tmp_path):
    arch, base, tuned, _ = pair
    res = extract(base, tuned, str(tmp_path / "ad"), policy=RankPolicy(energy=1.0), embeddings="lora")
    kinds = {v["kind"] for v in res.modules.values()}
    assert ({"conv1d"} if arch == "gpt2" else {"linear"}) <= kinds and "modules_to_save" in kinds  # norms
    if arch == "llama":
        assert "embedding" in kinds and res.modules["lm_head"]["kind"] == "linear"  # untied output layer: LoRA
    else:  # tied embeddings (and lora_bias) exclude embedding LoRA: the embedding travels in full, said so
        assert any("tied embedding" in why or "lora_bias" in why for why in res.skipped.values())
    cfg = json.load(open(tmp_path / "ad" / "adapter_config.json"))
    from peft import LoraConfig

    lc = LoraConfig.from_pretrained(str(tmp_path / "ad"))  # PEFT reads the config written without peft
    assert lc.r == cfg["r"] and set(lc.target_modules) == set(cfg["target_modules"]) and lc.rank_pattern == cfg["rank_pattern"]
    assert cfg["lora_bias"] == (arch in ("gpt2", "qwen2"))  # GPT-2 Conv1D and Qwen2 q/k/v have biases
    merged_dir = apply(str(tmp_path / "ad"), base, str(tmp_path / "merged"), merge=True)
    merged, want = state(merged_dir).state_dict(), state(tuned).state_dict()
    for k, v in want.items():
        assert torch.allclose(merged[k], v, atol=2e-5), (k, float((merged[k] - v).abs().max()))
    # PEFT's unmerged model, the merged one and the tuned one give the same logits
    peft_model, tok = load_adapted(str(tmp_path / "ad"), base)
    x = tokens(tok)
    with torch.no_grad():
        lp = peft_model(input_ids=x).logits
        lm = state(merged_dir)(input_ids=x).logits
        lt = state(tuned)(input_ids=x).logits
    assert torch.allclose(lp, lm, atol=1e-4) and torch.allclose(lm, lt, atol=1e-4)


@pytest.mark.parametrize("pair", ["gpt2"], indirect=True)  # Conv1D is GPT-2's
def test_conv1d_is_decomposed_not_saved_full(pair, tmp_path):
    arch, base, tuned, _ = pair
    extract(base, tuned, str(tmp_path / "ad"), policy=RankPolicy(rank=4))
    from safetensors.torch import load_file

    sd = load_file(str(tmp_path / "ad" / "adapter_model.safetensors"))
    a = sd["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"]
    b = sd["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"]
    assert a.shape == (4, 32) and b.shape == (96, 4)
    assert "base_model.model.transformer.h.0.attn.c_attn.weight" not in sd
    assert sd["base_model.model.transformer.h.0.attn.c_attn.lora_B.bias"].shape == (96,)
    assert a.dtype == torch.float32  # the input's dtype by default
    extract(base, tuned, str(tmp_path / "bf"), policy=RankPolicy(rank=4), dtype="bfloat16")
    assert {t.dtype for t in load_file(str(tmp_path / "bf" / "adapter_model.safetensors")).values()} == {torch.bfloat16}


def test_energy_picks_the_smallest_rank_reaching_the_threshold():
    torch.manual_seed(0)
    u, _ = torch.linalg.qr(torch.randn(40, 40))
    v, _ = torch.linalg.qr(torch.randn(30, 30))
    s = torch.tensor([10.0, 5, 3, 2, 1] + [0.1] * 25)
    m = u[:, :30] @ torch.diag(s) @ v.T
    total = float((s ** 2).sum())
    for f in (0.5, 0.8, 0.9, 0.97, 0.99, 0.999, 1.0):
        k = factorize(m, RankPolicy(energy=f))[2]
        cum = torch.cumsum(s ** 2, 0) / total
        assert float(cum[k - 1]) >= f - 1e-6 and (k == 1 or float(cum[k - 2]) < f)
    assert pick_rank(s, total, RankPolicy(sv_epsilon=1.5)) == 4
    assert factorize(m, RankPolicy(energy=0.9, svd="randomized", max_rank=8))[2] == factorize(m, RankPolicy(energy=0.9))[2]


def test_randomized_svd_error_within_one_percent_of_exact():
    torch.manual_seed(1)
    for shape in ((256, 192), (96, 320)):
        u, _ = torch.linalg.qr(torch.randn(shape[0], min(shape)))
        v, _ = torch.linalg.qr(torch.randn(shape[1], min(shape)))
        s = torch.exp(-torch.arange(min(shape), dtype=torch.float32) / 12)  # decaying spectrum
        m = u @ torch.diag(s) @ v.T + 1e-4 * torch.randn(shape)
        for k in (8, 16, 32):
            exact = factorize(m, RankPolicy(rank=k))[4]
            rand = factorize(m, RankPolicy(rank=k, svd="randomized", oversample=10, power_iters=2))[4]
            assert rand <= exact * 1.01, (shape, k, exact, rand)


def test_gram_svd_gives_the_exact_truncation():
    """--svd gram (eigh of the Gram matrix) against LAPACK's SVD: the same optimal error at every rank, the same
    energy-picked ranks, and full rank reproduces the matrix; tall and wide, with a zero singular value."""
    torch.manual_seed(2)
    for shape in ((256, 96), (64, 320)):
        r = min(shape)
        u, _ = torch.linalg.qr(torch.randn(shape[0], r))
        v, _ = torch.linalg.qr(torch.randn(shape[1], r))
        s = torch.exp(-torch.arange(r, dtype=torch.float32) / 10)
        s[-1] = 0  # rank-deficient: a zero singular value must not become inf/nan in the factors
        m = u @ torch.diag(s) @ v.T
        for k in (1, 8, 32, r):
            exact = factorize(m, RankPolicy(rank=k))
            gram = factorize(m, RankPolicy(rank=k, svd="gram"))
            assert abs(gram[4] - exact[4]) <= 1e-5 + 1e-4 * exact[4], (shape, k, exact[4], gram[4])
            assert gram[0].shape == exact[0].shape and gram[1].shape == exact[1].shape
            assert torch.isfinite(gram[0]).all() and torch.isfinite(gram[1]).all()
        assert float((factorize(m, RankPolicy(rank=r, svd="gram"))[0] @ factorize(m, RankPolicy(rank=r, svd="gram"))[1]
                      - m).abs().max()) < 1e-5
        for f in (0.5, 0.9, 0.99):
            assert factorize(m, RankPolicy(energy=f, svd="gram"))[2] == factorize(m, RankPolicy(energy=f))[2]


def test_gram_extraction_reproduces_the_delta_at_full_rank(pair, tmp_path):
    from app.delta.verify import module_errors

    _, base, tuned, _ = pair
    extract(base, tuned, str(tmp_path / "ad"), policy=RankPolicy(energy=1.0, svd="gram"), embeddings="lora")
    errors = module_errors(base, tuned, str(tmp_path / "ad"))
    assert errors and max(v["rel_error"] for v in errors.values()) < 1e-4, errors


@pytest.mark.parametrize("model_type", sorted(LAYOUTS))
def test_module_layouts_match_the_model_classes(model_type, tmp_path):
    """layout_kinds (read off the checkpoint, no transformers) == meta_kinds (the model's own classes) for every
    family it claims, tied and untied, and with tie_word_embeddings left out of config.json (inferred)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    small = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, max_position_embeddings=64, head_dim=8, pad_token_id=0, bos_token_id=1,
                 eos_token_id=2)
    for tie in (True, False):
        path = tmp_path / f"tie{tie}"
        AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **small, tie_word_embeddings=tie)).save_pretrained(path)
        ck = Checkpoint(str(path))
        kinds, params, tied = meta_kinds(ck.hf_config)
        saved = {k.rsplit(".", 1)[0] for k in ck.keys()} | {o for _, o in tied}
        want = ({m: k for m, k in kinds.items() if m in saved}, {m: sorted(p) for m, p in params.items() if m in saved}, tied)
        got = layout_kinds(ck)
        assert (got[0], {m: sorted(p) for m, p in got[1].items()}, got[2]) == want
        assert module_kinds(ck) == got
        assert ({"conv1d"} if model_type == "gpt2" else {"linear"}) <= set(got[0].values())
        cfg = json.load(open(path / "config.json"))
        del cfg["tie_word_embeddings"]
        json.dump(cfg, open(path / "config.json", "w"))
        assert layout_kinds(Checkpoint(str(path)))[2] == tied


def test_apply_onto_another_checkpoint_transfers_the_delta(tmp_path):
    """base_v2 + (tuned_v1 - base_v1): the point of the tool. LoRA'd modules get the delta added; modules in
    modules_to_save (norms here) carry tuned_v1's values, as PEFT defines them."""
    base_v1, tok = build("llama", seed=0, tie=False)
    b1 = save(base_v1, tok, tmp_path / "b1")
    t1 = save(perturb(base_v1, 1), tok, tmp_path / "t1")
    b2 = save(perturb(build("llama", seed=0, tie=False)[0], 7, scale=0.2), tok, tmp_path / "b2")  # another checkpoint
    res = extract(b1, t1, str(tmp_path / "ad"), policy=RankPolicy(energy=1.0))
    saved = {m for m, v in res.modules.items() if v["kind"] == "modules_to_save"}
    assert saved and all("norm" in m for m in saved)
    out = apply(str(tmp_path / "ad"), b2, str(tmp_path / "b2t"), merge=True)
    got, sb1, st1, sb2 = (state(p).state_dict() for p in (out, b1, t1, b2))
    for k in st1:
        want = st1[k] if k.rsplit(".", 1)[0] in saved else sb2[k] + (st1[k] - sb1[k])
        assert torch.allclose(got[k], want, atol=3e-5), k
    kept = apply(str(tmp_path / "ad"), b2, str(tmp_path / "b2a"), merge=False)
    assert os.path.isfile(os.path.join(kept, "adapter_model.safetensors"))


def test_low_rank_is_lossy_and_reported(pair, tmp_path):
    _, base, tuned, _ = pair
    res = extract(base, tuned, str(tmp_path / "ad"), policy=RankPolicy(rank=2), embeddings="full")
    errs = [v["rel_error"] for v in res.modules.values() if "rel_error" in v]
    assert errs and all(0 < e < 1 for e in errs)
    assert all(v["rank"] <= 2 for v in res.modules.values() if "rank" in v)
    meta = json.load(open(tmp_path / "ad" / "distillery_delta.json"))
    assert meta["streamed"] and meta["modules"] == json.loads(json.dumps(res.modules))


def test_vocabulary_mismatch_is_an_error_unless_resize(tmp_path):
    base, tok = build("llama", seed=0, tie=False)
    b = save(base, tok, tmp_path / "b")
    big, _ = build("llama", seed=0, vocab_extra=3, tie=False)
    with torch.no_grad():
        sd = base.state_dict()
        for k, p in big.state_dict().items():
            if p.shape == sd[k].shape:
                p.copy_(sd[k])
            else:
                p[: sd[k].shape[0]].copy_(sd[k])
    t = save(perturb(big, 2), tok, tmp_path / "t")
    with pytest.raises(DeltaError, match="vocabulary size differs"):
        extract(b, t, str(tmp_path / "ad"), policy=RankPolicy(rank=4))
    extract(b, t, str(tmp_path / "ad"), policy=RankPolicy(energy=1.0), resize=True)
    out = apply(str(tmp_path / "ad"), b, str(tmp_path / "m"))
    got, want = state(out).state_dict(), state(t).state_dict()
    for k in want:
        assert torch.allclose(got[k], want[k], atol=3e-5), k


def test_parallel_workers_give_the_same_adapter(pair, tmp_path):
    """Factorizations on several threads (torch's threads shared out, then restored) == one after another."""
    from safetensors.torch import load_file

    _, base, tuned, _ = pair
    threads = torch.get_num_threads()
    for w in (1, 3):
        extract(base, tuned, str(tmp_path / f"w{w}"), policy=RankPolicy(rank=3, svd="gram"), workers=w)
        assert torch.get_num_threads() == threads
    one, three = (load_file(str(tmp_path / f"w{w}" / "adapter_model.safetensors")) for w in (1, 3))
    assert one.keys() == three.keys()
    for k in one:  # a singular vector's sign may differ; the product B @ A may not
        if k.endswith("lora_B.weight"):
            a = k.replace("lora_B", "lora_A")
            assert torch.allclose(one[k] @ one[a], three[k] @ three[a], atol=1e-5), k
        elif not k.endswith("lora_A.weight"):
            assert torch.equal(one[k], three[k]), k
    meta = [json.load(open(tmp_path / f"w{w}" / "distillery_delta.json"))["modules"] for w in (1, 3)]
    assert {m: v["rank"] for m, v in meta[0].items() if "rank" in v} == {m: v["rank"] for m, v in meta[1].items() if "rank" in v}


def test_bad_arguments_fail_with_a_clear_error(pair, tmp_path):
    _, base, tuned, _ = pair
    with pytest.raises(DeltaError, match="exactly one"):
        RankPolicy(rank=4, energy=0.9)
    with pytest.raises(DeltaError, match="do not differ"):
        extract(base, base, str(tmp_path / "ad"), policy=RankPolicy(rank=4))


def test_verify_and_cli_report_errors_and_kl(pair, tmp_path, capsys):
    from app.cli import main

    arch, base, tuned, _ = pair
    texts = tmp_path / "t.txt"
    texts.write_text("the quick brown fox jumps over the lazy dog\n{\"text\": \"a cat sat on the mat\"}\n")
    full, low = str(tmp_path / "full"), str(tmp_path / "low")
    assert main(["delta", "extract", "--base", base, "--tuned", tuned, "--out", full, "--energy", "1.0"]) == 0
    assert main(["delta", "extract", "--base", base, "--tuned", tuned, "--out", low, "--rank", "1",
                 "--svd", "randomized"]) == 0
    assert main(["delta", "verify", "--base", base, "--tuned", tuned, "--adapter", full, "--texts", str(texts),
                 "--report", str(tmp_path / "full.json")]) == 0
    assert main(["delta", "verify", "--base", base, "--tuned", tuned, "--adapter", low, "--texts", str(texts),
                 "--report", str(tmp_path / "low.json")]) == 0
    rf, rl = (json.load(open(tmp_path / f)) for f in ("full.json", "low.json"))
    assert rf["functional"]["tokens"] == rl["functional"]["tokens"] > 0
    kl_full, kl_low = rf["functional"]["kl_tuned_vs_adapted"], rl["functional"]["kl_tuned_vs_adapted"]
    assert kl_full < 1e-6 and kl_low > 100 * max(kl_full, 1e-9)
    assert rf["functional"]["perplexity_tuned"] == pytest.approx(rf["functional"]["perplexity_adapted"], rel=1e-5)
    assert all(m["rel_error"] < 1e-4 and m["energy_kept"] == pytest.approx(1, abs=1e-4) for m in rf["modules"].values())
    assert all(m["rank"] == 1 and 0 < m["rel_error"] < 1 for m in rl["modules"].values())
    assert rf["summary"]["rel_error"] < 1e-4  # the overall error: per-module errors weighted by ||delta||^2
    errs, sq = [m["rel_error"] for m in rl["modules"].values()], [m["delta_sq"] for m in rl["modules"].values()]
    assert rl["summary"]["rel_error"] == pytest.approx((sum(e * e * d for e, d in zip(errs, sq)) / sum(sq)) ** 0.5)
    assert min(errs) <= rl["summary"]["rel_error"] <= max(errs)
    assert "KL(tuned || base+adapter)" in capsys.readouterr().out
    assert main(["delta", "extract", "--base", base, "--tuned", base, "--out", str(tmp_path / "x"), "--rank", "2"]) == 2
    assert "do not differ" in capsys.readouterr().err


@pytest.mark.slow
def test_gguf_reference_is_read_whole_and_extracts(tmp_path):
    """The real SmolLM2 GGUF as the base (dequantized, not streamed) against a local copy with one matrix tuned."""
    from app.models import load_causal_lm, plain_copy

    lm = load_causal_lm("smollm2")
    plain = plain_copy(lm.model)
    assert not hasattr(plain.config, "quantization_config") and hasattr(lm.model.config, "quantization_config")
    target = "model.layers.0.self_attn.q_proj"
    with torch.no_grad():
        w = plain.get_submodule(target).weight
        g = torch.Generator().manual_seed(0)
        w.add_(0.01 * torch.randn(w.shape[0], 2, generator=g) @ torch.randn(2, w.shape[1], generator=g))
    tuned = save(plain, lm.tokenizer, tmp_path / "tuned")
    res = extract("smollm2", tuned, str(tmp_path / "ad"), policy=RankPolicy(rank=2))
    assert res.modules == {target: {"kind": "linear", "rank": 2, "energy": pytest.approx(1, abs=1e-5),
                                    "rel_error": pytest.approx(0, abs=1e-3)}}
    assert json.load(open(tmp_path / "ad" / "distillery_delta.json"))["streamed"] is False


def test_reported_error_is_the_computed_one():
    """factorize's error (from the kept energy where that is accurate) == ||m - B A|| / ||m||, every method."""
    torch.manual_seed(3)
    m = torch.randn(96, 160) @ torch.diag(torch.exp(-torch.arange(160.0) / 30)) @ torch.randn(160, 160) / 10
    for svd in ("exact", "gram", "randomized"):
        for k in (2, 16, 60, 96):
            b, a, _, energy, err = factorize(m, RankPolicy(rank=k, svd=svd))
            want = float(torch.linalg.matrix_norm(m - b @ a) / torch.linalg.matrix_norm(m))
            assert err == pytest.approx(want, rel=1e-3, abs=1e-6), (svd, k, err, want)
            assert energy == pytest.approx(1 - want ** 2, abs=1e-4)
