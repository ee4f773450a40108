"""What a rerun of `distdl train` may change in a run it continues, a damaged run folder, and
where a run folder can go."""

from __future__ import annotations

from pathlib import Path

import pytest

from distdl import recipes
from distdl.config import resolve
from distdl.errors import UserError
from distdl.train import rundir


def _config(*overrides: str):
    return resolve(recipes.get("debug"), None, list(overrides))


@pytest.fixture
def run_dir(tmp_path):
    """A run directory of run 'debug' that recorded two epochs."""
    rundir.write_config(tmp_path, _config().to_dict(), {"distdl": "test"})
    for epoch in (1, 2):
        rundir.append_epoch(tmp_path, {"epoch": epoch})
    return tmp_path


def test_more_epochs_or_workers_continue_the_run(run_dir):
    assert rundir.epochs_recorded(_config("train.epochs=4", "train.num_workers=1"), run_dir) == 2


def test_dropout_and_the_memory_budget_may_change_on_a_resume(run_dir):
    """Neither changes what a checkpoint holds."""
    changed = _config("model.dropout=0.3", "data.cache_max_mb=0", "train.epochs=4")
    assert rundir.epochs_recorded(changed, run_dir) == 2


@pytest.mark.parametrize("override, changed", [
    ("optim.lr=1e-4", "optim"),
    ("optim.optimizer=sgd", "optim"),
    ("train.batch_size=128", "train.batch_size"),
    ("model.width=16", "model"),
    ("data.seed=7", "data"),
])
def test_settings_a_resume_cannot_keep_are_refused(run_dir, override, changed):
    with pytest.raises(UserError, match=f"was trained with other {changed} settings"):
        rundir.epochs_recorded(_config(override), run_dir)


def test_the_run_directory_of_another_run_is_refused(run_dir):
    with pytest.raises(UserError, match="holds run 'debug', not 'other'.*--name debug"):
        rundir.epochs_recorded(_config("name=other"), run_dir)


def test_runs_in_two_uri_storages_get_two_run_directories():
    first = rundir.default_run_dir("s3://bucket/runs", "digits")
    assert first.parts[0] == "runs" and first.parts[2] == "digits"
    assert first.parts[1].startswith("s3-bucket-runs-")
    others = ["gs://bucket/runs", "s3://bucket/runs-a", "s3://bucket/runs/a", "s3://bucket/ü"]
    folders = {rundir.default_run_dir(uri, "digits") for uri in [*others, "s3://bucket"]}
    assert first not in folders and len(folders) == len(others) + 1
    # A query or a user part may hold credentials: neither shows, nor changes the folder.
    for uri in ("s3://bucket/runs?access_key=SECRET", "s3://KEY:SECRET@bucket/runs"):
        assert rundir.default_run_dir(uri, "digits") == first


def test_damaged_run_files_are_one_line(run_dir):
    (run_dir / rundir.METRICS_FILE).write_text('{"epoch": 1}\n{"epoch": 2\n')
    with pytest.raises(UserError, match=r"metrics.jsonl: line 2 is not an epoch's metrics"):
        rundir.read_metrics(run_dir)
    for other in ('{"loss": 1}\n', "[]\n", '{"epoch": "1"}\n'):  # JSON, but another tool's
        (run_dir / rundir.METRICS_FILE).write_text(other)
        with pytest.raises(UserError, match=r"line 1 is not an epoch's metrics"):
            rundir.read_metrics(run_dir)
    (run_dir / rundir.METRICS_FILE).write_bytes(b'{"epoch": 1}\n\xff\n')
    with pytest.raises(UserError, match=r"metrics.jsonl: it is not UTF-8 text"):
        rundir.read_metrics(run_dir)
    for damaged in ("", '{"best_checkpoint": "x", ', '{"best_val_accuracy": 0.9}'):
        (run_dir / rundir.RESULT_FILE).write_text(damaged)
        with pytest.raises(UserError, match=r"result.json: it is not a finished run's result"):
            rundir.read_result(run_dir)
    result = {"best_checkpoint": None, "best_val_accuracy": None, "epochs_completed": 2,
              "wall_s": 1.0}
    rundir.write_result(run_dir, result)
    assert rundir.read_result(run_dir) == result
    assert sorted(p.name for p in run_dir.iterdir() if "result" in p.name) == ["result.json"]
    (run_dir / rundir.METRICS_FILE).write_text('{"epoch": 1}\n')
    (run_dir / rundir.CONFIG_FILE).write_text("optim: [1, 2\n")
    with pytest.raises(UserError, match="cannot read .*config.yaml"):
        rundir.epochs_recorded(_config(), run_dir)


def test_an_output_folder_that_can_be_made_passes_and_leaves_nothing(tmp_path):
    rundir.check_writable(tmp_path / "runs" / "digits")
    assert list(tmp_path.iterdir()) == []


def test_an_output_folder_under_a_file_is_refused(tmp_path):
    (tmp_path / "notes").write_text("")
    with pytest.raises(UserError, match="notes is a file; choose another --output"):
        rundir.check_writable(tmp_path / "notes" / "run")


def test_an_output_folder_under_proc_is_refused_even_for_root():
    # os.access says yes to root here; making a file says no.
    with pytest.raises(UserError, match=r"cannot write to /proc/distdl-run: /proc is not writable"):
        rundir.check_writable(Path("/proc/distdl-run"))
