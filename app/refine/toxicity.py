"""Toxicity scorers, two backends; every word scored (long documents in chunks, max over chunks).

``detoxify`` (the GPU path): Detoxify checkpoints, in Detoxify's own format (a dict with ``config`` and
``state_dict``), read with ``torch.load(weights_only=True)``: Detoxify itself unpickles arbitrary objects,
which DESIGN.md rules out for files we did not make. The transformers model and tokenizer are then built as
Detoxify builds them (``config.arch.args``: model_type, model_name, tokenizer_name, num_classes), except that
the HF config and tokenizer come from ``hf_config_path`` when given, so nothing is fetched from a hub.
Where a checkpoint comes from: ``checkpoint`` when set, otherwise the file Detoxify would have downloaded for
``variant`` in the torch hub cache (``torch.hub.get_dir()/checkpoints/``). Columns: ``tox_<label>`` per class
(Detoxify's standardised names) and ``toxicity`` = the max of them.

``profanity_check`` (offline, CPU): the model shipped inside the PyPI package ``alt-profanity-check`` (MIT):
scikit-learn's TfidfVectorizer (word unigrams, English stop words removed) and a LinearSVC with sigmoid
calibration (CalibratedClassifierCV), trained by its authors on human-labelled offensive-language data
(Davidson et al.'s hate-speech/offensive tweets and Jigsaw's Wikipedia toxic comments). One label: column
``tox_offensive`` (its calibrated probability) and ``toxicity`` = the same. Its two joblib (pickle) files
are unpickled from the installed package's own directory, which is exactly as trusted as the package's code
that we import anyway; no path from a config or a user is ever unpickled. The package pins scikit-learn and
joblib exactly (the versions that pickled the model) and needs Python >= 3.11.

Chunks for ``profanity_check``: its vectorizer L2-normalises a bag of words, so one insult in a long document
is diluted away: on ``make run``'s corpus pyarrow's 15,000-word LICENSE.txt, which includes the WTFPL ("DO WHAT
THE FUCK YOU WANT TO"), scores 0.0007 as one document and 0.999 in its chunk. Documents are cut into chunks of
at most ``chunk_words`` words, at sentence ends and line breaks where possible: sentences are packed greedily,
a longer one is cut into pieces of ``chunk_words`` words. Every word lands in exactly one chunk; a document's
score is the max over its chunks (as on the Detoxify path). 32 words, because (``benchmarks/toxicity.py``) one
offensive sentence planted in 150-600 words of a corpus document scores over the default threshold 0.7 in
98% / 86% / 38% / 0% of 200 such documents with chunks of 16 / 32 / 64 words / the whole document, while
16-word chunks also put three ordinary README documents of the corpus over 0.7 (words out of context: "git
commit" with "black", "sh", a list of identity terms), which 32-word chunks do not. Short chunks are also
closer to what the model was trained on (tweets, comments).
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
import warnings
from typing import Optional

import numpy as np
import pyarrow as pa

VARIANTS = {  # Detoxify's release files, by variant
    "original": "toxic_original-c1212f89.ckpt",
    "unbiased": "toxic_debiased-c7548aa0.ckpt",
    "multilingual": "multilingual_debiased-0b549669.ckpt",
}
RENAME = {"toxic": "toxicity", "identity_hate": "identity_attack", "severe_toxic": "severe_toxicity"}


BACKENDS = ("detoxify", "profanity_check")
OFFLINE_PACKAGE = "alt-profanity-check"
OFFLINE_LABELS = ["offensive"]


class ToxicityUnavailable(RuntimeError):
    """A toxicity backend cannot be loaded; the message is one line saying why."""


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"


def checkpoint_path(variant: str, checkpoint: Optional[str]) -> str:
    if checkpoint:
        return checkpoint
    import torch

    if variant not in VARIANTS:
        raise ToxicityUnavailable(f"toxicity: unknown variant '{variant}' (one of {', '.join(VARIANTS)})")
    return os.path.join(torch.hub.get_dir(), "checkpoints", VARIANTS[variant])


def load_detoxify(variant: str = "original", checkpoint: Optional[str] = None, hf_config_path: Optional[str] = None,
                  device: str = "cpu"):
    """(model, tokenizer, class names) from a Detoxify checkpoint; ToxicityUnavailable with one clear line."""
    import torch
    import transformers

    path = checkpoint_path(variant, checkpoint)
    if not os.path.isfile(path):
        raise ToxicityUnavailable(f"toxicity: no Detoxify checkpoint at {path} (set toxicity.checkpoint, or put the "
                                  f"'{variant}' release file in the torch hub cache)")
    try:
        loaded = torch.load(path, map_location=device, weights_only=True)
        args = loaded["config"]["arch"]["args"]
        classes = [RENAME.get(c, c) for c in loaded["config"]["dataset"]["args"]["classes"]]
        source = hf_config_path or args["model_type"]
        model_class = getattr(transformers, args["model_name"])
        config = model_class.config_class.from_pretrained(source, num_labels=args["num_classes"])
        model = model_class.from_pretrained(None, config=config, state_dict=loaded["state_dict"])
        tokenizer = getattr(transformers, args["tokenizer_name"]).from_pretrained(source)
    except Exception as e:  # noqa: BLE001 - one clear line
        raise ToxicityUnavailable(f"toxicity: cannot load {path}: {_one_line(e)}") from e
    model.to(device).eval()
    model.requires_grad_(False)
    return model, tokenizer, classes


class ToxicityScorer:
    """Ray Data callable class: text -> ``tox_<label>`` columns and ``toxicity`` (model loaded once)."""

    def __init__(self, variant: str = "original", checkpoint: Optional[str] = None, hf_config_path: Optional[str] = None,
                 *, device: Optional[str] = None, batch_size: int = 32, max_length: Optional[int] = None,
                 column: str = "text"):
        import torch

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.tok, self.classes = load_detoxify(variant, checkpoint, hf_config_path, self.device)
        if self.device.startswith("cuda"):
            self.model.to(torch.bfloat16)
        limit = max_length or min(self.tok.model_max_length, self.model.config.max_position_embeddings)
        # The special tokens around one sequence ([CLS] ... [SEP], <s> ... </s>), read off a probe.
        core = self.tok("a", add_special_tokens=False)["input_ids"]
        full = self.tok("a")["input_ids"]
        at = next(i for i in range(len(full)) if full[i : i + len(core)] == core)
        self.prefix, self.suffix = full[:at], full[at + len(core):]
        self.chunk = limit - len(self.prefix) - len(self.suffix)  # content tokens per chunk
        self.batch_size = batch_size
        self.column = column  # null entries are not scored

    def chunks(self, text: str) -> list[list[int]]:
        ids = self.tok(text, add_special_tokens=False)["input_ids"]
        parts = [ids[i : i + self.chunk] for i in range(0, len(ids), self.chunk)] or [[]]
        return [self.prefix + p + self.suffix for p in parts]

    def score(self, texts: list[Optional[str]]) -> np.ndarray:
        """(N, classes) probabilities: the max over each document's chunks (NaN rows for None)."""
        import torch

        seqs, owner = gather_chunks(texts, self.chunks)
        out = np.full((len(texts), len(self.classes)), np.nan)
        order = sorted(range(len(seqs)), key=lambda i: -len(seqs[i]))  # length buckets: little padding
        pad = self.tok.pad_token_id or 0
        for lo in range(0, len(order), self.batch_size):
            idx = order[lo : lo + self.batch_size]
            T = max(len(seqs[i]) for i in idx)
            ids = torch.full((len(idx), T), pad, dtype=torch.long)
            mask = torch.zeros((len(idx), T), dtype=torch.long)
            for r, i in enumerate(idx):
                ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
                mask[r, : len(seqs[i])] = 1
            with torch.inference_mode():
                logits = self.model(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).logits
            probs = torch.sigmoid(logits.float()).cpu().numpy()
            for r, i in enumerate(idx):
                d = owner[i]
                out[d] = probs[r] if np.isnan(out[d, 0]) else np.maximum(out[d], probs[r])
        return out

    def __call__(self, table: pa.Table) -> pa.Table:
        return with_toxicity_columns(table, self.classes, self.score(table.column(self.column).to_pylist()))


