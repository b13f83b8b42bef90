"""End-to-end refine runs on a corpus with planted duplicates and every kind of bad input."""

import json
import os
import time

import pyarrow.parquet as pq
import pytest

from app.config import RefineConfig, load_config
from cluster.local import free_ports
from tests.corpus import build, predicted_pairs, true_pairs


NO_MODELS = ["perplexity.enabled=false", "toxicity.enabled=false"]


def read_dir(path, columns=None):
    if not os.path.isdir(path):
        return []
    return pq.read_table(path, columns=columns).to_pylist()


def canonical(out):
    """Everything a run produces, order-free, for run-to-run comparison."""
    drop = lambda rows: sorted((r["id"], r.get("drop_reason"), tuple(r.get("drop_reasons") or ()), r.get("duplicate_of"),  # noqa: E731
                                r.get("near_similarity"), r.get("representative_id"), r.get("cluster_id")) for r in rows)
    rep = json.load(open(os.path.join(out, "report.json")))
    return {
        "kept": drop(read_dir(os.path.join(out, "kept"))),
        "dropped": drop(read_dir(os.path.join(out, "dropped"))),
        "duplicates": sorted(tuple(r.values()) for r in read_dir(os.path.join(out, "duplicates"))),
        "quarantine": sorted((r["source"], r["line"], r["error"], r["raw"]) for r in read_dir(os.path.join(out, "quarantine"))),
        "counts": rep["counts"], "drop_reasons": rep["drop_reasons"],
        "shards": [{k: v for k, v in s.items()} for s in rep["shards"]],
    }


@pytest.fixture(scope="module")
def corpus(tmp_path_factory, real_texts):
    root = tmp_path_factory.mktemp("corpus")
    facts = build(str(root / "in"), real_texts)
    facts["root"] = str(root)
    facts["input"] = str(root / "in")
    return facts


def _cfg(corpus, *extra):
    return load_config(RefineConfig, None, [f"io.max_doc_bytes={corpus['max_doc_bytes']}", "dedup.num_partitions=3",
                                            *NO_MODELS, *extra])


@pytest.fixture(scope="module")
def run1(ray_local, corpus):
    from app.refine.pipeline import run_refine

    out = os.path.join(corpus["root"], "out1")
    report = run_refine([corpus["input"]], out, _cfg(corpus))
    return out, report


def test_accounting_under_every_kind_of_bad_input(corpus, run1):
    out, report = run1
    c = report["counts"]
    n_good = len(corpus["docs"])
    assert c["input"] == n_good + corpus["n_bad"]
    assert c["quarantined"] == corpus["n_bad"]
    assert c["input"] == c["kept"] + c["dropped"] + c["quarantined"]
    assert report["accounting"]["ok"]
    for s in report["shards"]:
        assert s["docs"] == s["kept"] + s["dropped"] + s["quarantined"]
    # nothing lost, nothing doubled: every good document is in kept or dropped exactly once
    ids = [r["id"] for r in read_dir(os.path.join(out, "kept")) + read_dir(os.path.join(out, "dropped"))]
    assert sorted(ids) == sorted(corpus["docs"])
    q = read_dir(os.path.join(out, "quarantine"))
    assert sorted(r["error"] for r in q) == sorted(
        ["bad_json", "invalid_utf8", "missing_text", "text_not_string", "not_an_object", "text_not_string", "oversized", "invalid_utf8"])
    assert all(r["source"] and r["line"] >= 1 and r["error_detail"] and r["raw_bytes"] > 0 for r in q)
    assert {r["raw"] for r in q if r["error"] == "invalid_utf8"} >= {b'{"text": "caf\xe9 au lait"}'}
    # the original text is written, not the normalized one
    kept_or_dropped = {r["id"]: r for r in read_dir(os.path.join(out, "dropped")) + read_dir(os.path.join(out, "kept"))}
    assert kept_or_dropped["aa-exact-copy"]["text"] == corpus["docs"]["aa-exact-copy"]
    # every drop has a reason; the first one is the reported reason; the report sums them
    dropped = read_dir(os.path.join(out, "dropped"))
    assert all(r["drop_reason"] == r["drop_reasons"][0] for r in dropped)
    assert sum(report["drop_reasons"].values()) == c["dropped"]
    assert [s["name"] for s in report["steps"]][:2] == ["parse", "normalize"]
    assert report["versions"]["ray"] and report["config"]["dedup"]["near"]["threshold"] == 0.8
    assert os.path.exists(os.path.join(out, "report.html")) and os.path.exists(os.path.join(out, "config.yaml"))
    assert not os.path.exists(os.path.join(out, "_work"))


