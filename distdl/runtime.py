"""Connecting to Ray and choosing devices: the one place that knows about either.

A local Ray binds to 127.0.0.1 only. Worker output stays in Ray's log files
(/tmp/ray/session_latest/logs): the driver prints distdl's own progress, and worker errors
reach it as exceptions. The checks here turn "this will wait forever" situations
(more workers than the cluster can ever place, GPUs that do not exist) into a clear UserError.
"""

from __future__ import annotations

import logging
import os
import socket
from typing import TYPE_CHECKING

from distdl.errors import UserError

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)

_LOOPBACK = ("127.0.0.1", "localhost")


def connect(address: str | None = None, *, num_cpus: int | None = None,
            dashboard: bool = False) -> str:
    """Connect to the Ray cluster at `address` (or RAY_ADDRESS), else start a local one on loopback.

    `dashboard` starts a local Ray with its dashboard (on 127.0.0.1), which serves the state API.
    It costs about 5 s, so only searches ask for it: Ray Train frees the workers of a trial that
    Tune stops through that API, and without it a stopped trial would keep its CPUs.
    Returns the address other processes can use to join the same Ray instance.
    """
    import ray

    address = address or os.environ.get("RAY_ADDRESS")
    if address and address.startswith(("http://", "https://")):
        raise UserError(f"Ray address {address} is an HTTP address (a dashboard's, which "
                        "`distdl submit` takes); give the cluster's HOST:PORT (port 6379 by "
                        "default) in --address or RAY_ADDRESS")
    _quiet_ray_data()
    if ray.is_initialized():
        return _gcs_address()
    if address:
        _prepare_to_join(address)
        try:
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        except (ConnectionError, ValueError, RuntimeError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"cannot connect to the Ray cluster at {address}: {first} "
                            "(is it running? check --address or RAY_ADDRESS)") from None
        return _gcs_address()
    _loopback_only()
    # One machine is never preempted: Ray Train's preemption watcher would be one more process
    # to start and a poll of the GCS every few seconds of training. A value set by the user wins.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
    # Nothing reads Ray Train's own metrics on a local Ray (no Prometheus), and training was
    # slower with them on: digits on 2 cores gave 14,468, 13,207, 13,215 and 14,226 samples/s
    # without them against 12,963, 11,982, 11,392 and 13,960 with them (alternated runs).
    os.environ.setdefault("RAY_TRAIN_METRICS_ENABLED", "0")
    # Ray warns on every start that its token authentication is on; on loopback only, that is
    # noise in front of distdl's own output (and a second line before a one-line error).
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(
        logging.ERROR)
    ray.init(
        num_cpus=num_cpus,
        include_dashboard=dashboard,
        dashboard_host="127.0.0.1",
        logging_level=logging.WARNING,
        log_to_driver=False,
    )
    return _gcs_address()


def _loopback_only() -> None:
    """Ray resolves 127.0.0.1 to the machine's routable address unless "cluster mode" is off;
    with it off, a Ray started here binds to loopback only, and a driver joining a Ray on
    loopback looks for it there (not at the routable address, where it would wait forever)."""
    from ray._private import ray_constants

    ray_constants.ENABLE_RAY_CLUSTER = False
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def join_environment(address: str) -> None:
    """Set what joining the Ray at `address` needs from the environment: the token that clusters
    started with `ray start` (and local ones) require, where the user has one and has not chosen
    a mode, and loopback for an address on it. Ray reads both as it is imported: call this
    before the first `import ray` (the CLI does, as it starts)."""
    host = _host_port(address)[0]
    if "RAY_AUTH_MODE" not in os.environ and _auth_token_available():
        os.environ["RAY_AUTH_MODE"] = "token"
    if host in _LOOPBACK:
        os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"


def _prepare_to_join(address: str) -> None:
    """Fail in one line, not after minutes of retries, when nothing listens at the address."""
    join_environment(address)
    host, port = _host_port(address)
    if port is None:
        return  # "auto", ray:// clients: Ray's own resolution and errors
    try:
        socket.create_connection((host, port), timeout=5).close()
    except OSError as exc:
        raise UserError(f"no Ray cluster answers at {address} ({exc.strerror or exc}); is it "
                        "running? check --address or RAY_ADDRESS") from None
    if host in _LOOPBACK:
        _loopback_only()