def gather_chunks(texts: list[Optional[str]], chunks) -> tuple[list, list[int]]:
    """Every chunk of every text (None: none) and the index of the text it came from."""
    seqs, owner = [], []
    for d, t in enumerate(texts):
        if t is not None:
            for c in chunks(t):
                seqs.append(c)
                owner.append(d)
    return seqs, owner


def with_toxicity_columns(table: pa.Table, classes: list[str], probs: np.ndarray) -> pa.Table:
    """``tox_<label>`` per class and ``toxicity`` = their max, from (N, classes) probabilities (NaN rows: null)."""
    for j, name in enumerate(classes):
        col = [None if np.isnan(v) else float(v) for v in probs[:, j]]
        table = table.append_column(f"tox_{name}", pa.array(col, pa.float64()))
    top = [None if np.isnan(r).all() else float(np.nanmax(r)) for r in probs]
    return table.append_column("toxicity", pa.array(top, pa.float64()))


# ------------------------------------------------------------------------------ profanity_check (offline)


def load_profanity_check():
    """(vectorizer, model, column of the offensive class in ``predict_proba``) of alt-profanity-check.

    Importing ``profanity_check`` unpickles the two joblib files shipped inside the package (see the module
    docstring); a scikit-learn other than the one that pickled them is refused rather than trusted to give
    the same scores. ToxicityUnavailable with one clear line when it cannot be loaded.
    """
    if sys.version_info < (3, 11):
        raise ToxicityUnavailable(f"toxicity: the profanity_check backend needs Python >= 3.11 ({OFFLINE_PACKAGE} "
                                  f"requires it); this is {sys.version_info.major}.{sys.version_info.minor}")
    try:
        from sklearn.exceptions import InconsistentVersionWarning

        with warnings.catch_warnings():
            warnings.simplefilter("error", InconsistentVersionWarning)
            from profanity_check import profanity_check as pc
        vectorizer, model = pc.vectorizer, pc.model
        positive = list(model.classes_).index(1)
    except ImportError as e:
        raise ToxicityUnavailable(f"toxicity: the profanity_check backend needs the PyPI package {OFFLINE_PACKAGE} "
                                  f"(pip install {OFFLINE_PACKAGE}): {_one_line(e)}") from e
    except Exception as e:  # noqa: BLE001 - one clear line
        raise ToxicityUnavailable(f"toxicity: cannot load the model of {OFFLINE_PACKAGE}: {_one_line(e)}") from e
    return vectorizer, model, positive


