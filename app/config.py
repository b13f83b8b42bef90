"""Typed configuration: dataclasses with a docstring per field, YAML loading, ``--set a.b=c`` overrides.

Every unknown key and every bad value is a ``ConfigError`` that names the dotted key.
``configs/refine.yaml`` mirrors ``RefineConfig`` field for field (a test keeps them in step).
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml


class ConfigError(ValueError):
    """A config key is unknown or its value is invalid; the message names the key."""


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"{key}: {msg}")


def _frac(value: Optional[float], key: str) -> None:
    if value is not None:
        _check(0.0 <= value <= 1.0, key, f"must be between 0 and 1, got {value!r}")


# ----------------------------------------------------------------------------------------------- refine


@dataclass
class IOConfig:
    max_doc_bytes: int = 16 * 1024 * 1024
    """Records (JSONL lines, text files, Parquet texts) larger than this go to quarantine as `oversized`."""
    text_field: str = "text"
    """Name of the text field in JSONL objects and Parquet files."""
    id_field: str = "id"
    """Name of the optional id field; without it the id is derived from source + line number."""
    block_rows: int = 2048
    """Rows per block the reader yields (bounds reader memory together with `max_doc_bytes`)."""
    batch_size: int = 512
    """Rows per batch in the scoring steps."""
    quarantine_raw_bytes: int = 1024 * 1024
    """At most this many raw bytes of a quarantined record are kept (the full size is recorded)."""
    checkpoint_bytes: Optional[int] = None
    """Input bytes per resumable unit: pass 1 runs group by group of input files of about this size, and the
    scoring as many groups of graph partitions; a re-run skips the groups already finished. null: 100 MB per
    cluster CPU, at least 1 GiB and at least 1/256 of the input. Fixed by the first run of an output directory
    (a resumed run keeps its plan)."""

    def __post_init__(self) -> None:
        for name in ("max_doc_bytes", "block_rows", "batch_size", "quarantine_raw_bytes"):
            _check(getattr(self, name) > 0, f"io.{name}", "must be > 0")
        _check(self.checkpoint_bytes is None or self.checkpoint_bytes > 0, "io.checkpoint_bytes", "must be > 0 or null")


@dataclass
class HeuristicsConfig:
    """Gopher quality + repetition rules (Rae et al. 2021, App. A) and C4 rules (Raffel et al. 2020).

    Every threshold is optional: ``null`` switches that rule off (its signal column is still written).
    """

    enabled: bool = True
    """Compute the heuristic signal columns and apply the rules below."""
    min_words: Optional[int] = 50
    """gopher_min_words: fewer words than this fails."""
    max_words: Optional[int] = 100_000
    """gopher_max_words: more words than this fails."""
    min_mean_word_length: Optional[float] = 3.0
    """gopher_mean_word_length: mean word length below this fails."""
    max_mean_word_length: Optional[float] = 10.0
    """gopher_mean_word_length: mean word length above this fails."""
    max_symbol_word_ratio: Optional[float] = 0.1
    """gopher_symbol_ratio: (# '#' + # '...'/'…') / words above this fails."""
    max_bullet_lines_frac: Optional[float] = 0.9
    """gopher_bullet_lines: fraction of lines starting with a bullet above this fails."""
    max_ellipsis_lines_frac: Optional[float] = 0.3
    """gopher_ellipsis_lines: fraction of lines ending in an ellipsis above this fails."""
    min_alpha_words_frac: Optional[float] = 0.8
    """gopher_alpha_words: fraction of words with an alphabetic character below this fails."""
    min_stop_words: Optional[int] = 2
    """gopher_stop_words: fewer of {the, be, to, of, and, that, have, with} than this fails."""
    max_dup_line_frac: Optional[float] = 0.30
    """gopher_dup_lines: fraction of lines that duplicate an earlier line above this fails."""
    max_dup_para_frac: Optional[float] = 0.30
    """gopher_dup_paragraphs: fraction of paragraphs that duplicate an earlier one above this fails."""
    max_dup_line_char_frac: Optional[float] = 0.20
    """gopher_dup_line_chars: characters in duplicate lines / all characters above this fails."""
    max_dup_para_char_frac: Optional[float] = 0.20
    """gopher_dup_paragraph_chars: characters in duplicate paragraphs / all characters above this fails."""
    max_top_2gram_char_frac: Optional[float] = 0.20
    """gopher_top_2gram: characters of the most frequent word 2-gram / all word characters above this fails."""
    max_top_3gram_char_frac: Optional[float] = 0.18
    """gopher_top_3gram: as above for 3-grams."""
    max_top_4gram_char_frac: Optional[float] = 0.16
    """gopher_top_4gram: as above for 4-grams."""
    max_dup_5gram_char_frac: Optional[float] = 0.15
    """gopher_dup_5gram: characters covered by repeated word 5-grams / all word characters above this fails."""
    max_dup_6gram_char_frac: Optional[float] = 0.14
    """gopher_dup_6gram: as above for 6-grams."""
    max_dup_7gram_char_frac: Optional[float] = 0.13
    """gopher_dup_7gram: as above for 7-grams."""
    max_dup_8gram_char_frac: Optional[float] = 0.12
    """gopher_dup_8gram: as above for 8-grams."""
    max_dup_9gram_char_frac: Optional[float] = 0.11
    """gopher_dup_9gram: as above for 9-grams."""
    max_dup_10gram_char_frac: Optional[float] = 0.10
    """gopher_dup_10gram: as above for 10-grams."""
    c4_lorem_ipsum: bool = True
    """c4_lorem_ipsum: a document containing "lorem ipsum" fails."""
    c4_curly_bracket: bool = True
    """c4_curly_bracket: a document containing "{" fails (C4's code filter)."""
    c4_min_sentences: Optional[int] = 5
    """c4_min_sentences: fewer sentences in C4-kept lines (>= 3 words, terminal punctuation) fails."""
    c4_max_word_length: Optional[int] = 1000
    """c4_max_word_length: a word longer than this many characters fails."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name.endswith("_frac"):
                _frac(v, f"heuristics.{f.name}")
            elif v is not None and not isinstance(v, bool):
                _check(v >= 0, f"heuristics.{f.name}", f"must be >= 0, got {v!r}")
        if self.min_words is not None and self.max_words is not None:
            _check(self.min_words <= self.max_words, "heuristics.min_words", "must be <= heuristics.max_words")


@dataclass
class ExactDedupConfig:
    enabled: bool = True
    """Drop documents whose normalized text equals one with a smaller id (`exact_duplicate`)."""


@dataclass
class NearDedupConfig:
    enabled: bool = True
    """MinHash/LSH near-duplicate removal (`near_duplicate`)."""
    threshold: float = 0.8
    """Jaccard similarity of word-shingle sets at which two documents are near duplicates."""
    num_perm: int = 128
    """MinHash permutations (signature length)."""
    ngram: int = 5
    """Words per shingle."""
    seed: int = 1
    """Seed of the MinHash permutations (datasketch's)."""
    verify: bool = True
    """Check every LSH candidate pair against exact Jaccard before linking it."""
    min_recall: float = 0.99
    """Probability that LSH finds a pair at exactly `threshold` Jaccard: the banding is the bands x rows
    (within num_perm) that reaches it with the fewest expected candidates (candidates are verified, a missed
    pair is lost for good). At 0.8 and 128 permutations: 16 bands x 6 rows (0.992)."""
    all_pairs_max: int = 64
    """Band buckets with at most this many distinct texts verify every pair of them; bigger ones (boilerplate
    clusters) a star from the smallest id plus a chain, linear in the bucket. 0: star + chain everywhere."""
    bands: Optional[int] = None
    """LSH bands (null: chosen for min_recall; set with or without `rows`)."""
    rows: Optional[int] = None
    """Signature values per band (null: chosen for min_recall; both set: taken as given)."""

    def __post_init__(self) -> None:
        _check(0.0 < self.threshold <= 1.0, "dedup.near.threshold", f"must be in (0, 1], got {self.threshold!r}")
        _check(self.num_perm >= 2, "dedup.near.num_perm", "must be >= 2")
        _check(self.ngram >= 1, "dedup.near.ngram", "must be >= 1")
        _check(self.seed >= 0, "dedup.near.seed", "must be >= 0")
        _check(0.0 < self.min_recall < 1.0, "dedup.near.min_recall", f"must be in (0, 1), got {self.min_recall!r}")
        _check(self.all_pairs_max >= 0, "dedup.near.all_pairs_max", "must be >= 0")
        _check(self.bands is None or self.bands >= 1, "dedup.near.bands", "must be >= 1")
        _check(self.rows is None or self.rows >= 1, "dedup.near.rows", "must be >= 1")
        from app.refine.banding import choose_banding  # numpy only

        if not self.enabled:
            return
        try:
            choose_banding(self.threshold, self.num_perm, self.min_recall, bands=self.bands, rows=self.rows)
        except ValueError as e:
            raise ConfigError(f"dedup.near: {e}") from None


@dataclass
class DedupConfig:
    exact: ExactDedupConfig = field(default_factory=ExactDedupConfig)
    """Exact deduplication on the normalized text hash."""
    near: NearDedupConfig = field(default_factory=NearDedupConfig)
    """Near deduplication with MinHash + LSH."""
    num_partitions: Optional[int] = None
    """Hash partitions of the duplicate graph (bucket shuffle, verification, connected components,
    labels); each graph task holds one. null: one per `partition_bytes` of input, at least 4."""
    partition_bytes: int = 256 * 1024 * 1024
    """Input bytes per partition when `num_partitions` is null."""
    max_cc_rounds: int = 64
    """Give up (error) if connected components have not converged after this many rounds."""

    def __post_init__(self) -> None:
        _check(self.num_partitions is None or self.num_partitions >= 1, "dedup.num_partitions", "must be >= 1")
        _check(self.partition_bytes > 0, "dedup.partition_bytes", "must be > 0")
        _check(self.max_cc_rounds >= 1, "dedup.max_cc_rounds", "must be >= 1")


@dataclass
class PerplexityConfig:
    enabled: bool = True
    """Score documents with a reference causal LM (mean token NLL, perplexity, tokens scored)."""
    model: str = "smollm2"
    """Model reference: "smollm2" (the offline SmolLM2-135M GGUF), a local HF dir, a .gguf file or a hub id."""
    max_tokens: int = 1024
    """Tokens per scored segment (window "first": the first max_tokens tokens of a document)."""
    window: Literal["first", "sliding"] = "first"
    """"first": score the first max_tokens tokens; "sliding": score every token, segment by segment."""
    context: Optional[int] = None
    """Sliding window: tokens of context each later segment re-reads (null: max_tokens // 4)."""
    batch_tokens: int = 16384
    """Padded tokens per forward (length-sorted micro-batches)."""
    batch_size: int = 256
    """Documents per actor call."""
    num_gpus: float = 0.0
    """GPUs per scoring actor (0: CPU, fp32; >0: CUDA, bf16)."""
    dtype: Literal["auto", "bfloat16", "float32"] = "auto"
    """Model weights and activations: auto = bf16 on CUDA, fp32 on CPU."""
    concurrency: int = 1
    """Scoring actors."""
    tokenize_concurrency: Optional[int] = None
    """Tokenizer actors (CPU); null: an autoscaling pool of 1 to the cluster's CPUs."""

    def __post_init__(self) -> None:
        _check(self.tokenize_concurrency is None or self.tokenize_concurrency >= 1,
               "perplexity.tokenize_concurrency", "must be >= 1 or null")
        _check(self.max_tokens >= 2, "perplexity.max_tokens", "must be >= 2")
        _check(self.context is None or 0 <= self.context < self.max_tokens, "perplexity.context",
               "must be >= 0 and < max_tokens")
        for name in ("batch_tokens", "batch_size", "concurrency"):
            _check(getattr(self, name) >= 1, f"perplexity.{name}", "must be >= 1")
        _check(self.num_gpus >= 0, "perplexity.num_gpus", "must be >= 0")


TOXICITY_BACKENDS = ("detoxify", "profanity_check")


@dataclass
class ToxicityConfig:
    enabled: bool = True
    """Score documents for toxicity (`tox_<label>` per label of the backend + `toxicity` = their max)."""
    backend: Literal["auto", "detoxify", "profanity_check"] = "auto"
    """detoxify: Detoxify checkpoints (the GPU path). profanity_check: the linear model shipped inside the PyPI
    package alt-profanity-check (CPU, offline, Python >= 3.11; a different model, so its own threshold in
    `decide.max_toxicity`). auto: Detoxify when its checkpoint loads, else profanity_check (a `checkpoint`
    named here means Detoxify: no fallback). The backend that scored is saved in config.yaml and report.json,
    and a run is resumed only with the same backend."""
    variant: Literal["original", "unbiased", "multilingual"] = "original"
    """detoxify: the model; its release file is looked up in the torch hub cache unless `checkpoint` is set."""
    checkpoint: Optional[str] = None
    """detoxify: path of a Detoxify checkpoint (.ckpt, Detoxify's format)."""
    hf_config_path: Optional[str] = None
    """detoxify: directory with the HF config + tokenizer of the checkpoint's architecture (offline loading)."""
    required: bool = False
    """Fail before reading any data when the backend (auto: neither) cannot be loaded (else: the report marks
    toxicity unavailable)."""
    batch_size: int = 64
    """detoxify: chunks per forward (documents are scored in chunks of the model's 512 tokens)."""
    chunk_words: int = 32
    """profanity_check: most words per scored chunk (sentences packed greedily, longer ones cut); a document's
    score is the max over its chunks (a bag of words over a whole document dilutes one insult away)."""
    num_gpus: float = 0.0
    """GPUs per scoring actor (detoxify; profanity_check runs on CPU and asks for none)."""
    concurrency: int = 1
    """Scoring actors."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "chunk_words", "concurrency"):
            _check(getattr(self, name) >= 1, f"toxicity.{name}", "must be >= 1")
        _check(self.num_gpus >= 0, "toxicity.num_gpus", "must be >= 0")


@dataclass
class ScoringConfig:
    score_dropped: bool = False
    """Run the model steps on every document, not only on those that survive dedup and heuristics."""


MAX_TOXICITY = {"detoxify": 0.8, "profanity_check": 0.7}


def _threshold(value: Any, key: str, what: str = "a number or null") -> Optional[float]:
    if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
        try:
            value = float(value)
        except ValueError:
            pass
    _check(value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)), key,
           f"must be {what}, got {value!r}")
    _frac(value, key)
    return None if value is None else float(value)


def _per_backend(value: Any, key: str) -> dict:
    """A threshold per toxicity backend: a mapping (backends left out keep their defaults), or one number /
    null for all of them."""
    if not isinstance(value, dict):
        one = _threshold(value, key, "a number, null or a mapping backend: number")
        return {b: one for b in TOXICITY_BACKENDS}
    for b in value:
        _check(b in TOXICITY_BACKENDS, f"{key}.{b}",
               f"unknown toxicity backend (known: {', '.join(TOXICITY_BACKENDS)})")
    return {b: _threshold(value[b], f"{key}.{b}") if b in value else MAX_TOXICITY[b] for b in TOXICITY_BACKENDS}


@dataclass
class DecideConfig:
    """The quality decision (see app/refine/decide.py for the quality_score formula)."""

    max_perplexity: Optional[float] = None
    """high_perplexity: perplexity above this drops a document (absolute rule; null: off)."""
    max_nll_percentile: Optional[float] = None
    """high_perplexity: NLL above this percentile of its source drops a document (e.g. 0.9; null: off)."""
    max_toxicity: Any = field(default_factory=lambda: dict(MAX_TOXICITY))
    """toxic: toxicity above this drops a document, per backend (two models, two scales): detoxify 0.8;
    profanity_check 0.7 (above every document of `make run`'s corpus but the WTFPL licence text, the next
    highest 0.56; below every offensive sentence of tests/test_toxicity.py; benchmarks/toxicity.py). A number
    sets every backend's; null (here or for one backend): off."""
    head_percentile: float = 1 / 3
    """quality_bucket "head": per-source NLL percentile below this (CCNet terciles)."""
    tail_percentile: float = 2 / 3
    """quality_bucket "tail": per-source NLL percentile at or above this."""
    min_nll_std: float = 0.05
    """Floor of the per-source NLL standard deviation used to standardize NLL."""

    def __post_init__(self) -> None:
        _frac(self.max_nll_percentile, "decide.max_nll_percentile")
        self.max_toxicity = _per_backend(self.max_toxicity, "decide.max_toxicity")
        _frac(self.head_percentile, "decide.head_percentile")
        _frac(self.tail_percentile, "decide.tail_percentile")
        _check(self.head_percentile <= self.tail_percentile, "decide.head_percentile", "must be <= decide.tail_percentile")
        _check(self.max_perplexity is None or self.max_perplexity > 0, "decide.max_perplexity", "must be > 0")
        _check(self.min_nll_std > 0, "decide.min_nll_std", "must be > 0")

    def toxicity_threshold(self, backend: Optional[str]) -> Optional[float]:
        """`max_toxicity` of the backend that scored (None: no backend, or its rule is off)."""
        return self.max_toxicity.get(backend) if backend else None


@dataclass
class ReportConfig:
    samples: int = 3
    """Sample documents per drop reason kept in report.json (duplicates with the document they matched)."""
    heatmap_rows: int = 100
    """Most heatmap rows; with more shards, consecutive shards are aggregated into this many groups."""

    def __post_init__(self) -> None:
        _check(self.samples >= 0, "report.samples", "must be >= 0")
        _check(self.heatmap_rows >= 1, "report.heatmap_rows", "must be >= 1")


@dataclass
class RefineConfig:
    io: IOConfig = field(default_factory=IOConfig)
    """Reading, parsing and quarantine."""
    heuristics: HeuristicsConfig = field(default_factory=HeuristicsConfig)
    """Heuristic quality signals and rules."""
    dedup: DedupConfig = field(default_factory=DedupConfig)
    """Exact and near deduplication."""
    perplexity: PerplexityConfig = field(default_factory=PerplexityConfig)
    """Perplexity under a reference LM."""
    toxicity: ToxicityConfig = field(default_factory=ToxicityConfig)
    """Toxicity (Detoxify, or the offline profanity_check model)."""
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    """Which documents the model steps score."""
    decide: DecideConfig = field(default_factory=DecideConfig)
    """The quality decision: model-based drop rules and buckets."""
    report: ReportConfig = field(default_factory=ReportConfig)
    """report.json / report.html (the data-quality dashboard)."""


# ----------------------------------------------------------------------------------------------- loading


def _coerce(tp: Any, value: Any, key: str) -> Any:
    if tp is Any:  # the field's own __post_init__ validates it
        return value
    origin = typing.get_origin(tp)
    if origin is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _coerce(args[0], value, key)
    if origin is Literal:
        _check(value in typing.get_args(tp), key, f"must be one of {list(typing.get_args(tp))}, got {value!r}")
        return value
    if origin is list:
        _check(isinstance(value, list), key, f"must be a list, got {value!r}")
        (inner,) = typing.get_args(tp)
        return [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        _check(isinstance(value, dict), key, f"must be a mapping, got {type(value).__name__}")
        return _build(tp, value, key)
    if value is None:
        raise ConfigError(f"{key}: must not be null")
    if tp is bool:
        _check(isinstance(value, bool), key, f"must be true or false, got {value!r}")
        return value
    if tp is int:
        _check(isinstance(value, int) and not isinstance(value, bool), key, f"must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-3 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        _check(isinstance(value, (int, float)) and not isinstance(value, bool), key, f"must be a number, got {value!r}")
        return float(value)
    if tp is str:
        _check(isinstance(value, str), key, f"must be a string, got {value!r}")
        return value
    raise ConfigError(f"{key}: unsupported type {tp!r}")


def _build(cls: type, data: dict, prefix: str = "") -> Any:
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    for k in data:
        if k not in names:
            where = f"{prefix}.{k}" if prefix else k
            raise ConfigError(f"{where}: unknown key (known: {', '.join(sorted(names))})")
    kwargs = {k: _coerce(hints[k], v, f"{prefix}.{k}" if prefix else k) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # pragma: no cover - defensive
        raise ConfigError(f"{prefix or cls.__name__}: {e}") from e


def to_dict(cfg: Any) -> dict:
    return dataclasses.asdict(cfg)


def parse_override(item: str) -> tuple[list[str], Any]:
    """``a.b=c`` -> (["a", "b"], yaml-parsed c)."""
    if "=" not in item:
        raise ConfigError(f"{item}: an override must look like key.path=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"{item}: empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"{key}: cannot parse value {raw!r}: {e}") from e
    return key.split("."), value


def load_config(cls: type, path: Optional[str | Path] = None, overrides: Optional[list[str]] = None) -> Any:
    """Defaults <- YAML file <- ``--set`` overrides, validated; errors name the key."""
    data: dict = {}
    if path is not None:
        try:
            loaded = yaml.safe_load(Path(path).read_text())
        except FileNotFoundError as e:
            raise ConfigError(f"config file not found: {path}") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: invalid YAML: {e}") from e
        if loaded is not None:
            _check(isinstance(loaded, dict), str(path), "the top level must be a mapping")
            data = loaded
    for item in overrides or []:
        keys, value = parse_override(item)
        node = data
        for i, k in enumerate(keys[:-1]):
            nxt = node.setdefault(k, {})
            _check(isinstance(nxt, dict), ".".join(keys[: i + 1]), "is not a section")
            node = nxt
        node[keys[-1]] = value
    return _build(cls, data)
