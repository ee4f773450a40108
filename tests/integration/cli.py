"""Running the real `distdl` command in a subprocess, joined to the test session's Ray."""

from __future__ import annotations

import subprocess
import sys


def run_cli(*args: str, address: str | None = None, timeout: float = 300,
            cwd=None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "distdl.cli", *args]
    if address:
        command += ["--address", address]
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=cwd)


def popen_cli(*args: str, address: str | None, **kwargs) -> subprocess.Popen:
    """The command running in the background; address None lets it start its own Ray."""
    command = [sys.executable, "-m", "distdl.cli", *args]
    if address:
        command += ["--address", address]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kwargs)
