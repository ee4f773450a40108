"""How many torch threads a training worker runs, and addresses refused before joining Ray."""

from __future__ import annotations

import os

import pytest

from distdl import runtime
from distdl.errors import UserError


def test_a_worker_runs_its_whole_cpus_but_never_more_threads_than_cores():
    cores = os.cpu_count()
    assert runtime.torch_threads(0.5) == 1
    assert runtime.torch_threads(1) == 1
    assert runtime.torch_threads(1024) == cores  # a local Ray grants CPUs past the cores


def test_an_http_address_is_refused_before_joining():
    with pytest.raises(UserError, match=r"Ray address http://127.0.0.1:8265 is an HTTP address "
                                        r"\(a dashboard's"):
        runtime.connect("http://127.0.0.1:8265")
