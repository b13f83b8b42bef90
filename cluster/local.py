"""A Ray cluster on this machine: a head and N worker nodes on 127.0.0.1, token authentication on.

    python cluster/local.py up [--workers 2] [--worker-cpus 1] [--head-cpus 1] [--state out/cluster]
    python cluster/local.py down [--state out/cluster]
    python cluster/local.py env [--state out/cluster]        # the client environment, as shell exports
    python cluster/local.py kill-worker [--state out/cluster] # a crash drill: one worker node dies (SIGKILL)

``make cluster-up`` / ``make cluster-down`` call it. ``up`` starts one background process (in its own process
group, its pid in STATE/cluster.json) that holds the nodes, and returns once every node is alive; ``down`` stops
that group, so it stops exactly these nodes and no other Ray on the machine (a plain ``ray stop`` would).

The nodes are ``ray.cluster_utils.Cluster`` nodes under ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0``, the one way
Ray keeps several nodes of one machine on loopback: ``ray start --address`` refuses to join under that
variable, and without it Ray listens on the machine's outward address. Every port is on 127.0.0.1: the GCS
(``--port``, 6379) and the dashboard with the job API (``--dashboard-port``, 8265). The token is generated
once into STATE/auth_token (mode 0600); clients need ``RAY_AUTH_MODE=token`` and ``RAY_AUTH_TOKEN_PATH``
(``env`` prints them), and are refused without them.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time


def free_ports(n: int) -> list[int]:
    """n distinct free ports on 127.0.0.1 (all sockets held open until every port is drawn)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def client_env(state: str) -> dict:
    """What a client (``ray job submit``, ``ray.init``) needs to reach the cluster."""
    with open(os.path.join(state, "cluster.json")) as f:
        info = json.load(f)
    return {"RAY_ADDRESS": f"http://127.0.0.1:{info['dashboard_port']}", "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": os.path.abspath(os.path.join(state, "auth_token")),
            "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"}


def _record(state: str, info: dict) -> None:
    tmp = os.path.join(state, "cluster.json.tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, os.path.join(state, "cluster.json"))


def _hold(state: str, workers: int, head_cpus: float, worker_cpus: float, port: int, dashboard_port: int) -> None:
    """The background process: start the nodes, record them, wait for SIGTERM, stop them."""
    from ray.cluster_utils import Cluster

    # each node's dashboard agent needs a port of its own (the default, 52365, would be taken by the first)
    agents = free_ports(workers + 1)
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": head_cpus, "node_ip_address": "127.0.0.1", "gcs_server_port": port, "include_dashboard": True,
        "dashboard_host": "127.0.0.1", "dashboard_port": dashboard_port, "dashboard_agent_listen_port": agents[0]})
    for i in range(workers):
        cluster.add_node(num_cpus=worker_cpus, node_ip_address="127.0.0.1", dashboard_agent_listen_port=agents[i + 1])
    cluster.wait_for_nodes()
    stop, kill = [], []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    signal.signal(signal.SIGUSR1, lambda *_: kill.append(1))
    info = {"pid": os.getpid(), "address": cluster.address, "port": port, "dashboard_port": dashboard_port,
            "nodes": workers + 1, "killed": 0}
    _record(state, info)
    print(f"cluster up: {info}", flush=True)
    while not stop:
        if kill:
            kill.clear()
            if cluster.worker_nodes:
                # every process of the node at once, no graceful shutdown: what a crashed machine looks like
                cluster.remove_node(list(cluster.worker_nodes)[-1], allow_graceful=False)
                info["nodes"] -= 1
            info["killed"] += 1  # counted even with no worker left, so the caller stops waiting
            _record(state, info)
            print(f"killed a worker node: {info}", flush=True)
        time.sleep(0.2)
    cluster.shutdown()
    print("cluster down", flush=True)


