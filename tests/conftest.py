"""Shared fixtures. Integration tests share one local Ray instance (starting Ray costs seconds)."""

from __future__ import annotations

import os
import signal

import pytest

from tests.integration.cli import run_cli


def pytest_configure(config):
    """Commands the tests start must take Ctrl-C (SIGINT) as they do in a terminal. A suite run
    as a background job (`... &` in a script) inherits SIGINT ignored, and would pass that on
    to every command it starts, which would then never stop on it."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(scope="session")
def ray_address():
    """A local Ray on loopback for the whole session; returns its address for subprocesses."""
    import ray

    from distdl.runtime import connect

    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # With the dashboard, as a search needs: Ray Train frees stopped trials' workers through it.
    address = connect(None, num_cpus=4, dashboard=True)
    yield address
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_run(ray_address, tmp_path_factory):
    """The default `distdl train` (digits_cpu), once: training and serving tests share it."""
    storage = tmp_path_factory.mktemp("storage")
    done = run_cli("train", "--storage", str(storage), address=ray_address, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return storage / "digits", done.stdout
