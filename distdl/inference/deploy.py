"""Serve configs for distdl models, and deploying, updating and waiting for them.

`distdl serve` and `distdl serve build` share `serve_config`: what runs locally is exactly the
file that `serve deploy` or a KubeRay RayService (`serveConfigV2`) would run. Deploying goes
through Serve's declarative path too, so `serve update` changes only a deployment's
`user_config` and Serve reconfigures the running replicas in place, without dropping requests.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from distdl.errors import UserError, error_line, failure_line
from distdl.inference import BATCH_WAIT_MS, MAX_BATCH_SIZE, TOP_K, haproxy
from distdl.inference.inputs import Limits

log = logging.getLogger(__name__)

API_KEY_ENV = "DISTDL_API_KEY"  # read by the replicas: when set, requests must carry it
# A replica's forward pass shares the cores with its own request handling. OpenMP's default
# has idle intra-op threads spin for a while after each parallel region, taking CPU that the
# request path needs; passive threads sleep at once.
REPLICA_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
PREFIXES = {"image_classification": "vision"}  # a checkpoint's task -> where it mounts
HEALTH_APP = "healthz"
RETRY_AFTER_S = 1  # what an overloaded replica's 503 tells clients to wait
DEPLOYMENT = "VisionService"


@dataclass(kw_only=True)
class ServeOptions:
    replicas: int | None = 1  # fixed count; None with min/max replicas means autoscaling
    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 16.0
    max_batch_size: int = MAX_BATCH_SIZE
    batch_wait_ms: float | str = BATCH_WAIT_MS  # or "auto"
    max_ongoing_requests: int | None = None  # default: twice the batch size
    max_queued_requests: int = 256
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    threads: int | None = None  # torch threads per replica (default: its CPUs)
    access_log: bool = False  # Serve's log line per request
    limits: Limits = field(default_factory=Limits)
    host: str = "127.0.0.1"
    port: int = 8000


def mount(spec: str) -> tuple[str, str]:
    """`NAME=PATH` or `PATH` -> (application name, absolute checkpoint path), checked to load.
    PATH is a checkpoint directory, or a run directory for its best checkpoint. A PATH that
    exists is never split at an "=" in it (Ray Tune's default trial folders: lr=0.1_...)."""
    name, sep, path = spec.partition("=")
    if not sep or "/" in name or Path(spec).expanduser().exists():
        name, path = "", spec
    directory, task = checked_checkpoint(path)
    name = name or PREFIXES[task]
    if not name.replace("-", "").replace("_", "").isalnum() or name == HEALTH_APP:
        raise UserError(f"bad application name {name!r}: use letters, digits, - and _")
    return name, directory


def checked_checkpoint(path: str) -> tuple[str, str]:
    """A checkpoint (or run) directory -> (absolute checkpoint directory, its task), loaded
    once here: a corrupt checkpoint fails in one line, not in every replica."""
    from distdl.train import checkpoint

    path = checkpoint.resolve(path).removeprefix("file://")
    if "://" in path:
        raise UserError(f"checkpoint {path}: replicas load a checkpoint from a directory on "
                        "their node; copy it to one (on a cluster, one every node can read)")
    directory = Path(path).expanduser().resolve()
    if not directory.is_dir():
        problem = "is not a directory" if directory.exists() else "does not exist"
        raise UserError(f"checkpoint {path} {problem}: give the checkpoint directory that "
                        "holds model.pt and meta.json, or the run directory that names it")
    _, meta = checkpoint.load_model(directory)
    task = meta.get("task", "image_classification")
    if not isinstance(task, str) or task not in PREFIXES:
        raise UserError(f"checkpoint {path} is for task {task!r}; distdl serves "
                        f"{', '.join(PREFIXES)}")
    return str(directory), task


def application(name: str, checkpoint: str, options: ServeOptions,
                api_key: str | None = None) -> dict[str, Any]:
    deployment: dict[str, Any] = {
        "name": DEPLOYMENT,
        "max_ongoing_requests": options.max_ongoing_requests or 2 * options.max_batch_size,
        "max_queued_requests": options.max_queued_requests,
        "backpressure_config": {"status_code": 503, "retry_after_s": RETRY_AFTER_S},
        "user_config": {"checkpoint": checkpoint, "max_batch_size": options.max_batch_size,
                        "batch_wait_ms": options.batch_wait_ms},
        "ray_actor_options": {"num_cpus": options.num_cpus, "num_gpus": options.num_gpus},
        "health_check_period_s": 5,
        "logging_config": {"enable_access_log": options.access_log},
    }
    if options.replicas is None:
        # Serve's defaults wait 30 s before adding a replica; a burst of requests is over by then.
        deployment["autoscaling_config"] = {
            "min_replicas": options.min_replicas, "max_replicas": options.max_replicas,
            "target_ongoing_requests": options.target_ongoing_requests,
            "upscale_delay_s": 5.0, "look_back_period_s": 15.0, "downscale_delay_s": 120.0,
        }
    else:
        deployment["num_replicas"] = options.replicas
    app: dict[str, Any] = {
        "name": name,
        "route_prefix": f"/{name}",
        "import_path": "distdl.inference.serve_app:build_app",
        "args": {"checkpoint": checkpoint, "limits": asdict(options.limits),
                 "top_k": TOP_K, "threads": options.threads},
        "deployments": [deployment],
    }
    env = dict(REPLICA_ENV)
    if api_key:
        env[API_KEY_ENV] = api_key
    app["runtime_env"] = {"env_vars": env}
    return app


def serve_config(mounts: list[tuple[str, str]], options: ServeOptions,
                 api_key: str | None = None) -> dict[str, Any]:
    """A Serve config (ServeDeploySchema) for the checkpoints, plus the /healthz application."""
    names = [name for name, _ in mounts]
    taken = {name for name in names if names.count(name) > 1}
    if taken:
        raise UserError(f"two checkpoints would mount at /{taken.pop()}: name them, as NAME=PATH")
    apps = [application(name, path, options, api_key) for name, path in mounts]
    # At /, the health application also answers the paths no model serves (a JSON 404).
    apps.append({"name": HEALTH_APP, "route_prefix": "/",
                 "import_path": "distdl.inference.serve_app:build_health", "args": {}})
    config = {"proxy_location": "HeadOnly",
              "http_options": {"host": options.host, "port": options.port},
              "applications": apps}
    validate(config)
    return config


def validate(config: dict[str, Any]):
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        return ServeDeploySchema.model_validate(config)
    except ValidationError as exc:
        raise UserError(f"invalid Serve config: {str(exc).splitlines()[0]}") from None


def deploy(config: dict[str, Any], *, timeout_s: float = 180.0) -> None:
    """Start Serve (HTTP on the config's host and port) and run the config's applications.

    Applications already running from an earlier config stay: a Serve config replaces every
    application, so the running ones are merged in, and same-named ones are replaced.
    """
    from ray.serve._private.api import serve_start

    # Importing Serve sets its logger to INFO, whose "Started Serve in namespace" line would
    # come before distdl's own output; its warnings still show.
    logging.getLogger("ray.serve").setLevel(logging.WARNING)
    http = config["http_options"]
    try:
        client = serve_start(http_options=http, proxy_location=config.get("proxy_location"))
    except Exception as exc:  # Ray wraps the proxy's failure (a port in use) in several types
        raise UserError(f"Serve cannot start on {http['host']}:{http['port']}: "
                        f"{failure_line(exc)} (is the port in use? choose another --port)"
                        ) from None
    _check_port(client, http)
    ours = {app["name"] for app in config["applications"]}
    kept = [app for app in _deployed_apps(client) if app["name"] not in ours]
    merged = {**config, "applications": kept + _health_beside(kept, config["applications"])}
    client.deploy_apps(validate(merged))
    wait_running(sorted(ours), timeout_s=timeout_s)


def _health_beside(kept: list[dict[str, Any]], apps: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`apps`, with the health application at /healthz where another application on the
    cluster already has / (Serve's default prefix); otherwise it keeps / and with it every
    path that no application serves."""
    if not any(app.get("route_prefix", "/") == "/" for app in kept):
        return apps
    return [{**app, "route_prefix": f"/{HEALTH_APP}"} if app["name"] == HEALTH_APP else app
            for app in apps]


def check_port_free(host: str, port: int) -> None:
    """Refuse a port that a local Serve could not listen on, before starting anything: HAProxy
    failing to bind it surfaces 10 to 25 s later, and often without the reason."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port,
                                                             type=socket.SOCK_STREAM)[0]
        with socket.socket(family, kind, proto) as probe:
            # As servers do: a port whose last connections linger in TIME_WAIT is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            probe.bind(address)
    except OSError as exc:
        raise UserError(f"Serve cannot start on {host}:{port}: {exc.strerror or exc} (is the "
                        "port in use? choose another --port or --host)") from None


def _check_port(client, wanted: dict[str, Any]) -> None:
    running = client.http_config
    if (running.host, running.port) != (wanted["host"], wanted["port"]):
        raise UserError(f"Serve already runs on this cluster at {running.host}:{running.port}; "
                        f"use --host {running.host} --port {running.port}")


def wait_running(names: list[str], *, timeout_s: float) -> None:
    """Wait until the applications run; a failed deployment is one UserError line."""
    from ray import serve

    deadline = time.monotonic() + timeout_s
    while True:
        apps = serve.status().applications
        states = {name: apps[name].status.value if name in apps else "NOT_STARTED"
                  for name in names}
        failed = [name for name, state in states.items() if state == "DEPLOY_FAILED"]
        if failed:
            raise UserError(f"application {failed[0]} failed to deploy: "
                            f"{_message(apps[failed[0]].message)}")
        if all(state == "RUNNING" for state in states.values()):
            return
        if time.monotonic() > deadline:
            raise UserError(f"applications not running after {timeout_s:.0f} s: {states} "
                            "(does the cluster have the CPUs and GPUs the replicas ask for?)")
        time.sleep(0.5)


def _message(text: str) -> str:
    """The error line of Serve's (often multi-line, traceback-bearing) deployment message."""
    lines = text.strip().splitlines()
    return error_line(text) or (lines[0] if lines else "no message")


def _deployed_apps(client) -> list[dict[str, Any]]:
    details = client.get_serve_details()
    return [app["deployed_app_config"] for app in details.get("applications", {}).values()
            if app.get("deployed_app_config")]


def running_config() -> dict[str, Any]:
    """The Serve config the cluster runs now, rebuilt from what the controller deployed."""
    from ray.serve.context import _get_global_client

    try:
        client = _get_global_client()
        apps = _deployed_apps(client)
    except Exception as exc:  # Serve raises RayServeException and others when it is not running
        raise UserError(f"Serve is not running on this cluster: {failure_line(exc)}") from None
    http = client.http_config
    return {"proxy_location": "HeadOnly",
            "http_options": {"host": http.host, "port": http.port},
            "applications": apps}


def update(name: str, checkpoint: str, *, timeout_s: float = 180.0) -> str:
    """Point application `name` at another checkpoint, in place; returns the new model version.
    `checkpoint` is a path that `mount` returned."""
    from distdl.inference.serve_app import model_version

    config = running_config()
    apps = {app["name"]: app for app in config["applications"]}
    if name not in apps or name == HEALTH_APP:
        raise UserError(f"no distdl application {name!r} is running "
                        f"(running: {', '.join(sorted(set(apps) - {HEALTH_APP})) or 'none'})")
    deployment = next(d for d in apps[name]["deployments"] if d["name"] == DEPLOYMENT)
    _check_same_input(deployment.get("user_config", {}).get("checkpoint"), checkpoint)
    deployment["user_config"] = {**deployment.get("user_config", {}), "checkpoint": checkpoint}
    deploy(config, timeout_s=timeout_s)
    return model_version(checkpoint)


def _check_same_input(running: str | None, new: str) -> None:
    """Requests already checked against the running model's input shape wait in its batches
    during a swap, so an update in place keeps that shape."""
    from distdl.train.checkpoint import META_FILE, load_meta

    if not running or not (Path(running) / META_FILE).is_file():
        return  # a checkpoint this machine cannot read: the replicas' nodes can
    before, after = load_meta(running)["input_shape"], load_meta(new)["input_shape"]
    if list(before) != list(after):
        raise UserError(f"the new checkpoint takes images of shape {list(after)} (C, H, W), the "
                        f"running one {list(before)}; an update in place keeps the input shape: "
                        "serve the new model as another application (NAME=CHECKPOINT)")


# How HTTP reaches the replicas (see ingress_environment) -> the setting that turns it on.
INGRESS_ENV = {"proxy": None, "direct": "RAY_SERVE_ENABLE_DIRECT_INGRESS",
               "haproxy": "RAY_SERVE_ENABLE_HA_PROXY"}


def default_ingress() -> str:
    """HAProxy where distdl can run it (ray[serve] installs its binary on Linux), else Serve's
    proxy. Through HAProxy, a batched replica served 2.6x (ResNet-18) and 3.6x (digits) the
    requests/s it served through Serve's proxy on 2 cores (README, Benchmark)."""
    return "haproxy" if haproxy.real_binary() and haproxy.launcher() else "proxy"


def ingress_environment(kind: str, host: str) -> dict[str, str]:
    """The environment that makes a Ray that distdl starts serve HTTP on `host` with `kind`.

    - proxy: Serve's Python HTTP proxy on --port calls the replica (several ms of CPU per
      request).
    - direct: as proxy, and each ingress replica also answers on a port of its own.
    - haproxy: HAProxy listens on --port and forwards to the replicas' own ports. Ray would
      bind its stats page (:8404) and Prometheus exporter (:9101) on every interface; distdl's
      launcher puts them on `host` (RAY_SERVE_HAPROXY_STATS_PORT and
      RAY_SERVE_HAPROXY_METRICS_PORT move them; a RAY_SERVE_HAPROXY_BINARY_PATH set by the
      user wins, and with it Ray's own binds).

    Serve reads the setting when its processes start: on a cluster, it belongs in the nodes'
    environment. Replicas with a port of their own normally drain for 30 s before stopping, for
    outside load balancers; one replica on one machine needs only its own graceful timeout.
    """
    if not INGRESS_ENV[kind]:
        return {}
    env = {INGRESS_ENV[kind]: "1", "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S":
           os.environ.get("RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S", "1")}
    if kind == "haproxy":
        launcher = haproxy.launcher()
        if launcher is None or haproxy.real_binary() is None:
            raise UserError(f"--ingress haproxy needs an HAProxy binary (ray[serve] installs one "
                            f"on Linux) and distdl's {haproxy.LAUNCHER} command (reinstall "
                            "distdl); or choose --ingress proxy")
        env[haproxy.HOST_ENV] = host
        env[haproxy.BINARY_ENV] = os.environ.get(haproxy.BINARY_ENV, launcher)
    return env


def replica_urls(name: str) -> list[str]:
    """With direct ingress, the URL of each replica of application `name`, else nothing."""
    import ray
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    groups = ray.get(controller.get_target_groups.remote(app_name=name))
    return [f"http://{t.ip}:{t.port}{g.route_prefix}" for g in groups
            if g.app_name == name and g.protocol.value == "HTTP" for t in g.targets
            if t.name.startswith("SERVE_REPLICA::")]


def stop(names: list[str], *, local: bool) -> None:
    """Graceful stop: replicas finish the requests they hold. A local Serve shuts down entirely;
    on a shared cluster only these applications go."""
    from ray import serve

    # Deleting an application lets its replicas finish what they hold; shutting Serve down
    # kills its proxies at once, with whatever they are answering.
    for name in names:
        serve.delete(name)
    if set(serve.status().applications) == {HEALTH_APP}:
        serve.delete(HEALTH_APP)
    if local:
        _shut_down_local_serve()


def _shut_down_local_serve() -> None:
    """What serve.shutdown() does, less a line of Ray's on the console: Serve's call to its
    controller ends, by design, with the controller's death, and as the call may be retried Ray
    prints "Task ServeController.graceful_shutdown failed ... will be retried". Made without
    retries, the same call ends the same way, silently."""
    import ray
    from ray.serve.context import _get_global_client

    controller = _get_global_client()._controller
    try:
        ray.get(controller.graceful_shutdown.options(max_task_retries=0).remote(), timeout=60)
    except ray.exceptions.RayActorError:
        pass  # the controller exits once the applications and proxies have stopped
    except ray.exceptions.GetTimeoutError:
        log.warning("Serve did not stop within 60 s; stopping Ray ends it")