def up(state: str, workers: int, head_cpus: float, worker_cpus: float, port: int, dashboard_port: int,
       timeout: float = 300) -> dict:
    """Start the cluster in the background; returns its record once every node is alive."""
    path = os.path.join(state, "cluster.json")
    if os.path.exists(path):
        raise SystemExit(f"a cluster is already recorded in {path}: stop it first (make cluster-down)")
    for p, what in ((port, "--port (GCS)"), (dashboard_port, "--dashboard-port")):
        if _in_use(p):
            raise SystemExit(f"127.0.0.1:{p} is in use: choose another {what}")
    os.makedirs(state, exist_ok=True)
    token = os.path.join(state, "auth_token")
    if not os.path.exists(token):
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32))
    # jobs run `python` from the nodes' PATH: this interpreter's environment (the project's venv) comes first
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=os.path.abspath(token),
               RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
               PATH=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
    for k in ("RAY_ADDRESS", "RAY_AUTH_TOKEN"):
        env.pop(k, None)
    log = os.path.join(state, "cluster.log")
    proc = subprocess.Popen([sys.executable, os.path.abspath(__file__), "_hold", "--state", state,
                             "--workers", str(workers), "--head-cpus", str(head_cpus), "--worker-cpus", str(worker_cpus),
                             "--port", str(port), "--dashboard-port", str(dashboard_port)],
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, env=env, start_new_session=True)
    deadline = time.time() + timeout
    while not os.path.exists(path):
        if proc.poll() is not None or time.time() > deadline:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            with open(log) as f:
                tail = f.read()[-2000:]
            raise SystemExit(f"the cluster did not come up (see {log}):\n{tail}")
        time.sleep(0.5)
    with open(path) as f:
        return json.load(f)


def kill_worker(state: str, timeout: float = 60) -> dict:
    """Kill one worker node (all its processes, SIGKILL) through the holder; returns the updated record."""
    path = os.path.join(state, "cluster.json")
    with open(path) as f:
        info = json.load(f)
    if info["nodes"] <= 1:
        raise SystemExit("no worker node left to kill")
    os.kill(info["pid"], signal.SIGUSR1)
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(path) as f:
            now = json.load(f)
        if now["killed"] > info["killed"]:
            return now
        time.sleep(0.2)
    raise SystemExit(f"the holder (pid {info['pid']}) did not kill a node in {timeout:.0f}s")


def down(state: str, timeout: float = 60) -> int:
    path = os.path.join(state, "cluster.json")
    if not os.path.exists(path):
        print(f"no cluster recorded in {state}")
        return 0
    with open(path) as f:
        pid = json.load(f)["pid"]
    try:
        os.kill(pid, signal.SIGTERM)  # the holder shuts its nodes down
        deadline = time.time() + timeout
        while time.time() < deadline:
            os.kill(pid, 0)
            time.sleep(0.5)
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        os.killpg(pid, signal.SIGKILL)  # anything of the group left behind
    except ProcessLookupError:
        pass
    os.remove(path)
    print("cluster stopped")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("action", choices=["up", "down", "env", "kill-worker", "_hold"])
    ap.add_argument("--state", default="out/cluster", help="where the token, the log and cluster.json live")
    ap.add_argument("--workers", type=int, default=2, help="worker nodes besides the head")
    ap.add_argument("--head-cpus", type=float, default=1)
    ap.add_argument("--worker-cpus", type=float, default=1)
    ap.add_argument("--port", type=int, default=6379, help="the GCS port on 127.0.0.1")
    ap.add_argument("--dashboard-port", type=int, default=8265, help="dashboard and job API on 127.0.0.1")
    a = ap.parse_args()
    if a.action == "_hold":
        _hold(a.state, a.workers, a.head_cpus, a.worker_cpus, a.port, a.dashboard_port)
        return 0
    if a.action == "down":
        return down(a.state)
    if a.action == "kill-worker":
        info = kill_worker(a.state)
        print(f"killed one worker node: {info['nodes']} nodes left", file=sys.stderr)
        return 0
    if a.action == "up":
        info = up(a.state, a.workers, a.head_cpus, a.worker_cpus, a.port, a.dashboard_port)
        print(f"Ray cluster up: {info['nodes']} nodes on 127.0.0.1 (GCS {info['address']}, dashboard and job API "
              f"http://127.0.0.1:{info['dashboard_port']}), token authentication on. For clients:", file=sys.stderr)
    for k, v in client_env(a.state).items():
        print(f"export {k}={v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
