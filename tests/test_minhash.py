import random
import re
import unicodedata

import numpy as np
import pytest
from datasketch import MinHash

from app.refine.minhash import (_SHORT_DOC, _encode, _kernel_form, _nfkc, band_hashes, hashfunc, jaccard,
                                minhash_signatures, minhash_signatures_ref, shingles, words)

# Characters that stress the encoding: case, NFKC (ligatures, full width, compatibility forms),
# combining marks (also right after a line feed), final sigma, lone surrogates, non-word symbols.
TRICKY = list("aZ09_ .,;-\n\t") + list("éÄßµª²½©\u00a0İﬁΣσςΆＡ１Ⅻǅẞ\u212a™∃\u200b東京😀") + [
    "\u0301", "\u0308", "\u0327", "\u0345", "\u1100", "\u1161", "\u11a8", "\ud800", "\U0001d400"]
CYRILLIC = "АБВГДЕЖЗИЙКЛМНОПРСТУФХЦЧШЩЪЫЬЭЮЯ"  # 33 capitals: more substitutions than the fast path takes


def _tricky_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = [" ".join(CYRILLIC) + " слово " * 8, "ΟΔΟΣ ΣΑΣ σοφός Σ", "İSTANBUL ﬁne\n\u0301e",
           "\ud800 lone surrogate"]
    out += ["".join(rng.choice(TRICKY) for _ in range(rng.randrange(0, 80))) for _ in range(n)]
    return out


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
    long_doc = ""  # real prose, several thousand words
    for text in real_texts:
        if len(words(long_doc)) > 6000:
            break
        long_doc += "\n" + text
    assert len(words(long_doc)) > 6000
    # both loop orders of the minimum: just under and at _SHORT_DOC shingles
    short = [" ".join(f"w{i}" for i in range(_SHORT_DOC + ngram - 1 + d)) for d in (-1, 0)]
    texts = real_texts[:40] + [long_doc] + short + [
        "", "one", "two words", "Ünïcode ﬁ Straße " * 20, "x " * 3000, "___ -- !! ...",
        "MiXeD-case_words, and: punctuation;" * 5, "naïve café — Ωmega 東京 text " * 4] + _tricky_texts(40)
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


def test_band_hashes():
    b, r = 16, 6
    sig = minhash_signatures(["a b c d e f g", "a b c d e f g", "completely different words here now"], num_perm=128)
    keys = band_hashes(sig, b, r)
    assert keys.shape == (3, b) and keys.dtype == np.uint64
    assert (keys[0] == keys[1]).all() and not (keys[0] == keys[2]).any()
    with pytest.raises(ValueError):
        band_hashes(sig, 20, 10)


def test_encoding_gives_the_contract_words():
    """The kernel's words of ``_encode(text)`` (byte runs of [0-9A-Za-z_] or >= 0x80, ASCII lower-cased)
    are exactly ``words(text)``: on tricky random texts, on the regex fallback and on long real text."""
    for text in _tricky_texts(400, seed=1) + ["Plain ASCII, With Case.", "Ünïcode ﬁ Straße\n" * 3000]:
        kernel_words = [w.lower() for w in re.findall(rb"[0-9A-Za-z_\x80-\xff]+", _encode(text))]
        assert kernel_words == [w.encode("utf-8") for w in words(text)], repr(text)


def test_nfkc_by_pieces_equals_normalize():
    rng = random.Random(2)
    for _ in range(300):
        text = "".join(rng.choice(TRICKY + ["\n"] * 4) for _ in range(rng.randrange(0, 120)))
        assert _nfkc(text, chunk=rng.randrange(1, 8)) == unicodedata.normalize("NFKC", text), repr(text)


def test_kernel_forms_do_not_chain():
    """``_encode`` replaces characters one after another: that is order-free only because no non-ASCII
    character of a kernel form has a different kernel form itself. Checked for every code point."""
    form = _kernel_form.__wrapped__
    bad = [cp for cp in range(128, 0x110000) for c in form(chr(cp)) if ord(c) >= 128 and form(c) != c]
    assert bad == []
