"""Reading, parsing and quarantine of raw corpora through Ray Data.

``CorpusDatasource`` is a Ray Data ``FileBasedDatasource``: one read task per group of files, each file
streamed (JSONL line by line, plain or .gz/.zst through Arrow's decompressing streams; Parquet row
group by row group; text files one document per file). Every record becomes one row of
``RAW_SCHEMA``: a good record has ``error = null``; a malformed one keeps its raw bytes (up to
``quarantine_raw_bytes``), source, line number and the error, and is written to ``quarantine/`` later.
Bad input never raises.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Iterator, Optional

import pyarrow as pa
import pyarrow.parquet as pq

try:  # Ray is imported lazily by callers that only need the helpers.
    from ray.data.datasource import FileBasedDatasource
except ImportError:  # pragma: no cover
    FileBasedDatasource = object  # type: ignore[misc,assignment]

JSONL_EXT = (".jsonl", ".json", ".ndjson", ".jsonl.gz", ".json.gz", ".ndjson.gz", ".jsonl.zst", ".json.zst", ".ndjson.zst")
PARQUET_EXT = (".parquet", ".pq")
TEXT_EXT = (".txt", ".md", ".rst", ".text")
ALL_EXT = [e.lstrip(".") for e in JSONL_EXT + PARQUET_EXT + TEXT_EXT]
INPUT_SUFFIXES = tuple("." + e for e in ALL_EXT)  # what a directory's input files end with (case-insensitive)

RAW_SCHEMA = pa.schema(
    [
        ("id", pa.string()),
        ("text", pa.string()),
        ("source", pa.string()),
        ("line", pa.int64()),
        ("meta", pa.string()),
        ("error", pa.string()),
        ("error_detail", pa.string()),
        ("raw", pa.binary()),
        ("raw_bytes", pa.int64()),
    ]
)

QUARANTINE_COLUMNS = ["id", "source", "line", "error", "error_detail", "raw", "raw_bytes"]


def file_format(path: str) -> str:
    low = path.lower()
    if low.endswith(JSONL_EXT):
        return "jsonl"
    if low.endswith(PARQUET_EXT):
        return "parquet"
    if low.endswith(TEXT_EXT):
        return "text"
    raise ValueError(f"{path}: unsupported file type (JSONL[.gz|.zst], Parquet or text: {', '.join(ALL_EXT)})")


def derived_id(source: str, line: int) -> str:
    """Stable id of a record without one: a short hash of the source path and the line number."""
    return f"{hashlib.blake2b(source.encode(), digest_size=6).hexdigest()}-{line:010d}"


def iter_lines(f, max_bytes: int, chunk: int = 1 << 22) -> Iterator[tuple[int, bytes, int]]:
    """Yield ``(line_no, bytes, total_length)`` per line (1-based), reading ``chunk`` bytes at a time.

    A line longer than ``max_bytes`` is not held in memory: its first ``max_bytes + 1`` bytes are kept and
    the rest is counted and skipped, so ``total_length > max_bytes`` marks it oversized.
    """
    buf = bytearray()
    extra = 0
    line_no = 1
    cap = max_bytes + 1
    while True:
        data = f.read(chunk)
        if not data:
            break
        start = 0
        while True:
            nl = data.find(b"\n", start)
            end = len(data) if nl < 0 else nl
            room = cap - len(buf)
            if room > 0:
                buf += data[start : min(end, start + room)]
            extra += max(0, (end - start) - max(room, 0))
            if nl < 0:
                break
            yield line_no, bytes(buf), len(buf) + extra
            buf.clear()
            extra = 0
            line_no += 1
            start = nl + 1
    if buf or extra:
        yield line_no, bytes(buf), len(buf) + extra


class _Rows:
    """Column buffers for RAW_SCHEMA rows; ``flush`` makes a table."""

    def __init__(self, quarantine_raw_bytes: int):
        self.cols: dict[str, list] = {n: [] for n in RAW_SCHEMA.names}
        self.keep_raw = quarantine_raw_bytes

    def __len__(self) -> int:
        return len(self.cols["id"])

    def good(self, id_: str, text: str, source: str, line: int, meta: Optional[str], size: int) -> None:
        for k, v in (("id", id_), ("text", text), ("source", source), ("line", line), ("meta", meta),
                     ("error", None), ("error_detail", None), ("raw", None), ("raw_bytes", size)):
            self.cols[k].append(v)

    def bad(self, id_: str, source: str, line: int, error: str, detail: str, raw: bytes, size: int) -> None:
        for k, v in (("id", id_), ("text", None), ("source", source), ("line", line), ("meta", None),
                     ("error", error), ("error_detail", detail[:500]), ("raw", raw[: self.keep_raw]), ("raw_bytes", size)):
            self.cols[k].append(v)

    def flush(self) -> pa.Table:
        table = pa.table({n: pa.array(self.cols[n], type=RAW_SCHEMA.field(n).type) for n in RAW_SCHEMA.names})
        for v in self.cols.values():
            v.clear()
        return table


def parse_json_record(raw: bytes, size: int, source: str, line: int, *, text_field: str, id_field: str,
                      max_doc_bytes: int, rows: _Rows) -> None:
    """Parse one JSONL line into ``rows`` (good or quarantined)."""
    fallback_id = derived_id(source, line)
    if size > max_doc_bytes:
        rows.bad(fallback_id, source, line, "oversized", f"{size} bytes > io.max_doc_bytes={max_doc_bytes}", raw, size)
        return
    try:
        decoded = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        rows.bad(fallback_id, source, line, "invalid_utf8", str(e), raw, size)
        return
    try:
        obj = json.loads(decoded)
    except json.JSONDecodeError as e:
        rows.bad(fallback_id, source, line, "bad_json", str(e), raw, size)
        return
    if not isinstance(obj, dict):
        rows.bad(fallback_id, source, line, "not_an_object", f"a JSON {type(obj).__name__}, not an object", raw, size)
        return
    if text_field not in obj:
        rows.bad(fallback_id, source, line, "missing_text", f"no '{text_field}' field", raw, size)
        return
    text = obj.pop(text_field)
    if not isinstance(text, str):
        rows.bad(fallback_id, source, line, "text_not_string", f"'{text_field}' is a {type(text).__name__}", raw, size)
        return
    id_ = obj.pop(id_field, None)
    if id_ is None:
        id_ = fallback_id
    elif isinstance(id_, bool) or not isinstance(id_, (str, int)):
        rows.bad(fallback_id, source, line, "bad_id", f"'{id_field}' is a {type(id_).__name__}", raw, size)
        return
    meta = json.dumps(obj, sort_keys=True, ensure_ascii=False) if obj else None
    rows.good(str(id_), text, source, line, meta, size)


class CorpusDatasource(FileBasedDatasource):
    """JSONL (plain/.gz/.zst), Parquet and text files -> RAW_SCHEMA rows, streamed and never raising."""

    _FILE_EXTENSIONS = ALL_EXT

    def __init__(self, paths, *, text_field: str = "text", id_field: str = "id", max_doc_bytes: int = 16 << 20,
                 block_rows: int = 2048, quarantine_raw_bytes: int = 1 << 20, **kwargs):
        super().__init__(paths, file_extensions=ALL_EXT, **kwargs)
        self.text_field = text_field
        self.id_field = id_field
        self.max_doc_bytes = max_doc_bytes
        self.block_rows = block_rows
        self.quarantine_raw_bytes = quarantine_raw_bytes

    def _open_input_source(self, filesystem, path: str, **open_args):
        if file_format(path) == "parquet":  # Parquet needs random access
            return filesystem.open_input_file(path)
        return super()._open_input_source(filesystem, path, **open_args)

    def _read_stream(self, f, path: str) -> Iterator[pa.Table]:
        fmt = file_format(path)
        source = path
        rows = _Rows(self.quarantine_raw_bytes)
        if fmt == "jsonl":
            for line_no, raw, size in iter_lines(f, self.max_doc_bytes):
                if raw.endswith(b"\r"):
                    raw = raw[:-1]
                    size -= 1
                if not raw.strip():
                    continue  # blank lines are not records
                parse_json_record(raw, size, source, line_no, text_field=self.text_field, id_field=self.id_field,
                                  max_doc_bytes=self.max_doc_bytes, rows=rows)
                if len(rows) >= self.block_rows:
                    yield rows.flush()
        elif fmt == "text":
            data = f.read(self.max_doc_bytes + 1)
            size = len(data)
            while size > self.max_doc_bytes:  # count the rest without holding it
                more = f.read(1 << 22)
                if not more:
                    break
                size += len(more)
            fid = derived_id(source, 1)
            if size > self.max_doc_bytes:
                rows.bad(fid, source, 1, "oversized", f"{size} bytes > io.max_doc_bytes={self.max_doc_bytes}", data, size)
            else:
                try:
                    rows.good(fid, data.decode("utf-8"), source, 1, None, size)
                except UnicodeDecodeError as e:
                    rows.bad(fid, source, 1, "invalid_utf8", str(e), data, size)
        else:
            yield from self._read_parquet(f, source, rows)
        if len(rows):
            yield rows.flush()

    def _read_parquet(self, f, source: str, rows: _Rows) -> Iterator[pa.Table]:
        try:
            pf = pq.ParquetFile(f)
        except Exception as e:  # a corrupt Parquet file is one quarantined record
            rows.bad(derived_id(source, 0), source, 0, "bad_parquet", str(e), b"", 0)
            return
        names = pf.schema_arrow.names
        if self.text_field not in names:
            rows.bad(derived_id(source, 0), source, 0, "missing_text", f"no '{self.text_field}' column", b"", 0)
            return
        line = 0
        for batch in pf.iter_batches(batch_size=self.block_rows):
            for rec in batch.to_pylist():
                line += 1
                raw_json = json.dumps(rec, default=str, ensure_ascii=False).encode("utf-8")
                text = rec.pop(self.text_field, None)
                fid = derived_id(source, line)
                if not isinstance(text, str):
                    rows.bad(fid, source, line, "text_not_string", f"'{self.text_field}' is {type(text).__name__}",
                             raw_json, len(raw_json))
                    continue
                size = len(text.encode("utf-8"))
                if size > self.max_doc_bytes:
                    rows.bad(fid, source, line, "oversized", f"{size} bytes > io.max_doc_bytes={self.max_doc_bytes}",
                             raw_json, size)
                    continue
                id_ = rec.pop(self.id_field, None)
                meta = json.dumps(rec, sort_keys=True, default=str, ensure_ascii=False) if rec else None
                rows.good(fid if id_ is None else str(id_), text, source, line, meta, size)
                if len(rows) >= self.block_rows:
                    yield rows.flush()


def expand_inputs(inputs: list[str]) -> list[str]:
    """Paths, directories and globs -> a sorted list of input files (error when nothing matches)."""
    import glob

    files: list[str] = []
    for item in inputs:
        if "://" in item:  # remote URIs are handed to Ray Data as they are
            files.append(item)
            continue
        matches = sorted(glob.glob(item, recursive=True)) if any(c in item for c in "*?[") else [item]
        if not matches:
            raise FileNotFoundError(f"--input {item}: no file matches")
        for m in matches:
            if os.path.isdir(m):
                for root, _, names in os.walk(m):
                    files.extend(os.path.join(root, n) for n in names if n.lower().endswith(INPUT_SUFFIXES))
            elif os.path.exists(m):
                file_format(m)
                files.append(os.path.abspath(m))
            else:
                raise FileNotFoundError(f"--input {item}: no such file or directory")
    files = sorted(set(os.path.abspath(f) if "://" not in f else f for f in files))
    if not files:
        raise FileNotFoundError(f"--input {inputs}: no input files found")
    return files


def parquet_files(root: str, parts: list[int] | None = None) -> list[str]:
    """The Parquet files under ``root`` (of partitions ``p=<i>`` only, when ``parts`` is given), sorted; hidden
    temporary files of unfinished writers are left out."""
    dirs = [root] if parts is None else [os.path.join(root, f"p={p}") for p in parts]
    return sorted(os.path.join(r, f) for d in dirs for r, _, names in os.walk(d) for f in names
                  if f.endswith(".parquet") and not f.startswith("."))


def fsync_path(path: str) -> None:
    """Flush a file, or a directory's entries (names created, renamed or removed in it), to disk. Opened
    read-only: on Linux fsync flushes the inode's dirty pages whoever wrote them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_table(table: pa.Table, path: str) -> None:
    """Write one Parquet file atomically (temp name, fsync, then rename): a crash leaves the complete file or
    none, never a truncated one under the final name. The rename is made durable, with the directory, by the
    unit that owns the file (``app.refine.resume.RefineRun.sync``)."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), f".{os.path.basename(path)}.tmp-{os.getpid()}")  # hidden until complete
    pq.write_table(table, tmp, compression="zstd")
    fsync_path(tmp)
    os.replace(tmp, path)
