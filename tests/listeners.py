"""Which processes of this test session listen on a TCP port beyond loopback.

The session's processes are this pytest process and everything it started: the Ray head it starts (gcs, raylet,
dashboard, every worker and actor: Ray Train's workers, Serve's proxy and replicas, Ray Data's tasks), and the
subprocesses the tests run (``jobs/*.py``, ``make run``, the local cluster's holder).

``outside_listeners`` reads the kernel's socket tables (``/proc/net/tcp``, ``/proc/net/tcp6``, as ``ss -ltn``
does) and maps a listening socket to its process through ``/proc/PID/fd`` only when its address is not
loopback, so a look costs a few milliseconds. ``ListenerWatch`` looks every ``interval`` seconds on a thread and
keeps what it saw; the conftest fails any test during which it saw one.
"""

from __future__ import annotations

import ipaddress
import os
import threading
import time

_LISTEN = "0A"


def _addr(hex_addr: str) -> str:
    """/proc/net/tcp's address (little-endian 32-bit words) -> text."""
    raw = bytes.fromhex(hex_addr)
    raw = b"".join(raw[i:i + 4][::-1] for i in range(0, len(raw), 4))
    ip = ipaddress.ip_address(raw)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
        ip = ip.ipv4_mapped
    return str(ip)


def is_loopback(address: str) -> bool:
    return ipaddress.ip_address(address).is_loopback


def listening(path_root: str = "/proc/net") -> list[tuple[str, int, str]]:
    """(address, port, socket inode) of every listening TCP socket of this network namespace."""
    out = []
    for name in ("tcp", "tcp6"):
        try:
            with open(os.path.join(path_root, name)) as f:
                lines = f.readlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            parts = line.split()
            if len(parts) > 9 and parts[3] == _LISTEN:
                host, port = parts[1].split(":")
                out.append((_addr(host), int(port, 16), parts[9]))
    return out


def descendants(root: int) -> list[int]:
    """``root`` and every process below it (from /proc/*/stat's parent ids)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, ()))
    return out


def _owner(inode: str, pids: list[int]) -> int | None:
    target = f"socket:[{inode}]"
    for pid in pids:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    if os.readlink(f"/proc/{pid}/fd/{fd}") == target:
                        return pid
                except OSError:
                    continue
        except OSError:
            continue
    return None


def _name(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()[:120]
    except OSError:
        return "?"


def outside_listeners(root: int | None = None, foreign: set | None = None) -> list[dict]:
    """Listening sockets beyond 127.0.0.0/8 and ::1 held by ``root`` (default: this process) or a descendant.
    ``foreign``: socket inodes already found to be another process's (skipped; the ones found now are added). A
    socket is in its process's descriptor table before it listens, so an inode found foreign stays foreign."""
    foreign = set() if foreign is None else foreign
    outside = [(a, p, i) for a, p, i in listening() if not is_loopback(a) and i not in foreign]
    if not outside:
        return []
    pids = descendants(os.getpid() if root is None else root)
    found = []
    for addr, port, inode in outside:
        pid = _owner(inode, pids)
        if pid is None:
            foreign.add(inode)
        else:
            found.append({"address": addr, "port": port, "pid": pid, "process": _name(pid)})
    return found


class ListenerWatch:
    """Looks for ``outside_listeners`` every ``interval`` seconds on a daemon thread."""

    def __init__(self, interval: float = 0.25):
        self.interval = interval
        self.looks = 0
        self._seen: list[dict] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="listener-watch", daemon=True)
        self._root = os.getpid()
        self._foreign: set = set()  # listening sockets of processes outside the session (the machine's own)

    def start(self) -> "ListenerWatch":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                found = outside_listeners(self._root, self._foreign)
            except Exception as e:  # noqa: BLE001 - a look that fails is reported, not silent
                found = [{"address": "?", "port": -1, "pid": -1, "process": f"the look failed: {e!r}"}]
            with self._lock:
                self.looks += 1
                for f in found:
                    if f not in self._seen:
                        self._seen.append(f)
            self._stop.wait(self.interval)

    def take(self) -> list[dict]:
        """What was seen since the last ``take`` (and a look made now, so nothing that is still there is missed)."""
        now = outside_listeners(self._root, self._foreign)
        with self._lock:
            seen = self._seen + [f for f in now if f not in self._seen]
            self._seen = []
        return seen

    def wait_for_looks(self, n: int = 2, timeout: float = 10) -> None:
        start, deadline = self.looks, time.monotonic() + timeout
        while self.looks < start + n and time.monotonic() < deadline:
            time.sleep(self.interval / 2)