def offline_model_name() -> str:
    from importlib import metadata

    try:
        return f"{OFFLINE_PACKAGE} {metadata.version(OFFLINE_PACKAGE)}"
    except metadata.PackageNotFoundError:
        return OFFLINE_PACKAGE


_SENTENCE_BREAK = re.compile(r"(?<=[.!?])\s+|\n")


def word_chunks(text: str, max_words: int) -> list[str]:
    """``text`` in chunks of at most ``max_words`` whitespace-separated words, cut at sentence ends (``.!?``
    then whitespace) and line breaks where possible: sentences are packed greedily, a longer one is cut into
    pieces of ``max_words``. The chunks' words, in order, are the text's words (``[""]`` for no words)."""
    chunks: list[str] = []
    cur: list[str] = []
    for sentence in _SENTENCE_BREAK.split(text):
        words = sentence.split()
        for i in range(0, len(words), max_words):
            piece = words[i : i + max_words]
            if cur and len(cur) + len(piece) > max_words:
                chunks.append(" ".join(cur))
                cur = []
            cur.extend(piece)
    if cur:
        chunks.append(" ".join(cur))
    return chunks or [""]


class ProfanityCheckScorer:
    """Ray Data callable class: text -> ``tox_offensive`` and ``toxicity`` with alt-profanity-check's model
    (loaded once per actor; CPU)."""

    classes = OFFLINE_LABELS

    def __init__(self, *, chunk_words: int = 32, column: str = "text"):
        self.vectorizer, self.model, self.positive = load_profanity_check()
        self.chunk_words = chunk_words
        self.column = column  # null entries are not scored

    def chunks(self, text: str) -> list[str]:
        return word_chunks(text, self.chunk_words)

    def score(self, texts: list[Optional[str]]) -> np.ndarray:
        """(N, 1) probabilities: the max over each document's chunks (NaN rows for None)."""
        seqs, owner = gather_chunks(texts, self.chunks)
        out = np.full((len(texts), 1), np.nan)
        if seqs:
            probs = self.model.predict_proba(self.vectorizer.transform(seqs))[:, self.positive]  # (chunks,)
            np.fmax.at(out[:, 0], np.asarray(owner), probs)  # fmax: NaN (nothing yet) loses to any score
        return out

    def __call__(self, table: pa.Table) -> pa.Table:
        return with_toxicity_columns(table, self.classes, self.score(table.column(self.column).to_pylist()))


