"""Typed config of the server (``configs/serve.yaml`` and the ``args`` of ``cluster/serve.yaml`` mirror it)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Optional

from app.config import _check


@dataclass
class AutoscaleConfig:
    enabled: bool = False
    """Scale replicas with load (Ray Serve autoscaling) instead of a fixed `deployment.replicas`."""
    min_replicas: int = 1
    """Never fewer replicas than this (0: scale to zero when idle; the first request then waits for a load)."""
    max_replicas: int = 4
    """Never more replicas than this."""
    target_ongoing_requests: float = 16.0
    """Requests in flight per replica the autoscaler aims for (about the batch size: a full batch each)."""
    upscale_delay_s: float = 10.0
    """Load must stay high this long before a replica is added."""
    downscale_delay_s: float = 300.0
    """Load must stay low this long before a replica is removed."""

    def __post_init__(self) -> None:
        _check(self.min_replicas >= 0, "deployment.autoscale.min_replicas", "must be >= 0")
        _check(self.max_replicas >= max(self.min_replicas, 1), "deployment.autoscale.max_replicas",
               "must be >= min_replicas and >= 1")
        _check(self.target_ongoing_requests > 0, "deployment.autoscale.target_ongoing_requests", "must be > 0")


@dataclass
class DeploymentConfig:
    replicas: int = 1
    """Replicas of the model (each loads its own copy), when autoscaling is off."""
    autoscale: AutoscaleConfig = field(default_factory=AutoscaleConfig)
    """Autoscaling bounds (used when `enabled`)."""
    num_cpus: float = 1.0
    """CPUs reserved per replica (its torch threads on CPU)."""
    num_gpus: float = 0.0
    """GPUs per replica (a fraction shares one GPU between replicas)."""
    max_ongoing_requests: int = 128
    """Requests one replica takes at once (running, waiting in its queue, streaming); more wait at Serve's router.
    At least the batch's capacity (`batch.max_num_seqs`, or `batch.max_batch_size` with the static scheduler)."""
    max_queued_requests: int = 256
    """Requests waiting at Serve's router while every replica holds `max_ongoing_requests` (Serve's
    `max_queued_requests`); more are refused at once with a 503 and `Retry-After` instead of queueing without
    bound. -1: no bound."""
    graceful_shutdown_timeout_s: float = 600.0
    """A replica being stopped (downscale, redeploy, shutdown) takes no new requests and lets its running ones
    (streams included) finish for up to this long before it is killed (Serve's default, 20 s, cuts long streams).
    Make it at least `limits.max_tokens` / the slowest tokens/s a sequence gets."""

    def __post_init__(self) -> None:
        _check(self.replicas >= 1, "deployment.replicas", "must be >= 1")
        _check(self.num_cpus >= 0, "deployment.num_cpus", "must be >= 0")
        _check(self.num_gpus >= 0, "deployment.num_gpus", "must be >= 0")
        _check(self.max_ongoing_requests >= 1, "deployment.max_ongoing_requests", "must be >= 1")
        _check(self.max_queued_requests == -1 or self.max_queued_requests >= 1, "deployment.max_queued_requests",
               "must be >= 1, or -1 for no bound")
        _check(self.graceful_shutdown_timeout_s >= 0, "deployment.graceful_shutdown_timeout_s", "must be >= 0")


@dataclass
class BatchConfig:
    scheduler: Literal["continuous", "static"] = "static"
    """continuous: one decode loop per replica; requests join the running batch at any step and leave it as soon
    as they end (app/serve/scheduler.py). static: Ray Serve's @serve.batch; a batch runs to its end and the
    requests that came meanwhile form the next one (any causal LM; continuous needs a cache it can merge).
    static stays the default until continuous meets issue 20's targets (benchmarks/RESULTS.md: not yet)."""
    max_num_seqs: int = 32
    """continuous: sequences (requests x n) decoding at once; more requests wait for a place."""
    max_prefill_tokens: int = 4096
    """continuous: the prompt tokens one step may prefill (rows x the longest admitted prompt); a request's `n`
    rows are admitted over several steps when they do not fit one. At least `limits.max_prompt_tokens`, so every
    prompt fits one step."""
    max_waiting: int = 64
    """Requests waiting in the replica for a place in the running batch (continuous: every request waits there
    until the next step) or for the next batch (static); more are refused at once with a 503 (code
    server_overloaded, `Retry-After`) instead of queueing without bound."""
    max_batch_size: int = 32
    """static: sequences (requests x n) decoded together in one batch (Ray Serve @serve.batch). 1: no batching."""
    batch_wait_timeout_s: float = 0.05
    """static: how long the first request of a batch waits for others to join: longer fills batches better under
    load (throughput), and adds up to this much latency to a request that comes alone (benchmarks/serve.py)."""

    def __post_init__(self) -> None:
        _check(self.scheduler in ("continuous", "static"), "batch.scheduler", "must be continuous or static")
        _check(self.max_num_seqs >= 1, "batch.max_num_seqs", "must be >= 1")
        _check(self.max_prefill_tokens >= 1, "batch.max_prefill_tokens", "must be >= 1")
        _check(self.max_waiting >= 1, "batch.max_waiting", "must be >= 1 (a request waits there until the next step)")
        _check(self.max_batch_size >= 1, "batch.max_batch_size", "must be >= 1")
        _check(self.batch_wait_timeout_s >= 0, "batch.batch_wait_timeout_s", "must be >= 0")

    @property
    def capacity(self) -> int:
        """The most sequences decoding together (what one request's prompts x n may not exceed)."""
        return self.max_num_seqs if self.scheduler == "continuous" else self.max_batch_size


