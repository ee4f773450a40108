"""Shared fixtures. Integration tests share one local Ray instance (starting Ray costs seconds)."""

from __future__ import annotations

import os

import pytest

from tests.integration.cli import run_cli


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