# ------------------------------------------------------------------------------ backend selection


@dataclasses.dataclass(frozen=True)
class ToxicityChoice:
    """Which backend scores toxicity in a run (``backend`` None: none does, ``reason`` says why)."""

    backend: Optional[str] = None
    reason: str = "toxicity.enabled is false"
    model: Optional[str] = None
    """What scored: the Detoxify checkpoint file, or the offline package and its version."""
    labels: list = dataclasses.field(default_factory=list)
    """The ``tox_<label>`` columns the backend writes."""
    selection: str = ""
    """How ``auto`` chose (empty for a backend named in the config)."""

    @property
    def ok(self) -> bool:
        return self.backend is not None

    def as_report(self) -> dict:
        return {"available": self.ok, "reason": self.reason, "backend": self.backend, "model": self.model,
                "labels": list(self.labels), "selection": self.selection}


def load_backend(backend: str, *, variant: str = "original", checkpoint: Optional[str] = None,
                 hf_config_path: Optional[str] = None) -> ToxicityChoice:
    """Load ``backend`` once (on the driver, to know it works before any data is read); ToxicityUnavailable."""
    if backend == "detoxify":
        _model, _tok, classes = load_detoxify(variant, checkpoint, hf_config_path)
        return ToxicityChoice("detoxify", "ok", checkpoint_path(variant, checkpoint), classes)
    if backend == "profanity_check":
        load_profanity_check()
        return ToxicityChoice("profanity_check", "ok", offline_model_name(), list(OFFLINE_LABELS))
    raise ToxicityUnavailable(f"toxicity: unknown backend '{backend}' (one of auto, {', '.join(BACKENDS)})")


def select_backend(backend: str = "auto", *, variant: str = "original", checkpoint: Optional[str] = None,
                   hf_config_path: Optional[str] = None) -> ToxicityChoice:
    """The backend that will score: the one named, or for ``auto`` Detoxify when its checkpoint loads, else
    profanity_check. A ``checkpoint`` named in the config means Detoxify was asked for: ``auto`` then does not
    fall back. ToxicityUnavailable (one line, every backend tried) when none loads."""
    kw = {"variant": variant, "checkpoint": checkpoint, "hf_config_path": hf_config_path}
    if backend != "auto":
        return load_backend(backend, **kw)
    try:
        return dataclasses.replace(load_backend("detoxify", **kw), selection="auto: Detoxify's checkpoint loaded")
    except ToxicityUnavailable as e:
        if checkpoint:
            raise
        first = str(e)
    try:
        choice = load_backend("profanity_check", **kw)
    except ToxicityUnavailable as e:
        raise ToxicityUnavailable(f"{first}; {e}") from e
    return dataclasses.replace(choice, selection=f"auto: {first}; the offline profanity_check backend is used")
