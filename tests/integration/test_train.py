"""`distdl train` and `distdl evaluate` for real: a local Ray, DDP over 2 workers, digits."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch

from distdl.train import checkpoint, rundir
from tests.integration.cli import fresh_shell_env, popen_cli, run_cli


@pytest.mark.slow
def test_default_run_reaches_97_percent_and_writes_the_run_directory(digits_run):
    run_dir, stdout = digits_run
    result = rundir.read_result(run_dir)
    history = rundir.read_metrics(run_dir)
    assert result["best_val_accuracy"] >= 0.97
    assert result["epochs_completed"] == 20
    assert [m["epoch"] for m in history] == list(range(1, 21))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert max(m["val_accuracy"] for m in history) == result["best_val_accuracy"]
    for name in ("config.yaml", "curves.png"):
        assert (run_dir / name).stat().st_size > 0
    assert "epoch  20/20 " in stdout and "best validation accuracy" in stdout
    assert Path(result["best_checkpoint"]).parent == run_dir


@pytest.mark.slow
def test_checkpoint_loads_with_weights_only_and_metadata_round_trips(digits_run):
    run_dir, _ = digits_run
    best = Path(rundir.read_result(run_dir)["best_checkpoint"])
    state = torch.load(best / checkpoint.MODEL_FILE, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    torch.load(best / checkpoint.TRAIN_STATE_FILE, weights_only=True)
    meta = json.loads((best / checkpoint.META_FILE).read_text())
    assert meta["classes"] == [str(i) for i in range(10)]
    assert meta["input_shape"] == [1, 8, 8]
    assert meta["model"]["name"] == "small_cnn" and meta["data"]["source"] == "digits"
    assert len(meta["normalization"]["mean"]) == 1 and meta["normalization"]["std"][0] > 0
    model, loaded = checkpoint.load_model(best)
    assert loaded == meta
    assert model(torch.zeros(2, 1, 8, 8)).shape == (2, 10)


@pytest.mark.slow
def test_evaluate_reproduces_the_reported_accuracy(digits_run, ray_address, tmp_path):
    """From a new terminal's environment: joining a Ray on 127.0.0.1 by its address works. The
    run directory stands for its best checkpoint."""
    run_dir, _ = digits_run
    result = rundir.read_result(run_dir)
    done = run_cli("evaluate", str(run_dir), "--output", str(tmp_path),
                   address=ray_address, env=fresh_shell_env())
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "evaluation.json").read_text())
    assert report["checkpoint"] == result["best_checkpoint"]
    assert report["accuracy"] == pytest.approx(result["best_val_accuracy"], abs=1e-9)
    assert sum(row["count"] for row in report["per_class"].values()) == report["examples"]
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 0
    assert f"accuracy {report['accuracy']:.4f}" in done.stdout


@pytest.mark.slow
def test_rerunning_a_name_resumes_at_the_next_epoch(ray_address, tmp_path):
    common = ("train", "--recipe", "debug", "--name", "resume", "--storage", str(tmp_path))
    first = run_cli(*common, "--set", "train.epochs=2", address=ray_address)
    assert first.returncode == 0, first.stderr[-3000:]
    before = rundir.read_metrics(tmp_path / "resume")
    second = run_cli(*common, "--set", "train.epochs=4", address=ray_address)
    assert second.returncode == 0, second.stderr[-3000:]
    after = rundir.read_metrics(tmp_path / "resume")
    assert [m["epoch"] for m in after] == [1, 2, 3, 4]
    assert after[:2] == before  # epochs 1 and 2 were not trained again
    assert "epoch   1/4" not in second.stdout and "epoch   3/4" in second.stdout
    assert "continuing run 'resume' from its latest checkpoint (2 of 4 epochs" in second.stdout
    assert rundir.read_result(tmp_path / "resume")["epochs_completed"] == 4
    third = run_cli(*common, "--set", "train.epochs=4", address=ray_address)
    assert third.returncode == 0, third.stderr[-3000:]
    assert "has trained 4 epochs already, so there is nothing to train" in third.stdout
    assert "training small_cnn" not in third.stdout  # decided before joining Ray
    assert rundir.read_metrics(tmp_path / "resume") == after


@pytest.mark.slow
def test_ctrl_c_ends_training_in_one_line_and_the_same_command_continues(ray_address, tmp_path):
    """Ray Train's own Ctrl-C handler aborts the run; the command then ends with 130 and
    says how to continue, and that command does, without training an epoch twice."""
    epochs = 30  # more than the run can train before the abort lands
    common = ("train", "--recipe", "debug", "--set", "train.batch_size=16", "--name", "ctrlc",
              "--storage", str(tmp_path))
    command = (*common, "--set", f"train.epochs={epochs}")
    # A finished first epoch, which the interrupted run continues: its result must not outlive
    # that continuation (it would name checkpoints since deleted).
    first = run_cli(*common, "--set", "train.epochs=1", address=ray_address)
    assert first.returncode == 0, first.stderr[-3000:]
    process = popen_cli(*command, address=ray_address,
                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    hung = threading.Timer(300, process.kill)  # reading its output would wait on a hang forever
    hung.start()
    try:
        for line in process.stdout:
            if line.startswith(f"epoch   2/{epochs}"):
                break
        process.send_signal(signal.SIGINT)
        output = process.communicate(timeout=120)[0]
    finally:
        hung.cancel()
        process.kill()
    assert process.returncode == 130, output[-3000:]
    assert "interrupted; the same command continues from the latest checkpoint" in (
        output.splitlines()), output[-3000:]
    assert "Traceback" not in output
    stopped_at = len(rundir.read_metrics(tmp_path / "ctrlc"))
    assert 1 <= stopped_at < epochs, output[-3000:]
    assert not (tmp_path / "ctrlc" / rundir.RESULT_FILE).exists()

    done = run_cli(*command, address=ray_address)
    assert done.returncode == 0, done.stderr[-3000:]
    recorded = [m["epoch"] for m in rundir.read_metrics(tmp_path / "ctrlc")]
    assert recorded == list(range(1, epochs + 1))


@pytest.mark.slow
def test_a_rerun_records_the_last_epoch_whose_report_was_lost(ray_address, tmp_path):
    """A run stopped after its last checkpoint but before that epoch's report reached the
    driver (a kill at that moment) has nothing left to train; its rerun records that epoch."""
    common = ("train", "--recipe", "debug", "--name", "lost", "--storage", str(tmp_path),
              "--set", "train.epochs=2")
    first = run_cli(*common, address=ray_address)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "lost"
    trained = rundir.read_metrics(run_dir)
    # What the kill leaves: the checkpoint of epoch 2, but no line for it and no result.
    (run_dir / rundir.METRICS_FILE).write_text(json.dumps(trained[0]) + "\n")
    (run_dir / rundir.RESULT_FILE).unlink()
    second = run_cli(*common, address=ray_address)
    assert second.returncode == 0, second.stderr[-3000:]
    recorded = rundir.read_metrics(run_dir)
    assert [m["epoch"] for m in recorded] == [1, 2]
    assert recorded[1]["val_accuracy"] == trained[1]["val_accuracy"]
    assert recorded[1]["train_loss"] == trained[1]["train_loss"]  # not trained again
    result = rundir.read_result(run_dir)
    assert result["epochs_completed"] == 2
    assert result["best_val_accuracy"] == max(m["val_accuracy"] for m in trained)
    # With a run directory elsewhere, the same name's stored checkpoints still count: the run
    # has nothing left to train, and with more epochs it continues from them.
    done = run_cli(*common, "--output", str(tmp_path / "done"), address=ray_address)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (f"run 'lost' has trained 2 epochs already (its latest checkpoint is in {tmp_path}), "
            "so there is nothing to train") in done.stdout
    assert not (tmp_path / "done" / rundir.METRICS_FILE).exists()
    elsewhere = run_cli(*common, "--set", "train.epochs=3", "--output",
                        str(tmp_path / "elsewhere"), address=ray_address)
    assert elsewhere.returncode == 0, elsewhere.stderr[-3000:]
    assert (f"continuing run 'lost' from its latest checkpoint in {tmp_path}/lost, although "
            f"{tmp_path / 'elsewhere'} records none of its epochs") in elsewhere.stdout


@pytest.mark.slow
def test_a_rerun_with_more_epochs_records_the_epochs_whose_report_was_lost(ray_address,
                                                                           tmp_path):
    """A run stopped after a checkpoint but before its report reached the driver continues from
    that checkpoint; the epochs of the lost report are recorded with the first new one."""
    common = ("train", "--recipe", "debug", "--name", "gap", "--storage", str(tmp_path))
    first = run_cli(*common, "--set", "train.epochs=2", address=ray_address)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "gap"
    trained = rundir.read_metrics(run_dir)
    (run_dir / rundir.METRICS_FILE).write_text(json.dumps(trained[0]) + "\n")
    (run_dir / rundir.RESULT_FILE).unlink()
    second = run_cli(*common, "--set", "train.epochs=3", address=ray_address)
    assert second.returncode == 0, second.stderr[-3000:]
    recorded = rundir.read_metrics(run_dir)
    assert [m["epoch"] for m in recorded] == [1, 2, 3]
    assert recorded[1]["train_loss"] == trained[1]["train_loss"]  # as trained, not again


@pytest.mark.slow
def test_short_epochs_are_reported_together_and_a_lost_report_is_recovered(ray_address, tmp_path):
    """With a learning rate too small to change a prediction (and no batch norm, whose
    statistics would), no epoch after the first is a new best, so epochs 2 to 4 wait for the
    report of the last one, which carries them."""
    common = ("train", "--recipe", "debug", "--name", "held", "--storage", str(tmp_path),
              "--set", "train.epochs=5", "--set", "optim.lr=1e-9",
              "--set", "model.batch_norm=false", "--set", "train.report_interval_s=1000")
    first = run_cli(*common, address=ray_address)
    assert first.returncode == 0, first.stderr[-3000:]
    run_dir = tmp_path / "held"
    trained = rundir.read_metrics(run_dir)
    assert [m["epoch"] for m in trained] == [1, 2, 3, 4, 5]
    assert len({m["val_accuracy"] for m in trained}) == 1  # the premise: no new best
    metas = sorted((checkpoint.load_meta(path) for path in run_dir.glob("checkpoint_*/")),
                   key=lambda meta: meta["epoch"])
    assert [(meta["epoch"], [m["epoch"] for m in meta[rundir.EARLIER_EPOCHS]])
            for meta in metas] == [(1, []), (5, [2, 3, 4])]
    # A kill after the last checkpoint, before its report reached the driver: the rerun
    # records every epoch that report carried, as they were trained.
    (run_dir / rundir.METRICS_FILE).write_text(json.dumps(trained[0]) + "\n")
    (run_dir / rundir.RESULT_FILE).unlink()
    second = run_cli(*common, address=ray_address)
    assert second.returncode == 0, second.stderr[-3000:]
    assert rundir.read_metrics(run_dir) == trained


@pytest.mark.slow
def test_shards_too_large_for_the_cache_stream_from_ray_data(ray_address, tmp_path):
    done = run_cli("train", "--recipe", "debug", "--name", "stream", "--storage", str(tmp_path),
                   "--set", "data.cache_max_mb=0", "--set", "train.epochs=3", address=ray_address)
    assert done.returncode == 0, done.stderr[-3000:]
    history = rundir.read_metrics(tmp_path / "stream")
    assert [m["epoch"] for m in history] == [1, 2, 3]
    assert history[-1]["val_accuracy"] > 0.8


@pytest.mark.slow
def test_evaluate_scores_png_files_of_another_dataset(digits_run, ray_address, tmp_path):
    """The validation digits written as PNG files score as they did in training (an unreadable
    one skipped and counted), also when the files are RGB (read as their luminance, as the model takes one channel); a class the model
    does not know is refused in one line."""
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    rng = np.random.default_rng(0)
    for n, i in enumerate(rng.choice(len(digits.target), size=300, replace=False)):
        pixels = np.round(digits.images[i] * 255 / 16).astype(np.uint8)
        rgb = np.repeat(pixels[..., None], 3, axis=-1)
        rgb[0, 0] = (40, 0, 0) if n == 0 else rgb[0, 0]  # one tinted pixel: the folder is colour
        for kind, image in (("pngs", Image.fromarray(pixels, mode="L")),
                            ("rgb", Image.fromarray(rgb, mode="RGB"))):
            folder = tmp_path / kind / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{i}.png")
    (tmp_path / "pngs" / "3" / "torn.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    best = rundir.read_result(digits_run[0])["best_checkpoint"]
    done = run_cli("evaluate", best, "--data", f"imagefolder:{tmp_path / 'pngs'}", "--output",
                   str(tmp_path / "eval"), address=ray_address)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert report["examples"] == 300 and report["split"] == "all" and report["skipped"] == 1
    assert "on 300 examples" in done.stdout and "; skipped 1 unreadable image\n" in done.stdout
    assert report["accuracy"] > 0.95  # mostly training images, through the PNG decode path
    colour = run_cli("evaluate", best, "--data", f"imagefolder:{tmp_path / 'rgb'}",
                     "--output", str(tmp_path / "eval_rgb"), address=ray_address)
    assert colour.returncode == 0, colour.stderr[-3000:]
    rgb_report = json.loads((tmp_path / "eval_rgb" / "evaluation.json").read_text())
    assert rgb_report["examples"] == 300 and rgb_report["accuracy"] > 0.95
    (tmp_path / "rgb" / "letter_a").mkdir()
    moved = next((tmp_path / "rgb" / "0").iterdir())
    moved.rename(tmp_path / "rgb" / "letter_a" / moved.name)
    unknown = run_cli("evaluate", best, "--data", f"imagefolder:{tmp_path / 'rgb'}",
                      "--output", str(tmp_path / "eval_a"), address=ray_address)
    assert unknown.returncode == 2 and unknown.stderr.count("\n") == 1, unknown.stderr[-3000:]
    assert "classes the model does not know: letter_a" in unknown.stderr


def test_evaluate_refuses_an_output_that_is_a_file_before_ray(digits_run, tmp_path):
    """Checked before connecting: the address where nothing answers is never reached."""
    (tmp_path / "taken").write_text("a file")
    done = run_cli("evaluate", str(digits_run[0]), "--output", str(tmp_path / "taken"),
                   "--address", "127.0.0.1:1", timeout=60)
    assert done.returncode == 2, done.stderr[-3000:]
    assert done.stderr.splitlines() == [
        f"error: cannot write to {tmp_path / 'taken'}: {tmp_path / 'taken'} is a file; "
        "choose another --output"]


@pytest.mark.slow
def test_evaluate_scores_images_at_the_model_height_and_width(ray_address, tmp_path):
    """Wide images whose classes differ only in fine columns: squashed to a square on the way
    to the model, the stripes would blur into the flat class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(60):
        name = ("flat", "stripes")[i % 2]
        red = np.full((10, 40), 128, np.uint8) if name == "flat" else \
            np.tile(np.array([0, 255], np.uint8), (10, 20))
        noise = rng.integers(0, 30, (10, 40, 2), dtype=np.uint8)
        (tmp_path / "wide" / name).mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.dstack([red, noise])).save(tmp_path / "wide" / name / f"{i}.png")
    data = f"imagefolder:{tmp_path / 'wide'}"
    trained = run_cli("train", "--recipe", "debug", "--set", f"data.source={data}",
                      "--set", "train.num_workers=1", "--set", "train.batch_size=8",
                      "--set", "train.epochs=5",
                      "--output", str(tmp_path / "run"), "--storage", str(tmp_path / "storage"),
                      address=ray_address)
    assert trained.returncode == 0, trained.stderr[-3000:]
    best = rundir.read_result(tmp_path / "run")
    assert best["best_val_accuracy"] == 1.0
    done = run_cli("evaluate", str(tmp_path / "run"), "--data", data, "--output",
                   str(tmp_path / "eval"), address=ray_address)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((tmp_path / "eval" / "evaluation.json").read_text())
    assert report["examples"] == 60 and report["accuracy"] == 1.0


