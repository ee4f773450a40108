"""One real multi-node cluster on this machine (a head and 2 worker nodes) for tests/cluster."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


def distdl(*args: str, env: dict[str, str] | None = None, timeout: float = 240,
           cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "distdl.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env, cwd=cwd)


def group_pids(pgids: set[int]) -> set[int]:
    """Running (not zombie) processes in the given process groups."""
    out = subprocess.run(["ps", "-eo", "pid=,pgid=,stat="], capture_output=True, text=True).stdout
    rows = [line.split() for line in out.splitlines()]
    return {int(pid) for pid, pgid, stat in rows if int(pgid) in pgids and not stat.startswith("Z")}


@pytest.fixture(scope="package")
def local_cluster(tmp_path_factory):
    """`distdl cluster up --workers 2`; torn down by pid, and checked that nothing is left.
    Down when this folder's tests end: its three nodes would take CPU from every later test."""
    directory = tmp_path_factory.mktemp("cluster")
    up = distdl("cluster", "up", "--workers", "2", "--dir", str(directory), timeout=180)
    assert up.returncode == 0, up.stdout + up.stderr
    state = json.loads((directory / "cluster.json").read_text())
    pgids = {node["pid"] for node in state["nodes"]}
    assert len(group_pids(pgids)) > len(pgids)  # the nodes' raylets, GCS, dashboard, ...
    yield state
    # A fault test may have restarted a node: its new process group is ours too.
    current = json.loads((directory / "cluster.json").read_text())
    pgids |= {node["pid"] for node in current["nodes"]}
    down = distdl("cluster", "down", "--dir", str(directory), timeout=120)
    assert down.returncode == 0, down.stdout + down.stderr
    assert group_pids(pgids) == set()
    assert not (directory / "cluster.json").exists()


@pytest.fixture(scope="package")
def cluster_env(local_cluster) -> dict[str, str]:
    """What a client of the cluster needs: token mode and the cluster's token file."""
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_TOKEN", "RAY_ADDRESS")}
    env.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=local_cluster["token_path"])
    return env