def test_report_samples_and_dashboard_fields_are_real_rows(run1):
    from app.refine.profile import SAMPLE_CHARS
    from app.refine.report import HEURISTIC_REASONS

    out, report = run1
    rows = {r["id"]: r for r in read_dir(os.path.join(out, "dropped")) + read_dir(os.path.join(out, "kept"))}
    cut = lambda t: t if len(t) <= SAMPLE_CHARS else t[:SAMPLE_CHARS] + " …"  # noqa: E731
    assert report["samples"], "no samples"
    for reason, docs in report["samples"].items():
        assert 1 <= len(docs) <= report["config"]["report"]["samples"]
        for d in docs:
            assert rows[d["id"]]["drop_reason"] == reason and d["text"] == cut(rows[d["id"]]["text"])
            if reason in ("exact_duplicate", "near_duplicate"):
                m = d["matched"]
                assert m["id"] == rows[d["id"]]["duplicate_of"] and m["text"] == cut(rows[m["id"]]["text"])
    assert {"exact_duplicate", "near_duplicate"} <= set(report["samples"])
    for s in report["shards"]:
        heur = sum(1 for r in rows.values() if r["source"] == s["source"] and r.get("drop_reason") in HEURISTIC_REASONS)
        assert s["heuristic_dropped"] == heur
        assert s["kept_share"] == (s["kept"] / s["docs"] if s["docs"] else None)


def test_exact_dedup_keeps_the_smallest_id(corpus, run1):
    out, _ = run1
    dropped = {r["id"]: r for r in read_dir(os.path.join(out, "dropped"))}
    for group in corpus["exact_groups"]:
        rep = min(group)
        assert "exact_duplicate" not in (dropped.get(rep, {}).get("drop_reasons") or [])
        for other in group:
            if other != rep:
                assert dropped[other]["drop_reason"] == "exact_duplicate"
                assert dropped[other]["duplicate_of"] == rep
    dups = [r for r in read_dir(os.path.join(out, "duplicates")) if r["kind"] == "exact"]
    for group in corpus["exact_groups"]:
        rows = [r for r in dups if r["id"] in group]
        assert sorted(r["id"] for r in rows) == sorted(group)  # the representative has its row too
        assert {(r["representative_id"], r["cluster_id"], r["similarity"]) for r in rows} == {(min(group), f"exact:{min(group)}", 1.0)}


def test_near_duplicates_precision_and_recall_against_brute_force(corpus, run1):
    out, _ = run1
    truth = true_pairs(corpus["docs"], 0.8)
    pred = predicted_pairs(read_dir(os.path.join(out, "duplicates")))
    tp = len(truth & pred)
    precision = tp / len(pred)
    recall = tp / len(truth)
    assert len(truth) >= 15
    assert precision == 1.0, sorted(pred - truth)[:5]
    assert recall >= 0.95, sorted(truth - pred)[:5]


def test_transitive_chain_is_one_cluster_with_the_smallest_representative(corpus, run1):
    from app.refine.minhash import jaccard, shingles

    d = corpus["docs"]
    sh = {k: shingles(d[k]) for k in ("chain-1", "chain-2", "chain-3")}
    assert jaccard(sh["chain-1"], sh["chain-2"]) >= 0.8 and jaccard(sh["chain-2"], sh["chain-3"]) >= 0.8
    assert jaccard(sh["chain-1"], sh["chain-3"]) < 0.8  # the ends are only linked through the middle
    out, _ = run1
    rows = {r["id"]: r for r in read_dir(os.path.join(out, "duplicates")) if r["kind"] == "near" and r["id"].startswith("chain")}
    assert {r["representative_id"] for r in rows.values()} == {"chain-1"}
    assert rows["chain-3"]["similarity"] == pytest.approx(jaccard(sh["chain-1"], sh["chain-3"]))
    dropped = {r["id"]: r for r in read_dir(os.path.join(out, "dropped"))}
    assert dropped["chain-3"]["drop_reasons"][0] == "near_duplicate"
    assert "near_duplicate" not in (dropped.get("chain-1", {}).get("drop_reasons") or [])