@pytest.mark.slow
def test_storage_given_as_a_uri(ray_address, tmp_path):
    done = run_cli("train", "--recipe", "debug", "--set", "train.epochs=1", "--storage",
                   f"file://{tmp_path / 'store'}", "--output", str(tmp_path / "run"),
                   address=ray_address)
    assert done.returncode == 0, done.stderr[-3000:]
    best = rundir.read_result(tmp_path / "run")["best_checkpoint"]
    assert best.startswith(f"file://{tmp_path / 'store' / 'debug'}/checkpoint_")
    assert (Path(best.removeprefix("file://")) / checkpoint.MODEL_FILE).is_file()


def test_a_local_ray_turns_off_what_only_a_cluster_uses(ray_address):
    # Ray Train reads both in the driver as each run starts; the shared Ray is a local one.
    assert os.environ.get("RAY_TRAIN_METRICS_ENABLED") == "0"
    assert os.environ.get("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER") == "0"


def test_what_ray_trains_controller_unpickles_does_not_import_torch(ray_address, tmp_path):
    """Ray Train's controller unpickles the run's settings (the training function's config, the
    backend, the callbacks); in a process without torch, that must not import it, or the
    controller spends a core-second on it at every start (backend.py)."""
    from ray import cloudpickle

    from distdl import recipes
    from distdl.config import resolve
    from distdl.train import trainer
    from distdl.train.recorder import EpochRecorder

    cfg = resolve(recipes.get("debug"), None, [])
    built = trainer.build_trainer(cfg, trainer.prepare_data(cfg), storage=str(tmp_path),
                                  callbacks=[EpochRecorder(tmp_path)])
    pickled = tmp_path / "run_context.pkl"
    pickled.write_bytes(cloudpickle.dumps(built.train_run_context))
    code = ("import pickle, sys; context = pickle.loads(open(sys.argv[1], 'rb').read()); "
            "assert context.train_loop_config['spec'].steps_per_epoch > 0; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    done = subprocess.run([sys.executable, "-c", code, str(pickled)], capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip() == "[]"


def test_the_driver_of_distdl_train_imports_no_torch(ray_address, tmp_path):
    """torch loads in the model check's process and the workers (model_check.py); here the
    driver cannot import it at all, and the run still trains and records torch's version."""
    code = ("import sys; sys.modules['torch'] = None; from distdl.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    done = subprocess.run([sys.executable, "-c", code, "train", "--recipe", "debug", "--set",
                           "train.epochs=1", "--storage", str(tmp_path), "--output",
                           str(tmp_path / "run"), "--address", ray_address],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    meta = checkpoint.load_meta(rundir.read_result(tmp_path / "run")["best_checkpoint"])
    assert meta["versions"]["torch"] == str(torch.__version__)
    assert f"# torch: {torch.__version__}\n" in (tmp_path / "run" / rundir.CONFIG_FILE).read_text()
