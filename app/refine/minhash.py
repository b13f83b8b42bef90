"""MinHash signatures of word n-gram shingle sets: a fast batch path and its datasketch reference.

Similarity (DESIGN.md): the Jaccard index of word ``ngram``-shingle sets, where words are ``\\w+`` runs of
the NFKC-normalised, lower-cased text; a document with fewer than ``ngram`` words is one shingle.

Glossary
    shingle     ``" ".join(words[i:i+ngram])`` (a str); its bytes are what ``hashfunc`` hashes.
    hashfunc    bytes -> 32-bit int. FNV-1a (64-bit) of every space-separated word, folded left to right
                with a multiply-xor step, finalised to 32 bits. Defined on the shingle's bytes so that
                datasketch can call it, and computed from per-word hashes so the fast path never builds
                shingle strings.
    signature   datasketch 2.x's default ``affine32`` scheme: for every permutation k,
                ``min over shingles of (a_k * fmix32(h) + b_k) mod 2**32`` with ``(a, b)`` taken from
                ``datasketch.MinHash(num_perm, seed).permutations``.

``minhash_signatures`` is a numba kernel over a whole batch, no Python per shingle;
``minhash_signatures_ref`` feeds the same shingles to ``datasketch.MinHash.update_batch`` and is the
reference the tests compare against. Written by hand because datasketch hashes one Python object per
shingle, which is the bottleneck the batch path removes (see ``benchmarks/minhash.py``).

The batch path, per document:
    encode      (Python, ``_encode``) ASCII text goes as is; other text is NFKC-normalised only in the
                pieces that change and has its non-ASCII characters lower-cased or blanked, so that the
                kernel's byte-level words are the contract's words. No per-word Python work.
    words       (kernel) FNV-1a per word from a 256-entry byte table (word byte, ASCII lower-cased),
                branch-free per byte: the FNV multiply chain is the limit, ~5 cycles per byte.
    shingles    (kernel) the fold of ``ngram`` word hashes, one pass per word position over all
                shingles (vectorised), then fmix32, into a uint32 array.
    minimum     (kernel) per permutation, a min reduction of ``(a_k * h + b_k) mod 2**32`` over that
                array in uint32 lanes (vpmulld, vpaddd, vpminud on 8 lanes; the affine32 scheme wraps
                mod 2**32, so no modulo); documents under ``_SHORT_DOC`` shingles run the other way
                round, each shingle over all permutations.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from typing import Iterable, Sequence

import numpy as np

WORD_RE = re.compile(r"\w+")

_FNV_OFFSET = 0xCBF29CE484222325
_FNV_PRIME = 0x100000001B3
_FOLD_MUL = 0x9E3779B97F4A7C15
_M64 = (1 << 64) - 1


def words(text: str) -> list[str]:
    """``\\w+`` runs of the NFKC-normalised, lower-cased text."""
    return WORD_RE.findall(unicodedata.normalize("NFKC", text).lower())


def shingles(text: str, ngram: int = 5) -> set[str]:
    """The shingle set of ``text``: word ``ngram``-grams; fewer than ``ngram`` words make one shingle."""
    w = words(text)
    if len(w) < ngram:
        return {" ".join(w)}
    return {" ".join(w[i : i + ngram]) for i in range(len(w) - ngram + 1)}


def jaccard(a: set, b: set) -> float:
    """Exact Jaccard index of two sets (1.0 for two empty sets)."""
    if not a and not b:
        return 1.0
    inter = len(a & b)
    return inter / (len(a) + len(b) - inter)


def _fnv1a(word: bytes) -> int:
    h = _FNV_OFFSET
    for byte in word:
        h = ((h ^ byte) * _FNV_PRIME) & _M64
    return h


def _fold(acc: int, wh: int) -> int:
    acc = ((acc ^ wh) * _FOLD_MUL) & _M64
    return acc ^ (acc >> 29)


def hashfunc(shingle: bytes) -> int:
    """32-bit hash of a shingle's UTF-8 bytes (words separated by single spaces)."""
    acc = _FNV_OFFSET
    for word in shingle.split(b" "):
        acc = _fold(acc, _fnv1a(word))
    return (acc ^ (acc >> 32)) & 0xFFFFFFFF