def test_every_duplicate_names_the_kept_document_of_its_family(corpus, run1):
    """Issue 31, section 2: on the real-text corpus, every duplicates/ row and every document dropped as a duplicate
    names its family's kept document as representative_id, one cluster_id per family (``assert_families_closed``);
    the exact copy of a near duplicate is matched against that near duplicate and represented by the kept one."""
    from tests.test_families import assert_families_closed

    out, _ = run1
    rows = {r["id"]: r for r in read_dir(os.path.join(out, "kept")) + read_dir(os.path.join(out, "dropped"))}
    copy, near, kept = corpus["copy_of_near"]
    assert (rows[copy]["drop_reason"], rows[copy]["duplicate_of"], rows[copy].get("representative_id")) == (
        "exact_duplicate", near, kept)
    assert (rows[near]["drop_reason"], rows[near]["duplicate_of"], rows[near].get("representative_id")) == (
        "near_duplicate", kept, kept)
    assert rows == assert_families_closed(out)
    assert rows[copy]["cluster_id"] == rows[near]["cluster_id"] == rows[kept]["cluster_id"] == f"near:{kept}"
    assert not {"exact_duplicate", "near_duplicate"} & set(rows[kept].get("drop_reasons") or ())  # heuristics may drop it


@pytest.mark.parametrize("exact,near", [(True, True), (False, True), (True, False), (False, False)])
def test_copies_and_near_copies_are_dropped_whatever_the_exact_setting(ray_local, real_texts, tmp_path, exact, near):
    """a = T, b = T, c = T with one word changed, d unrelated: b goes whenever some dedup is on (as an exact
    duplicate, or a near one of Jaccard 1 when exact dedup is off), c whenever near dedup is on."""
    from app.refine.minhash import jaccard, shingles
    from app.refine.pipeline import run_refine
    from tests.conftest import write_jsonl

    text = next(t for t in real_texts if len(t.split()) >= 200)
    words = text.split()
    changed = " ".join(words[:100] + ["zebra"] + words[101:])
    assert jaccard(shingles(text), shingles(changed)) >= 0.9
    docs = {"a": text, "b": text, "c": changed, "d": next(t for t in real_texts if t[:50] != text[:50])}
    write_jsonl(str(tmp_path / "in" / "s.jsonl"), [{"id": k, "text": v} for k, v in docs.items()])
    cfg = load_config(RefineConfig, None, [*NO_MODELS, "heuristics.enabled=false", "dedup.num_partitions=2",
                                           f"dedup.exact.enabled={str(exact).lower()}",
                                           f"dedup.near.enabled={str(near).lower()}"])
    report = run_refine([str(tmp_path / "in")], str(tmp_path / "out"), cfg)
    dropped = {r["id"]: (r["drop_reason"], r["duplicate_of"]) for r in read_dir(str(tmp_path / "out" / "dropped"))}
    want = {}
    if exact:
        want["b"] = ("exact_duplicate", "a")
    elif near:
        want["b"] = ("near_duplicate", "a")
    if near:
        want["c"] = ("near_duplicate", "a")
    assert dropped == want
    assert report["counts"]["kept"] == 4 - len(want) and report["accounting"]["ok"]


def test_identical_input_gives_identical_output(corpus, run1):
    """A second run, with another number of graph partitions, writes the same rows and the same report."""
    from app.refine.pipeline import run_refine

    out2 = os.path.join(corpus["root"], "out2")
    run_refine([corpus["input"]], out2, _cfg(corpus, "dedup.num_partitions=5"))
    assert canonical(out2) == canonical(run1[0])


def test_existing_output_is_refused_without_overwrite(corpus, run1):
    from app.refine.pipeline import run_refine

    with pytest.raises(FileExistsError, match="finished refine run.*--overwrite"):
        run_refine([corpus["input"]], run1[0], _cfg(corpus))


