"""The model part of the refine plan: which documents are scored, the scoring actors, per-source statistics.

    read work -> dedup/heuristic decision -> `_score_text` (text of the documents to score, else null)
      -> Tokenize (CPU actors) -> PerplexityScorer (GPU/CPU actors) -> ToxicityScorer (Detoxify, GPU/CPU actors)
                                                                          or ProfanityCheckScorer (CPU actors)
      -> ScoredSink: _work/scored/ + per-source NLL and toxicity histograms
    read scored -> quality_step (per-source standardization, buckets, model drop rules) -> OutputSink
"""

from __future__ import annotations

import logging
import os

import pyarrow as pa
import pyarrow.compute as pc
from ray.data.datasource import Datasink

from app.refine.decide import batch_stats, merge_stats
from app.refine.perplexity import PerplexityScorer, Tokenize
from app.refine.sinks import _Writers
from app.refine.toxicity import (ProfanityCheckScorer, ToxicityChoice, ToxicityScorer, ToxicityUnavailable,
                                  select_backend)

log = logging.getLogger(__name__)

SCORE_COLUMN = "_score_text"


def check_toxicity(cfg) -> ToxicityChoice:
    """Choose and load the toxicity backend once on the driver, before any data is read.

    Unavailable + ``required`` -> ToxicityUnavailable (the job fails); otherwise one log line and the
    report marks toxicity unavailable.
    """
    t = cfg.toxicity
    if not t.enabled:
        return ToxicityChoice(reason="toxicity.enabled is false")
    try:
        choice = select_backend(t.backend, variant=t.variant, checkpoint=t.checkpoint, hf_config_path=t.hf_config_path)
    except ToxicityUnavailable as e:
        if t.required:
            raise
        log.warning("%s; toxicity is skipped (toxicity.required is false)", e)
        return ToxicityChoice(reason=str(e))
    fell_back = t.backend == "auto" and choice.backend != "detoxify"  # another model, another threshold: say so
    log.log(logging.WARNING if fell_back else logging.INFO, "toxicity: the %s backend scores (%s)%s", choice.backend,
            choice.model, f"; {choice.selection}" if choice.selection else "")
    return choice


def mark_for_scoring(table: pa.Table, *, score_dropped: bool) -> pa.Table:
    """``_score_text``: the text of documents the model steps score (survivors, or all), else null."""
    text = table.column("text")
    if not score_dropped:
        text = pc.if_else(pc.is_null(table.column("drop_reason")), text, pa.scalar(None, pa.string()))
    return table.append_column(SCORE_COLUMN, text)


def tokenize_pool(p):
    """Tokenizer actors: the configured number, or an autoscaling pool of 1 to the cluster's CPUs."""
    if p.tokenize_concurrency is not None:
        return p.tokenize_concurrency
    import ray

    return (1, max(1, int(ray.cluster_resources().get("CPU", 1))))


def add_model_steps(ds, cfg, toxicity_ok: bool):
    """The perplexity steps and the toxicity scorer of ``cfg.toxicity.backend`` (resolved: not ``auto``)."""
    p, t = cfg.perplexity, cfg.toxicity
    if p.enabled:
        ds = ds.map_batches(Tokenize, fn_constructor_kwargs={"model_ref": p.model, "max_tokens": p.max_tokens,
                                                             "window": p.window, "column": SCORE_COLUMN},
                            batch_format="pyarrow", batch_size=p.batch_size, concurrency=tokenize_pool(p))
        ds = ds.map_batches(PerplexityScorer, fn_constructor_args=(p.model,),
                            fn_constructor_kwargs={"max_tokens": p.max_tokens, "batch_tokens": p.batch_tokens,
                                                   "window": p.window, "context": p.context, "dtype": p.dtype,
                                                   "device": "cuda" if p.num_gpus > 0 else "cpu"},
                            batch_format="pyarrow", batch_size=p.batch_size, concurrency=p.concurrency,
                            num_gpus=p.num_gpus)
    if toxicity_ok and t.backend == "profanity_check":  # CPU only: toxicity.num_gpus is Detoxify's
        ds = ds.map_batches(ProfanityCheckScorer, fn_constructor_kwargs={"chunk_words": t.chunk_words,
                                                                         "column": SCORE_COLUMN},
                            batch_format="pyarrow", batch_size=max(t.batch_size, 64), concurrency=t.concurrency)
    elif toxicity_ok:
        if t.backend != "detoxify":
            raise ValueError(f"toxicity.backend {t.backend!r}: resolve it first (check_toxicity)")
        ds = ds.map_batches(ToxicityScorer, fn_constructor_kwargs={
            "variant": t.variant, "checkpoint": t.checkpoint, "hf_config_path": t.hf_config_path,
            "device": "cuda" if t.num_gpus > 0 else "cpu", "batch_size": t.batch_size, "column": SCORE_COLUMN},
            batch_format="pyarrow", batch_size=max(t.batch_size, 64), concurrency=t.concurrency, num_gpus=t.num_gpus)
    return ds.map_batches(lambda b: b.drop_columns([SCORE_COLUMN]), batch_format="pyarrow", batch_size=None)


class ScoredSink(Datasink):
    """Scored documents -> ``work_scored/`` block by block; per-source statistics for the decision."""

    def __init__(self, work_scored: str, prefix: str = ""):
        self.work_scored = work_scored
        self.prefix = prefix
        self.stats: dict = {}

    def write(self, blocks, ctx) -> dict:
        out = _Writers()
        parts = []
        for block in blocks:
            if block.num_rows:
                out.write(os.path.join(self.work_scored, f"{self.prefix}part-{ctx.task_idx:06d}.parquet"), block)
                parts.append(batch_stats(block))
        out.close()
        return merge_stats(parts)

    def on_write_complete(self, write_result) -> None:
        self.stats = merge_stats(write_result.write_returns)

