"""The data-quality dashboard: aggregation, page numbers == report.json, size bound, server, browser."""

import json
import os
import random
import re
import shutil
import subprocess
import threading
import urllib.error
import urllib.request

import pytest

from app.cli import main as cli_main
from app.dashboard.render import SIGNALS, aggregate, fmt, page_data, render_page, worst_shards
from app.dashboard.server import make_server
from app.refine.profile import PPL_LOG10_EDGES, TOX_EDGES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_report(n_shards: int, seed: int = 0, out: str = "/data/run") -> dict:
    rnd = random.Random(seed)
    shards, reasons = [], {}
    for s in range(n_shards):
        docs = rnd.randint(50, 5000)
        q = rnd.randint(0, docs // 50)
        dropped = rnd.randint(0, docs - q)
        ex, nd = rnd.randint(0, dropped // 2), rnd.randint(0, dropped // 3)
        heur = dropped - ex - nd
        scored = docs - q - dropped
        tox_over = rnd.randint(0, scored // 20)
        dr = {k: v for k, v in (("exact_duplicate", ex), ("near_duplicate", nd), ("gopher_min_words", heur)) if v}
        for k, v in dr.items():
            reasons[k] = reasons.get(k, 0) + v
        p50 = rnd.uniform(5, 80)
        shards.append({
            "source": f"s3://bucket/crawl/shard-{s:05d}.jsonl.zst", "docs": docs, "kept": docs - q - dropped,
            "dropped": dropped, "quarantined": q, "exact_dup_ratio": ex / docs, "near_dup_ratio": nd / docs,
            "drop_reasons": dr, "quarantine_reasons": {"bad_json": q} if q else {}, "scored": scored,
            "perplexity_p10": p50 / 2, "perplexity_p50": p50, "perplexity_p90": p50 * 3,
            "toxicity_p10": 0.01, "toxicity_p50": 0.05, "toxicity_p90": 0.3, "toxicity_mean": rnd.uniform(0, 0.3),
            "toxicity_scored": scored, "toxicity_over": tox_over, "heuristic_dropped": heur,
            "kept_share": (docs - q - dropped) / docs, "toxicity_over_share": tox_over / scored if scored else None,
            "heuristic_drop_share": heur / docs})
    counts = {k: sum(r[k2] for r in shards) for k, k2 in
              (("input", "docs"), ("kept", "kept"), ("dropped", "dropped"), ("quarantined", "quarantined"))}
    hist = lambda edges: [rnd.randint(0, 50) for _ in range(len(edges) - 1)]  # noqa: E731
    return {
        "output": out, "counts": counts, "drop_reasons": dict(sorted(reasons.items(), key=lambda kv: -kv[1])),
        "shards": shards, "accounting": {"ok": True, "message": "input == kept + dropped + quarantined"},
        "histograms": {"perplexity": {"log10_edges": PPL_LOG10_EDGES.tolist(), "kept": hist(PPL_LOG10_EDGES),
                                      "dropped": hist(PPL_LOG10_EDGES)},
                       "toxicity": {"edges": TOX_EDGES.tolist(), "kept": hist(TOX_EDGES), "dropped": hist(TOX_EDGES)}},
        "thresholds": {"max_perplexity": 1000.0, "max_nll_percentile": None, "max_toxicity": 0.8},
        "samples": {"gopher_min_words": [{"id": "a1", "source": shards[0]["source"], "text": "<b>short</b> & odd",
                                          "drop_reason": "gopher_min_words"}],
                    "near_duplicate": [{"id": "d1", "source": shards[0]["source"], "text": "copy of a document",
                                        "similarity": 0.91, "matched": {"id": "r1", "source": shards[0]["source"],
                                                                        "text": "original document", "drop_reason": None}}]},
        "perplexity": {"available": True, "reason": "ok"}, "toxicity": {"available": True, "reason": "ok"},
        "config": {"report": {"heatmap_rows": 100}},
    }


def test_page_numbers_equal_report_json():
    report = fake_report(37, seed=1)
    page = render_page([report])
    heat = page_data(page, "heatmap-0")[0]
    by_source = sorted(report["shards"], key=lambda r: r["source"])
    assert heat["x"] == [t for _, t, _ in SIGNALS]
    assert heat["y"] == [r["source"].rsplit("/", 1)[1] for r in by_source]
    assert heat["text"] == [[fmt(r[k], kind) for k, _, kind in SIGNALS] for r in by_source]
    for col in zip(*heat["z"]):  # colour scaled per column
        assert min(col) == 0.0 and max(col) == 1.0
    for name in ("perplexity", "toxicity"):
        kept, dropped = page_data(page, f"hist-{name}-0")[:2]
        assert kept["y"] == report["histograms"][name]["kept"] and dropped["y"] == report["histograms"][name]["dropped"]
    bars = page_data(page, "reasons-0")[0]
    assert dict(zip(bars["y"], bars["x"])) == report["drop_reasons"]
    c = report["counts"]
    assert f'input <b>{c["input"]:,}</b>' in page and f'kept <b>{c["kept"]:,}</b>' in page
    for r in worst_shards(report):
        assert r["source"] in page
    assert "&lt;b&gt;short&lt;/b&gt; &amp; odd" in page and "<b>short</b>" not in page  # sample text is escaped
    assert "original document" in page  # a duplicate is shown with the document it matched
    # sorting menu: every option is a permutation of the same rows
    menu = re.search(r'"updatemenus":\[\{"buttons":(\[.*?\]),"direction"', page)
    assert menu and len(json.loads(menu.group(1))) == len(SIGNALS) + 1


def test_ten_thousand_shards_aggregate_into_groups_and_the_page_stays_small():
    report = fake_report(10_000, seed=2)
    rows = aggregate(report["shards"], 100)
    assert len(rows) == 100 and sum(r["members"] for r in rows) == 10_000
    assert sum(r["docs"] for r in rows) == report["counts"]["input"]
    kept = sum(r["kept_share"] * r["docs"] for r in rows)
    assert kept == pytest.approx(report["counts"]["kept"], rel=1e-9)
    heur = sum(r["heuristic_drop_share"] * r["docs"] for r in rows)
    assert heur == pytest.approx(sum(s["heuristic_dropped"] for s in report["shards"]), rel=1e-9)
    page = render_page([report])
    assert len(page_data(page, "heatmap-0")[0]["y"]) == 100
    assert len(page.encode()) < 6_000_000, len(page.encode())  # README: under 6 MB for any number of shards
    assert "10,000 shards in 100 groups" in page


def test_side_by_side_runs_each_have_their_own_charts():
    page = render_page([fake_report(5, 3), fake_report(7, 4)], ["before", "after"])
    assert len(page_data(page, "heatmap-0")[0]["y"]) == 5 and len(page_data(page, "heatmap-1")[0]["y"]) == 7
    assert page.count("<script>") >= 1 and "cdn" not in page.split("<script>")[0].lower()
    assert 'src="http' not in page and "src='http" not in page  # offline: nothing fetched


def _write_run(d, report):
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "report.json"), "w") as f:
        json.dump(report, f)


def _get(url):
    with urllib.request.urlopen(url, timeout=30) as r:
        return r.status, r.headers.get("Content-Type"), r.read()


def test_server_serves_the_page_and_report_json(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    _write_run(a, fake_report(4, 5, out=a))
    _write_run(b, fake_report(6, 6, out=b))
    server = make_server([a, b], 0)
    assert server.server_address[0] == "127.0.0.1"
    base = f"http://127.0.0.1:{server.server_address[1]}"
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    try:
        code, ctype, body = _get(base + "/")
        page = body.decode()
        assert code == 200 and ctype.startswith("text/html")
        assert len(page_data(page, "heatmap-0")[0]["y"]) == 4 and len(page_data(page, "heatmap-1")[0]["y"]) == 6
        code, ctype, body = _get(base + "/api/runs")
        assert [r["dir"] for r in json.loads(body)] == [a, b]
        with open(os.path.join(b, "report.json"), "rb") as f:
            assert _get(base + "/api/runs/1/report.json")[2] == f.read()
        assert json.loads(_get(base + "/report.json")[2])["output"] == a
        with pytest.raises(urllib.error.HTTPError) as e:
            _get(base + "/api/runs/2/report.json")
        assert e.value.code == 404
        # a re-run shows without restarting the server
        _write_run(a, fake_report(9, 7, out=a))
        os.utime(os.path.join(a, "report.json"), ns=(1, 10**18))
        assert len(page_data(_get(base + "/")[2].decode(), "heatmap-0")[0]["y"]) == 9
    finally:
        server.shutdown()
        server.server_close()


def test_cli_dashboard_without_report_fails_with_one_line(tmp_path, capsys):
    assert cli_main(["dashboard", str(tmp_path)]) == 2
    assert "no report.json" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------- the browser

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def make_run_output(ray_local, tmp_path_factory):
    """``make run``'s output (the same Makefile target, into a temporary OUT), joined to the session's Ray and
    scoring the first 64 tokens of each document instead of 256 (the page is what is tested, not the scores)."""
    out = tmp_path_factory.mktemp("makerun")
    env = dict(os.environ, RAY_ADDRESS=ray_local.get_runtime_context().gcs_address)
    proc = subprocess.run(["make", "-s", "run", f"OUT={out}", "REFINE_ARGS=--set perplexity.max_tokens=64"], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    return str(out / "refine")


@pytest.mark.slow
def test_browser_draws_the_dashboard_of_make_run(make_run_output):
    if CHROMIUM is None:
        pytest.skip("Debian's chromium is not installed (make setup installs it with apt-get; here it could not)")
    from playwright.sync_api import sync_playwright

    with open(os.path.join(make_run_output, "report.json")) as f:
        report = json.load(f)
    with open(os.path.join(make_run_output, "report.html")) as f:
        written = f.read()
    heat = page_data(written, "heatmap-0")[0]  # the page written by the run carries report.json's numbers
    assert heat["text"] == [[fmt(r[k], kind) for k, _, kind in SIGNALS]
                            for r in sorted(report["shards"], key=lambda r: r["source"])]
    assert sum(page_data(written, "hist-perplexity-0")[0]["y"]) == sum(report["histograms"]["perplexity"]["kept"]) > 0
    # Toxicity on the default config: Detoxify where its checkpoint loads, else the offline model; never an empty column.
    tox = report["toxicity"]
    assert tox["available"] and tox["backend"] in ("detoxify", "profanity_check"), tox
    assert report["thresholds"]["max_toxicity"] == report["config"]["decide"]["max_toxicity"][tox["backend"]]
    hist = report["histograms"]["toxicity"]
    assert sum(page_data(written, "hist-toxicity-0")[0]["y"]) == sum(hist["kept"]) > 0
    assert sum(hist["kept"]) + sum(hist["dropped"]) == sum(r["toxicity_scored"] for r in report["shards"])
    assert all(r["toxicity_mean"] is not None for r in report["shards"] if r["toxicity_scored"])
    assert f"toxicity: available ({tox['backend']}" in written

    server = make_server([make_run_output], 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    artifacts = os.path.join(ROOT, "test-artifacts")
    os.makedirs(artifacts, exist_ok=True)
    errors = []
    try:
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.goto(f"http://127.0.0.1:{server.server_address[1]}/")
            page.wait_for_selector("#heatmap-0 .heatmaplayer image", state="attached", timeout=30_000)
            for div in ("heatmap-0", "hist-perplexity-0", "hist-toxicity-0", "reasons-0"):
                box = page.locator(f"#{div} .main-svg").first.bounding_box()
                assert box and box["width"] > 100 and box["height"] > 100, (div, box)
            img = page.locator("#heatmap-0 .heatmaplayer image").first.bounding_box()
            assert img and img["width"] > 0 and img["height"] > 0
            assert page.locator("#hist-perplexity-0 .barlayer .point").count() > 0  # bars drawn
            assert page.locator("#hist-toxicity-0 .barlayer .point").count() > 0  # bars drawn
            assert tox["backend"] in page.locator("#hist-toxicity-0 .gtitle").first.text_content()
            drag = page.locator("#heatmap-0 .nsewdrag").first.bounding_box()
            page.mouse.move(drag["x"] + drag["width"] * 0.05, drag["y"] + drag["height"] * 0.05)
            hover = page.locator("#heatmap-0 .hoverlayer .hovertext")
            hover.first.wait_for(timeout=10_000)
            assert re.search(r"\d", hover.first.text_content()), hover.first.text_content()
            page.mouse.move(0, 0)
            # the menu sorts the rows: by kept %, highest first
            page.locator("#heatmap-0 .updatemenu-header-group").click()
            page.locator("#heatmap-0 .updatemenu-dropdown-button", has_text="sort: kept %").dispatch_event("click")
            rows = aggregate(report["shards"], 100)
            expected = [r["label"] for r in sorted(rows, key=lambda r: (r["kept_share"] is None, -(r["kept_share"] or 0)))]
            assert page.evaluate("document.getElementById('heatmap-0').data[0].y") == expected
            page.locator("#heatmap-0 .updatemenu-header-group").click()
            page.locator("#heatmap-0 .updatemenu-dropdown-button", has_text="sort: source order").dispatch_event("click")
            page.screenshot(path=os.path.join(artifacts, "dashboard.png"), full_page=True)
            browser.close()
    finally:
        server.shutdown()
        server.server_close()
    assert not errors, errors


def test_profile_histograms_count_every_scored_document_once_and_samples_are_bounded():
    import pyarrow as pa

    from app.refine.profile import merge_profiles, profile_block

    def block(lo, n):
        return pa.table({
            "id": [f"d{i}" for i in range(lo, lo + n)], "source": [f"s{i % 3}" for i in range(lo, lo + n)],
            "text": ["x" * 1500 if i % 2 else "short" for i in range(lo, lo + n)],
            "drop_reason": [None if i % 4 == 0 else ("toxic" if i % 4 == 1 else "gopher_min_words") for i in range(lo, lo + n)],
            "perplexity": [None if i % 5 == 0 else 10.0 ** (i % 7) for i in range(lo, lo + n)],
            "toxicity": [None if i % 6 == 0 else (i % 10) / 10 for i in range(lo, lo + n)]})
    blocks = [block(0, 37), block(37, 50), block(87, 13)]
    parts = [profile_block(b, max_toxicity=0.75, lookup_ids=frozenset({"d3", "d90"}), k=2) for b in blocks]
    prof = merge_profiles(parts, 2)
    rows = [r for b in blocks for r in b.to_pylist()]
    for name in ("perplexity", "toxicity"):
        for side, is_dropped in (("kept", False), ("dropped", True)):
            want = sum(1 for r in rows if r[name] is not None and (r["drop_reason"] is not None) == is_dropped)
            assert sum(prof["hist"][name][side]) == want
    for src in ("s0", "s1", "s2"):
        mine = [r for r in rows if r["source"] == src and r["toxicity"] is not None]
        assert prof["sources"][src] == {"toxicity_scored": len(mine), "toxicity_over": sum(r["toxicity"] > 0.75 for r in mine)}
    assert {r: len(v) for r, v in prof["samples"].items()} == {"toxic": 2, "gopher_min_words": 2}
    assert set(prof["lookup"]) == {"d3", "d90"}
    assert all(len(d["text"]) <= 1002 for v in prof["samples"].values() for d in v)
