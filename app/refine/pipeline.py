"""The refine job as a Ray Data plan, in resumable units (``app.refine.resume``).

    pass 1 (streaming)   read + parse/quarantine -> normalize -> heuristics -> exact key -> MinHash bands
                         -> WorkSink: _work/docs/p=<part>/ (by id hash) + quarantine/      [a unit per file group]
    pass 2 (shuffle)     bucket rows (exact key + band keys) -> Ray Data groupby(key).map_groups -> _work/edges/
    pass 3 (Ray tasks)   verify candidates (exact Jaccard) -> connected components -> duplicates/ + _work/labels/
                                                                                           [passes 2-3: one unit]
    pass 4 (streaming)   _work/docs -> decide (dedup + heuristics) -> [model steps -> _work/scored/ + per-source
                         statistics [a unit per group of partitions] -> quality decision] -> OutputSink: kept/ +
                         dropped/                                                          [one unit]
    report               report.json (+ report.html), accounting checked: input = kept + dropped + quarantined

Every stage reads files and writes files, so a worker node lost mid-run costs only its tasks, which Ray
runs again elsewhere; a driver lost mid-run costs only the unfinished units, which the next run redoes.
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
from app.refine.components import dedup_graph, label_paths
from app.models import resolve
from app.refine.decide import decide_step, merge_stats, quality_step, read_labels, summarize
from app.refine.exact import exact_step
from app.refine.heuristics import heuristics_step
from app.refine.io import CorpusDatasource, expand_inputs, parquet_files
from app.refine.banding import choose_banding
from app.refine.lsh import bucket_edges, bucket_rows, minhash_step, partition_of
from app.refine.normalize import normalize_step
from app.refine.profile import duplicate_samples, pick_duplicates
from app.refine.report import AccountingError, build_report, write_report
from app.refine.scoring import ScoredSink, add_model_steps, check_toxicity, mark_for_scoring
from app.refine.resume import default_checkpoint_bytes, file_prefix, open_run, split_parts, unit_name
from app.refine.sinks import FilesSink, OutputSink, WorkSink, merge_counts

log = logging.getLogger(__name__)

@ray.remote(num_cpus=0)
class StepStats:
    """Sums the seconds workers spend per step (document counts come from the accounting: a retried task
    would count its batches twice)."""

    def __init__(self) -> None:
        self.steps: dict[str, float] = {}

    def add(self, name: str, seconds: float) -> None:
        self.steps[name] = self.steps.get(name, 0.0) + seconds

    def take(self) -> dict:
        """The sums so far, and start again (one record per unit of work)."""
        out, self.steps = self.steps, {}
        return out


def _timed(name: str, fn, stats, table: pa.Table) -> pa.Table:
    t0 = time.perf_counter()
    out = fn(table)
    stats.add.remote(name, time.perf_counter() - t0)
    return out


_LABEL_CACHE: dict = {}  # per worker: the labels of the last partitions seen (by label file)
_SUMMARY: dict = {}  # per worker: the per-source statistics of the current run (one entry)


def _decide_batch(table: pa.Table, *, labels: list, k: int, heuristics_cfg, heuristics_enabled: bool, stats) -> pa.Table:
    t0 = time.perf_counter()
    parts: list[dict] = []
    if labels:
        for p in set(partition_of(table.column("id").to_pylist(), k).tolist()):
            key = labels[p]
            if key not in _LABEL_CACHE:
                if len(_LABEL_CACHE) >= 2:
                    _LABEL_CACHE.clear()
                _LABEL_CACHE[key] = read_labels(labels[p])
            parts.append(_LABEL_CACHE[key])
    out = decide_step(table.drop_columns([c for c in ("bands",) if c in table.column_names]), ChainMap(*parts),
                      heuristics_cfg, heuristics_enabled)
    stats.add.remote("decide", time.perf_counter() - t0)
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


def read_work(files: list[str], columns, batch_rows: int):
    """Work files as a Dataset, streamed row group by row group (one file per task input).

    A plain ``read_parquet`` holds far more than a batch per read task; this keeps a worker at one batch,
    and every block comes from one work file, so from one graph partition.
    """
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


def _on_this_node():
    """Actors the driver needs to the end live on the driver's node: a lost worker node does not take them."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)


def _sum_seconds(records) -> dict:
    out: dict = {}
    for r in records:
        for name, sec in r.get("seconds", {}).items():
            out[name] = out.get(name, 0.0) + sec
    return out


def _merge_steps(records) -> dict:
    out: dict = {}
    for r in records:
        for name, sec in r.get("steps", {}).items():
            out[name] = out.get(name, 0.0) + sec
    return out


