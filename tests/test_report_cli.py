import json

import pytest

from app.cli import main
from app.config import RefineConfig, load_config
from app.dashboard.render import page_data, render_page
from app.refine.report import build_report


NO_MODELS = load_config(RefineConfig, None, ["perplexity.enabled=false", "toxicity.enabled=false"])


def _report(ingest, output):
    return build_report(files=["a.jsonl"], cfg=RefineConfig(), ingest=ingest, output=output, steps={}, graph={},
                        phases={}, lsh={"bands": 16, "rows": 8}, out_dir="/x")


def test_accounting_holds_and_fails_per_shard():
    ok = _report({"a.jsonl": {"records": 10, "quarantined": 2, "quarantine_reasons": {"bad_json": 2}}},
                 {"a.jsonl": {"docs": 8, "kept": 5, "dropped": 3, "exact_duplicates": 1, "near_duplicates": 1,
                              "drop_reasons": {"exact_duplicate": 1, "near_duplicate": 1, "gopher_min_words": 1}}})
    assert ok["accounting"]["ok"] and ok["counts"] == {"input": 10, "kept": 5, "dropped": 3, "quarantined": 2}
    assert ok["shards"][0]["exact_dup_ratio"] == pytest.approx(0.1)
    assert page_data(render_page([ok]), "heatmap-0")[0]["y"] == ["a.jsonl"] and json.dumps(ok)
    lost = _report({"a.jsonl": {"records": 10, "quarantined": 2, "quarantine_reasons": {}}},
                   {"a.jsonl": {"docs": 7, "kept": 5, "dropped": 2, "drop_reasons": {"x": 2}}})
    assert not lost["accounting"]["ok"] and "a.jsonl: input 10" in lost["accounting"]["message"]


def test_cli_rejects_bad_config_before_starting_ray(tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    rc = main(["refine", "--input", str(tmp_path / "a.jsonl"), "--output", str(tmp_path / "out"),
               "--set", "dedup.near.thresold=0.5"])
    assert rc == 2
    assert "dedup.near.thresold: unknown key" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_run_refuses_missing_input(ray_local, tmp_path):
    from app.refine.pipeline import run_refine

    with pytest.raises(FileNotFoundError, match="no such file"):
        run_refine([str(tmp_path / "missing.jsonl")], str(tmp_path / "out"), RefineConfig())


def test_accounting_failure_is_an_error(ray_local, tmp_path, monkeypatch):
    """When the counts do not add up the run raises (and the job exits 3), after writing the report."""
    from app.refine import pipeline, report
    from app.refine.pipeline import AccountingError, run_refine

    (tmp_path / "a.jsonl").write_text("".join(json.dumps({"text": f"document number {i} " * 10}) + "\n" for i in range(5)))
    real = report.build_report

    def lossy(**kw):
        kw["output"] = {k: {**v, "kept": v["kept"] - 1} for k, v in kw["output"].items()}
        return real(**kw)

    monkeypatch.setattr(pipeline, "build_report", lossy)
    with pytest.raises(AccountingError, match="input 5"):
        run_refine([str(tmp_path / "a.jsonl")], str(tmp_path / "out"), NO_MODELS)
    assert not json.loads((tmp_path / "out" / "report.json").read_text())["accounting"]["ok"]


def test_cli_toxicity_required_exits_before_reading(ray_local, tmp_path, capsys):
    (tmp_path / "a.jsonl").write_text('{"text": "x"}\n')
    rc = main(["refine", "--input", str(tmp_path / "a.jsonl"), "--output", str(tmp_path / "out"),
               "--set", "perplexity.enabled=false", "--set", "toxicity.required=true",
               "--set", f"toxicity.checkpoint={tmp_path / 'missing.ckpt'}"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no Detoxify checkpoint at" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()
