"""Shared fixtures: a session-scoped local Ray bound to loopback, tiny corpora written per test."""

import json
import os
import time

# Ray must bind to loopback only: set before Ray is imported anywhere.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub here: fail fast instead of retrying

import pytest  # noqa: E402

# `slow` tests (real SmolLM2, make run, bigger corpora) run last, and only while the suite is under this many
# seconds: CI has a 20-minute budget for the whole suite. DISTILLERY_SLOW_BUDGET_S=inf runs them all.
SLOW_BUDGET_S = float(os.environ.get("DISTILLERY_SLOW_BUDGET_S", "840"))
_STARTED = time.monotonic()


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)  # stable: the order is kept otherwise


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    ran = time.monotonic() - _STARTED
    if item.get_closest_marker("slow") and ran > SLOW_BUDGET_S:
        pytest.skip(f"slow test left out: the suite has run {ran / 60:.1f} min, past its {SLOW_BUDGET_S / 60:.0f}-minute "
                    "budget for slow tests (DISTILLERY_SLOW_BUDGET_S=inf runs them)")


@pytest.fixture(scope="session")
def ray_local():
    import ray

    if not ray.is_initialized():
        # the dashboard (127.0.0.1) serves the State API that Ray Train v2 needs to clean up after stopped trials
        ray.init(address="local", num_cpus=2, _node_ip_address="127.0.0.1", include_dashboard=True, dashboard_host="127.0.0.1",
                 log_to_driver=False)
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    yield ray
    ray.shutdown()


def write_jsonl(path, records):
    """Write records (dicts, or raw bytes lines) as JSONL."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "wb") as f:
        for r in records:
            f.write((r if isinstance(r, bytes) else json.dumps(r).encode()) + b"\n")
    return path


@pytest.fixture(scope="session")
def real_texts():
    """Real prose from this machine: licence files and package descriptions (deduplicated, >= 60 words)."""
    from app.refine.minhash import words
    from app.refine.sample import collect_texts

    seen, out = set(), []
    for _origin, text in collect_texts():
        key = " ".join(words(text))
        if key in seen or len(key.split()) < 60:
            continue
        seen.add(key)
        out.append(text)
    assert len(out) >= 60, "need real text on the machine"
    return out