@dataclass
class LimitsConfig:
    max_prompt_tokens: int = 2048
    """Longer prompts are refused (400, code context_length_exceeded)."""
    max_tokens: int = 1024
    """The largest `max_tokens` a request may ask for (400 above it)."""
    default_max_tokens: int = 256
    """Chat completions without `max_tokens` get this many, or `max_tokens` if lower (completions: 16, as OpenAI's)."""
    max_n: int = 8
    """The largest `n` (choices per prompt)."""
    max_body_bytes: int = 1 << 20
    """Request bodies larger than this are refused (413), counted as the bytes arrive (chunked bodies too)."""
    max_stop_chars: int = 256
    """The longest stop string, in characters (400 above it): decoding holds back text that may begin one."""
    max_stop_tokens: int = 64
    """The longest stop string, in the model's tokens (400 above it)."""

    def __post_init__(self) -> None:
        for name in ("max_prompt_tokens", "max_tokens", "default_max_tokens", "max_n", "max_body_bytes",
                     "max_stop_chars", "max_stop_tokens"):
            _check(getattr(self, name) >= 1, f"limits.{name}", "must be >= 1")


@dataclass
class ServeConfig:
    model: str = "out/distill/student"
    """The model: a save_pretrained directory (the distilled student: `OUTPUT/student`), a GGUF file,
    `smollm2`, or a hub id. Any HF causal LM works."""
    model_name: Optional[str] = None
    """The id clients send as `model` and /v1/models lists (vLLM's `served_model_name`; null: the directory's or
    GGUF file's name, or the hub id). The model's path is never shown to clients."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """auto: CUDA when the replica has a GPU."""
    dtype: Optional[Literal["float32", "bfloat16", "float16"]] = None
    """Weights' dtype (null: bfloat16 on CUDA, float32 on CPU)."""
    host: str = "127.0.0.1"
    """Address the HTTP proxy listens on. Keep 127.0.0.1 unless a gateway in front needs more: any other address
    needs an API key (the server refuses to start without one)."""
    port: int = 8000
    """HTTP port."""
    route_prefix: str = "/"
    """The API lives under this prefix (/v1/... below it)."""
    api_key_env: Optional[str] = "DISTILLERY_API_KEY"
    """When this environment variable is set where the server is started (`distillery serve`, `jobs/serve.py`, the
    process that builds the app for `serve run` / `serve deploy`) or on a replica's node, every /v1 request needs
    `Authorization: Bearer <its value>` (401 otherwise); the key is handed to every replica with its constructor
    arguments, never in its config or environment. /health stays open."""
    api_key_file: Optional[str] = None
    """Or read the key from this file (e.g. a mounted Kubernetes secret), where the server is started or, when the
    file is not there, on each replica's node; it wins over `api_key_env`."""
    require_api_key: bool = False
    """Refuse to start without a key. Implied by a `host` beyond loopback."""
    deployment: DeploymentConfig = field(default_factory=DeploymentConfig)
    """Replicas, autoscaling and resources per replica."""
    batch: BatchConfig = field(default_factory=BatchConfig)
    """Batching: the scheduler and its limits."""
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    """Request limits."""

    def __post_init__(self) -> None:
        _check(bool(self.model), "model", "must be given")
        _check(0 <= self.port < 65536, "port", "must be a port number")
        _check(self.route_prefix.startswith("/"), "route_prefix", "must start with /")
        if self.batch.scheduler == "continuous":
            _check(self.batch.max_prefill_tokens >= self.limits.max_prompt_tokens, "batch.max_prefill_tokens",
                   f"must be >= limits.max_prompt_tokens ({self.limits.max_prompt_tokens}): a longest prompt must "
                   f"fit one prefill step")
        which = "batch.max_num_seqs" if self.batch.scheduler == "continuous" else "batch.max_batch_size"
        _check(self.deployment.max_ongoing_requests >= self.batch.capacity, "deployment.max_ongoing_requests",
               f"must be >= {which} (a replica could never fill a batch)")

    @property
    def exposed(self) -> bool:
        """Whether `host` reaches beyond this machine (anything but a loopback address or localhost)."""
        import ipaddress

        if self.host.strip().lower() == "localhost":
            return False
        try:
            return not ipaddress.ip_address(self.host.strip("[]")).is_loopback
        except ValueError:  # a host name: it may resolve to anything
            return True

    @property
    def needs_api_key(self) -> bool:
        return self.require_api_key or self.exposed

    @property
    def served_name(self) -> str:
        """The model's id in the API: `model_name`, else the directory's or file's name, or the hub id (a reference
        that is not a path here). Never a filesystem path."""
        import os
        import re

        if self.model_name:
            return self.model_name
        if not os.path.exists(self.model) and re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", self.model):
            return self.model  # a hub id (org/name) is its own name
        return os.path.basename(os.path.normpath(self.model)) or self.model
