"""`distdl tune` for real: a local Ray, one TorchTrainer per trial, digits, a few epochs."""

from __future__ import annotations

import csv
import json
import os
import re
import shlex
import signal
import threading
import time
from pathlib import Path

import pytest
import ray.train
from ray import tune

from distdl import cli
from distdl.tune import report
from tests.integration.cli import popen_cli, run_cli

GOOD_LR = 1e-2
EPOCHS = 4
# Narrow models, one worker per trial, two trials at a time: the 2-core budget of the suite.
TINY = ("--recipe", "digits_tune", "--set", f"train.epochs={EPOCHS}", "--set", "model.width=8",
        "--set", "tune.num_samples=1", "--set", "tune.max_concurrent_trials=2")


@pytest.fixture(scope="module")
def lr_search(ray_address, tmp_path_factory):
    """ASHA over a good learning rate and two hopeless ones (too small to learn, divergent)."""
    storage = tmp_path_factory.mktemp("tune")
    started = time.time()
    done = run_cli("tune", *TINY, "--name", "lr", "--storage", str(storage),
                   "--set", f"tune.space={{optim.lr: {{grid: [{GOOD_LR}, 1.0e-5, 10.0]}}}}",
                   address=ray_address, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    print(f"lr search: {time.time() - started:.1f} s")
    return storage / "lr", done.stdout


def _result(run_dir: Path) -> dict:
    return json.loads((run_dir / report.RESULT_FILE).read_text())


@pytest.mark.slow
def test_search_picks_the_good_learning_rate(lr_search):
    run_dir, stdout = lr_search
    result = _result(run_dir)
    print({k: v for k, v in result.items() if k != "trials"})
    assert result["best_config"] == {"optim.lr": GOOD_LR}
    assert result["best_val_accuracy"] >= 0.85
    others = [t for t in result["trials"] if t["id"] != result["best_trial"]]
    assert len(others) == 2
    assert all(t["best_metric"] < result["best_val_accuracy"] - 0.3 for t in others)
    assert f"best trial {result['best_trial']}" in stdout
    # The command it prints trains with the search's settings and the best trial's values.
    (command,) = [line.split(": ", 1)[1] for line in stdout.splitlines()
                  if line.startswith("train with its values: ")]
    args = cli.build_parser().parse_args(shlex.split(command)[1:])
    cfg = cli._config(args)
    assert (cfg.optim.lr, cfg.train.epochs, cfg.model.width) == (GOOD_LR, EPOCHS, 8)
    assert (args.command, args.name, args.storage) == ("train", "lr-best", str(run_dir.parent))


@pytest.mark.slow
def test_asha_stops_a_poor_trial_before_its_last_epoch(lr_search):
    run_dir, _ = lr_search
    result = _result(run_dir)
    stopped = [t for t in result["trials"] if t["stopped_early"]]
    assert stopped and all(t["epochs_run"] < EPOCHS for t in stopped)
    assert all(t["config"]["optim.lr"] != GOOD_LR for t in stopped)
    assert result["stopped_early"] == len(stopped)
    best = next(t for t in result["trials"] if t["id"] == result["best_trial"])
    assert best["status"] == "completed" and best["epochs_run"] == EPOCHS
    with (run_dir / report.TRIALS_FILE).open() as f:
        rows = list(csv.DictReader(f))
    assert sorted(r["id"] for r in rows) == sorted(t["id"] for t in result["trials"])
    assert (run_dir / report.CURVES_FILE).stat().st_size > 0


@pytest.mark.slow
def test_best_checkpoint_evaluates_to_the_reported_accuracy(lr_search, ray_address, tmp_path):
    run_dir, _ = lr_search
    result = _result(run_dir)
    done = run_cli("evaluate", str(run_dir), "--output", str(tmp_path), address=ray_address)
    assert done.returncode == 0, done.stderr[-3000:]
    evaluation = json.loads((tmp_path / "evaluation.json").read_text())
    assert evaluation["checkpoint"] == result["best_checkpoint"]  # the search's folder stands for it
    assert evaluation["accuracy"] == pytest.approx(result["best_val_accuracy"], abs=1e-9)


def _finished_in_saved_state(experiment: Path) -> set[str]:
    """Trials that Tune's saved experiment state records as finished."""
    finished = set()
    for path in experiment.glob("experiment_state-*.json"):
        try:
            trials = [json.loads(state) for state, _ in json.loads(path.read_text())["trial_data"]]
        except (OSError, ValueError, KeyError):
            continue  # being written
        finished |= {t["trial_id"] for t in trials if t["status"] == "TERMINATED"}
    return finished


def test_trials_keep_the_checkpoints_their_search_metric_ranks_best(ray_address, tmp_path):
    """A search for the lowest val_loss must not lose that epoch's checkpoint to one that
    Ray Train kept for a higher val_accuracy."""
    from distdl import config, recipes
    from distdl.train import trainer
    from distdl.tune import driver

    cfg = config.resolve(recipes.get("debug"), None, ["tune.metric=val_loss", "tune.mode=min"])
    data = trainer.prepare_data(cfg)
    kept = driver.trial_trainer(cfg, data, storage=str(tmp_path),
                                 callbacks=[]).run_config.checkpoint_config
    assert (kept.checkpoint_score_attribute, kept.checkpoint_score_order) == ("val_loss", "min")
    plain = trainer.build_trainer(cfg, data, storage=str(tmp_path)).run_config.checkpoint_config
    assert (plain.checkpoint_score_attribute, plain.checkpoint_score_order) == ("val_accuracy",
                                                                                 "max")


@pytest.mark.slow
def test_a_killed_search_resumes_without_rerunning_finished_trials(ray_address, tmp_path):
    args = ("tune", *TINY, "--name", "resume", "--storage", str(tmp_path),
            "--set", "tune.scheduler=fifo",
            "--set", "tune.space={optim.lr: {grid: [1.0e-2, 3.0e-3, 1.0e-3]}}")
    experiment = tmp_path / "resume"
    process = popen_cli(*args, address=ray_address, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for line in process.stdout:
            if " done after epoch " in line:
                break
        # A trial's last epoch comes before its trainer shuts down and Tune records it as
        # finished; kill once the saved state (what a resume reads) says so, within a minute.
        deadline = time.monotonic() + 60
        while not _finished_in_saved_state(experiment) and time.monotonic() < deadline:
            time.sleep(0.5)
    finally:
        process.kill()  # SIGKILL: no chance to clean up
        process.stdout.read()
        process.wait()
    finished = _finished_in_saved_state(experiment)
    assert finished
    records = {t: (experiment / t / "result.json").read_bytes() for t in finished}

    done = run_cli(*args, "--resume", address=ray_address, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = _result(experiment)
    assert len(result["trials"]) == 3
    trials = [(t["id"], t["status"], t["epochs_run"]) for t in result["trials"]]
    assert all(status == "completed" and epochs == EPOCHS for _, status, epochs in trials), (
        f"{trials}\n{done.stdout[-4000:]}\n{done.stderr[-3000:]}")
    # Finished trials were not run again: no epoch of theirs now, their records untouched.
    assert not finished & set(re.findall(r"(\S+)  epoch ", done.stdout)), done.stdout
    assert {t: (experiment / t / "result.json").read_bytes() for t in finished} == records
    assert result["trials_run"] == 3 and result["best_config"] is not None


@pytest.mark.slow
def test_ctrl_c_ends_a_search_that_resumes_with_its_own_settings(ray_address, tmp_path):
    """Ctrl-C ends the command as others end (130, no summary of unrun trials), naming the
    command that continues it; that command, without the search's --recipe and --set, keeps
    the search's own space and epochs (the default recipe's would be 5 fields and 6 epochs)."""
    storage = str(tmp_path)
    settings = ["--recipe", "digits_tune", "--set", "train.epochs=2", "--set", "model.width=8",
                "--set", "tune.num_samples=1", "--set", "tune.max_concurrent_trials=2",
                "--set", "tune.scheduler=fifo",
                "--set", "tune.space={optim.lr: {grid: [1.0e-2, 3.0e-3]}}"]
    process = popen_cli("tune", *settings, "--name", "ctrlc", "--storage", storage,
                        address=ray_address, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    line = ""
    hung = threading.Timer(300, process.kill)  # reading its output would wait on a hang forever
    hung.start()
    try:
        for line in process.stdout:
            if re.search(r"  epoch +1 ", line):
                break
        process.send_signal(signal.SIGINT)
        output = line + process.communicate(timeout=120)[0]
    finally:
        hung.cancel()
        process.kill()
    assert process.returncode == 130, output[-3000:]
    resume = ["distdl", "tune", "--name", "ctrlc", "--storage", storage, "--address",
              ray_address, "--resume"]
    assert output.rstrip().splitlines()[-1] == (
        f"interrupted; continue the search with: {shlex.join(resume)}"), output[-3000:]
    assert "Tuner.restore" not in output and "Traceback" not in output, output[-3000:]
    assert not (tmp_path / "ctrlc" / report.RESULT_FILE).exists()

    # The other settings of a new search: refused, naming the file that holds its own.
    other = run_cli(*resume[1:-3], *settings, "--set", "train.epochs=3", "--resume",
                    address=ray_address, timeout=120)
    assert other.returncode == 2, other.stdout[-2000:] + other.stderr[-2000:]
    assert other.stderr.splitlines() == [
        f"error: a search resumes with its own settings, saved in {tmp_path}/ctrlc/config.yaml; "
        "these --recipe, --config or --set change its train.epochs: drop them, or choose "
        "another --name to start a new search"]

    done = run_cli(*resume[1:], timeout=600)  # the printed command, as a user would run it
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "resuming optim.lr for val_accuracy" in done.stdout, done.stdout[-3000:]
    result = _result(tmp_path / "ctrlc")
    assert sorted(t["config"]["optim.lr"] for t in result["trials"]) == [3e-3, 1e-2]
    assert [(t["status"], t["epochs_run"]) for t in result["trials"]] == [("completed", 2)] * 2
    (command,) = [line.split(": ", 1)[1] for line in done.stdout.splitlines()
                  if line.startswith("train with its values: ")]
    cfg = cli._config(cli.build_parser().parse_args(shlex.split(command)[1:]))
    assert (cfg.train.epochs, cfg.model.width, cfg.tune.scheduler) == (2, 8, "fifo")
    assert cfg.optim.lr == result["best_config"]["optim.lr"] and cfg.name == "ctrlc-best"


def _four_epochs(config):
    for epoch in range(1, EPOCHS + 1):
        ray.train.report({"epoch": epoch})


def _trial_of_four_epochs(config):
    from ray.train.torch import TorchTrainer

    from distdl.tune import driver

    storage = f"{config['storage']}/{tune.get_context().get_trial_id()}"
    driver.fit_reporting(lambda callbacks: TorchTrainer(
        _four_epochs, scaling_config=ray.train.ScalingConfig(num_workers=1),
        run_config=ray.train.RunConfig(storage_path=storage, callbacks=callbacks)))


class _BusyDriver(tune.Callback):
    """A search driver slow to take each result, as on 2 cores while another trial's workers
    start. With Ray's TuneReportCallback, a trial's last report then raced the trial's end and
    the search hung."""

    def on_trial_result(self, **info):
        time.sleep(3)


@pytest.mark.slow
def test_every_epoch_reaches_tune_when_the_search_driver_is_slow(ray_address, tmp_path):
    tuner = tune.Tuner(
        tune.with_resources(_trial_of_four_epochs, {"CPU": 0, "memory": 2**28}),
        param_space={"storage": str(tmp_path / "train"), "x": tune.grid_search([0, 1])},
        tune_config=tune.TuneConfig(max_concurrent_trials=2),
        run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), verbose=0,
                                  callbacks=[_BusyDriver()]))
    grids = []
    search = threading.Thread(target=lambda: grids.append(tuner.fit()), daemon=True)
    search.start()
    search.join(timeout=240)
    assert not search.is_alive(), "the search did not end within 240 s"
    epochs = [list(result.metrics_dataframe["epoch"]) for result in grids[0]]
    assert epochs == [[1, 2, 3, 4], [1, 2, 3, 4]]


@pytest.mark.parametrize(("args", "message"), [
    (("--set", "tune.space={}"), "tune.space is empty"),
    (("--set", "tune.space={optim.learning_rate: {uniform: [0.1, 0.2]}}"),
     "unknown field 'optim.learning_rate'"),
    (("--set", "tune.space={optim.weight_decay: {uniform: [-0.1, 0.0]}}"),
     "optim.weight_decay must be >= 0"),
    (("--set", "tune.space={optim.lr: {loguniform: [0.1, 0.001]}}"), "must be below high"),
    (("--set", "tune.metric=accuracy"), "is never reported by training"),
    (("--set", "train.num_workers=16"), "can never be placed"),
    (("--set", "tune.space={model.name: {grid: [small_cnn, nosuchmodel]}}"),
     "value 'nosuchmodel' is not valid: unknown model 'nosuchmodel'"),
    (("--set", "tune.space={data.source: {grid: [digits, nosuchdata]}}"),
     "tune.space cannot vary data.source: the data is loaded once for every trial"),
    (("--resume",), "no search named"),
])
def test_bad_input_is_one_line_and_exit_2(args, message, ray_address, tmp_path):
    done = run_cli("tune", "--storage", str(tmp_path), *args, address=ray_address, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stdout[-2000:] + done.stderr[-2000:]
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert "Traceback" not in done.stdout + done.stderr
