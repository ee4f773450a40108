"""Running the real `distdl` command in a subprocess, joined to the test session's Ray."""

from __future__ import annotations

import os
import subprocess
import sys


def run_cli(*args: str, address: str | None = None, timeout: float = 300,
            cwd=None, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "distdl.cli", *args]
    if address:
        command += ["--address", address]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd,
                          env=env)


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
