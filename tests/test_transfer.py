"""delta transfer across families: byte-exact span alignment, span log-likelihoods, and the transfer itself from a
GPT-2-shaped A onto a Qwen2-shaped B, each with its own byte-level BPE trained here (tests/sublang.py)."""

import json
import math
import os

import numpy as np
import pytest
import torch

from app.delta.checkpoint import DeltaError
from app.delta.spans import TokenBytes, align, windows
from tests import sublang

TRICKY = ["Café au lait, naïve résumé — 日本語のテキスト 🙂🙂 and tabs\there,\n\nnew  lines  and   spaces.",
          "  leading spaces, trailing ones  ", "ünïcödé ÄÖÜ ß ø å € ¥ © ™ … “quotes” ‘single’",
          "The red fox sees a blue owl near the hill. 123 4567 89 x=y+z; {a: [1, 2]}"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return sublang.build_world(str(tmp_path_factory.mktemp("sublang")))


@pytest.fixture(scope="module")
def toks(world):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(world["a0"]), AutoTokenizer.from_pretrained(world["b"])


def metaspace_tokenizer(corpus, vocab_size=300, normalize=False):
    """A SentencePiece-style BPE (▁ for spaces, a dummy prefix, <0xNN> byte fallback), as Llama-2 and Gemma."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE(byte_fallback=True, unk_token=None))
    if normalize:
        tk.normalizer = normalizers.Lowercase()
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    byte_pieces = [f"<0x{i:02X}>" for i in range(256)]
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=vocab_size + 256, special_tokens=["<s>", "</s>"] + byte_pieces,
                                                       show_progress=False))
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>")


def test_spans_tile_every_byte_for_byte_level_and_metaspace_tokenizers(toks):
    tok_a, tok_b = toks
    meta = metaspace_tokenizer(sublang.texts(50, False, 7))
    for a, b in [(tok_a, tok_b), (tok_a, meta), (meta, tok_b)]:
        ta, tb = TokenBytes(a), TokenBytes(b)
        for text in TRICKY:
            al = align(text, ta, tb)
            assert al is not None, text
            raw = text.encode()
            assert al.bounds[0] == 0 and al.bounds[-1] == len(raw)
            # every span is covered by whole tokens on both sides, and the tokens rebuild its bytes exactly
            for side, tab, ids, span in ((0, ta, al.ids_a, al.span_a), (1, tb, al.ids_b, al.span_b)):
                assert np.all(np.diff(span) >= 0)
                pieces = b"".join(tab.table[i] for i in ids)
                assert pieces in (raw, b" " + raw)
            assert al.one_to_one() <= al.n_spans
            wins, dropped = windows(al, 16, 16)
            assert dropped == 0 and sum(sum(w.span_bytes) for w in wins) == len(raw)
            assert all(len(w.ids_a) <= 16 and len(w.ids_b) <= 16 for w in wins)
    same = align(TRICKY[0], TokenBytes(tok_a), TokenBytes(tok_a))
    assert same.one_to_one() == same.n_spans == len(same.ids_a)  # one tokenizer: every token its own span


def test_a_tokenizer_that_does_not_rebuild_the_text_is_refused(toks):
    lower = metaspace_tokenizer(sublang.texts(50, False, 7), normalize=True)
    assert align("The Red Fox", TokenBytes(toks[0]), TokenBytes(lower)) is None  # lower-cased: refused
    assert align("the red fox", TokenBytes(toks[0]), TokenBytes(lower)) is not None


def test_span_loglikelihoods_equal_the_models_own_loss(world, toks):
    from transformers import AutoModelForCausalLM

    from app.delta.spanscore import score_windows

    tok_a, tok_b = toks
    text = sublang.texts(1, True, 3)[0]
    al = align(text, TokenBytes(tok_a), TokenBytes(tok_b))
    wins, _ = windows(al, 100, 100)
    for path, tok, side in ((world["a1"], tok_a, "a"), (world["b"], tok_b, "b")):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        ids = [getattr(w, f"ids_{side}") for w in wins]
        spans = [getattr(w, f"span_{side}") for w in wins]
        got = score_windows(model, ids, spans, [len(w.span_bytes) for w in wins], tok.bos_token_id, tok.pad_token_id,
                            batch_tokens=64)
        for w_ids, ll in zip(ids, got):
            x = torch.tensor([[tok.bos_token_id] + w_ids])
            with torch.no_grad():
                ref = -float(model(input_ids=x, labels=x).loss) * len(w_ids)
            assert math.isclose(float(ll.sum()), ref, rel_tol=1e-5, abs_tol=1e-4)


def _bpb_of(model, tok, rows):
    from app.delta.spanscore import score_windows
    from app.delta.transfer import bpb
    from app.delta.transfer_train import _lists

    ll = score_windows(model, *_lists(rows), tok.bos_token_id, tok.pad_token_id)
    return bpb(ll, rows.per_window(rows.span_bytes))


def test_cross_family_transfer_recovers_the_delta_over_its_placebo(world, ray_local, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from app.cli import main
    from app.delta.apply import apply
    from app.delta.transfer import verify_transfer
    from app.delta.transfer_train import read_rows

    out = str(tmp_path / "transfer")
    code = main(["delta", "transfer", "--base-a", world["a0"], "--tuned-a", world["a1"], "--target", world["b"],
                 "--text", world["transfer"], "--eval-text", world["eval"], "--retain-text", world["retain"],
                 "--out", out, "--cache", str(tmp_path / "cache"), "--steps", "200"])
    assert code == 0
    rep = json.load(open(os.path.join(out, "transfer.json")))
    al, m = rep["alignment"], rep["measures"]
    assert al["bytes_covered"] == al["bytes"] > 100_000 and al["texts_refused"] == 0  # every byte in a span
    assert 0 < al["one_to_one_share"] < 1  # two different vocabularies
    gain = m["in_domain"]["gain_A_bpb"]
    assert gain > 0.02  # A1 learned the sub-language
    ad, placebo = m["adapters"]["B+LoRA"], m["adapters"]["placebo"]
    print(json.dumps(m["adapters"], indent=1), m["general"])
    assert ad["recovery"] >= 0.3, ad
    assert placebo["recovery"] <= 0.1 and placebo["recovery"] <= ad["recovery"] - 0.25, placebo
    # the placebo's targets are permuted among spans of the same length, so it keeps how much longer spans move
    # (a stronger null than a permutation across all spans) and loses only the link to the span itself
    assert ad["fidelity_r"] > 0.75 and abs(placebo["fidelity_r"]) < 0.5 and ad["fidelity_r"] - placebo["fidelity_r"] > 0.3
    a1_damage = m["general"]["damage_A1_bpb"]
    assert ad["damage_bpb"] <= max(a1_damage, 0) + 0.015, (ad, a1_damage)
    assert "routes" not in rep  # GPT-2 and Qwen2: no weight-space route

    # the adapter reloads with PEFT, merges with delta apply, and verify recomputes the report's figures
    tok = AutoTokenizer.from_pretrained(world["b"])
    domain = read_rows(rep["cache"], "eval_domain", scores=())
    b = AutoModelForCausalLM.from_pretrained(world["b"], dtype=torch.float32)
    peft_bpb = _bpb_of(PeftModel.from_pretrained(b, out).eval(), tok, domain)
    assert math.isclose(peft_bpb, m["in_domain"]["bpb"]["B+LoRA"], rel_tol=1e-6)
    merged = apply(out, world["b"], str(tmp_path / "merged"))
    merged_bpb = _bpb_of(AutoModelForCausalLM.from_pretrained(merged, dtype=torch.float32).eval(), tok, domain)
    assert math.isclose(merged_bpb, peft_bpb, rel_tol=1e-5)
    ver = verify_transfer(out)
    assert math.isclose(ver["measures"]["adapters"]["B+LoRA"]["recovery"], ad["recovery"], rel_tol=1e-6)
    assert ver["measures"]["adapters"]["placebo"] == placebo

    # a rerun with other fit settings reuses the span scores
    code = main(["delta", "transfer", "--base-a", world["a0"], "--tuned-a", world["a1"], "--target", world["b"],
                 "--text", world["transfer"], "--eval-text", world["eval"], "--retain-text", world["retain"],
                 "--out", str(tmp_path / "again"), "--cache", str(tmp_path / "cache"), "--steps", "2", "--no-placebo"])
    assert code == 0 and json.load(open(tmp_path / "again" / "transfer.json"))["cached"] is True


def test_same_shapes_function_space_agrees_with_the_weight_space_route(world, ray_local, tmp_path):
    from app.delta.transfer import TransferOptions, run_transfer

    res = run_transfer(world["a0"], world["a1"], world["a0"], [world["transfer"]], str(tmp_path / "same"),
                       eval_texts=[world["eval"]], retain_texts=[world["retain"]],
                       opts=TransferOptions(placebo=False, sample_from_tuned=8, sample_tokens=64, steps=200))
    rep = res.report
    assert rep["samples_from_tuned"] == 8 and rep["alignment"]["one_to_one_share"] == 1.0
    ws, fs = rep["measures"]["adapters"]["weight-space"], rep["measures"]["adapters"]["B+LoRA"]
    assert ws["recovery"] > 0.9  # rank 16 of a width-64 model's delta: nearly all of it
    assert fs["recovery"] >= 0.6  # one tokenizer, one model: the general text carries most of the change
    print(json.dumps(rep["measures"]["adapters"], indent=1), rep["routes"])
    assert rep["routes"]["agreement_r"] > 0.9, rep["routes"]


def test_bad_options_and_inputs_fail_with_a_clear_error(world, tmp_path):
    from app.delta.transfer import TransferOptions, run_transfer

    with pytest.raises(DeltaError, match="rank"):
        TransferOptions(rank=0)
    with pytest.raises(DeltaError, match="heldout"):
        TransferOptions(heldout=1.5)
    with pytest.raises(FileNotFoundError):
        run_transfer(world["a0"], world["a1"], world["b"], [str(tmp_path / "missing.jsonl")], str(tmp_path / "o"))
    with pytest.raises(DeltaError, match="transfer text"):
        run_transfer(world["a0"], world["a1"], world["b"], [], str(tmp_path / "o"))
