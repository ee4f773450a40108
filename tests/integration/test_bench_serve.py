"""`distdl bench serve` end to end: its own Ray (twice: Serve's ingress is chosen at start-up),
then the bare server; short measurements, so only the report's shape and sums are checked."""

from __future__ import annotations

import json

import pytest

from distdl.bench.serve import PATHS, VARIANTS
from distdl.inference import AUTO_WAIT_MS
from tests.integration.cli import run_cli


@pytest.mark.slow
def test_serve_benchmark_measures_every_path_without_errors(tmp_path):
    report_file = tmp_path / "bench.json"
    done = run_cli("bench", "serve", "--model", "digits", "--clients", "4", "--seconds", "1",
                   "--port", "18410", "--json", str(report_file), timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "(raylet)" not in done.stdout  # Ray's notice of a retried call, as Serve shut down
    report = json.loads(report_file.read_text())
    assert report["batch_wait_ms"] == "auto"
    low, high = AUTO_WAIT_MS
    assert all(low <= report[f"serve_batched{suffix}"]["batch_wait_ms"] <= high
               for _, suffix, _ in PATHS)
    rate = {}
    for key in VARIANTS:
        assert report[key]["errors"] == 0 and report[key]["requests"] > 0, (key, report[key])
        assert report[key]["p50_ms"] <= report[key]["p99_ms"]
        rate[key] = report[key]["requests_per_s"]
    for prefix, suffix, words in PATHS:
        assert report[f"{prefix}ratio_vs_bare"] == pytest.approx(
            rate[f"serve_batched{suffix}"] / rate["bare_fastapi"], abs=2e-3)
        assert report[f"{prefix}ratio_vs_unbatched"] == pytest.approx(
            rate[f"serve_batched{suffix}"] / rate[f"serve_unbatched{suffix}"], abs=2e-3)
        assert words in done.stdout
