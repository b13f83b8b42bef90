"""Shared fixtures: a session-scoped local Ray bound to loopback, tiny corpora written per test."""

import json
import os

# Ray must bind to loopback only: set before Ray is imported anywhere.
os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # no model hub here: fail fast instead of retrying
# Ray Train v2's controller polls its workers every 2 s by default: a finished run waits up to that long to be
# seen, at every start and end of every fit and Tune trial (~2-4 s each, over 20 fits). The suite polls faster.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")

import pytest  # noqa: E402

from tests.listeners import ListenerWatch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    """`slow` tests (real SmolLM2, make run, bigger corpora) run last; every test runs (`-m "not slow"` leaves them
    out of a quick local loop)."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is not None)  # stable: the order is kept otherwise


@pytest.fixture(scope="session")
def listener_watch():
    """Looks, four times a second all session long, for a process of the session listening beyond loopback."""
    watch = ListenerWatch().start()
    yield watch
    watch.stop()


@pytest.fixture(autouse=True)
def _nothing_listens_beyond_loopback(listener_watch):
    """Every test: no process of the session (Ray's, the jobs' it started) listened outside 127.0.0.0/8 or ::1
    while it ran (Ray Train's process group, Serve's proxy, the dashboard, ...)."""
    seen = listener_watch.take()  # since the last test: this test's module fixtures, or an earlier teardown
    yield
    seen += listener_watch.take()
    if seen:
        pytest.fail("processes of this session listened beyond loopback: " + "; ".join(
            f"{s['address']}:{s['port']} pid {s['pid']} ({s['process']})" for s in seen), pytrace=False)


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
