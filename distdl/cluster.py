"""A real multi-node Ray cluster on one machine: a head and N worker nodes, each a `ray start`.

Every node is a separate `ray start --block` process in its own process group, so `down` can stop
exactly what `up` started (by process group) and never touches another Ray on the machine. All of
it binds to 127.0.0.1, uses token authentication with a token of its own (DIR/auth_token), and
shares one storage folder (DIR/storage) for checkpoints. DIR/cluster.json records what was started.

Run as `python -m distdl.cluster start ...` it is the `ray start` of one node, bound to loopback.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import psutil

from distdl.errors import UserError

log = logging.getLogger(__name__)

STATE_FILE = "cluster.json"
STATE_KEYS = {"dir", "dashboard_url", "token_path", "temp_dir", "nodes"}  # what down and status read
NODE_KEYS = {"name", "pid", "started"}
TOKEN_FILE = "auth_token"
OBJECT_STORE_BYTES = 512 * 2**20  # per node: enough for the digits and shapes data, not 30% of RAM
START_TIMEOUT_S = 60.0
STOP_GRACE_S = 8.0  # `ray start --block` stops its children on SIGTERM, but not always all of them


def up(directory: Path, workers: int) -> dict[str, Any]:
    """Start a head and `workers` worker nodes; write and return DIR/cluster.json."""
    if workers < 0:
        raise UserError(f"--workers {workers}: the number of worker nodes must be 0 or more")
    directory = directory.expanduser().resolve()
    if _read_state(directory) and _alive(_read_state(directory)):
        raise UserError(f"a cluster is already running in {directory}; stop it with "
                        f"`distdl cluster down --dir {directory}`")
    _make_folder(directory)
    state = _new_state(directory)
    env = node_env(state)
    try:
        state["nodes"].append(_start_node(state, env, "head", _head_args(state)))
        write_state(state)  # from here on, `down` can stop what was started
        _wait_for_nodes(state, 1)
        for i in range(1, workers + 1):
            name = f"node_{i}"
            state["nodes"].append(_start_node(state, env, name, _worker_args(state, name)))
            write_state(state)
            # One at a time: on 2 busy cores, raylets registering together can miss Ray's
            # 30 s startup deadline.
            _wait_for_nodes(state, i + 1)
    except BaseException:
        _stop_nodes(state)
        shutil.rmtree(state["temp_dir"], ignore_errors=True)
        (directory / STATE_FILE).unlink(missing_ok=True)
        raise
    return state


def _make_folder(directory: Path) -> None:
    """Create --dir and its storage/ folder, or one UserError saying why it cannot be."""
    for folder in (directory, directory / "storage"):
        if folder.exists() and not folder.is_dir():
            raise UserError(f"--dir {directory}: {folder} is a file, not a folder; choose "
                            "another --dir")
    try:
        (directory / "storage").mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"--dir {directory}: cannot create the folder ({exc.strerror or exc}); "
                        "choose a folder you can write") from None
    if not os.access(directory, os.W_OK | os.X_OK):
        raise UserError(f"--dir {directory}: the folder is not writable; choose a folder you "
                        "can write")


def _new_state(directory: Path) -> dict[str, Any]:
    token = directory / TOKEN_FILE
    token.unlink(missing_ok=True)
    # Readable by this user only, from its creation on; 256 bits, as Ray's own generator.
    with os.fdopen(os.open(token, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w") as out:
        out.write(secrets.token_hex(32))
    gcs_port, dashboard_port = _free_port(), _free_port()
    # Ray's Unix sockets live under the temp dir, and their paths must stay under 108 bytes.
    temp_dir = tempfile.mkdtemp(prefix="distdl-ray-", dir="/tmp")
    return {
        "dir": str(directory),
        "gcs_address": f"127.0.0.1:{gcs_port}",
        "dashboard_url": f"http://127.0.0.1:{dashboard_port}",
        "token_path": str(token),
        "storage": str(directory / "storage"),
        "temp_dir": temp_dir,
        "nodes": [],
    }


def _head_args(state: dict[str, Any]) -> list[str]:
    return [
        "--head",
        f"--port={state['gcs_address'].rsplit(':', 1)[1]}",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={state['dashboard_url'].rsplit(':', 1)[1]}",
        f"--ray-client-server-port={_free_port()}",
        f"--temp-dir={state['temp_dir']}",
        f"--resources={json.dumps({'node_head': 1})}",
    ]


def _worker_args(state: dict[str, Any], name: str) -> list[str]:
    # A temp dir of its own, as on a machine of its own: sharing the head's, a node's agent
    # unpacked each job's working directory again as the job's driver started, deleting it
    # first, under the running driver (seen as ImportErrors of modules imported late).
    return [f"--address={state['gcs_address']}", f"--resources={json.dumps({name: 1})}",
            f"--temp-dir={state['temp_dir']}/{name}"]


def node_env(state: dict[str, Any]) -> dict[str, str]:
    """The environment of every node, and so of every job driver and worker they start."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_ADDRESS")}
    env.update(
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN_PATH=state["token_path"],
        # Off "cluster mode", Ray keeps 127.0.0.1 instead of resolving it to the machine's address,
        # in the nodes and in every driver that connects from inside them.
        RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER="0",
        # Jobs run `python`: this one, whose environment has distdl's dependencies.
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    )
    return env


