"""Byte-exact spans that two tokenizers both cover: the units of a delta carried across model families.

Glossary:
    token bytes      the bytes of the text a token stands for, read off the vocabulary: byte-level BPE
                     (GPT-2, SmolLM2, Qwen: the ``bytes_to_unicode`` alphabet undone) or SentencePiece-style
                     pieces (Llama-2, Gemma: ``▁`` is a space, ``<0xNN>`` a raw byte, a dummy-prefix space
                     on the first token dropped)
    boundary         a byte offset where a token of one tokenizer ends
    common boundary  an offset that is a boundary of both tokenizations (0 and the text's length always are)
    span             the bytes between two consecutive common boundaries: both tokenizers cover it with whole
                     tokens, so both models give it a log-likelihood, log p(span | the text before it)
                     (approximate likelihood matching, Minixhofer et al. 2025)
    window           consecutive spans whose tokens fit a model's context under both tokenizers; each is
                     scored from a fresh start (BOS), so both models condition on the same bytes

A text whose tokens do not rebuild its bytes exactly (a normalising tokenizer: lower-casing, NFKC, stripped
spaces) is refused and counted, never aligned approximately.

Written by hand: HF tokenizers' offset mappings are in characters and overlap where byte-level BPE splits a
multi-byte character across tokens, and no library computes the common boundaries of two tokenizations.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Optional

import numpy as np

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """The inverse of GPT-2's bytes_to_unicode (printable stand-ins for the 256 bytes)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


def _decoder_types(tok: Any) -> set[str]:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"{type(tok).__name__}: a fast (Rust) tokenizer is needed to read its vocabulary")
    dec = json.loads(backend.to_str()).get("decoder") or {}
    seen, stack = set(), [dec]
    while stack:
        d = stack.pop()
        if isinstance(d, dict):
            seen.add(d.get("type"))
            stack.extend(d.get("decoders") or [])
    return seen


class TokenBytes:
    """Per token id, the bytes it stands for in running text."""

    def __init__(self, tok: Any):
        self.tok = tok
        self.byte_level = "ByteLevel" in _decoder_types(tok)
        vocab = tok.get_vocab()  # piece -> id, added tokens included
        added = {t.content for t in getattr(tok, "added_tokens_decoder", {}).values()}
        size = max(vocab.values()) + 1
        table: list[bytes] = [b""] * size
        u2b = _unicode_to_byte()
        for piece, i in vocab.items():
            m = None if self.byte_level else _BYTE_PIECE.match(piece)
            if m:  # a byte-fallback piece (listed among the added tokens by some conversions)
                table[i] = bytes([int(m.group(1), 16)])
            elif piece in added:
                table[i] = piece.encode("utf-8")  # added tokens are stored as their text
            elif self.byte_level:
                try:
                    table[i] = bytes(u2b[c] for c in piece)
                except KeyError:  # not in the byte alphabet: the text itself
                    table[i] = piece.encode("utf-8")
            else:
                table[i] = piece.replace("\u2581", " ").encode("utf-8")
        self.table = table
        self.lengths = np.array([len(b) for b in table], dtype=np.int64)

    def encode(self, text: str) -> Optional[tuple[list[int], np.ndarray]]:
        """(token ids, byte end offset of each token) for ``text``, or None when the tokens do not rebuild
        the text's bytes (a normalising tokenizer)."""
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        raw = text.encode("utf-8")
        if any(i >= len(self.table) for i in ids):
            return None
        lens = self.lengths[ids] if ids else np.zeros(0, dtype=np.int64)
        got = b"".join(self.table[i] for i in ids)
        if got != raw:
            # a SentencePiece dummy prefix: one space before the first token that is not in the text
            if got == b" " + raw and ids and self.table[ids[0]].startswith(b" "):
                lens = lens.copy()
                lens[0] -= 1
            else:
                return None
        return ids, np.cumsum(lens)


