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