@functools.lru_cache(maxsize=16)
def permutations(num_perm: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``(a, b)`` of datasketch's affine32 scheme for ``(num_perm, seed)``, as uint32 arrays."""
    from datasketch import MinHash

    m = MinHash(num_perm=num_perm, seed=seed)
    if m.scheme != "affine32":  # pragma: no cover - guards a datasketch default change
        raise RuntimeError(f"datasketch's default MinHash scheme is {m.scheme!r}, expected 'affine32'")
    a, b = m.permutations
    return np.ascontiguousarray(a, dtype=np.uint32), np.ascontiguousarray(b, dtype=np.uint32)


# Every ASCII byte: deleted from a text's UTF-8 to leave only its non-ASCII characters.
_ASCII_BYTES = bytes(range(128))
# A text needing more character substitutions than this is reduced with the regex instead (one
# ``str.replace`` pass per character stops paying off).
_MAX_SUBSTITUTIONS = 32


@functools.lru_cache(maxsize=65536)
def _kernel_form(char: str) -> str:
    """What a non-ASCII character becomes for the kernel: its lower case, non-word characters as spaces."""
    return "".join(c if WORD_RE.fullmatch(c) else " " for c in char.lower())


def _nfkc(text: str, chunk: int = 4096) -> str:
    """``unicodedata.normalize("NFKC", text)``, normalising only the pieces of ``text`` that change.

    A line feed is a starter that neither composes nor reorders with its neighbours, so NFKC of a text
    is the concatenation of NFKC of its pieces cut after line feeds. The text is cut into pieces of
    about ``chunk`` characters; ASCII pieces and pieces already in NFKC (a check ~10x cheaper than
    ``normalize``) are kept as they are. Long licence texts quoting a few names with accents keep their
    normalisation cost to the lines that hold them.
    """
    if unicodedata.is_normalized("NFKC", text):
        return text
    pieces = []
    start = 0
    while start < len(text):
        end = text.find("\n", start + chunk) + 1 or len(text)
        piece = text[start:end]
        if not piece.isascii() and not unicodedata.is_normalized("NFKC", piece):
            piece = unicodedata.normalize("NFKC", piece)
        pieces.append(piece)
        start = end
    return "".join(pieces)


def _encode(text: str) -> bytes:
    """One text as bytes whose kernel words (see ``_encode_batch``) are exactly ``words(text)``.

    ASCII text passes as is (the kernel lower-cases ASCII letters). Other text is NFKC-normalised and
    each distinct non-ASCII character is replaced by ``_kernel_form``: ``str.lower`` maps characters one
    by one except for capital sigma (its final form depends on the neighbours), and no character of a
    kernel form has a kernel form of its own other than itself (``tests/test_minhash.py`` checks every
    code point), so the replacements neither interfere nor depend on their order. Texts with a capital
    sigma or many characters to replace take the obvious path, ``" ".join(words(text))``.
    """
    if text.isascii():
        return text.encode("ascii")
    text = _nfkc(text)
    raw = text.encode("utf-8", "surrogatepass")
    non_ascii = set(raw.translate(None, _ASCII_BYTES).decode("utf-8", "surrogatepass"))
    subs = [(c, f) for c in non_ascii if (f := _kernel_form(c)) != c]
    if not subs:  # nothing to replace, so no lone surrogate either: raw is the UTF-8
        return raw
    if "\u03a3" in non_ascii or len(subs) > _MAX_SUBSTITUTIONS:
        return " ".join(WORD_RE.findall(text.lower())).encode("utf-8")
    for c, f in subs:
        text = text.replace(c, f)
    return text.encode("utf-8")


def _encode_batch(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated bytes per text (``_encode``) and the (N+1,) byte offsets.

    The kernel's words are maximal runs of bytes that are ASCII ``[0-9A-Za-z_]`` or >= 0x80, with ASCII
    letters lower-cased. For ASCII text that is exactly ``\\w+`` of the lower-cased text (NFKC leaves
    ASCII unchanged); ``_encode`` makes it so for any other text.
    """
    parts = [_encode(t) for t in texts]
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    buf = np.frombuffer(b"".join(parts), dtype=np.uint8) if parts else np.zeros(0, np.uint8)
    return buf, offsets


# Below this many shingles a document's minimum runs shingle by shingle over all permutations (a
# vector over permutations, loading and storing the signature per shingle); from it on, permutation
# by permutation over all shingles (a umin reduction over shingles). The crossover was measured at
# about 60 shingles with num_perm = 128.
_SHORT_DOC = 64


@functools.lru_cache(maxsize=1)
def _kernel():
    import numba

    @numba.njit(cache=True, nogil=True, boundscheck=False)
    def kernel(buf, offsets, ngram, a, b):  # pragma: no cover - compiled
        n_docs = offsets.shape[0] - 1
        num_perm = a.shape[0]
        out = np.empty((n_docs, num_perm), dtype=np.uint64)  # (N, P)
        fnv_off = np.uint64(_FNV_OFFSET)
        fnv_prime = np.uint64(_FNV_PRIME)
        fold_mul = np.uint64(_FOLD_MUL)
        # A byte's value inside a word (ASCII letters lower-cased), 0 for a byte that ends words.
        low = np.zeros(256, dtype=np.uint64)
        for c in range(256):
            if c >= 128 or (48 <= c <= 57) or (97 <= c <= 122) or c == 95:
                low[c] = c
            elif 65 <= c <= 90:
                low[c] = c + 32
        max_len = 0
        for d in range(n_docs):
            max_len = max(max_len, offsets[d + 1] - offsets[d])
        wh = np.empty(max_len // 2 + 2, dtype=np.uint64)  # (W,) word hashes of one document (a word and its end: >= 2 bytes)
        acc = np.empty(max_len // 2 + 2, dtype=np.uint64)  # (S,) shingle folds (S <= W)
        hs = np.empty(max_len // 2 + 2, dtype=np.uint32)  # (S,) fmix32 of the shingle hashes
        sig = np.empty(num_perm, dtype=np.uint32)  # (P,)
        for d in range(n_docs):
            # 1. FNV-1a of every word, without a branch per byte: the running hash is stored at the
            #    current word slot after every byte, and the slot advances where a word ends.
            nw = 0
            h = fnv_off
            in_word = 0
            for c in buf[offsets[d] : offsets[d + 1]]:
                x = low[c]
                w = 1 if x != 0 else 0
                wh[nw] = h
                nw += in_word & (1 - w)
                hx = (h ^ x) * fnv_prime
                h = hx if w else fnv_off
                in_word = w
            if in_word:
                wh[nw] = h
                nw += 1
            if nw == 0:  # a document without words is one empty word
                wh[0] = fnv_off
                nw = 1
            # 2. Shingles: fold `width` consecutive word hashes, one pass per word position so the
            #    loops run over shingles (vectorised), then fmix32 of the 32-bit fold (datasketch).
            width = ngram if nw >= ngram else nw
            n = nw - width + 1
            for s in range(n):
                acc[s] = fnv_off
            for j in range(width):
                for s in range(n):
                    v = (acc[s] ^ wh[s + j]) * fold_mul
                    acc[s] = v ^ (v >> np.uint64(29))
            for s in range(n):
                v = acc[s]
                hv = np.uint32(v ^ (v >> np.uint64(32)))  # numba widens uint32 arithmetic: cast back
                hv = np.uint32(hv ^ (hv >> np.uint32(16)))
                hv = np.uint32(hv * np.uint32(0x85EBCA6B))
                hv = np.uint32(hv ^ (hv >> np.uint32(13)))
                hv = np.uint32(hv * np.uint32(0xC2B2AE35))
                hs[s] = np.uint32(hv ^ (hv >> np.uint32(16)))
            # 3. affine32: min over shingles of (a_k * h + b_k) mod 2^32, in uint32 lanes.
            if n >= _SHORT_DOC:
                for k in range(num_perm):
                    ak = a[k]
                    bk = b[k]
                    m = np.uint32(0xFFFFFFFF)
                    for s in range(n):  # a umin reduction: vpmulld, vpaddd, vpminud
                        m = min(m, np.uint32(ak * hs[s] + bk))
                    out[d, k] = m
            else:
                for k in range(num_perm):
                    sig[k] = np.uint32(0xFFFFFFFF)
                for s in range(n):
                    h32 = hs[s]
                    for k in range(num_perm):
                        sig[k] = min(sig[k], np.uint32(a[k] * h32 + b[k]))
                for k in range(num_perm):
                    out[d, k] = sig[k]
        return out

    return kernel


def minhash_signatures(texts: Sequence[str], *, num_perm: int = 128, ngram: int = 5, seed: int = 1) -> np.ndarray:
    """Signatures of a batch of raw texts: a ``(len(texts), num_perm)`` uint64 array.

    Row i equals ``datasketch.MinHash(num_perm=num_perm, seed=seed, hashfunc=hashfunc)`` updated with
    the UTF-8 bytes of ``shingles(texts[i], ngram)``.
    """
    if ngram < 1:
        raise ValueError(f"ngram must be >= 1, got {ngram}")
    a, b = permutations(num_perm, seed)
    buf, offsets = _encode_batch(list(texts))
    return _kernel()(buf, offsets, np.int64(ngram), a, b)


def minhash_signatures_ref(texts: Iterable[str], *, num_perm: int = 128, ngram: int = 5, seed: int = 1) -> np.ndarray:
    """The slow, obvious reference: datasketch ``MinHash.update_batch`` per document."""
    from datasketch import MinHash

    rows = []
    for text in texts:
        m = MinHash(num_perm=num_perm, seed=seed, hashfunc=hashfunc)
        m.update_batch([s.encode("utf-8") for s in sorted(shingles(text, ngram))])
        rows.append(np.asarray(m.hashvalues, dtype=np.uint64))
    return np.stack(rows) if rows else np.zeros((0, num_perm), dtype=np.uint64)


def band_hashes(signatures: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit key per (document, band): a fold of the band's ``rows`` signature values. (N, bands)."""
    n, num_perm = signatures.shape
    if bands * rows > num_perm:
        raise ValueError(f"bands*rows = {bands * rows} exceeds num_perm = {num_perm}")
    sig = signatures[:, : bands * rows].reshape(n, bands, rows)  # (N, B, R)
    acc = np.full((n, bands), _FNV_OFFSET, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for r in range(rows):
            acc = (acc ^ sig[:, :, r]) * np.uint64(_FOLD_MUL)
            acc ^= acc >> np.uint64(29)
    return acc
