import random

import numpy as np
import pyarrow as pa
import pytest

from app.refine.toxicity import ToxicityScorer, ToxicityUnavailable, load_detoxify
from tests.tiny_models import WORDS, tiny_detoxify


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_detoxify(str(tmp_path_factory.mktemp("detox")))


def _text(n, seed):
    rnd = random.Random(seed)
    return " ".join(rnd.choice(WORDS + ["idiot", "stupid", "hate"]) for _ in range(n))


def test_short_texts_equal_detoxify_itself(ckpt):
    from detoxify import Detoxify

    path, hf = ckpt
    texts = [_text(n, s) for s, n in enumerate([3, 10, 20, 25])]
    ours = ToxicityScorer(checkpoint=path, hf_config_path=hf)
    got = ours(pa.table({"text": texts})).to_pylist()
    ref = Detoxify(checkpoint=path, huggingface_config_path=hf).predict(texts)
    assert ours.classes == list(ref)  # Detoxify's standardised names: toxicity, severe_toxicity, ...
    for i, row in enumerate(got):
        for name in ours.classes:
            assert row[f"tox_{name}"] == pytest.approx(ref[name][i], abs=1e-5)
        assert row["toxicity"] == pytest.approx(max(ref[name][i] for name in ours.classes), abs=1e-5)


def test_long_documents_are_scored_in_chunks_max_over_chunks(ckpt):
    import torch

    path, hf = ckpt
    sc = ToxicityScorer(checkpoint=path, hf_config_path=hf, batch_size=3)
    long_doc = _text(200, 7)
    chunks = sc.chunks(long_doc)
    ids = sc.tok(long_doc, add_special_tokens=False)["input_ids"]
    assert len(chunks) > 1 and all(len(c) <= 32 for c in chunks)
    assert [t for c in chunks for t in c[1:-1]] == ids  # every token in exactly one chunk
    with torch.inference_mode():
        per_chunk = [torch.sigmoid(sc.model(input_ids=torch.tensor([c])).logits)[0].numpy() for c in chunks]
    texts = [_text(5, 1), long_doc, None, ""]
    got = sc.score(texts)
    np.testing.assert_allclose(got[1], np.max(per_chunk, axis=0), atol=1e-5)
    assert np.isnan(got[2]).all() and not np.isnan(got[3]).any()
    np.testing.assert_allclose(got[0], sc.score([texts[0]])[0], atol=1e-5)  # batching/order do not matter


def test_missing_or_bad_checkpoint_is_one_clear_line(tmp_path):
    with pytest.raises(ToxicityUnavailable, match="no Detoxify checkpoint at") as e:
        load_detoxify("original", str(tmp_path / "missing.ckpt"))
    assert "\n" not in str(e.value)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(ToxicityUnavailable, match="cannot load"):
        load_detoxify("original", str(bad))
    with pytest.raises(ToxicityUnavailable, match="unknown variant"):
        load_detoxify("spicy", None)
