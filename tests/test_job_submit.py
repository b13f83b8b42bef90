"""``ray job submit -- python jobs/refine.py`` on ``make cluster-up``'s cluster (cluster/local.py: a head without
CPUs and 2 worker nodes on 127.0.0.1, token auth on), with the model steps on and off.

A job's driver starts inside the job's unpacked package; Ray unpacks it again (rmtree, then the same path) when
the job's runtime env is first created on the driver's node, which left the driver in a deleted directory: its
first ``import torch`` then exited with "Intel oneMKL FATAL ERROR: Cannot load libtorch_cpu.so" (MKL calls
``getcwd()`` when libtorch_cpu loads). The first job below is the one that died: toxicity on (the offline
backend, which imports torch on the driver while choosing), perplexity off. Each cluster gets a new package,
so the first job of this module meets the re-unpack."""

import json
import os
import subprocess
import sys
import time

import pytest

from cluster.local import free_ports
from tests.conftest import write_jsonl
from tests.tiny_models import tiny_llama

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.dirname(sys.executable)


def _env():
    env = dict(os.environ)
    env["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    env.pop("RAY_ADDRESS", None)
    env["PATH"] = BIN + os.pathsep + env["PATH"]
    return env


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    state = str(tmp_path_factory.mktemp("cluster") / "state")
    port, dash = free_ports(2)
    local = [sys.executable, os.path.join(REPO, "cluster", "local.py")]
    up = subprocess.run([*local, "up", "--state", state, "--workers", "2", "--head-cpus", "0", "--port", str(port),
                         "--dashboard-port", str(dash)], capture_output=True, text=True, timeout=400, env=_env())
    try:
        assert up.returncode == 0, up.stdout[-2000:] + up.stderr[-3000:]
        env = _env()
        env.update(line[len("export "):].split("=", 1) for line in up.stdout.splitlines() if line.startswith("export "))
        yield env
    finally:
        down = subprocess.run([*local, "down", "--state", state], capture_output=True, text=True, timeout=180)
        assert down.returncode == 0, down.stderr[-2000:]


def submit(env, args, timeout=600):
    """``ray job submit --working-dir REPO -- python jobs/refine.py ARGS``: (returncode, stdout + stderr)."""
    cmd = [os.path.join(BIN, "ray"), "job", "submit", "--working-dir", REPO, "--", "python", "jobs/refine.py", *args]
    for _ in range(30):  # the job agent comes up a little after the nodes
        job = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        if "No available agent" not in job.stderr:
            return job.returncode, job.stdout + job.stderr
        time.sleep(2)
    raise AssertionError("the job agent never came up: " + job.stderr[-2000:])


@pytest.fixture(scope="module")
def small_corpus(tmp_path_factory, real_texts):
    root = tmp_path_factory.mktemp("jobs")
    docs = [{"id": f"d{i:03d}", "text": t} for i, t in enumerate(real_texts[:40])]
    docs.append({"id": "copy", "text": real_texts[0]})  # one exact duplicate
    write_jsonl(str(root / "in" / "a.jsonl"), docs[::2])
    write_jsonl(str(root / "in" / "b.jsonl"), docs[1::2])
    return {"root": root, "input": str(root / "in"), "n": len(docs)}


def _report(out):
    with open(os.path.join(out, "report.json")) as f:
        return json.load(f)


def test_refine_job_with_model_steps_on(cluster, small_corpus, tmp_path):
    base = ["--input", small_corpus["input"], "--set", "io.max_doc_bytes=67108864"]

    # toxicity on (auto: the offline model here), perplexity off: the run that died at start
    out = str(small_corpus["root"] / "out-toxicity")
    rc, log = submit(cluster, [*base, "--output", out, "--set", "perplexity.enabled=false"])
    assert rc == 0 and "oneMKL" not in log, log[-4000:]
    report = _report(out)
    assert report["accounting"]["ok"] and report["counts"]["input"] == small_corpus["n"]
    assert report["toxicity"]["available"] and report["toxicity"]["backend"] == "profanity_check"
    assert not report["perplexity"]["available"]

    # both model steps on (perplexity under a tiny Llama built here)
    model = tiny_llama(str(tmp_path / "lm"))
    out = str(small_corpus["root"] / "out-models")
    rc, log = submit(cluster, [*base, "--output", out, "--set", f"perplexity.model={model}",
                               "--set", "perplexity.max_tokens=64"])
    assert rc == 0, log[-4000:]
    report = _report(out)
    assert report["accounting"]["ok"] and report["perplexity"]["available"] and report["toxicity"]["available"]

