"""The refine job as a Ray Data plan.

    pass 1 (streaming)   read + parse/quarantine -> normalize -> heuristics -> exact key -> MinHash bands
                         -> WorkSink: _work/docs/p=<part>/ (by id hash) + quarantine/
    pass 2 (shuffle)     bucket rows (exact key + band keys) -> Ray Data groupby(key).map_groups -> edges
    pass 3 (Ray tasks)   verify candidates (exact Jaccard) -> connected components -> duplicates/ + labels
    pass 4 (streaming)   _work/docs -> decide (dedup + heuristics) -> [model steps -> _work/scored/ + per-source
                         statistics -> quality decision] -> OutputSink: kept/ + dropped/
    report               report.json (+ report.html), accounting checked: input = kept + dropped + quarantined
"""

from __future__ import annotations

import dataclasses
import functools
from collections import ChainMap
import logging
import os
import shutil
import time
import pyarrow as pa
import pyarrow.parquet as pq
import ray

from app.config import RefineConfig, to_dict
from app.refine.components import dedup_graph
from app.models import resolve
from app.refine.decide import decide_step, quality_step, summarize
from app.refine.exact import exact_step
from app.refine.heuristics import heuristics_step
from app.refine.io import CorpusDatasource, expand_inputs
from app.refine.lsh import bucket_edges, bucket_rows, minhash_step, partition_of
from app.refine.minhash import lsh_params
from app.refine.normalize import normalize_step
from app.refine.profile import duplicate_samples, pick_duplicates
from app.refine.report import AccountingError, build_report, write_report
from app.refine.scoring import ScoredSink, add_model_steps, check_toxicity, mark_for_scoring
from app.refine.sinks import OutputSink, WorkSink

log = logging.getLogger(__name__)

OUTPUT_ENTRIES = ("kept", "dropped", "quarantine", "duplicates", "_work", "report.json", "report.html", "config.yaml")


@ray.remote(num_cpus=0)
class StepStats:
    """Collects (seconds, docs in, docs out) per step from every worker."""

    def __init__(self) -> None:
        self.steps: dict[str, dict] = {}

    def add(self, name: str, seconds: float, docs_in: int, docs_out: int) -> None:
        s = self.steps.setdefault(name, {"seconds": 0.0, "docs_in": 0, "docs_out": 0})
        s["seconds"] += seconds
        s["docs_in"] += docs_in
        s["docs_out"] += docs_out

    def get(self) -> dict:
        return self.steps


def _timed(name: str, fn, stats, table: pa.Table) -> pa.Table:
    t0 = time.perf_counter()
    out = fn(table)
    good = table.column("error").null_count  # rows without a parse error
    stats.add.remote(name, time.perf_counter() - t0, good, good)
    return out


_LABEL_CACHE: dict = {}  # per worker: the label tables of the last partitions seen
_SUMMARY: dict = {}  # per worker: the per-source statistics of the current run (one entry)


def _decide_batch(table: pa.Table, *, label_refs: list, k: int, heuristics_cfg, heuristics_enabled: bool, stats) -> pa.Table:
    t0 = time.perf_counter()
    parts: list[dict] = []
    if label_refs:
        for p in set(partition_of(table.column("id").to_pylist(), k).tolist()):
            key = label_refs[p].hex()
            if key not in _LABEL_CACHE:
                if len(_LABEL_CACHE) >= 2:
                    _LABEL_CACHE.clear()
                t = ray.get(label_refs[p])
                _LABEL_CACHE[key] = dict(zip(t.column("id").to_pylist(), zip(
                    t.column("exact_of").to_pylist(), t.column("near_of").to_pylist(), t.column("near_similarity").to_pylist())))
            parts.append(_LABEL_CACHE[key])
    out = decide_step(table.drop_columns([c for c in ("bands",) if c in table.column_names]), ChainMap(*parts),
                      heuristics_cfg, heuristics_enabled)
    kept = out.column("drop_reason").null_count
    stats.add.remote("decide", time.perf_counter() - t0, table.num_rows, kept)
    return out


def _quality_batch(table: pa.Table, *, summary_ref, **kw) -> pa.Table:
    key = summary_ref.hex()
    if key not in _SUMMARY:
        _SUMMARY.clear()
        _SUMMARY[key] = ray.get(summary_ref)
    return quality_step(table, _SUMMARY[key], **kw)


