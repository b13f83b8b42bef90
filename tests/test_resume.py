"""The bookkeeping of resumable refine runs (app.refine.resume), without Ray: plans, fingerprints, units."""

import json
import os

import pytest

from app.config import RefineConfig, load_config
from app.refine import resume


def _files(tmp_path, sizes):
    out = []
    for i, n in enumerate(sizes):
        p = tmp_path / "in" / f"s{i}.jsonl"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"x" * n)
        out.append(str(p))
    return out


def test_plan_groups_keeps_order_and_never_splits_a_file(tmp_path):
    files = _files(tmp_path, [40, 70, 10, 10, 100, 5])
    groups = resume.plan_groups(files, 100)
    assert [f for g in groups for f in g] == files
    assert [len(g) for g in groups] == [2, 3, 1]  # a group closes once it holds >= 100 bytes
    assert resume.plan_groups(files, 10**9) == [files]
    assert resume.plan_groups(["s3://b/x.jsonl", "s3://b/y.jsonl"], resume.UNKNOWN_SIZE) == [["s3://b/x.jsonl"], ["s3://b/y.jsonl"]]


def test_default_unit_grows_with_the_cluster_and_caps_the_unit_count(tmp_path, monkeypatch):
    import ray

    files = _files(tmp_path, [10, 10])
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 64.0})
    assert resume.default_checkpoint_bytes(files) == 64 * resume.CHECKPOINT_PER_CPU
    monkeypatch.setattr(ray, "cluster_resources", lambda: {})  # a head without CPUs, workers still to come
    assert resume.default_checkpoint_bytes(files) == resume.MIN_CHECKPOINT
    many = [f"s3://b/{i}.jsonl" for i in range(4096)]  # 1 TiB of unknown-size remote files
    assert resume.default_checkpoint_bytes(many) == 4096 * resume.UNKNOWN_SIZE // resume.MAX_UNITS
    assert len(resume.plan_groups(many, resume.default_checkpoint_bytes(many))) == resume.MAX_UNITS


def test_split_parts_covers_every_partition_once():
    for k, n in ((3, 4), (7, 3), (1, 5), (10, 10)):
        parts = resume.split_parts(k, n)
        assert sorted(p for g in parts for p in g) == list(range(k)) and len(parts) == min(k, n)
        assert all(g for g in parts)


def test_differences_name_settings_and_inputs_but_not_execution_knobs(tmp_path):
    files = _files(tmp_path, [10, 20])
    cfg = load_config(RefineConfig, None, [])
    fp = resume.fingerprint(files, cfg)
    assert resume.differences(fp, json.loads(json.dumps(fp))) == []
    same_work = load_config(RefineConfig, None, ["io.batch_size=7", "io.checkpoint_bytes=5", "toxicity.concurrency=3"])
    assert resume.differences(fp, resume.fingerprint(files, same_work)) == []
    other = load_config(RefineConfig, None, ["dedup.near.threshold=0.7", "heuristics.enabled=false"])
    assert resume.differences(fp, resume.fingerprint(files, other)) == [
        "dedup.near.threshold: 0.8 -> 0.7", "heuristics.enabled: True -> False"]
    with open(files[1], "ab") as f:
        f.write(b"more")
    diff = resume.differences(fp, resume.fingerprint(files + _files(tmp_path / "b", [1]), cfg))
    assert diff == [f"input files added: 1 ({tmp_path / 'b' / 'in' / 's0.jsonl'})", f"input files changed: 1 ({files[1]})"]
    assert resume.differences(fp, resume.fingerprint(files, cfg, toxicity_ok=True))[0] == "toxicity available: False -> True"


def test_lost_node_errors_are_told_from_errors_of_the_data_or_code():
    import ray.exceptions as rx

    lost = rx.ObjectLostError("ab" * 14, "owner", "call site")
    assert resume.lost_to_the_cluster(lost)
    try:  # wrapped, as Ray Data re-raises it
        try:
            raise lost
        except rx.ObjectLostError as e:
            raise RuntimeError("execution failed") from e
    except RuntimeError as e:
        assert resume.lost_to_the_cluster(e)
    assert resume.lost_to_the_cluster(rx.RayTaskError("f", "tb", rx.NodeDiedError("node gone")))
    assert not resume.lost_to_the_cluster(ValueError("bad record"))
    assert resume.lost_to_the_cluster(rx.ActorDiedError())  # died: its node, or a kill
    assert not resume.lost_to_the_cluster(rx.ActorDiedError(rx.RayTaskError("Scorer.__init__", "tb", OSError("no model"))))
    assert not resume.lost_to_the_cluster(rx.RayTaskError("f", "tb", KeyError("text")))


