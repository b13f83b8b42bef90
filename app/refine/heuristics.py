"""Heuristic quality signals: Gopher quality + repetition (Rae et al. 2021, App. A) and C4 (Raffel et al. 2020).

This step only adds signal columns (``h_*``); ``decide.py`` applies the thresholds with ``RULES``.
Definitions (all on the original text):
    tokens              whitespace-separated tokens; *words* are tokens with at least one letter or digit
    h_words             number of words                    h_mean_word_len     mean characters per word
    h_symbol_ratio      (# '#' + # '...' + # '…') / words   h_alpha_frac        tokens with a letter / tokens
    h_bullet_frac       non-empty lines starting with a bullet / non-empty lines
    h_ellipsis_frac     non-empty lines ending in '...' or '…' / non-empty lines
    h_stop_words        distinct Gopher stop words present (the, be, to, of, and, that, have, with)
    h_dup_line_frac     lines equal to an earlier line / lines; h_dup_line_chars: their characters / characters
    h_dup_para_frac     the same for paragraphs (split on blank lines); h_dup_para_chars
    h_top{n}gram        n = 2..4: characters (of words) in all occurrences of the most frequent word n-gram
                        / characters in all words
    h_dup{n}gram        n = 5..10: characters of words covered by some word n-gram that occurs more than
                        once (overlaps counted once) / characters in all words
    h_c4_sentences      sentences in the lines C4 keeps (>= 3 words, ending in terminal punctuation,
                        no "javascript", no policy boilerplate)
    h_c4_lorem, h_c4_curly, h_c4_max_word_len, h_c4_javascript_frac, h_c4_policy_frac
Written by hand: DataTrove's filters return keep/drop, not the per-document signal columns we report.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Callable

import pyarrow as pa

STOP_WORDS = frozenset({"the", "be", "to", "of", "and", "that", "have", "with"})
BULLETS = ("•", "-", "*", "‣", "◦", "●", "▪", "⁃", "–", "·")
TERMINAL = (".", "!", "?", '"', "'", "”", "’")
POLICY = ("terms of use", "privacy policy", "cookie policy", "uses cookies", "use of cookies", "use cookies")
_ALNUM = re.compile(r"[^\W_]")
_ALPHA = re.compile(r"[^\W\d_]")
_SENT = re.compile(r"[.!?]+(?=\s|$|[\"'”’])")
_PARA = re.compile(r"\n\s*\n")

INT_SIGNALS = ["h_words", "h_stop_words", "h_c4_sentences", "h_c4_max_word_len"]
BOOL_SIGNALS = ["h_c4_lorem", "h_c4_curly"]
FLOAT_SIGNALS = (
    ["h_mean_word_len", "h_symbol_ratio", "h_alpha_frac", "h_bullet_frac", "h_ellipsis_frac",
     "h_dup_line_frac", "h_dup_line_chars", "h_dup_para_frac", "h_dup_para_chars"]
    + [f"h_top{n}gram" for n in (2, 3, 4)]
    + [f"h_dup{n}gram" for n in range(5, 11)]
    + ["h_c4_javascript_frac", "h_c4_policy_frac"]
)
SIGNALS = INT_SIGNALS + BOOL_SIGNALS + FLOAT_SIGNALS


def _dup_fracs(items: list[str], total_chars: int) -> tuple[float, float]:
    if not items:
        return 0.0, 0.0
    seen: set[str] = set()
    dup = dup_chars = 0
    for it in items:
        if it in seen:
            dup += 1
            dup_chars += len(it)
        else:
            seen.add(it)
    return dup / len(items), dup_chars / max(total_chars, 1)


def _ngram_signals(words: list[str]) -> dict[str, float]:
    out: dict[str, float] = {}
    lens = [len(w) for w in words]
    total = sum(lens) or 1
    n_words = len(words)
    for n in (2, 3, 4):
        if n_words < n:
            out[f"h_top{n}gram"] = 0.0
            continue
        grams = Counter(tuple(words[i : i + n]) for i in range(n_words - n + 1))
        gram, count = grams.most_common(1)[0]
        out[f"h_top{n}gram"] = (sum(len(w) for w in gram) * count / total) if count > 1 else 0.0
    for n in range(5, 11):
        if n_words < n:
            out[f"h_dup{n}gram"] = 0.0
            continue
        keys = [hash(tuple(words[i : i + n])) for i in range(n_words - n + 1)]
        counts = Counter(keys)
        covered = bytearray(n_words)
        for i, k in enumerate(keys):
            if counts[k] > 1:
                covered[i : i + n] = b"\x01" * n
        out[f"h_dup{n}gram"] = sum(length for length, c in zip(lens, covered) if c) / total
    return out


def signals(text: str) -> dict:
    """All heuristic signals of one document."""
    tokens = text.split()
    words = [t for t in tokens if _ALNUM.search(t)]
    n_words = len(words)
    lines = [ln.strip() for ln in text.split("\n")]
    nonempty = [ln for ln in lines if ln]
    n_lines = max(len(nonempty), 1)
    paragraphs = [p.strip() for p in _PARA.split(text.strip()) if p.strip()]
    lower = text.lower()
    lower_words = {t.strip(".,;:!?\"'()[]{}").lower() for t in tokens}

    c4_lines = []
    js = policy = 0
    for ln in nonempty:
        low = ln.lower()
        if "javascript" in low:
            js += 1
            continue
        if any(p in low for p in POLICY):
            policy += 1
            continue
        if ln.endswith(TERMINAL) and not ln.endswith("...") and len(ln.split()) >= 3:
            c4_lines.append(ln)

    s = {
        "h_words": n_words,
        "h_mean_word_len": (sum(len(w) for w in words) / n_words) if n_words else 0.0,
        "h_symbol_ratio": (text.count("#") + text.count("...") + text.count("…")) / max(n_words, 1),
        "h_alpha_frac": (sum(1 for t in tokens if _ALPHA.search(t)) / len(tokens)) if tokens else 0.0,
        "h_bullet_frac": sum(1 for ln in nonempty if ln.startswith(BULLETS)) / n_lines,
        "h_ellipsis_frac": sum(1 for ln in nonempty if ln.endswith(("...", "…"))) / n_lines,
        "h_stop_words": len(STOP_WORDS & lower_words),
        "h_c4_sentences": sum(len(_SENT.findall(ln)) or 1 for ln in c4_lines),
        "h_c4_lorem": "lorem ipsum" in lower,
        "h_c4_curly": "{" in text,
        "h_c4_max_word_len": max((len(t) for t in tokens), default=0),
        "h_c4_javascript_frac": js / n_lines,
        "h_c4_policy_frac": policy / n_lines,
    }
    s["h_dup_line_frac"], s["h_dup_line_chars"] = _dup_fracs(nonempty, len(text))
    s["h_dup_para_frac"], s["h_dup_para_chars"] = _dup_fracs(paragraphs, len(text))
    s.update(_ngram_signals(words))
    return s


def heuristics_step(table: pa.Table) -> pa.Table:
    """Adds one column per signal (null for quarantined rows)."""
    texts = table.column("text").to_pylist()
    rows = [None if t is None else signals(t) for t in texts]
    for name in SIGNALS:
        tp = pa.int64() if name in INT_SIGNALS else pa.bool_() if name in BOOL_SIGNALS else pa.float64()
        table = table.append_column(name, pa.array([None if r is None else r[name] for r in rows], type=tp))
    return table


def _max(field: str, signal: str):
    return field, lambda s, cfg: getattr(cfg, field) is not None and s[signal] > getattr(cfg, field)


def _min(field: str, signal: str):
    return field, lambda s, cfg: getattr(cfg, field) is not None and s[signal] < getattr(cfg, field)


# (reason, config field, fails(signals, HeuristicsConfig) -> bool), in the order reasons are reported.
RULES: list[tuple[str, str, Callable]] = [
    ("gopher_min_words", *_min("min_words", "h_words")),
    ("gopher_max_words", *_max("max_words", "h_words")),
    ("gopher_mean_word_length", "min_mean_word_length",
     lambda s, c: (c.min_mean_word_length is not None and s["h_mean_word_len"] < c.min_mean_word_length)
     or (c.max_mean_word_length is not None and s["h_mean_word_len"] > c.max_mean_word_length)),
    ("gopher_symbol_ratio", *_max("max_symbol_word_ratio", "h_symbol_ratio")),
    ("gopher_bullet_lines", *_max("max_bullet_lines_frac", "h_bullet_frac")),
    ("gopher_ellipsis_lines", *_max("max_ellipsis_lines_frac", "h_ellipsis_frac")),
    ("gopher_alpha_words", *_min("min_alpha_words_frac", "h_alpha_frac")),
    ("gopher_stop_words", *_min("min_stop_words", "h_stop_words")),
    ("gopher_dup_lines", *_max("max_dup_line_frac", "h_dup_line_frac")),
    ("gopher_dup_paragraphs", *_max("max_dup_para_frac", "h_dup_para_frac")),
    ("gopher_dup_line_chars", *_max("max_dup_line_char_frac", "h_dup_line_chars")),
    ("gopher_dup_paragraph_chars", *_max("max_dup_para_char_frac", "h_dup_para_chars")),
    *[(f"gopher_top_{n}gram", *_max(f"max_top_{n}gram_char_frac", f"h_top{n}gram")) for n in (2, 3, 4)],
    *[(f"gopher_dup_{n}gram", *_max(f"max_dup_{n}gram_char_frac", f"h_dup{n}gram")) for n in range(5, 11)],
    ("c4_lorem_ipsum", "c4_lorem_ipsum", lambda s, c: c.c4_lorem_ipsum and s["h_c4_lorem"]),
    ("c4_curly_bracket", "c4_curly_bracket", lambda s, c: c.c4_curly_bracket and s["h_c4_curly"]),
    ("c4_min_sentences", *_min("c4_min_sentences", "h_c4_sentences")),
    ("c4_max_word_length", *_max("c4_max_word_length", "h_c4_max_word_len")),
]


def failing_rules(sig: dict, cfg) -> list[str]:
    """Names of the rules ``sig`` fails under ``cfg`` (a HeuristicsConfig), in ``RULES`` order."""
    return [name for name, _field, fails in RULES if fails(sig, cfg)]
