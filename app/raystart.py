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
        cwd = _cwd()
        ray.init(address=address, log_to_driver=True)
        log.info("joined Ray at %s", address)
        settle_working_dir(cwd)
        return
    # address="local": a new Ray, even when a head killed earlier left its address in /tmp/ray/ray_current_cluster
    # (Ray would otherwise try to join that one and refuse num_cpus). The dashboard (on 127.0.0.1) serves the
    # State API, which Ray Train v2's PlacementGroupCleaner needs to see that a controller died: without it a
    # Tune trial stopped early (ASHA) leaks its workers' CPUs for good.
    ray.init(address="local", num_cpus=num_cpus, _node_ip_address="127.0.0.1", include_dashboard=True,
             dashboard_host="127.0.0.1")
    log.info("started a local Ray on 127.0.0.1")


def _cwd() -> str | None:
    try:
        return os.getcwd()
    except FileNotFoundError:
        return None


def settle_working_dir(cwd: str | None) -> bool:
    """Keep a job's driver inside a directory that exists. Returns whether it had to move back in.

    Under ``ray job submit --working-dir``, the driver starts inside the job's package, unpacked on the head node
    by the job manager. The first time the job's runtime env is created on that node (a worker prestarted for the
    job, or any task or actor placed there, seconds or minutes later), Ray's working_dir plugin unpacks the package
    again with ``overwrite=True`` (``shutil.rmtree`` of the same path, then a new directory at it): the driver is
    left in a deleted directory. From then on ``os.getcwd()`` fails, relative paths (``--config configs/...``)
    find nothing, and importing torch exits the process with "Intel oneMKL FATAL ERROR: Cannot load
    libtorch_cpu.so": the MKL inside libtorch_cpu calls ``getcwd()`` when the library loads and exits with
    status 2 when it fails. (It showed when toxicity was on and perplexity off: the first import of torch in
    the driver came after the re-unpack; with perplexity on it came before.)

    So the driver makes the env exist on its own node first (a zero-CPU task pinned to this node: Ray creates a
    job's runtime env once per node and keeps it while the job runs) and then enters the path again.
    """
    import ray

    if cwd is None or not ray.get_runtime_context().runtime_env.working_dir():
        return False
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    ray.get(ray.remote(_working_dir_of_a_task).options(num_cpus=0, scheduling_strategy=here).remote())
    if not os.path.isdir(cwd):
        log.warning("the job's working directory %s is gone; the driver stays where it is", cwd)
        return False
    if os.path.samestat(os.stat("."), os.stat(cwd)):  # "." is still the directory at that path
        return False
    os.chdir(cwd)
    log.info("re-entered the job's working directory %s (Ray unpacked it again on this node)", cwd)
    return True


def _working_dir_of_a_task() -> str:
    return os.getcwd()