def _run(tmp_path, files, **kw):
    cfg = load_config(RefineConfig, None, kw.pop("sets", []))
    return resume.open_run(str(tmp_path / "out"), files, cfg, overwrite=kw.pop("overwrite", False), checkpoint_bytes=15)


def test_units_run_once_are_retried_on_a_lost_node_and_skipped_on_resume(tmp_path, monkeypatch):
    import ray.exceptions as rx

    files = _files(tmp_path, [10, 10, 10])
    run = _run(tmp_path, files)
    assert not run.resumed and run.state["groups"] == [files[:2], files[2:]]
    work = os.path.join(run.work, "docs")
    calls = []

    def body():
        calls.append(1)
        os.makedirs(work, exist_ok=True)
        with open(os.path.join(work, f"g00000-{len(calls)}.parquet"), "w") as f:
            f.write("partial")
        if len(calls) == 1:
            raise rx.NodeDiedError("a worker node died")
        return {"n": len(calls)}

    assert run.unit("ingest-g00000", body, dirs=[work], prefix="g00000-") == {"n": 2}
    assert sorted(os.listdir(work)) == ["g00000-2.parquet"]  # the first attempt's file was cleared
    with pytest.raises(ValueError):
        run.unit("ingest-g00001", lambda: (_ for _ in ()).throw(ValueError("bad")), dirs=[work], prefix="g00001-")
    assert run.ran == ["ingest-g00000"]

    again = _run(tmp_path, files, sets=["io.batch_size=3"])  # resumes: same inputs and settings
    assert again.resumed and again.state["groups"] == run.state["groups"]
    assert again.unit("ingest-g00000", lambda: pytest.fail("a finished unit ran again"), dirs=[work]) == {"n": 2}
    assert again.unit("ingest-g00001", lambda: {"n": 9}, dirs=[work], prefix="g00001-") == {"n": 9}
    assert again.summary() == {"resumed": True, "units_skipped": ["ingest-g00000"], "units_run": ["ingest-g00001"]}

    with pytest.raises(FileExistsError, match=r"dedup.exact.enabled: True -> False.*--overwrite"):
        _run(tmp_path, files, sets=["dedup.exact.enabled=false"])
    again.finish("complete", {})
    with pytest.raises(FileExistsError, match="finished refine run"):
        _run(tmp_path, files)
    fresh = _run(tmp_path, files, overwrite=True)
    assert not fresh.resumed and not os.path.exists(work)


def test_output_without_state_is_refused(tmp_path):
    files = _files(tmp_path, [10])
    (tmp_path / "out" / "kept").mkdir(parents=True)
    with pytest.raises(FileExistsError, match="no\n?.*_work/state.json"):
        _run(tmp_path, files)


def _record_fsyncs(monkeypatch, marker: list) -> list:
    """os.fsync -> a list of (path, whether the file ``marker[0]`` existed then), the path read from /proc/self/fd."""
    calls = []
    real = os.fsync

    def fsync(fd):
        calls.append((os.readlink(f"/proc/self/fd/{fd}"), os.path.exists(marker[0])))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    return calls


