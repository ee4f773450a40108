"""`distdl bench train` end to end, with its own local Ray (it shuts Ray down for the baseline)."""

from __future__ import annotations

import json

import pytest

from tests.integration.cli import run_cli


@pytest.mark.slow
def test_train_benchmark_reports_the_ratio_and_the_fixed_overhead(tmp_path):
    report_file = tmp_path / "bench.json"
    done = run_cli("bench", "train", "--recipe", "debug", "--set", "train.epochs=3",
                   "--json", str(report_file), timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(report_file.read_text())
    assert json.loads(done.stdout.strip().splitlines()[-1]) == report
    assert report["distdl_samples_per_s"] > 0 and report["bare_samples_per_s"] > 0
    assert report["ratio_vs_bare"] == pytest.approx(
        report["distdl_samples_per_s"] / report["bare_samples_per_s"], abs=2e-3)
    assert 0 < report["seconds_to_first_step"] < report["seconds_to_end"]
    epochs_s = report["seconds_to_end"] - report["seconds_to_first_step"]
    # Three epochs: the one period is from the second's start to the third's.
    assert 0 < report["epoch_period_s"] < epochs_s / 2
    assert report["ray_train_floor_s"] > 0  # the plainest Ray Train run really ran
    assert "plainest Ray Train run" in done.stdout
    assert (report["epochs"], report["workers"], report["model"]) == (3, 2, "small_cnn")
    assert "ratio vs bare" in done.stdout