def test_interrupted_run_resumes_to_the_output_of_an_uninterrupted_one(corpus, run1, ray_local, tmp_path):
    """``jobs/refine.py`` killed (SIGKILL) once its first unit of work is done; a re-run with other settings is
    refused (naming them), the same run resumes: finished units skipped, the rest done, the output of ``run1``."""
    import subprocess
    import sys

    from app.refine.pipeline import run_refine

    out = str(tmp_path / "out")
    done = os.path.join(out, "_work", "done")
    sets = [f"io.max_doc_bytes={corpus['max_doc_bytes']}", "dedup.num_partitions=3", *NO_MODELS,
            "io.checkpoint_bytes=1"]  # one unit per input file: 4 pass-1 units
    cmd = [sys.executable, os.path.join(REPO, "jobs", "refine.py"), "--input", corpus["input"], "--output", out]
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address, RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0")
    job = subprocess.Popen([*cmd, *(a for kv in sets for a in ("--set", kv))], env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not os.path.exists(os.path.join(done, "ingest-g00000.json")):
        assert job.poll() is None, job.stderr.read()[-3000:]
        assert time.time() < deadline
        time.sleep(0.05)
    job.kill()
    job.wait()
    before = sorted(f[:-len(".json")] for f in os.listdir(done))
    assert "ingest-g00000" in before and "output" not in before, before
    assert not os.path.exists(os.path.join(out, "report.json"))

    with pytest.raises(FileExistsError, match=r"dedup.near.threshold: 0.8 -> 0.7.*--overwrite"):
        run_refine([corpus["input"]], out, load_config(RefineConfig, None, [*sets, "dedup.near.threshold=0.7"]))
    # a setting that changes only how the work runs may differ
    report = run_refine([corpus["input"]], out, load_config(RefineConfig, None, [*sets, "io.batch_size=64"]))
    resume = report["resume"]
    assert resume["resumed"] and resume["units_skipped"] == before
    assert set(resume["units_run"]) | set(before) >= {"ingest-g00000", "ingest-g00003", "graph", "output"}
    assert not set(resume["units_run"]) & set(before)
    assert canonical(out) == canonical(run1[0])
    assert report["counts"] == run1[1]["counts"] and report["accounting"]["ok"]
    assert not [f for _, _, names in os.walk(out) for f in names if ".tmp-" in f]  # no writer's leftovers


REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

def _env():
    env = dict(os.environ)
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env.pop("RAY_ADDRESS", None)
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """``make cluster-up``'s cluster (cluster/local.py: a head without CPUs and 2 worker nodes on 127.0.0.1, token
    auth on); the client environment ``env`` prints. Each one is new, so its first job meets a new package."""
    import subprocess
    import sys

    bin_dir = os.path.dirname(sys.executable)
    state = str(tmp_path_factory.mktemp("cluster") / "state")
    port, dash = free_ports(2)
    local = [sys.executable, os.path.join(REPO, "cluster", "local.py")]
    up = subprocess.run([*local, "up", "--state", state, "--workers", "2", "--head-cpus", "0", "--port", str(port),
                         "--dashboard-port", str(dash)], capture_output=True, text=True, timeout=400, env=_env())
    try:
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-3000:]
        env = _env()
        env.update(line[len("export "):].split("=", 1) for line in up.stdout.splitlines() if line.startswith("export "))
        env["PATH"] = bin_dir + os.pathsep + env["PATH"]
        assert env["RAY_AUTH_MODE"] == "token" and env["RAY_ADDRESS"] == f"http://127.0.0.1:{dash}"
        yield {"env": env, "local": local, "state": state, "dash": dash, "ray": os.path.join(bin_dir, "ray")}
    finally:
        down = subprocess.run([*local, "down", "--state", state], capture_output=True, text=True, timeout=180)
        assert down.returncode == 0 and not os.path.exists(os.path.join(state, "cluster.json")), down.stderr[-2000:]


def _submit_cmd(cluster, args):
    return [cluster["ray"], "job", "submit", "--working-dir", REPO, "--", "python", "jobs/refine.py", *args]


def submit(cluster, args, timeout=600):
    """``ray job submit --working-dir REPO -- python jobs/refine.py ARGS`` to the end: (returncode, its output)."""
    import subprocess

    for _ in range(30):  # the job agent comes up a little after the nodes
        job = subprocess.run(_submit_cmd(cluster, args), capture_output=True, text=True, timeout=timeout,
                             env=cluster["env"])
        if "No available agent" not in job.stderr:
            return job.returncode, job.stdout + job.stderr
        time.sleep(2)
    raise AssertionError("the job agent never came up: " + job.stderr[-2000:])