def test_a_units_files_and_directories_are_on_disk_before_its_marker(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from app.refine.io import write_table

    run = _run(tmp_path, _files(tmp_path, [10]))
    out, work = os.path.join(str(tmp_path), "out"), run.work
    docs, quarantine = os.path.join(work, "docs"), os.path.join(out, "quarantine")
    other = os.path.join(docs, "p=0", "g00001-000000.parquet")  # another unit's file: not this unit's to sync
    os.makedirs(os.path.dirname(other))
    pq.write_table(pa.table({"id": ["o"]}), other)
    mine = [os.path.join(docs, "p=0", "g00000-000000.parquet"), os.path.join(docs, "p=1", "g00000-000000.parquet"),
            os.path.join(quarantine, "g00000-000000.parquet")]
    marker = os.path.join(work, "done", "ingest-g00000.json")
    watch = [marker]
    calls = _record_fsyncs(monkeypatch, watch)

    def body():
        for p in mine:
            write_table(pa.table({"id": ["a"]}), p)
        return {"n": 1}

    run.unit("ingest-g00000", body, dirs=[docs, quarantine], prefix="g00000-")
    before = {p for p, marked in calls if not marked}
    # the writers flush each file under its temporary name, before the rename
    assert sum(os.path.basename(p).startswith(".g00000-") for p in before) == len(mine)
    # then the driver: every file of the unit, every directory holding one and its parents up to the output
    holders = {os.path.join(docs, "p=0"), os.path.join(docs, "p=1"), docs, work, quarantine, out}
    assert set(mine) | holders <= before
    assert other not in {p for p, _ in calls}
    # the marker: its temporary file flushed before the rename, done/ after it (the last call)
    assert marker + ".tmp" in before and calls[-1] == (os.path.dirname(marker), True)

    calls.clear()  # a unit without a prefix (pass 4): every file in its directories
    kept = os.path.join(out, "kept")
    watch[0] = os.path.join(work, "done", "output.json")
    run.unit("output", lambda: write_table(pa.table({"id": ["a"]}), os.path.join(kept, "part-000000.parquet")) or {},
             dirs=[kept])
    assert {os.path.join(kept, "part-000000.parquet"), kept, out} <= {p for p, marked in calls if not marked}


def test_remote_inputs_are_fingerprinted_by_size_and_mtime(tmp_path):
    local = _files(tmp_path, [10, 20])
    uris = ["file://" + f for f in local]  # pyarrow's filesystems, as for s3:// (Ray Data reads file:// too)
    run = _run(tmp_path, uris)
    st = os.stat(local[0])
    assert run.state["fingerprint"]["inputs"][0] == [uris[0], 10, st.st_mtime_ns, None]
    assert _run(tmp_path, uris).resumed

    with open(local[1], "ab") as f:  # rewritten: another size
        f.write(b"more")
    with pytest.raises(FileExistsError, match=f"input files changed: 1 \\({uris[1]}\\)"):
        _run(tmp_path, uris)
    _run(tmp_path, uris, overwrite=True)
    os.utime(local[0], ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # rewritten: the same size, later
    with pytest.raises(FileExistsError, match=f"input files changed: 1 \\({uris[0]}\\)"):
        _run(tmp_path, uris)

    folder = "file://" + os.path.dirname(local[0])  # a directory: each file Ray Data would read under it
    assert [e[0] for e in resume.input_entries([folder])] == uris
    _run(tmp_path, [folder], overwrite=True)
    _files(tmp_path / "in" / "_hidden", [5])  # skipped by Ray Data's reader, so by the fingerprint too
    (tmp_path / "in" / "new.jsonl").write_bytes(b"{}")
    with pytest.raises(FileExistsError, match=f"input files added: 1 \\({folder}/new.jsonl\\)"):
        _run(tmp_path, [folder])

    gone = "file://" + str(tmp_path / "in" / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match=f"input {gone}: no such file"):
        resume.fingerprint([gone], load_config(RefineConfig, None, []))


def test_an_s3_etag_tells_a_rewrite_of_the_same_size_and_second(monkeypatch):
    import pyarrow.fs as pafs

    class Store:  # what pyarrow's S3FileSystem answers: FileInfo without an ETag, the ETag in the file's metadata
        type_name = "s3"
        etag = b'"a1"'

        def get_file_info(self, path):
            if path.endswith("broken.jsonl"):
                raise OSError("AWS Error ACCESS_DENIED during HeadObject operation")
            return pafs.FileInfo(path, pafs.FileType.File, mtime_ns=1_700_000_000_000_000_000, size=10)

        def open_input_file(self, path):
            store = self

            class File:
                def __enter__(self):
                    return self

                def __exit__(self, *exc):
                    return False

                def metadata(self):
                    return {"Content-Length": b"10", "ETag": store.etag}

            return File()

    store = Store()
    monkeypatch.setattr(resume, "_filesystem", lambda uri: (store, uri[len("s3://"):]))
    cfg = load_config(RefineConfig, None, [])
    fp = resume.fingerprint(["s3://b/x.jsonl"], cfg)
    assert fp["inputs"] == [["s3://b/x.jsonl", 10, 1_700_000_000_000_000_000, '"a1"']]
    store.etag = b'"b2"'
    changed = ["input files changed: 1 (s3://b/x.jsonl)"]
    assert resume.differences(fp, resume.fingerprint(["s3://b/x.jsonl"], cfg)) == changed
    old = {**fp, "inputs": [["s3://b/x.jsonl", None, None]]}  # a state.json from before sizes were read
    assert resume.differences(old, fp) == changed
    with pytest.raises(OSError, match="input s3://b/broken.jsonl: cannot read its size.*ACCESS_DENIED"):
        resume.fingerprint(["s3://b/x.jsonl", "s3://b/broken.jsonl"], cfg)
