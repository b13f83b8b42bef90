"""Resumable refine runs: a fingerprint, a plan, and one marker per finished unit of work.

    _work/state.json        written before any data is read: the fingerprint (the resolved config + every input
                            file with its size and mtime, and its ETag where the store gives one) and the plan
                            (pass-1 groups of input files)
    _work/done/<unit>.json  one per finished unit, written atomically after the unit's files are on disk:
                              ingest-g<NNNNN>  pass 1 of one group of input files (its counts, its step times)
                              graph            passes 2-3: duplicates/ and _work/labels/ (+ graph statistics)
                              score-g<NNNNN>   the model scores of one group of graph partitions (+ statistics)
                              output           pass 4: kept/ and dropped/ (+ their counts and the profile)
                              complete         report.json written

Every file a unit writes is named after the unit (``g<NNNNN>-...``), so the files of a unit that was cut off
are found, deleted and written again; a finished unit is never redone. DataTrove resumes the same way
(completion files per task), at the granularity of the plan.

A marker survives a power loss only with what it names: the unit's files and the directories that hold them are
fsync'd before it (``RefineRun.sync``), and every JSON file here is written to a temporary name, fsync'd, renamed,
and its directory fsync'd.

A re-run into the same directory: the same fingerprint -> the run resumes; another fingerprint -> refused,
naming what differs, unless ``--overwrite``; a finished run -> refused unless ``--overwrite``. Settings that
change only how the work runs, not what it produces (``EXECUTION_ONLY``), may differ between the two.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Optional

from app.config import to_dict
from app.refine.io import ALL_EXT, INPUT_SUFFIXES, fsync_path

log = logging.getLogger(__name__)

OUTPUT_ENTRIES = ("kept", "dropped", "quarantine", "duplicates", "_work", "report.json", "report.html", "config.yaml")

EXECUTION_ONLY = frozenset({
    "io.batch_size", "io.block_rows", "io.checkpoint_bytes",
    "perplexity.concurrency", "perplexity.tokenize_concurrency", "toxicity.concurrency",
})
"""Config keys a resumed run may change: batch sizes, pool sizes, the checkpoint size (the plan is kept)."""

UNIT_ATTEMPTS = 3
"""A unit that fails because a node, a worker or an actor was lost is run again, up to this many times in all."""

UNKNOWN_SIZE = 256 * 1024 * 1024  # a remote input file counts this many bytes when planning groups
REMOTE_INFO_THREADS = 16  # concurrent metadata requests when fingerprinting remote inputs
MIN_CHECKPOINT = 1 << 30
CHECKPOINT_PER_CPU = 100 * 1024 * 1024
MAX_UNITS = 256


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(_flat(v, key + ".") if isinstance(v, dict) else {key: v})
    return out


def _file_entry(path: str) -> list:
    st = os.stat(path)
    return [path, st.st_size, st.st_mtime_ns]


def _filesystem(uri: str):
    """``uri`` -> (pyarrow filesystem, its path there): the filesystems Ray Data reads remote inputs with."""
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri)


def _remote_entries(uri: str) -> list[list]:
    """``[uri, size, mtime_ns, etag]`` of a remote input file, or of each file Ray Data reads under a remote
    directory (``etag``: None where the store gives none; the directory's files come from one listing).

    pyarrow's ``FileInfo`` carries a size and a modification time, no ETag; S3 answers one in the object's
    metadata (``open_input_file(...).metadata()``, one HEAD request), so a rewrite within the second of
    S3's Last-Modified is told apart too. An input whose metadata cannot be read is an error naming it:
    the run would fail reading it, and a fingerprint without it would let a rewritten input resume."""
    import pyarrow.fs as pafs

    try:
        fs, path = _filesystem(uri)
        info = fs.get_file_info(path)
        if info.type == pafs.FileType.Directory:
            base = path.rstrip("/")
            out = []
            for f in fs.get_file_info(pafs.FileSelector(base, recursive=True)):
                rel = f.path[len(base):].lstrip("/")
                if f.is_file and not rel.startswith((".", "_")) and rel.lower().endswith(INPUT_SUFFIXES):  # as Ray Data
                    if f.mtime_ns is None:
                        raise OSError(f"input {uri}/{rel}: its filesystem ({fs.type_name}) lists no modification "
                                      "time, so a rewrite of it could not be told on resume")
                    # no ETag from a listing (one HEAD per object would be); size and mtime (S3: to the second)
                    out.append([f"{uri.rstrip('/')}/{rel}", f.size, f.mtime_ns, None])
            if not out:
                raise FileNotFoundError(f"input {uri}: a directory without input files ({', '.join(ALL_EXT)})")
            return sorted(out)
        if info.type != pafs.FileType.File:
            raise FileNotFoundError(f"input {uri}: no such file or directory ({fs.type_name} filesystem)")
        etag = None
        if fs.type_name != "local":
            with fs.open_input_file(path) as f:
                tag = f.metadata().get("ETag")
            etag = tag.decode() if isinstance(tag, bytes) else tag
    except FileNotFoundError:
        raise
    except Exception as e:
        raise OSError(f"input {uri}: cannot read its size and modification time to fingerprint the run "
                      f"({type(e).__name__}: {e})") from e
    if info.mtime_ns is None and etag is None:
        raise OSError(f"input {uri}: its filesystem ({fs.type_name}) gives no modification time or ETag, so a "
                      "rewrite of it could not be told on resume")
    return [[uri, info.size, info.mtime_ns, etag]]


def input_entries(files: list[str]) -> list[list]:
    """The fingerprint of the inputs: ``[path, size, mtime_ns]`` per local file, ``[uri, size, mtime_ns, etag]``
    per remote one (metadata requests run REMOTE_INFO_THREADS at a time)."""
    remote = [f for f in files if "://" in f]
    found: dict = {}
    if remote:
        with ThreadPoolExecutor(min(REMOTE_INFO_THREADS, len(remote))) as pool:
            found = dict(zip(remote, pool.map(_remote_entries, remote)))
    return [e for f in files for e in (found[f] if f in found else [_file_entry(f)])]


def fingerprint(files: list[str], cfg, toxicity_ok: bool = False) -> dict:
    """What fixes a run's output: the config (with the toxicity backend that scores), the inputs, and whether a
    toxicity backend loaded. As it
    reads back from JSON (tuples become lists), so a fresh one compares equal to a stored one."""
    return json.loads(json.dumps({"config": to_dict(cfg), "inputs": input_entries(files),
                                  "toxicity_available": toxicity_ok}))


def differences(old: dict, new: dict) -> list[str]:
    """What differs between two fingerprints, beyond EXECUTION_ONLY settings (empty: the same run)."""
    out = []
    if old.get("toxicity_available") != new.get("toxicity_available"):
        out.append(f"toxicity available: {old.get('toxicity_available')} -> {new.get('toxicity_available')}")
    a, b = _flat(old["config"]), _flat(new["config"])
    for key in sorted(set(a) | set(b)):
        if key not in EXECUTION_ONLY and a.get(key) != b.get(key):
            out.append(f"{key}: {a.get(key)!r} -> {b.get(key)!r}")
    old_in = {e[0]: e[1:] for e in old["inputs"]}
    new_in = {e[0]: e[1:] for e in new["inputs"]}
    gone = sorted(set(old_in) - set(new_in))
    added = sorted(set(new_in) - set(old_in))
    changed = sorted(p for p in set(old_in) & set(new_in) if old_in[p] != new_in[p])
    for what, paths in (("input files gone", gone), ("input files added", added), ("input files changed", changed)):
        if paths:
            out.append(f"{what}: {len(paths)} ({', '.join(paths[:3])}{', ...' if len(paths) > 3 else ''})")
    return out


def _size(path: str) -> int:
    return UNKNOWN_SIZE if "://" in path else os.path.getsize(path)


def default_checkpoint_bytes(files: list[str]) -> int:
    """100 MB of input per cluster CPU (about 5 minutes of pass 1 at the measured 0.34 MB per core-second), at
    least 1 GiB, and at most MAX_UNITS units in all: an autoscaling cluster that starts with few CPUs does not
    cut a large corpus into thousands of units (each costs about a second more: benchmarks/RESULTS.md)."""
    import ray

    per_cpu = int(ray.cluster_resources().get("CPU", 1)) * CHECKPOINT_PER_CPU
    return max(MIN_CHECKPOINT, per_cpu, -(-sum(_size(f) for f in files) // MAX_UNITS))


def plan_groups(files: list[str], checkpoint_bytes: int) -> list[list[str]]:
    """Consecutive input files (sorted) -> groups of about ``checkpoint_bytes`` each (a file is never split)."""
    groups: list[list[str]] = [[]]
    size = 0
    for f in files:
        if groups[-1] and size >= checkpoint_bytes:
            groups.append([])
            size = 0
        groups[-1].append(f)
        size += _size(f)
    return groups


def split_parts(k: int, n_units: int) -> list[list[int]]:
    """Graph partitions 0..k-1 -> ``n_units`` (at most k) groups of consecutive partitions."""
    n = max(1, min(k, n_units))
    return [list(range(i * k // n, (i + 1) * k // n)) for i in range(n)]


def lost_to_the_cluster(e: BaseException) -> bool:
    """Whether ``e`` (or what caused it) is Ray saying a node, worker, actor or object was lost: work that can
    be done again, unlike an error of the data or the code. Ray retries lost tasks by itself; what it cannot
    retry is state held in a lost actor (Ray Data's shuffle aggregators)."""
    import ray.exceptions as rx

    lost = (rx.RayActorError, rx.NodeDiedError, rx.ObjectLostError, rx.OwnerDiedError, rx.WorkerCrashedError,
            rx.LocalRayletDiedError, rx.ObjectFetchTimedOutError)
    seen: set = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, rx.RayActorError) and e.actor_init_failed:
            return False  # the actor's constructor raised (a model that does not load): not the cluster's doing
        if isinstance(e, lost):
            return True
        e = getattr(e, "cause", None) or e.__cause__ or e.__context__
    return False


def unit_name(kind: str, g: int) -> str:
    return f"{kind}-g{g:05d}"


def file_prefix(g: int) -> str:
    return f"g{g:05d}-"


class RefineRun:
    """The state of one refine output directory: its plan and its finished units."""

    def __init__(self, out_dir: str, state: dict, resumed: bool):
        self.out_dir = out_dir
        self.state = state
        self.resumed = resumed
        self.skipped: list[str] = []
        self.ran: list[str] = []

    @property
    def work(self) -> str:
        return os.path.join(self.out_dir, "_work")

    def _marker(self, unit: str) -> str:
        return os.path.join(self.work, "done", f"{unit}.json")

    def done(self, unit: str) -> Optional[dict]:
        """The record of a finished unit (and it counts as skipped), or None."""
        try:
            with open(self._marker(unit)) as f:
                rec = json.load(f)
        except FileNotFoundError:
            return None
        self.skipped.append(unit)
        return rec

    def finish(self, unit: str, record: dict, *, written: Iterable[str] = ()) -> None:
        """Mark ``unit`` finished with ``record``, once the files ``written`` (and their directories) are on disk."""
        _fsync_all(written, _dirs_up_to({os.path.dirname(os.path.abspath(p)) for p in written}, self.out_dir))
        path = self._marker(unit)
        done = os.path.dirname(path)
        if not os.path.isdir(done):
            os.makedirs(done, exist_ok=True)
            fsync_path(self.work)  # the entry of done/ itself
        _write_json(path, record)
        self.ran.append(unit)

    def unit(self, unit: str, body: Callable[[], dict], *, dirs: list[str], prefix: str = "",
             before: Callable[[], None] = lambda: None) -> dict:
        """The record of ``unit``: from its marker when finished, else from ``body()`` (run after clearing what
        an earlier attempt left in ``dirs``; again on a lost node, up to UNIT_ATTEMPTS), then, once its files in
        ``dirs`` are on disk (``sync``), marked finished."""
        rec = self.done(unit)
        if rec is not None:
            return rec
        for attempt in range(1, UNIT_ATTEMPTS + 1):
            before()
            self.clear(dirs, prefix)
            t0 = time.time()
            try:
                rec = body()
            except Exception as e:
                if attempt == UNIT_ATTEMPTS or not lost_to_the_cluster(e):
                    raise
                log.warning("refine: %s lost work with a node, worker or actor after %.0fs (%s: %s); running it "
                            "again (attempt %d of %d)", unit, time.time() - t0, type(e).__name__, e, attempt + 1,
                            UNIT_ATTEMPTS)
                continue
            self.sync(dirs, prefix)
            self.finish(unit, rec)
            return rec
        raise AssertionError("unreachable")

    def clear(self, dirs: list[str], prefix: str = "") -> None:
        """Delete what a cut-off unit may have left: files named ``prefix*`` (all, without a prefix) in ``dirs``,
        and the hidden temporary files of interrupted writers; the deletions are fsync'd (a power loss after the
        unit's marker does not bring them back)."""
        touched = set()
        for d in dirs:
            if not os.path.isdir(d):
                continue
            if not prefix:
                shutil.rmtree(d)
                touched.add(os.path.dirname(os.path.abspath(d)))
                continue
            for root, _, names in os.walk(d):
                for n in names:
                    if n.startswith(prefix) or n.startswith("." + prefix):
                        os.remove(os.path.join(root, n))
                        touched.add(root)
        _fsync_all((), touched)

    def sync(self, dirs: list[str], prefix: str = "") -> int:
        """fsync a finished unit's files, named ``prefix*`` (all, without a prefix) in ``dirs``, then each directory
        that holds one and its parents up to the output directory (the writers' renames, the directories they
        made); returns the number of files. One walk of ``dirs``, one fsync per file and per directory.

        The writers (``io.write_table``, ``sinks._Writers``) fsync each file before renaming it into place, on
        the node they run on; only the driver knows when a unit is complete, so the renames are made durable
        here. A file is opened read-only for its fsync: on Linux fsync flushes an inode's dirty pages whoever
        wrote them, so on one node this pass also covers every Ray worker's files. On a shared filesystem the
        data lives in the writing node's cache until that node flushes it, which the writers' own fsync does
        (NFS also commits a file on close, and makes creates and renames stable on the server before it
        answers)."""
        files, holders = [], set()
        for d in dirs:
            for root, _, names in os.walk(d):
                mine = [n for n in names if n.startswith(prefix) and not n.startswith(".")]
                files.extend(os.path.join(root, n) for n in mine)
                if mine:
                    holders.add(os.path.abspath(root))
        _fsync_all(files, _dirs_up_to(holders, self.out_dir))
        return len(files)

    def summary(self) -> dict:
        return {"resumed": self.resumed, "units_skipped": sorted(self.skipped), "units_run": sorted(self.ran)}


def _dirs_up_to(dirs: Iterable[str], top: str) -> list[str]:
    """``dirs`` and their parents up to ``top`` (included; a directory outside ``top`` alone), deepest first."""
    top = os.path.abspath(top)
    out = set()
    for d in dirs:
        out.add(d)
        while d != top and d.startswith(top + os.sep):
            d = os.path.dirname(d)
            out.add(d)
    return sorted(out, key=lambda d: (-d.count(os.sep), d))


def _fsync_all(files: Iterable[str], dirs: Iterable[str]) -> None:
    for p in files:
        fsync_path(p)
    for d in dirs:
        fsync_path(d)


def _write_json(path: str, obj) -> None:
    """Write ``path`` atomically and durably: a temporary file, fsync'd, renamed into place, and the directory
    fsync'd (a crash leaves the old file or the new one, complete)."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(os.path.dirname(os.path.abspath(path)))


def open_run(out_dir: str, files: list[str], cfg, *, overwrite: bool, checkpoint_bytes: int,
             toxicity_ok: bool = False) -> RefineRun:
    """Start, resume or refuse a refine run in ``out_dir`` (see the module docstring)."""
    state_path = os.path.join(out_dir, "_work", "state.json")
    fp = fingerprint(files, cfg, toxicity_ok)
    present = [e for e in OUTPUT_ENTRIES if os.path.exists(os.path.join(out_dir, e))]
    if present and not overwrite:
        finished = os.path.exists(os.path.join(out_dir, "_work", "done", "complete.json"))
        if finished or (not os.path.exists(state_path) and "report.json" in present):
            raise FileExistsError(f"{out_dir} holds a finished refine run (report.json); pass --overwrite to replace it")
        if not os.path.exists(state_path):
            raise FileExistsError(f"{out_dir} already holds files of a refine run ({', '.join(present)}) but no "
                                  "_work/state.json to resume it from; pass --overwrite to replace them")
        with open(state_path) as f:
            state = json.load(f)
        diff = differences(state["fingerprint"], fp)
        if diff:
            raise FileExistsError(f"{out_dir} holds an unfinished refine run of other inputs or settings "
                                  f"({'; '.join(diff)}); run it with those to resume, or pass --overwrite to replace it")
        done = len(os.listdir(os.path.join(out_dir, "_work", "done"))) if os.path.isdir(
            os.path.join(out_dir, "_work", "done")) else 0
        log.info("refine: resuming the run in %s (%d units finished)", out_dir, done)
        return RefineRun(out_dir, state, resumed=True)
    for e in present:
        p = os.path.join(out_dir, e)
        shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)
    os.makedirs(os.path.join(out_dir, "_work"), exist_ok=True)
    state = {"fingerprint": fp, "groups": plan_groups(files, checkpoint_bytes)}
    _write_json(state_path, state)
    out = os.path.abspath(out_dir)
    _fsync_all((), [out, os.path.dirname(out)])  # _work/ in out_dir (and out_dir in its parent, when it was made)
    return RefineRun(out_dir, state, resumed=False)
