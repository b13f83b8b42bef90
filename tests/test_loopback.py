"""Nothing the session starts listens beyond loopback: the watch the conftest runs all session long (every test
fails on what it sees, e.g. Ray Train's 2-worker distill run, Serve's proxy, the refine jobs), checked here on
a process made to listen on all interfaces; and the pieces that pin Ray Train's process group."""

import socket
import subprocess
import sys

from tests.listeners import is_loopback, listening, outside_listeners

LISTEN = ("import socket, sys, time; s = socket.socket(); s.bind((sys.argv[1], 0)); s.listen(); "
          "print(s.getsockname()[1], flush=True); time.sleep(60)")


def test_the_watch_sees_a_session_process_listening_on_all_interfaces(listener_watch):
    procs = [subprocess.Popen([sys.executable, "-c", LISTEN, host], stdout=subprocess.PIPE, text=True)
             for host in ("0.0.0.0", "127.0.0.1")]
    try:
        ports = [int(p.stdout.readline()) for p in procs]
        listener_watch.wait_for_looks(2)
        assert {(a, p) for a, p, _ in listening()} >= {("0.0.0.0", ports[0]), ("127.0.0.1", ports[1])}
        found = outside_listeners()
        assert [(f["address"], f["port"], f["pid"]) for f in found] == [("0.0.0.0", ports[0], procs[0].pid)]
        assert "socket.socket()" in found[0]["process"]
    finally:
        for p in procs:
            p.kill()
            p.wait()
    seen = listener_watch.take()  # the watch saw it too (and this test's check is not to fail on it)
    assert [(f["port"], f["pid"]) for f in seen] == [(ports[0], procs[0].pid)]
    assert outside_listeners() == []


def test_addresses_count_as_loopback_only_inside_127_8_and_1():
    assert all(map(is_loopback, ["127.0.0.1", "127.3.4.5", "::1"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "192.0.2.2", "10.0.0.1", "fd00::2"]))


def test_the_process_group_binds_the_node_address_and_its_interface(ray_local):
    """What each Ray Train worker runs: the store's socket on the node's Ray address (127.0.0.1 here), and gloo /
    NCCL pinned to the interface that holds it."""
    import ray

    from app.distill import backend

    @ray.remote
    def probe():
        import os

        addr, port = backend._listen()
        bound = backend._STORE_SOCKET.getsockname()[:2]
        backend._STORE_SOCKET.close()
        os.environ.pop("GLOO_SOCKET_IFNAME", None)
        backend._pin_interfaces()
        return addr, port, bound, os.environ["GLOO_SOCKET_IFNAME"], os.environ["NCCL_SOCKET_IFNAME"]

    addr, port, bound, gloo, nccl = ray.get(probe.remote())
    assert addr == "127.0.0.1" and bound == (addr, port)
    assert gloo == nccl == backend.interface_of("127.0.0.1") and gloo is not None
    assert backend.interface_of("203.0.113.77") is None
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    assert backend.interface_of(s.getsockname()[0]) == gloo
    s.close()
