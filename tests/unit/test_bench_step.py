"""`distdl bench step` with a tiny model: the report holds both sides and their ratio."""

from __future__ import annotations

import json

import pytest
import torch

from distdl.bench.step import StepSettings, format_report, run
from tests.integration.cli import run_cli


def test_step_benchmark_reports_both_sides_and_their_ratio():
    report = run(StepSettings(model="small_cnn", width=8, image_size=8, batch_size=32, steps=3,
                              rounds=1))
    assert report["device"] == ("cuda" if torch.cuda.is_available() else "cpu")
    for key in ("train", "predict_batch_1", "predict_batch_32"):
        r = report[key]
        assert r["distdl_samples_per_s"] > 0 and r["bare_samples_per_s"] > 0
        assert r["ratio_vs_bare"] == pytest.approx(
            r["distdl_samples_per_s"] / r["bare_samples_per_s"], abs=2e-3)
    assert "ratio" in format_report(report)
    json.dumps(report)  # the CLI prints it as one JSON line


@pytest.mark.parametrize("args, message", [
    (["--steps", "0"], "argument --steps: must be at least 1"),
    (["--model", "nope"], "error: unknown model 'nope'"),
])
def test_step_benchmark_bad_input_is_one_line(args, message):
    done = run_cli("bench", "step", *args, timeout=60)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1
    assert message in lines[0]


@pytest.mark.parametrize(("workers", "cpus", "threads"), [(2, 1.0, 2), (2, 0.5, 2), (2, 1.5, 2),
                                                          (4, 2.0, 8)])
def test_the_bare_training_loop_gets_the_threads_of_all_the_workers(workers, cpus, threads):
    from distdl.bench.train import worker_threads
    from distdl.config import TrainConfig

    train = TrainConfig(num_workers=workers, cpus_per_worker=cpus, batch_size=8 * workers)
    assert worker_threads(train) == threads
