"""Starting or joining Ray, bound to loopback when this process starts it."""

from __future__ import annotations

import logging
import os

log = logging.getLogger(__name__)


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at ``address`` / ``RAY_ADDRESS`` (as under ``ray job submit``), else start a local
    Ray on 127.0.0.1. ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0`` is set first: without it Ray listens on the
    machine's outward address even when told 127.0.0.1."""
    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
        log.info("joined Ray at %s", address)
        return
    # address="local": a new Ray, even when a head killed earlier left its address in /tmp/ray/ray_current_cluster
    # (Ray would otherwise try to join that one and refuse num_cpus). The dashboard (on 127.0.0.1) serves the
    # State API, which Ray Train v2's PlacementGroupCleaner needs to see that a controller died: without it a
    # Tune trial stopped early (ASHA) leaks its workers' CPUs for good.
    ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=True,
             dashboard_host="127.0.0.1")
    log.info("started a local Ray on 127.0.0.1")