def _start_node(state: dict[str, Any], env: dict[str, str], name: str,
                args: list[str]) -> dict[str, Any]:
    log_path = Path(state["dir"]) / f"{name}.log"
    command = [
        sys.executable, "-m", "distdl.cluster", "start", "--block",
        "--node-ip-address=127.0.0.1", "--num-cpus=1",
        f"--object-store-memory={OBJECT_STORE_BYTES}",
        # Fixed by default (52365): each node on this machine needs its own.
        f"--dashboard-agent-listen-port={_free_port()}",
        "--disable-usage-stats", *args,
    ]
    with open(log_path, "w") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    log.info("started %s (pid %d), log %s", name, proc.pid, log_path)
    return {"name": name, "pid": proc.pid, **_start_stamp(proc.pid), "log": str(log_path)}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_nodes(state: dict[str, Any], count: int) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        dead = [n["name"] for n in state["nodes"] if not _process_alive(n)]
        if dead:
            raise UserError(f"node {dead[0]} exited while starting; "
                            f"see {state['dir']}/{dead[0]}.log")
        try:
            if len(nodes(state)) >= count:
                return
        except (OSError, urllib.error.URLError, ValueError, KeyError):
            pass  # the dashboard is not up yet
        time.sleep(1.0)
    raise UserError(f"the cluster did not reach {count} nodes in {START_TIMEOUT_S:.0f} s; "
                    f"see the logs in {state['dir']}")


def nodes(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Alive nodes, from the dashboard's state API (authenticated with the cluster's token)."""
    url = f"{state['dashboard_url']}/api/v0/nodes?detail=1&limit=1000"
    token = Path(state["token_path"]).read_text().strip()
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=10) as response:
        body = json.load(response)
    found = body["data"]["result"]["result"]
    return [n for n in found if n.get("state") == "ALIVE"]


def status(directory: Path) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The recorded state and the alive nodes; UserError when no cluster runs in `directory`."""
    state = _require_running(directory)
    try:
        return state, nodes(state)
    except (OSError, urllib.error.URLError, ValueError) as exc:
        raise UserError(f"the cluster in {directory} does not answer at {state['dashboard_url']} "
                        f"({exc}); stop it with `distdl cluster down --dir {directory}`") from None


def restart_node(directory: Path, name: str) -> dict[str, Any]:
    """Stop what is left of worker node `name` and start it again; it rejoins with a new node id."""
    state = _require_running(directory)
    index = next((i for i, n in enumerate(state["nodes"]) if n["name"] == name), None)
    if index is None or index == 0:
        raise UserError(f"no worker node {name} in {state['dir']}")
    _stop_nodes({"nodes": [state["nodes"][index]]})
    before = {n["node_id"] for n in nodes(state)}
    state["nodes"][index] = _start_node(state, node_env(state), name, _worker_args(state, name))
    write_state(state)
    deadline = time.monotonic() + START_TIMEOUT_S
    while not any(n["node_id"] not in before and name in n["resources_total"]
                  for n in nodes(state)):
        if time.monotonic() > deadline or not _process_alive(state["nodes"][index]):
            raise UserError(f"node {name} did not rejoin; see {state['nodes'][index]['log']}")
        time.sleep(1.0)
    return state


def down(directory: Path) -> list[int]:
    """Stop exactly the processes `up` started (and all they spawned); return the stopped pids."""
    directory = directory.expanduser().resolve()
    state = _read_state(directory)
    if state is None:
        raise UserError(f"no cluster was started in {directory} (no {STATE_FILE}); "
                        "start one with `distdl cluster up`")
    stopped = _stop_nodes(state)
    shutil.rmtree(state["temp_dir"], ignore_errors=True)
    (directory / STATE_FILE).unlink()
    return stopped


def _stop_nodes(state: dict[str, Any]) -> list[int]:
    """SIGTERM every process of every node, workers before the head, then SIGKILL what is left.

    A node's processes are its `ray start` process, its descendants (Ray's workers, each in a
    process group of its own, are the raylet's children), and whatever is still in the node's
    process group (a process whose parent died is no descendant).
    Signalling through psutil checks each process's start time, so a reused pid is never hit.
    """
    procs = _node_processes(state)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for proc in procs:
            _signal(proc, sig)
        procs = _wait_gone(procs, STOP_GRACE_S)
        if not procs:
            break
    if procs:
        raise UserError(f"processes {[p.pid for p in procs]} of the cluster did not stop")
    return [n["pid"] for n in state["nodes"]]