def _host_port(address: str) -> tuple[str, int | None]:
    host, sep, port = address.rpartition(":")
    if "://" in address or not sep or not port.isdigit():
        return address, None
    return host, int(port)


def _auth_token_available() -> bool:
    """Where Ray looks for a token: RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token."""
    if os.environ.get("RAY_AUTH_TOKEN"):
        return True
    path = os.environ.get("RAY_AUTH_TOKEN_PATH") or os.path.expanduser("~/.ray/auth_token")
    return os.path.isfile(os.path.expanduser(path))


def _quiet_ray_data() -> None:
    """Progress is printed per epoch by distdl; Ray Data's bars would interleave with it."""
    from ray.data import DataContext

    DataContext.get_current().enable_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.ERROR)


def _gcs_address() -> str:
    import ray

    return ray.get_runtime_context().gcs_address


def local_cpus(reserved: float) -> int:
    """Logical CPUs for a local Ray: at least the machine's, plus one for data tasks.

    Training workers hold their CPUs for the whole run; Ray Data's read and split tasks need a
    CPU of their own at the same time, or the first epoch waits for them forever.
    """
    return max(os.cpu_count() or 1, int(reserved + 0.999)) + 1


def torch_threads(cpus_per_worker: float) -> int:
    """A worker's torch threads: its whole CPUs, at least one, and no more than its node has
    (a local Ray may grant more CPUs than there are cores; threads past them only contend)."""
    return max(1, min(int(cpus_per_worker), os.cpu_count() or 1))


def check_placeable(num_workers: int, cpus_per_worker: float, use_gpu: bool) -> None:
    """Fail fast when the cluster can never host the worker group (instead of waiting forever)."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    per_worker = {"CPU": cpus_per_worker, **({"GPU": 1.0} if use_gpu else {})}
    fits = sum(
        int(min(n["Resources"].get(k, 0.0) / v for k, v in per_worker.items() if v > 0))
        for n in nodes
    )
    if fits < num_workers:
        total = {k: sum(n["Resources"].get(k, 0.0) for n in nodes) for k in per_worker}
        have = ", ".join(f"{v:g} {k}" for k, v in total.items())
        raise UserError(
            f"{num_workers} workers needing {_fmt(per_worker)} each can never be placed on this "
            f"cluster ({have} in total, at most {fits} such workers); lower train.num_workers "
            "or train.cpus_per_worker, or add nodes"
        )


# A CPU worker holds about nine times its model's parameter bytes: weights, gradients, AdamW's
# two moments, DDP's buckets, its share of the shared-memory all-reduce pages. Two workers of a
# 252M-parameter small_cnn (1 GB of float32) had 8.6 and 9.6 GB resident. Eight, rounded down,
# refuses only what cannot fit, before Ray's memory monitor kills the workers minutes later.
_CPU_WORKER_BYTES_PER_PARAMETER = 8 * 4


def cluster_memory() -> float:
    """Bytes of memory on the cluster's live nodes, as Ray counted them at their start."""
    import ray

    nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
    # Ray splits each node's free memory at start-up into these two.
    return sum(n.get("memory", 0.0) + n.get("object_store_memory", 0.0) for n in nodes)


def check_memory(parameters: int, num_workers: int, have: float) -> None:
    """Fail fast when CPU workers training a model of `parameters` cannot fit in `have` bytes
    (cluster_memory)."""
    need = parameters * _CPU_WORKER_BYTES_PER_PARAMETER * num_workers
    if need > have:
        raise UserError(
            f"{num_workers} workers training a model of {parameters / 1e6:,.0f}M parameters on "
            f"CPU need about {need / 2**30:,.0f} GiB of memory, and this cluster has "
            f"{have / 2**30:,.0f} GiB; choose a smaller model (model.width) or fewer workers"
        )


def _fmt(resources: dict[str, float]) -> str:
    return " + ".join(f"{v:g} {k}" for k, v in resources.items())


# torch is imported where it is used: the CLI calls join_environment before every command with
# an address, `distdl submit` and `distdl jobs` among them, which need no torch (2 s to import).
def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The mixed-precision dtype for `device`: bf16 where supported, fp16 otherwise, None on CPU."""
    import torch

    if device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
