"""Running the real `distdl` command in a subprocess, joined to the test session's Ray."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest


def run_cli(*args: str, address: str | None = None, timeout: float = 300,
            cwd=None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "distdl.cli", *args]
    if address:
        command += ["--address", address]
    try:
        return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                              env=env)
    except subprocess.TimeoutExpired as hung:
        pytest.fail(f"distdl {args[0]} still running after {timeout:.0f} s:\n"
                    f"{_text(hung.stdout)[-6000:]}\n{_text(hung.stderr)[-3000:]}\n{_ray_state()}")


def _text(output: bytes | str | None) -> str:
    if isinstance(output, bytes):
        return output.decode(errors="replace")
    return output or ""


def _ray_state() -> str:
    """What the session's Ray holds, to tell a hang waiting for resources from any other."""
    import ray

    if not ray.is_initialized():
        return "(no Ray in the test process)"
    from ray.util.state import list_actors

    try:
        # This session's Ray by address: a test may have started another on this machine.
        address = ray.get_runtime_context().gcs_address
        actors = [f"{a.class_name} {a.state} pid={a.pid}"
                  for a in list_actors(address=address, limit=200) if a.state != "DEAD"]
        return (f"available {ray.available_resources()} of {ray.cluster_resources()}\n"
                "actors not dead:\n  " + "\n  ".join(actors))
    except Exception as exc:  # the hang's report must not be lost to a second failure
        return f"(Ray's state could not be read: {exc})"


def fresh_shell_env() -> dict[str, str]:
    """This process's environment without what starting the session's Ray added to it (the
    auth mode, loopback-only Ray): what a user's new terminal has."""
    added = ("RAY_AUTH_MODE", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")
    return {k: v for k, v in os.environ.items() if k not in added}


def popen_cli(*args: str, address: str | None, **kwargs) -> subprocess.Popen:
    """The command running in the background; address None lets it start its own Ray."""
    command = [sys.executable, "-m", "distdl.cli", *args]
    if address:
        command += ["--address", address]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kwargs)
