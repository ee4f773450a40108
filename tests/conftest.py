"""Shared fixtures. Integration tests share one local Ray instance (starting Ray costs seconds)."""

from __future__ import annotations

import os

import pytest


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
