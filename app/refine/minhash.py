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

``minhash_signatures`` is a numba kernel over a whole batch (word hashing, shingle folding and the
permutation minimum in one pass, no Python per shingle); ``minhash_signatures_ref`` feeds the same
shingles to ``datasketch.MinHash.update_batch`` and is the reference the tests compare against.
Written by hand because datasketch hashes one Python object per shingle, which is the bottleneck the
batch path removes (see ``benchmarks/minhash.py``).
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


def _encode_batch(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated UTF-8 per text and the (N+1,) byte offsets, in a form the kernel splits into words.

    The kernel's words are maximal runs of bytes that are ASCII ``[0-9A-Za-z_]`` or >= 0x80. For ASCII
    text that is exactly ``\\w+`` of the lower-cased text (NFKC leaves ASCII unchanged), so it is passed
    as is; any other text is reduced to ``" ".join(words(text))`` here first.
    """
    parts = [t.lower().encode("ascii") if t.isascii() else " ".join(words(t)).encode("utf-8") for t in texts]
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([len(p) for p in parts], out=offsets[1:])
    buf = np.frombuffer(b"".join(parts), dtype=np.uint8) if parts else np.zeros(0, np.uint8)
    return buf, offsets


@functools.lru_cache(maxsize=1)
def _kernel():
    import numba

    @numba.njit(cache=True, nogil=True)
    def kernel(buf, offsets, ngram, a, b):  # pragma: no cover - compiled
        n_docs = offsets.shape[0] - 1
        num_perm = a.shape[0]
        out = np.empty((n_docs, num_perm), dtype=np.uint64)
        m32 = np.uint64(0xFFFFFFFF)
        fnv_off = np.uint64(_FNV_OFFSET)
        fnv_prime = np.uint64(_FNV_PRIME)
        fold_mul = np.uint64(_FOLD_MUL)
        wh = np.empty(16, dtype=np.uint64)  # per-word hashes of the current document (grown on demand)
        sig = np.empty(num_perm, dtype=np.uint32)
        for d in range(n_docs):
            # 1. FNV-1a of every word (see _encode_batch); a document without words is one empty word.
            nw = 0
            h = fnv_off
            in_word = False
            for i in range(offsets[d], offsets[d + 1] + 1):
                c = buf[i] if i < offsets[d + 1] else 32
                if c >= 128 or (48 <= c <= 57) or (65 <= c <= 90) or (97 <= c <= 122) or c == 95:
                    h = (h ^ np.uint64(c)) * fnv_prime
                    in_word = True
                elif in_word:
                    if nw == wh.shape[0]:
                        grown = np.empty(wh.shape[0] * 2, dtype=np.uint64)
                        grown[:nw] = wh[:nw]
                        wh = grown
                    wh[nw] = h
                    nw += 1
                    h = fnv_off
                    in_word = False
            if nw == 0:
                wh[0] = fnv_off
                nw = 1
            # 2. Shingles: fold `ngram` consecutive word hashes (all words when there are fewer).
            width = ngram if nw >= ngram else nw
            for k in range(num_perm):
                sig[k] = np.uint32(0xFFFFFFFF)
            for s in range(nw - width + 1):
                acc = fnv_off
                for j in range(s, s + width):
                    acc = (acc ^ wh[j]) * fold_mul
                    acc = acc ^ (acc >> np.uint64(29))
                hv = (acc ^ (acc >> np.uint64(32))) & m32
                # 3. datasketch affine32: fmix32, then (a*h + b) mod 2^32, min over shingles.
                hv = hv ^ (hv >> np.uint64(16))
                hv = (hv * np.uint64(0x85EBCA6B)) & m32
                hv = hv ^ (hv >> np.uint64(13))
                hv = (hv * np.uint64(0xC2B2AE35)) & m32
                hv = hv ^ (hv >> np.uint64(16))
                h32 = np.uint32(hv)
                for k in range(num_perm):  # 32-bit lanes: the compiler vectorises this loop
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


def lsh_params(threshold: float, num_perm: int, fp_weight: float, fn_weight: float) -> tuple[int, int]:
    """(bands, rows) that datasketch's ``MinHashLSH`` picks for this threshold and weighting."""
    from datasketch import MinHashLSH

    lsh = MinHashLSH(threshold=threshold, num_perm=num_perm, weights=(fp_weight, fn_weight))
    return int(lsh.b), int(lsh.r)