def run_refine(inputs: list[str], out_dir: str, cfg: RefineConfig, *, overwrite: bool = False,
               keep_work: bool = False) -> dict:
    """Run the whole refine job, or resume it (``app.refine.resume``); returns the report (also in
    ``out_dir/report.json``)."""
    import yaml

    t_start = time.time()
    files = expand_inputs(inputs)
    # Model references are checked before any data is read (toxicity.required fails the job here).
    if cfg.perplexity.enabled:
        resolve(cfg.perplexity.model)
    toxicity = check_toxicity(cfg)
    toxicity_ok = toxicity.ok
    if toxicity_ok:  # resolved (auto -> the backend that scores): config.yaml and the resume fingerprint name it
        cfg = dataclasses.replace(cfg, toxicity=dataclasses.replace(cfg.toxicity, backend=toxicity.backend))
    max_toxicity = cfg.decide.toxicity_threshold(toxicity.backend)
    out_dir = os.path.abspath(out_dir)
    k = cfg.dedup.num_partitions or num_partitions_for(files, cfg.dedup.partition_bytes)
    cfg = dataclasses.replace(cfg, dedup=dataclasses.replace(cfg.dedup, num_partitions=k))  # resolved
    run = open_run(out_dir, files, cfg, overwrite=overwrite, toxicity_ok=toxicity_ok,
                   checkpoint_bytes=cfg.io.checkpoint_bytes or default_checkpoint_bytes(files))
    with open(os.path.join(out_dir, "config.yaml"), "w") as f:
        yaml.safe_dump(to_dict(cfg), f, sort_keys=False)
    work = run.work
    work_docs, labels_dir = os.path.join(work, "docs"), os.path.join(work, "labels")
    quarantine_dir, dup_dir = os.path.join(out_dir, "quarantine"), os.path.join(out_dir, "duplicates")
    near, exact = cfg.dedup.near, cfg.dedup.exact
    banding = (choose_banding(near.threshold, near.num_perm, near.min_recall, bands=near.bands, rows=near.rows)
               if near.enabled else None)
    stats = StepStats.options(scheduling_strategy=_on_this_node()).remote()
    groups = run.state["groups"]
    log.info("refine: %d input files in %d groups -> %s (%d partitions)", len(files), len(groups), out_dir, k)
    if near.enabled:
        log.info("refine: LSH banding %d bands x %d rows (%s): finds a pair at Jaccard %.2f with probability %.4f",
                 banding.bands, banding.rows, "chosen for min_recall %.3g" % near.min_recall if banding.chosen_by == "min_recall"
                 else "from the config", near.threshold, banding.recall_at_threshold)

    # ---- pass 1: parse, score, hash; quarantine the malformed. One unit per group of input files.
    steps = [("normalize", normalize_step), ("exact_hash", exact_step)]
    if cfg.heuristics.enabled:
        steps.insert(1, ("heuristics", heuristics_step))
    if near.enabled:
        steps.append(("minhash", functools.partial(minhash_step, num_perm=near.num_perm, ngram=near.ngram,
                                                   seed=near.seed, bands=banding.bands, rows=banding.rows)))
    take_steps = lambda: ray.get(stats.take.remote())  # noqa: E731  (the step sums of one unit)

    def ingest_unit(g: int, group: list[str]) -> dict:
        t0 = time.time()
        ds = ray.data.read_datasource(CorpusDatasource(
            group, text_field=cfg.io.text_field, id_field=cfg.io.id_field, max_doc_bytes=cfg.io.max_doc_bytes,
            block_rows=cfg.io.block_rows, quarantine_raw_bytes=cfg.io.quarantine_raw_bytes))
        for name, fn in steps:
            ds = ds.map_batches(functools.partial(_timed, name, fn, stats), batch_format="pyarrow",
                                batch_size=cfg.io.batch_size)
        sink = WorkSink(work_docs, quarantine_dir, k, prefix=file_prefix(g))
        ds.write_datasink(sink)
        return {"counts": sink.counts, "steps": take_steps(), "seconds": {"parse_and_score": time.time() - t0}}

    ingest = [run.unit(unit_name("ingest", g), functools.partial(ingest_unit, g, group),
                       dirs=[work_docs, quarantine_dir], prefix=file_prefix(g), before=take_steps)
              for g, group in enumerate(groups)]
    ingest_counts = merge_counts(r["counts"] for r in ingest)
    n_good = sum(c["records"] - c["quarantined"] for c in ingest_counts.values())
    records = list(ingest)

    # ---- pass 2 + 3: the duplicate graph (one unit)
    labels: list = []
    graph_stats: dict = {"candidate_edges": 0, "verified_edges": 0, "cc_rounds": 0, "exact_clusters": 0, "near_clusters": 0, "families": 0, "duplicate_rows": 0,
                         "max_task_pairs": 0, "max_task_cc_rows": 0}
    edges_dir = os.path.join(work, "edges")

    def graph_unit() -> dict:
        t0 = time.time()
        cols = ["id", "exact_hash"] + (["bands"] if near.enabled else [])
        (read_work(parquet_files(work_docs), cols, cfg.io.batch_size)
         .map_batches(functools.partial(bucket_rows, exact=exact.enabled, near=near.enabled),
                      batch_format="pyarrow", batch_size=None)
         .groupby("key", num_partitions=k).map_groups(functools.partial(bucket_edges, all_pairs_max=near.all_pairs_max),
                                                       batch_format="pyarrow")
         .write_datasink(FilesSink(edges_dir)))
        t1 = time.time()
        gstats = dedup_graph(parquet_files(edges_dir), work_docs=work_docs, out_dir=out_dir, labels_dir=labels_dir,
                             k=k, ngram=near.ngram, threshold=near.threshold, verify=near.verify,
                             max_rounds=cfg.dedup.max_cc_rounds)
        return {"stats": gstats, "seconds": {"buckets": t1 - t0, "dedup_graph": time.time() - t1}}

    if (exact.enabled or near.enabled) and n_good:
        labels = label_paths(labels_dir, k)
        rec = run.unit("graph", graph_unit, dirs=[edges_dir, labels_dir, dup_dir])
        graph_stats = rec["stats"]
        records.append(rec)

    # ---- pass 4: decide (and score: a unit per group of graph partitions) and write (one unit)
    dup_picks = pick_duplicates(dup_dir, cfg.report.samples)
    decide = functools.partial(_decide_batch, labels=labels, k=k, heuristics_cfg=cfg.heuristics,
                               heuristics_enabled=cfg.heuristics.enabled, stats=stats)
    scoring = cfg.perplexity.enabled or toxicity_ok
    scored_dir = os.path.join(work, "scored")

    def score_unit(g: int, parts: list[int]) -> dict:
        t0 = time.time()
        # Whole blocks: a work file holds one partition, so a worker holds one partition's labels at a time.
        ds = read_work(parquet_files(work_docs, parts), None, cfg.io.batch_size).map_batches(
            decide, batch_format="pyarrow", batch_size=None)
        ds = add_model_steps(ds.map_batches(functools.partial(mark_for_scoring, score_dropped=cfg.scoring.score_dropped),
                                            batch_format="pyarrow", batch_size=None), cfg, toxicity_ok)
        sink = ScoredSink(scored_dir, prefix=file_prefix(g))
        ds.write_datasink(sink)
        return {"stats": sink.stats, "steps": take_steps(), "seconds": {"score": time.time() - t0}}

    score_recs = []
    if scoring and n_good:
        score_recs = [run.unit(unit_name("score", g), functools.partial(score_unit, g, parts), dirs=[scored_dir],
                               prefix=file_prefix(g), before=take_steps)
                      for g, parts in enumerate(split_parts(k, len(groups)))]
        records.extend(score_recs)

    def output_unit() -> dict:
        t0 = time.time()
        sink = OutputSink(out_dir, max_toxicity=max_toxicity, samples=cfg.report.samples,
                          lookup_ids={d for p in dup_picks for d in (p["id"], p["duplicate_of"])})
        summary: dict = {}
        if n_good:
            if scoring:
                summary = summarize(merge_stats(r["stats"] for r in score_recs))
                ds = read_work(parquet_files(scored_dir), None, cfg.io.batch_size).map_batches(
                    functools.partial(_quality_batch, summary_ref=ray.put(summary), decide_cfg=cfg.decide,
                                      max_toxicity=max_toxicity,
                                      heuristics_cfg=cfg.heuristics, heuristics_enabled=cfg.heuristics.enabled),
                    batch_format="pyarrow", batch_size=None)
            else:
                ds = read_work(parquet_files(work_docs), None, cfg.io.batch_size).map_batches(
                    decide, batch_format="pyarrow", batch_size=None)
            ds.write_datasink(sink)
        return {"counts": sink.counts, "profile": sink.profile, "summary": summary, "steps": take_steps(),
                "seconds": {"decide_and_write": time.time() - t0}}

    rec = run.unit("output", output_unit, dirs=[os.path.join(out_dir, "kept"), os.path.join(out_dir, "dropped")],
                   before=take_steps)
    records.append(rec)

    phases = _sum_seconds(records)
    phases["total"] = sum(phases.values())
    report = build_report(files=files, cfg=cfg, ingest=ingest_counts, output=rec["counts"], steps=_merge_steps(records),
                          graph=graph_stats, phases=phases, lsh=banding.as_dict() if banding else {}, out_dir=out_dir,
                          scores=rec["summary"], toxicity=toxicity.as_report(), profile=rec["profile"],
                          duplicate_samples=duplicate_samples(dup_picks, rec["profile"]["lookup"]))
    report["resume"] = {**run.summary(), "this_run_seconds": round(time.time() - t_start, 3)}
    write_report(report, out_dir)
    run.finish("complete", {"accounting_ok": report["accounting"]["ok"]},
               written=[os.path.join(out_dir, n) for n in ("report.json", "report.html", "config.yaml")])
    if not keep_work:
        shutil.rmtree(work, ignore_errors=True)
    if not report["accounting"]["ok"]:
        raise AccountingError(report["accounting"]["message"])
    return report


def default_out_line(out_dir: str) -> str:
    return f"report: {os.path.join(os.path.abspath(out_dir), 'report.html')}"