def test_refine_job_on_a_cluster_with_the_model_steps_on(cluster, corpus, tmp_path):
    """``ray job submit -- python jobs/refine.py`` with toxicity on (auto: the offline model here) and perplexity off,
    then with both on (perplexity under a tiny Llama built here).

    A job's driver starts inside the job's unpacked package; Ray unpacks it again (rmtree, then the same path) when
    the job's runtime env is first created on the driver's node, which left the driver in a deleted directory. Its
    first ``import torch`` (the toxicity backend's choice) then exited with "Intel oneMKL FATAL ERROR: Cannot load
    libtorch_cpu.so" (MKL calls ``getcwd()`` when libtorch_cpu loads). This is the cluster's first job, so it
    meets the re-unpack."""
    import json

    from tests.tiny_models import tiny_llama

    base = ["--input", corpus["input"], "--set", f"io.max_doc_bytes={corpus['max_doc_bytes']}",
            "--set", "dedup.num_partitions=3"]
    out = os.path.join(corpus["root"], "out-job-toxicity")
    rc, log = submit(cluster, [*base, "--output", out, "--set", "perplexity.enabled=false"])
    assert rc == 0 and "oneMKL" not in log, log[-4000:]
    assert "re-entered the job's working directory" in log  # it met the re-unpack (it is the cluster's first job)
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["accounting"]["ok"] and report["counts"]["input"] == len(corpus["docs"]) + corpus["n_bad"]
    assert report["toxicity"]["available"] and report["toxicity"]["backend"] == "profanity_check"
    assert not report["perplexity"]["available"]

    model = tiny_llama(str(tmp_path / "lm"))
    out = os.path.join(corpus["root"], "out-job-models")
    rc, log = submit(cluster, [*base, "--output", out, "--set", f"perplexity.model={model}",
                               "--set", "perplexity.max_tokens=64"])
    assert rc == 0, log[-4000:]
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["accounting"]["ok"] and report["perplexity"]["available"] and report["toxicity"]["available"]


def test_local_cluster_with_token_auth_survives_a_lost_worker_node(cluster, corpus, run1):
    """On the same cluster, ``ray job submit -- python jobs/refine.py`` with the model steps off; once the first of
    its 4 pass-1 units is done, ``cluster/local.py kill-worker`` kills one worker node (every process, SIGKILL)
    while the other works on. The job still succeeds, with the output of one undisturbed node (``run1``) and its
    accounting; a client without the token is refused. (It kills a node: it runs last.)"""
    import json
    import subprocess

    env, local, state, ray_cli = cluster["env"], cluster["local"], cluster["state"], cluster["ray"]
    out = os.path.join(corpus["root"], "out-job")
    anon = subprocess.run([ray_cli, "job", "list", f"--address=http://127.0.0.1:{cluster['dash']}"],
                          capture_output=True, text=True, timeout=120, env={**_env(), "PATH": env["PATH"]})
    assert anon.returncode != 0 and "token" in anon.stdout + anon.stderr

    def alive():
        nodes = subprocess.run([ray_cli, "list", "nodes", "--format=json", "--filter", "state=ALIVE"],
                               capture_output=True, text=True, timeout=120, env=env)
        return [n["node_ip"] for n in json.loads(nodes.stdout)]

    ips = alive()
    assert len(ips) == 3 and all(ip == "127.0.0.1" for ip in ips), ips
    cmd = _submit_cmd(cluster, ["--input", corpus["input"], "--output", out,
                                "--set", f"io.max_doc_bytes={corpus['max_doc_bytes']}", "--set", "dedup.num_partitions=3",
                                "--set", NO_MODELS[0], "--set", NO_MODELS[1], "--set", "io.checkpoint_bytes=1"])
    first_unit = os.path.join(out, "_work", "done", "ingest-g00000.json")
    for _ in range(30):  # the job agent comes up a little after the nodes
        job = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.time() + 300
        while not os.path.exists(first_unit) and job.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        if os.path.exists(first_unit) or job.poll() is None:
            break
        stdout, stderr = job.communicate()
        assert "No available agent" in stderr, stdout[-3000:] + stderr[-3000:]
        time.sleep(2)
    assert os.path.exists(first_unit), "the job made no progress"
    kill = subprocess.run([*local, "kill-worker", "--state", state], capture_output=True, text=True, timeout=120)
    assert kill.returncode == 0, kill.stderr[-2000:]
    assert not os.path.exists(os.path.join(out, "report.json"))  # the node died mid-run
    stdout, stderr = job.communicate(timeout=600)
    assert job.returncode == 0, stdout[-3000:] + stderr[-3000:]
    assert "succeeded" in (stdout + stderr).lower()
    assert f"report: {out}/report.html" in stdout
    assert len(alive()) == 2
    assert canonical(out) == canonical(run1[0])
    report = json.load(open(os.path.join(out, "report.json")))
    assert report["accounting"]["ok"] and report["counts"] == run1[1]["counts"]
    assert not report["resume"]["resumed"]  # the one run carried on: no restart from markers
