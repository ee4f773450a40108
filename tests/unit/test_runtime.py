"""How many torch threads a training worker runs."""

from __future__ import annotations

import os

from distdl import runtime


def test_a_worker_runs_its_whole_cpus_but_never_more_threads_than_cores():
    cores = os.cpu_count()
    assert runtime.torch_threads(0.5) == 1
    assert runtime.torch_threads(1) == 1
    assert runtime.torch_threads(1024) == cores  # a local Ray grants CPUs past the cores