@dataclass
class Alignment:
    """One text under two tokenizers: the common boundaries and which span each token belongs to."""

    ids_a: list[int]
    ids_b: list[int]
    bounds: np.ndarray  # (S+1,) byte offsets of the common boundaries, bounds[0] = 0, bounds[-1] = n_bytes
    span_a: np.ndarray  # (len(ids_a),) span index of each A token
    span_b: np.ndarray  # (len(ids_b),)

    @property
    def n_spans(self) -> int:
        return len(self.bounds) - 1

    def one_to_one(self) -> int:
        """Spans that are one token under both tokenizers."""
        ca = np.bincount(self.span_a, minlength=self.n_spans)
        cb = np.bincount(self.span_b, minlength=self.n_spans)
        return int(((ca == 1) & (cb == 1)).sum())


def _span_of(ends: np.ndarray, bounds: np.ndarray) -> np.ndarray:
    """Span index per token from its end offset: the span whose right bound is the first >= the end
    (a zero-length token goes with the token before it, or span 0)."""
    return np.clip(np.searchsorted(bounds, ends, side="left") - 1, 0, max(len(bounds) - 2, 0))


def align(text: str, a: TokenBytes, b: TokenBytes) -> Optional[Alignment]:
    """The common boundaries of ``text`` under two tokenizers, or None if either does not rebuild it."""
    ea, eb = a.encode(text), b.encode(text)
    if ea is None or eb is None:
        return None
    (ids_a, ends_a), (ids_b, ends_b) = ea, eb
    if not ids_a or not ids_b:
        return None
    bounds = np.union1d([0], np.intersect1d(ends_a, ends_b))
    return Alignment(ids_a, ids_b, bounds, _span_of(ends_a, bounds), _span_of(ends_b, bounds))


@dataclass
class Window:
    """Spans [first, last) of one aligned text, with their tokens under both tokenizers."""

    ids_a: list[int]
    ids_b: list[int]
    span_a: list[int]  # span index (from 0 in this window) per A token
    span_b: list[int]
    span_bytes: list[int]  # (n_spans,)
    one_to_one: int = 0  # spans that are one token under both tokenizers


def windows(al: Alignment, max_a: int, max_b: int) -> tuple[list[Window], int]:
    """Greedy windows of whole spans with at most ``max_a`` / ``max_b`` tokens (the start token not counted).
    Returns (windows, bytes of spans too long to fit any window: not scored)."""
    na = np.bincount(al.span_a, minlength=al.n_spans)
    nb = np.bincount(al.span_b, minlength=al.n_spans)
    start_a = np.concatenate([[0], np.cumsum(na)])
    start_b = np.concatenate([[0], np.cumsum(nb)])
    sizes = np.diff(al.bounds)
    out, dropped = [], 0
    s = 0
    while s < al.n_spans:
        if na[s] > max_a or nb[s] > max_b or na[s] == 0 or nb[s] == 0:
            dropped += int(sizes[s])  # a span longer than a window (or empty under one tokenizer)
            s += 1
            continue
        e = s
        while e < al.n_spans and 0 < na[e] and 0 < nb[e] and start_a[e + 1] - start_a[s] <= max_a \
                and start_b[e + 1] - start_b[s] <= max_b:
            e += 1
        out.append(Window(ids_a=al.ids_a[start_a[s]:start_a[e]], ids_b=al.ids_b[start_b[s]:start_b[e]],
                          span_a=(al.span_a[start_a[s]:start_a[e]] - s).tolist(),
                          span_b=(al.span_b[start_b[s]:start_b[e]] - s).tolist(),
                          span_bytes=sizes[s:e].tolist(), one_to_one=int(((na[s:e] == 1) & (nb[s:e] == 1)).sum())))
        s = e
    return out, dropped


def start_token(tok: Any) -> Optional[int]:
    """The token every window starts from: BOS, else EOS (the document separator of models without BOS)."""
    return tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