def _stream_files(paths: pa.Table, *, columns, batch_rows: int):
    for path in paths.column("path").to_pylist():
        for batch in pq.ParquetFile(path).iter_batches(batch_size=batch_rows, columns=columns):
            yield pa.Table.from_batches([batch])


def read_work(work_docs: str, columns, batch_rows: int):
    """The work files as a Dataset, streamed row group by row group (one file per task input).

    A plain ``read_parquet`` holds far more than a batch per read task; this keeps a worker at one batch,
    and every block comes from one work file, so from one graph partition.
    """
    files = sorted(os.path.join(root, f) for root, _, names in os.walk(work_docs) for f in names if f.endswith(".parquet"))
    return ray.data.from_items([{"path": f} for f in files], override_num_blocks=max(1, len(files))).map_batches(
        functools.partial(_stream_files, columns=columns, batch_rows=batch_rows), batch_format="pyarrow", batch_size=1)


def num_partitions_for(files: list[str], partition_bytes: int) -> int:
    """One partition per ``partition_bytes`` of input on disk (compressed files count 4x), at least 4."""
    total = 0
    for f in files:
        try:
            size = os.path.getsize(f)
        except OSError:  # remote URIs: no size, no contribution
            continue
        total += size * (4 if f.endswith((".gz", ".zst", ".parquet")) else 1)
    return max(4, -(-total // partition_bytes))


def prepare_output(out_dir: str, overwrite: bool) -> None:
    present = [e for e in OUTPUT_ENTRIES if os.path.exists(os.path.join(out_dir, e))]
    if present and not overwrite:
        raise FileExistsError(f"{out_dir} already holds refine output ({', '.join(present)}); "
                              "pass --overwrite to replace it")
    for e in present:
        p = os.path.join(out_dir, e)
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    os.makedirs(out_dir, exist_ok=True)


def run_refine(inputs: list[str], out_dir: str, cfg: RefineConfig, *, overwrite: bool = False,
               keep_work: bool = False) -> dict:
    """Run the whole refine job; returns the report (also written to ``out_dir/report.json``)."""
    import yaml

    t_start = time.time()
    files = expand_inputs(inputs)
    # Model references are checked before any data is read (toxicity.required fails the job here).
    if cfg.perplexity.enabled:
        resolve(cfg.perplexity.model)
    toxicity_ok, toxicity_reason = check_toxicity(cfg)
    out_dir = os.path.abspath(out_dir)
    prepare_output(out_dir, overwrite)
    k = cfg.dedup.num_partitions or num_partitions_for(files, cfg.dedup.partition_bytes)
    cfg = dataclasses.replace(cfg, dedup=dataclasses.replace(cfg.dedup, num_partitions=k))  # resolved
    with open(os.path.join(out_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    work_docs = os.path.join(out_dir, "_work", "docs")
    near, exact = cfg.dedup.near, cfg.dedup.exact
    bands, rows = lsh_params(near.threshold, near.num_perm, near.fp_weight, near.fn_weight)
    stats = StepStats.remote()
    phases: dict[str, float] = {}
    log.info("refine: %d input files -> %s (LSH bands=%d rows=%d, %d partitions)", len(files), out_dir, bands, rows, k)

    # ---- pass 1: parse, score, hash; quarantine the malformed
    t0 = time.time()
    ds = ray.data.read_datasource(CorpusDatasource(
        files, text_field=cfg.io.text_field, id_field=cfg.io.id_field, max_doc_bytes=cfg.io.max_doc_bytes,
        block_rows=cfg.io.block_rows, quarantine_raw_bytes=cfg.io.quarantine_raw_bytes))
    steps = [("normalize", normalize_step), ("exact_hash", exact_step)]
    if cfg.heuristics.enabled:
        steps.insert(1, ("heuristics", heuristics_step))
    if near.enabled:
        steps.append(("minhash", functools.partial(minhash_step, num_perm=near.num_perm, ngram=near.ngram,
                                                   seed=near.seed, bands=bands, rows=rows)))
    for name, fn in steps:
        ds = ds.map_batches(functools.partial(_timed, name, fn, stats), batch_format="pyarrow",
                            batch_size=cfg.io.batch_size)
    work_sink = WorkSink(work_docs, os.path.join(out_dir, "quarantine"), k)
    ds.write_datasink(work_sink)
    phases["parse_and_score"] = time.time() - t0
    n_good = sum(c["records"] - c["quarantined"] for c in work_sink.counts.values())

    # ---- pass 2 + 3: duplicate graph
    label_refs: list = []
    graph_stats: dict = {"verified_edges": 0, "cc_rounds": 0, "exact_clusters": 0, "near_clusters": 0, "duplicate_rows": 0}
    if (exact.enabled or near.enabled) and n_good:
        t0 = time.time()
        cols = ["id", "exact_hash"] + (["bands"] if near.enabled else [])
        edges = (read_work(work_docs, cols, cfg.io.batch_size)
                 .map_batches(functools.partial(bucket_rows, exact=exact.enabled, near=near.enabled),
                              batch_format="pyarrow", batch_size=None)
                 .groupby("key", num_partitions=k).map_groups(bucket_edges, batch_format="pyarrow"))
        edge_refs = edges.to_arrow_refs()
        phases["buckets"] = time.time() - t0
        t0 = time.time()
        label_refs, graph_stats = dedup_graph(edge_refs, work_docs=work_docs, out_dir=out_dir, k=k, ngram=near.ngram,
                                              threshold=near.threshold, verify=near.verify, max_rounds=cfg.dedup.max_cc_rounds)
        phases["dedup_graph"] = time.time() - t0

    # ---- pass 4: decide (and score) and write
    t0 = time.time()
    dup_picks = pick_duplicates(os.path.join(out_dir, "duplicates"), cfg.report.samples)
    out_sink = OutputSink(out_dir, max_toxicity=cfg.decide.max_toxicity, samples=cfg.report.samples,
                          lookup_ids={d for p in dup_picks for d in (p["id"], p["representative_id"])})
    summary: dict = {}
    if n_good:
        # Whole blocks: a work file holds one partition, so a worker holds one partition's labels at a time.
        ds = read_work(work_docs, None, cfg.io.batch_size).map_batches(
            functools.partial(_decide_batch, label_refs=label_refs, k=k, heuristics_cfg=cfg.heuristics,
                              heuristics_enabled=cfg.heuristics.enabled, stats=stats),
            batch_format="pyarrow", batch_size=None)
        if cfg.perplexity.enabled or toxicity_ok:
            ds = add_model_steps(ds.map_batches(functools.partial(mark_for_scoring, score_dropped=cfg.scoring.score_dropped),
                                                batch_format="pyarrow", batch_size=None), cfg, toxicity_ok)
            scored_sink = ScoredSink(os.path.join(out_dir, "_work", "scored"))
            ds.write_datasink(scored_sink)
            phases["score"] = time.time() - t0
            summary = summarize(scored_sink.stats)
            ds = read_work(scored_sink.work_scored, None, cfg.io.batch_size).map_batches(
                functools.partial(_quality_batch, summary_ref=ray.put(summary), decide_cfg=cfg.decide,
                                  heuristics_cfg=cfg.heuristics, heuristics_enabled=cfg.heuristics.enabled),
                batch_format="pyarrow", batch_size=None)
        ds.write_datasink(out_sink)
    phases["decide_and_write"] = time.time() - t0
    phases["total"] = time.time() - t_start

    report = build_report(files=files, cfg=cfg, ingest=work_sink.counts, output=out_sink.counts,
                          steps=ray.get(stats.get.remote()), graph=graph_stats, phases=phases,
                          lsh={"bands": bands, "rows": rows}, out_dir=out_dir, scores=summary,
                          toxicity=(toxicity_ok, toxicity_reason), profile=out_sink.profile,
                          duplicate_samples=duplicate_samples(dup_picks, out_sink.profile["lookup"]))
    write_report(report, out_dir)
    if not keep_work:
        shutil.rmtree(os.path.join(out_dir, "_work"), ignore_errors=True)
    if not report["accounting"]["ok"]:
        raise AccountingError(report["accounting"]["message"])
    return report


def default_out_line(out_dir: str) -> str:
    return f"report: {os.path.join(os.path.abspath(out_dir), 'report.html')}"