def _node_processes(state: dict[str, Any]) -> list[Any]:

    found: dict[int, psutil.Process] = {}
    for node in reversed(state["nodes"]):
        if _process_alive(node):
            leader = psutil.Process(node["pid"])
            found.update((p.pid, p) for p in [leader, *leader.children(recursive=True)])
    # A process group id is never handed out again while the group has members, so a group
    # named after a node's pid still holds only that node's processes.
    groups = {n["pid"] for n in state["nodes"]}
    for proc in psutil.process_iter():
        try:
            if os.getpgid(proc.pid) in groups:
                found.setdefault(proc.pid, proc)
        except (ProcessLookupError, psutil.Error):
            continue
    return list(found.values())


def _signal(proc: Any, sig: signal.Signals) -> None:

    try:
        proc.send_signal(sig)
    except psutil.Error:
        pass  # gone already


def _wait_gone(procs: list[Any], timeout: float) -> list[Any]:
    """The processes still running after `timeout` s (zombies count as gone: init reaps them)."""
    deadline = time.monotonic() + timeout
    while procs and time.monotonic() < deadline:
        time.sleep(0.2)
        procs = [p for p in procs if _running(p)]
    return procs


def _running(proc: Any) -> bool:

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _start_stamp(pid: int) -> dict[str, float]:
    """When process `pid` started, to tell it from a later process of the same pid:
    "started", psutil's create_time, and on Linux "start_ticks", clock ticks from boot to its
    start. create_time adds the boot time as the wall clock now gives it, so it moves when the
    clock is stepped (time sync, a paused machine resumed): a running node then looked stopped."""
    stamp = {"started": psutil.Process(pid).create_time()}
    stat = Path(f"/proc/{pid}/stat")
    if stat.exists():
        # The fields after the command name's closing parenthesis; starttime is the 22nd field.
        stamp["start_ticks"] = int(stat.read_text().rsplit(")", 1)[1].split()[19])
    return stamp


def _process_alive(node: dict[str, Any]) -> bool:
    """The node's own process still runs (the same process: its start matches)."""
    try:
        proc = psutil.Process(node["pid"])
        now = _start_stamp(proc.pid)
        # cluster.json files from before start_ticks, and systems without /proc, have "started".
        key = "start_ticks" if "start_ticks" in node and "start_ticks" in now else "started"
        return now[key] == node[key] and _running(proc)
    except (psutil.Error, OSError):  # OSError: it ended as /proc was read
        return False


def _alive(state: dict[str, Any]) -> bool:
    return any(_process_alive(n) for n in state["nodes"])


def _read_state(directory: Path) -> dict[str, Any] | None:
    """DIR/cluster.json, or None where there is none; a UserError where it cannot be read,
    which a user can fix (an interrupted write, an edit)."""
    path = directory.expanduser().resolve() / STATE_FILE
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as exc:  # JSONDecodeError and UnicodeDecodeError among them
        problem = getattr(exc, "strerror", None) or "it is empty or not valid JSON"
        raise UserError(_unreadable(path, problem)) from None
    if not (isinstance(state, dict) and STATE_KEYS <= set(state)
            and isinstance(state["nodes"], list)
            and all(isinstance(n, dict) and NODE_KEYS <= set(n) for n in state["nodes"])):
        raise UserError(_unreadable(path, "it does not record a cluster's nodes"))
    return state


def _unreadable(path: Path, problem: str) -> str:
    return (f"cannot read {path}: {problem}; if a cluster of it still runs, stop its `ray start` "
            "processes (their logs in that folder name them), then delete the file")


def write_state(state: dict[str, Any]) -> Path:
    path = Path(state["dir"]) / STATE_FILE
    path.write_text(json.dumps(state, indent=2) + "\n")
    return path


def _require_running(directory: Path) -> dict[str, Any]:
    state = _read_state(directory)
    if state is None or not _alive(state):
        raise UserError(f"no cluster is running in {directory.expanduser().resolve()}; "
                        "start one with `distdl cluster up`")
    return state


def _start_loopback_node(argv: list[str]) -> None:
    """`ray start ARGV` for a node of this cluster, bound to 127.0.0.1 only.

    The nodes run with cluster mode off (see node_env), under which `ray start` would resolve
    nothing to a routable address but also refuses to join a head; this process alone turns it
    back on and keeps the given --node-ip-address=127.0.0.1 as it is.
    """
    from ray._private import ray_constants, services
    from ray.scripts.scripts import main

    ray_constants.ENABLE_RAY_CLUSTER = True
    services.resolve_ip_for_localhost = lambda host: host
    sys.argv = ["ray", *argv]
    main()


if __name__ == "__main__":
    _start_loopback_node(sys.argv[1:])
