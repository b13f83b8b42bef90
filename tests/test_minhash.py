import numpy as np
import pytest
from datasketch import MinHash, MinHashLSH

from app.refine.minhash import (band_hashes, hashfunc, jaccard, lsh_params, minhash_signatures,
                                minhash_signatures_ref, shingles, words)


def test_words_and_shingles_follow_the_contract():
    assert words("Ｈｅｌｌｏ, WORLD_1 ﬁne!") == ["hello", "world_1", "fine"]  # NFKC + lower + \w+
    assert shingles("a b c", 5) == {"a b c"}  # fewer than ngram words: one shingle
    assert shingles("", 5) == {""}
    assert shingles("one two three four five six", 5) == {"one two three four five", "two three four five six"}


def test_hashfunc_is_32_bit_and_word_sensitive():
    hs = {hashfunc(s.encode()) for s in ["a b", "b a", "ab", "a  b", ""]}
    assert len(hs) == 5
    assert all(0 <= h < 2**32 for h in hs)


@pytest.mark.parametrize("num_perm,ngram,seed", [(128, 5, 1), (64, 3, 7), (16, 1, 0)])
def test_batch_signatures_equal_datasketch(real_texts, num_perm, ngram, seed):
    texts = real_texts[:40] + ["", "one", "two words", "Ünïcode ﬁ Straße " * 20, "x " * 3000,
                              "___ -- !! ...", "MiXeD-case_words, and: punctuation;" * 5, "naïve café — Ωmega 東京 text " * 4]
    fast = minhash_signatures(texts, num_perm=num_perm, ngram=ngram, seed=seed)
    assert fast.dtype == np.uint64 and fast.shape == (len(texts), num_perm)
    ref = minhash_signatures_ref(texts, num_perm=num_perm, ngram=ngram, seed=seed)
    np.testing.assert_array_equal(fast, ref)
    # and the reference really is datasketch fed the shingles, one by one
    m = MinHash(num_perm=num_perm, seed=seed, hashfunc=hashfunc)
    for s in shingles(texts[0], ngram):
        m.update(s.encode())
    np.testing.assert_array_equal(fast[0], m.hashvalues)


def test_signature_agreement_estimates_jaccard(real_texts):
    a = real_texts[0]
    w = a.split()
    b = " ".join(w[: len(w) // 2] + ["changed"] + w[len(w) // 2 + 1 :])
    sig = minhash_signatures([a, b], num_perm=256)
    est = float((sig[0] == sig[1]).mean())
    true = jaccard(shingles(a, 5), shingles(b, 5))
    assert abs(est - true) < 0.12


def test_lsh_params_and_bands():
    b, r = lsh_params(0.8, 128, 0.5, 0.5)
    lsh = MinHashLSH(threshold=0.8, num_perm=128)
    assert (b, r) == (lsh.b, lsh.r)
    sig = minhash_signatures(["a b c d e f g", "a b c d e f g", "completely different words here now"], num_perm=128)
    keys = band_hashes(sig, b, r)
    assert keys.shape == (3, b) and keys.dtype == np.uint64
    assert (keys[0] == keys[1]).all() and not (keys[0] == keys[2]).any()
    with pytest.raises(ValueError):
        band_hashes(sig, 20, 10)
