"""``distillery dashboard OUTDIR [OUTDIR ...]``: the page and report.json over HTTP on 127.0.0.1.

    GET /                            the dashboard; with several output directories, side by side
    GET /api/runs                    [{"index", "dir", "report"}] for each output directory
    GET /api/runs/<index>/report.json   that run's report.json, as written
    GET /report.json                 the first run's report.json

Reports are read from disk on each request (the page is re-rendered when a report.json changes), so a
re-run of a refine job shows without restarting the server. Standard library only (http.server): the
server is a viewer for one person on one machine, not a web service; it binds to loopback only.
"""

from __future__ import annotations

import json
import os
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from app.dashboard.render import render_page

HOST = "127.0.0.1"


class NoReport(FileNotFoundError):
    pass


def report_path(out_dir: str) -> str:
    path = os.path.join(out_dir, "report.json")
    if not os.path.isfile(path):
        raise NoReport(f"{out_dir}: no report.json (not the output directory of a refine run)")
    return path


def titles_for(dirs: list[str]) -> list[str]:
    names = [os.path.basename(os.path.abspath(d).rstrip("/")) for d in dirs]
    return names if len(set(names)) == len(names) else [os.path.abspath(d) for d in dirs]


class Dashboard:
    """The output directories and a cache of the page keyed by their report.json modification times."""

    def __init__(self, dirs: list[str]):
        self.dirs = [os.path.abspath(d) for d in dirs]
        for d in self.dirs:
            report_path(d)
        self._lock = threading.Lock()
        self._key = None
        self._page = b""

    def page(self) -> bytes:
        paths = [report_path(d) for d in self.dirs]
        key = tuple(os.stat(p).st_mtime_ns for p in paths)
        with self._lock:
            if key != self._key:
                reports = []
                for p in paths:
                    with open(p) as f:
                        reports.append(json.load(f))
                self._page = render_page(reports, titles_for(self.dirs)).encode()
                self._key = key
            return self._page


def handler_for(dash: Dashboard):
    class Handler(BaseHTTPRequestHandler):
        def _send(self, code: int, body: bytes, ctype: str) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _json_file(self, index: int) -> None:
            if not 0 <= index < len(dash.dirs):
                return self._send(404, b'{"error": "no such run"}', "application/json")
            with open(report_path(dash.dirs[index]), "rb") as f:
                self._send(200, f.read(), "application/json")

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            path = self.path.split("?", 1)[0]
            try:
                if path in ("/", "/index.html"):
                    return self._send(200, dash.page(), "text/html; charset=utf-8")
                if path == "/api/runs":
                    runs = [{"index": i, "dir": d, "report": f"/api/runs/{i}/report.json"} for i, d in enumerate(dash.dirs)]
                    return self._send(200, json.dumps(runs).encode(), "application/json")
                if path == "/report.json":
                    return self._json_file(0)
                m = re.fullmatch(r"/api/runs/(\d+)/report\.json", path)
                if m:
                    return self._json_file(int(m.group(1)))
                self._send(404, b"not found", "text/plain")
            except NoReport as e:
                self._send(404, str(e).encode(), "text/plain")

        do_HEAD = do_GET

        def log_message(self, fmt: str, *args) -> None:  # quiet: one line per request is noise for a viewer
            pass

    return Handler


def make_server(dirs: list[str], port: int = 8765) -> ThreadingHTTPServer:
    """A server on 127.0.0.1:port (0: any free port); ``server.server_address`` says which."""
    return ThreadingHTTPServer((HOST, port), handler_for(Dashboard(dirs)))
