"""A worker node crashes mid-training (its raylet and the workers under it are SIGKILLed) and
rejoins: the job still succeeds."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from distdl import cluster

pytestmark = [pytest.mark.slow, pytest.mark.cluster]

REPO = Path(__file__).resolve().parents[2]
EPOCHS = 30
BATCH = 16  # 45 steps per rank and epoch, about 0.5 s: training goes on long after the kill


def _first_epoch(metrics: Path, job: subprocess.Popen, timeout: float = 150) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if metrics.is_file() and metrics.read_text().strip():
            return json.loads(metrics.read_text().splitlines()[0])
        assert job.poll() is None, job.stdout.read()
        time.sleep(0.2)
    raise AssertionError("no epoch finished")


def _crash(state: dict, name: str) -> list[str]:
    """SIGKILL node `name`'s raylet and every process under it, at once, as a machine crash would.
    Killing only the raylet leaves its workers to notice on their own, which may take longer
    than the rest of the run. Returns the killed processes' command lines."""
    leader = next(n for n in state["nodes"] if n["name"] == name)
    raylet = next(p for p in psutil.Process(leader["pid"]).children(recursive=True)
                  if p.name() == "raylet")
    killed = []
    for proc in [raylet, *raylet.children(recursive=True)]:
        try:
            killed.append(" ".join(proc.cmdline()))
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    return killed


def test_training_survives_a_killed_worker_node(local_cluster, cluster_env):
    directory = Path(local_cluster["dir"])
    run_dir = Path(local_cluster["storage"]) / "fault"
    job = subprocess.Popen(
        [sys.executable, "-m", "distdl.cli", "submit", "--address", local_cluster["dashboard_url"],
         "--follow", "--", "train", "--recipe", "debug", "--set", f"train.epochs={EPOCHS}",
         "--set", f"train.batch_size={BATCH}", "--set", "train.max_failures=2",
         "--storage", local_cluster["storage"], "--name", "fault"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=cluster_env, cwd=REPO)
    ranks_on = set(_first_epoch(run_dir / "metrics.jsonl", job)["nodes"])
    state = json.loads((directory / "cluster.json").read_text())
    names = {n["node_id"]: next(k for k in n["resources_total"] if k.startswith("node_"))
             for n in cluster.nodes(state)}
    victim_id = next(i for i in ranks_on if names[i] != "node_head")
    victim = names[victim_id]

    killed = _crash(state, victim)
    assert any("RayTrainWorker" in line for line in killed), killed
    done = len((run_dir / "metrics.jsonl").read_text().splitlines())
    assert done < EPOCHS - 5, "training ended before the fault: nothing was tested"
    cluster.restart_node(directory, victim)

    out, _ = job.communicate(timeout=300)
    assert job.returncode == 0, out
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    epochs = [json.loads(line)["epoch"] for line in lines]
    assert epochs == list(range(1, EPOCHS + 1))  # resumed from a checkpoint, nothing repeated
    result = json.loads((run_dir / "result.json").read_text())
    assert len(set(result["worker_nodes"])) == 2
    # The group did restart, off the dead node.
    assert victim_id not in result["worker_nodes"], "\n".join(lines)
