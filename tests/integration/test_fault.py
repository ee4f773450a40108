"""A Ray Train worker killed for real mid-run: the run restores from its latest checkpoint."""

from __future__ import annotations

import os
import signal
import subprocess
import time

import pytest

from distdl.train import rundir
from tests.integration.cli import popen_cli

EPOCHS = 5


def _worker_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ray::RayTrainWorker"], capture_output=True, text=True)
    return [int(pid) for pid in out.stdout.split()]


def _wait_for_epoch(run_dir, epoch: int, process: subprocess.Popen, timeout: float = 240):
    deadline = time.time() + timeout
    while time.time() < deadline and process.poll() is None:
        history = rundir.read_metrics(run_dir)
        if history and history[-1]["epoch"] >= epoch:
            return history
        time.sleep(0.1)
    pytest.fail(f"epoch {epoch} never finished; output:\n{process.communicate()[0][-3000:]}")


@pytest.mark.slow
def test_killed_worker_restarts_from_the_latest_checkpoint(ray_address, tmp_path):
    # Generated 32x32 images make epochs long enough to kill a worker inside one.
    process = popen_cli(
        "train", "--recipe", "debug", "--name", "fault", "--storage", str(tmp_path),
        "--set", "data.source=shapes", "--set", "data.num_samples=3000",
        "--set", "data.image_size=32", "--set", f"train.epochs={EPOCHS}",
        "--set", "train.max_failures=1", address=ray_address,
    )
    try:
        before = _wait_for_epoch(tmp_path / "fault", 2, process)
        pids = _worker_pids()
        assert len(pids) == 2, pids
        os.kill(pids[0], signal.SIGKILL)
        output, _ = process.communicate(timeout=300)
    finally:
        process.kill()
    assert process.returncode == 0, output[-3000:]
    after = rundir.read_metrics(tmp_path / "fault")
    assert [m["epoch"] for m in after] == list(range(1, EPOCHS + 1))
    # Epochs checkpointed before the kill were kept, not trained again from scratch.
    assert after[:len(before)] == before
    assert rundir.read_result(tmp_path / "fault")["epochs_completed"] == EPOCHS
