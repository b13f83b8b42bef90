"""Ray Train's torch process group with every listener on the node's Ray address, never on all interfaces.

Ray Train's own ``TorchConfig`` backend (``ray.train.torch.config._TorchBackend``) gives rank 0's address to
``init_process_group("env://")``; torch then starts its rendezvous ``TCPStore`` on rank 0, and that server
listens on every interface (``*:port``) whatever address it was given. The collectives pick their own
interface too: gloo from the hostname, NCCL the first non-loopback one. On a session bound to 127.0.0.1 that
puts a port on the machine's outward addresses.

``NodeBoundTorchConfig`` does what Ray's backend does with two changes:

* rank 0 binds the store's socket itself, on ``ray.util.get_node_ip_address()`` (the address Ray uses for that
  node: 127.0.0.1 on a loopback session, the node's cluster address on a real cluster, as ``ray start
  --node-ip-address`` sets it), and hands the listening socket to ``TCPStore(master_listen_fd=...)``;
* every worker sets ``GLOO_SOCKET_IFNAME`` and ``NCCL_SOCKET_IFNAME`` to the interface that holds its node's Ray
  address, unless they are set already (a cluster that wants another interface sets them in the workers'
  environment: cluster/README.md).

Ray's backend is subclassed, not copied: only ``on_start`` (the process group's setup) differs.
"""

from __future__ import annotations

import logging
import os
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

from ray.train.torch import TorchConfig
from ray.train.torch.config import _TorchBackend

log = logging.getLogger(__name__)

# rank 0's listening socket, from _listen until _init_group hands it to the TCPStore (same worker process)
_STORE_SOCKET: Optional[socket.socket] = None


def interface_of(address: str) -> Optional[str]:
    """The network interface that holds ``address`` (None: no interface has it)."""
    import psutil

    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == address for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)):
            return name
    return None


def _listen() -> tuple[str, int]:
    """On rank 0: a listening socket on this node's Ray address (a free port); returns (address, port)."""
    import ray

    global _STORE_SOCKET
    addr = ray.util.get_node_ip_address()
    sock = socket.socket(socket.AF_INET6 if ":" in addr else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((addr, 0))
    sock.listen(128)
    _STORE_SOCKET = sock
    return addr, sock.getsockname()[1]


def _pin_interfaces() -> None:
    import ray

    name = interface_of(ray.util.get_node_ip_address())
    if name is None:
        log.warning("no network interface holds this node's Ray address %s: gloo and NCCL choose their own",
                    ray.util.get_node_ip_address())
        return
    for var in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
        os.environ.setdefault(var, name)


def _init_group(backend: str, world_rank: int, world_size: int, addr: str, port: int, timeout_s: float) -> None:
    """On every worker: the TCPStore (rank 0 serves it on the socket ``_listen`` bound), then the process group."""
    import torch.distributed as dist

    global _STORE_SOCKET
    _pin_interfaces()
    if "nccl" in backend:  # as Ray's backend: fail on a timed-out NCCL collective rather than hang
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = addr, str(port)  # for libraries that read them
    timeout = timedelta(seconds=timeout_s)
    if world_rank == 0:
        fd, _STORE_SOCKET = _STORE_SOCKET.detach(), None  # the store owns the descriptor from here on
        store = dist.TCPStore(addr, port, world_size, True, timeout=timeout, wait_for_workers=False,
                              master_listen_fd=fd)
    else:
        store = dist.TCPStore(addr, port, world_size, False, timeout=timeout)
    dist.init_process_group(backend, store=store, rank=world_rank, world_size=world_size, timeout=timeout)


class _NodeBoundBackend(_TorchBackend):
    def on_start(self, worker_group, backend_config: "NodeBoundTorchConfig") -> None:
        import ray
        from ray.train.torch.config import _set_torch_distributed_env_vars

        backend = backend_config.backend
        if backend is None:
            backend = "nccl" if worker_group.get_resources_per_worker().get("GPU", 0) > 0 else "gloo"
        addr, port = worker_group.execute_single(0, _listen)
        worker_group.execute(_set_torch_distributed_env_vars)  # LOCAL_RANK, RANK, WORLD_SIZE, ... (Ray Train v2)
        ray.get([worker_group.execute_single_async(i, _init_group, backend=backend, world_rank=i,
                                                   world_size=len(worker_group), addr=addr, port=port,
                                                   timeout_s=backend_config.timeout_s)
                 for i in range(len(worker_group))])


@dataclass
class NodeBoundTorchConfig(TorchConfig):
    """``TorchConfig`` whose process group listens only on each node's Ray address (see the module doc)."""

    @property
    def backend_cls(self):
        return _NodeBoundBackend
