import gzip
import io
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard

from app.refine.io import _Rows, derived_id, expand_inputs, iter_lines, parse_json_record


def test_iter_lines_bounds_memory_on_oversized_lines():
    data = b"short\n" + b"x" * 5000 + b"\n\nlast-no-newline"
    out = list(iter_lines(io.BytesIO(data), max_bytes=100, chunk=64))
    assert [(n, len(b), size) for n, b, size in out] == [(1, 5, 5), (2, 101, 5000), (3, 0, 0), (4, 15, 15)]


@pytest.mark.parametrize("raw,error", [
    (b'{"text": "abc"', "bad_json"),
    (b'{"text": "caf\xe9"}', "invalid_utf8"),
    (b'{"body": "x"}', "missing_text"),
    (b'{"text": 3}', "text_not_string"),
    (b'{"text": null}', "text_not_string"),
    (b'["text"]', "not_an_object"),
    (b'{"text": "ok", "id": [1]}', "bad_id"),
    (b'{"text": "' + b"y" * 200 + b'"}', "oversized"),
])
def test_bad_records_are_quarantined_with_raw_bytes(raw, error):
    rows = _Rows(quarantine_raw_bytes=1 << 20)
    parse_json_record(raw, len(raw), "s.jsonl", 7, text_field="text", id_field="id", max_doc_bytes=100, rows=rows)
    t = rows.flush().to_pylist()[0]
    assert t["error"] == error and t["text"] is None
    assert t["raw"] == raw and t["line"] == 7 and t["source"] == "s.jsonl" and t["raw_bytes"] == len(raw)
    assert t["id"] == derived_id("s.jsonl", 7)


def test_good_record_keeps_id_and_metadata():
    rows = _Rows(1 << 20)
    raw = json.dumps({"text": "héllo", "id": 42, "url": "u", "lang": "en"}).encode()
    parse_json_record(raw, len(raw), "s", 3, text_field="text", id_field="id", max_doc_bytes=1000, rows=rows)
    t = rows.flush().to_pylist()[0]
    assert (t["id"], t["text"], t["error"]) == ("42", "héllo", None)
    assert json.loads(t["meta"]) == {"lang": "en", "url": "u"}


def test_reader_streams_every_format(ray_local, tmp_path):
    import ray

    from app.refine.io import CorpusDatasource

    lines = b"".join(json.dumps({"text": f"doc {i}"}).encode() + b"\n" for i in range(5))
    (tmp_path / "a.jsonl").write_bytes(lines + b"\n\n{bad\n")
    with gzip.open(tmp_path / "b.jsonl.gz", "wb") as f:
        f.write(lines)
    (tmp_path / "c.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    pq.write_table(pa.table({"text": ["p1", None, "p3"], "id": ["x1", "x2", "x3"]}), tmp_path / "d.parquet")
    (tmp_path / "e.txt").write_text("a whole text file\nwith two lines")
    (tmp_path / "f.txt").write_bytes(b"\xff\xfe not utf8")
    files = expand_inputs([str(tmp_path)])
    assert len(files) == 6
    rows = ray.data.read_datasource(CorpusDatasource(files, block_rows=2)).take_all()
    by_src = {}
    for r in rows:
        by_src.setdefault(r["source"].rsplit("/", 1)[1], []).append(r)
    assert [r["text"] for r in by_src["b.jsonl.gz"]] == [f"doc {i}" for i in range(5)]
    assert [r["text"] for r in by_src["c.jsonl.zst"]] == [f"doc {i}" for i in range(5)]
    assert [r["error"] for r in by_src["a.jsonl"]] == [None] * 5 + ["bad_json"]
    assert by_src["a.jsonl"][-1]["line"] == 8  # blank lines are skipped but counted in line numbers
    assert [(r["id"], r["error"]) for r in by_src["d.parquet"]] == [("x1", None), (derived_id(by_src["d.parquet"][1]["source"], 2), "text_not_string"), ("x3", None)]
    assert by_src["e.txt"][0]["text"] == "a whole text file\nwith two lines"
    assert by_src["f.txt"][0]["error"] == "invalid_utf8" and by_src["f.txt"][0]["raw"] == b"\xff\xfe not utf8"


def test_expand_inputs_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        expand_inputs([str(tmp_path / "nope.jsonl")])
    with pytest.raises(FileNotFoundError):
        expand_inputs([str(tmp_path / "*.jsonl")])
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unsupported"):
        expand_inputs([str(tmp_path / "x.csv")])
