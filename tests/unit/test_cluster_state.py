"""cluster.json tells a node's process from a later process that reuses its pid."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil

from distdl import cluster


def _node(pid: int, **stamp) -> dict:
    return {"name": "head", "pid": pid, **stamp}


def test_a_running_node_is_alive_and_a_changed_start_is_another_process():
    stamp = cluster._start_stamp(os.getpid())
    assert cluster._process_alive(_node(os.getpid(), **stamp))
    if "start_ticks" in stamp:
        # Ticks decide where both sides have them: a stepped wall clock does not matter.
        assert cluster._process_alive(_node(os.getpid(), **{**stamp, "started": 0.0}))
        assert not cluster._process_alive(
            _node(os.getpid(), **{**stamp, "start_ticks": stamp["start_ticks"] - 1}))


def test_a_cluster_json_from_before_start_ticks_is_read_by_create_time():
    started = psutil.Process(os.getpid()).create_time()
    assert cluster._process_alive(_node(os.getpid(), started=started))
    assert not cluster._process_alive(_node(os.getpid(), started=started - 5))


def test_an_ended_process_is_not_alive():
    ended = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    assert not cluster._process_alive(_node(int(ended.stdout), started=0.0, start_ticks=0))
