"""Every mistake a user can make in `distdl train` ends in one clear line and exit code 2."""

from __future__ import annotations

import math
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.integration.cli import run_cli


def _parquet_without_label(tmp_path) -> str:
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"image": [[0] * 64] * 4, "target": [0, 1, 0, 1]}), path)
    return str(path)


CASES = [
    (["--set", "data.source=mnist"], "unknown dataset 'mnist'"),
    (["--set", "model.name=vgg99"], "unknown model 'vgg99'"),
    (["--recipe", "fastest"], "unknown recipe 'fastest'"),
    (["--set", "data.source=imagefolder:/no/such/folder"], "path not found: /no/such/folder"),
    (["--config", "/no/such/config.yaml"], "config file not found"),
    (["--set", "train.epochz=3"], "unknown config field 'train.epochz'"),
    (["--set", "train.epochs=many"], "train.epochs must be of type int"),
    (["--set", "train.num_workers=64"], "64 workers needing 1 CPU each can never be placed"),
    (["--set", "train.use_gpu=true"], "can never be placed"),
    (["--set", "data.source=parquet:{parquet}"], "has no column 'label' (data.label_column)"),
    (["--bogus-flag"], "unrecognized arguments: --bogus-flag"),
    # 2 x 719 rows, but digits' blocks split as 720 + 718: one worker would hold no full batch.
    (["--set", "train.batch_size=1438"], "the smallest worker's share is 718"),
    (["--set", "model.name=torchvision:alexnet"],
     "model torchvision:alexnet cannot train on 2 images of 1x8x8 (C x H x W)"),
]


@pytest.mark.parametrize("args, message", CASES, ids=[c[1][:30] for c in CASES])
def test_bad_input_is_one_line_and_exit_2(args, message, ray_address, tmp_path):
    args = [a.replace("{parquet}", _parquet_without_label(tmp_path)) if "{parquet}" in a else a
            for a in args]
    done = run_cli("train", "--recipe", "debug", "--storage", str(tmp_path), *args,
                   address=ray_address, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr[-2000:]
    assert len(lines) == 1 and message in lines[0], done.stderr
    assert "Traceback" not in done.stdout + done.stderr


BEFORE_RAY = [
    (["train", "--set", "model.name=vgg99"], "unknown model 'vgg99'"),
    (["train", "--set", "model.name=torchvision:vgg99"], "unknown torchvision model 'vgg99'"),
    (["train", "--set", "data.source=parquet:/no/such.parquet"],
     "path not found: /no/such.parquet"),
    (["train", "--storage", "{tmp}/file"], "{tmp}/file is a file"),
    (["train", "--output", "{tmp}/file/run"], "{tmp}/file is a file"),
    (["tune", "--resume", "--set", "tune.space={optim.lr: {choice: [0.1]}}"],
     "no search named 'debug' to resume"),
    (["train", "--storage", "s3://b/r?endpoint_override=127.0.0.1:1&scheme=http"],
     "cannot use storage s3://b/r"),
    (["tune", "--storage", "s3://b/r?endpoint_override=127.0.0.1:1&scheme=http"],
     "cannot use storage s3://b/r"),
    (["train", "--storage", "s3://"], "cannot use storage s3://: it names no bucket or folder"),
    (["train", "--set", "data.source=imagefolder:{tmp}/file"], "{tmp}/file is not a folder"),
    (["train", "--set", "data.source=imagefolder:{tmp}"], "has no class folders"),
    (["tune", "--set", "data.source=cifar10:{tmp}"], "is not a CIFAR-10 folder"),
]


@pytest.mark.parametrize("args, message", BEFORE_RAY, ids=[c[1][:30] for c in BEFORE_RAY])
def test_mistakes_are_found_before_ray_starts(args, message, tmp_path):
    """Nothing answers at the address: a check made after connecting would fail on that."""
    (tmp_path / "file").write_text("")
    command, *rest = [a.replace("{tmp}", str(tmp_path)) for a in args]
    done = run_cli(command, "--recipe", "debug", "--storage", str(tmp_path / "runs"), *rest,
                   address="127.0.0.1:1", timeout=60)  # a --storage in `rest` comes last: it wins
    lines = done.stderr.splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr[-2000:]
    assert lines[0].startswith("error: ") and message.replace("{tmp}", str(tmp_path)) in lines[0]


def test_a_model_too_large_for_memory_is_refused_before_training(ray_address, tmp_path):
    """Ray's memory monitor would otherwise kill the workers, minutes into a thrashing run."""
    import ray

    from distdl.config import ModelConfig
    from distdl.models import build_model

    have = sum(n["Resources"].get("memory", 0) + n["Resources"].get("object_store_memory", 0)
               for n in ray.nodes() if n["Alive"])
    base = build_model(ModelConfig(width=100), num_classes=10, in_channels=1, image_size=8)
    # small_cnn's parameters grow with the square of its width: a third more than 2 workers at
    # 32 bytes per parameter can hold.
    scale = have / 64 * 1.33 / sum(p.numel() for p in base.parameters())
    done = run_cli("train", "--recipe", "debug", "--storage", str(tmp_path), "--set",
                   f"model.width={math.ceil(100 * math.sqrt(scale))}", address=ray_address,
                   timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.count("\n") == 1 and "on CPU need about" in done.stderr, done.stderr
    assert "choose a smaller model (model.width) or fewer workers" in done.stderr


def test_resuming_a_run_with_another_model_is_refused(ray_address, tmp_path):
    common = ("train", "--recipe", "debug", "--set", "train.epochs=1", "--storage", str(tmp_path))
    first = run_cli(*common, address=ray_address)
    assert first.returncode == 0, first.stderr[-2000:]
    again = run_cli(*common, address=ray_address)  # finished: nothing to train, same result
    assert again.returncode == 0 and "after 1 epochs" in again.stdout, again.stderr[-2000:]
    other = run_cli(*common, "--set", "model.width=16", address=ray_address)
    assert other.returncode == 2
    assert other.stderr.strip().splitlines() == [
        f"error: run 'debug' in {tmp_path / 'debug'} was trained with other model settings, "
        "so it cannot be resumed with these; choose another --name"]
    # A new --output records none of the run's epochs: its checkpoints in the storage decide,
    # before Ray starts (nothing answers at this address).
    elsewhere = run_cli(*common, "--output", str(tmp_path / "elsewhere"), "--set",
                        "data.seed=7", address="127.0.0.1:1")
    assert elsewhere.returncode == 2
    assert elsewhere.stderr.strip().splitlines() == [
        f"error: run 'debug' in {tmp_path} was trained with other data settings, so it cannot "
        "be resumed with these; choose another --name"]
    for change, what in (("optim.lr=0.5", "optim"), ("optim.optimizer=sgd", "optim"),
                         ("train.batch_size=32", "train.batch_size")):
        refused = run_cli(*common, "--output", str(tmp_path / "elsewhere"), "--set", change,
                          address="127.0.0.1:1")
        assert refused.returncode == 2 and f"with other {what} settings" in refused.stderr, \
            refused.stderr[-2000:]


def test_a_benchmark_report_file_in_a_missing_folder_is_refused_before_measuring(tmp_path):
    done = run_cli("bench", "train", "--recipe", "debug", "--json", str(tmp_path / "no" / "b.json"),
                   timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert f"no folder {tmp_path / 'no'}" in done.stderr and "ratio" not in done.stdout


def test_the_serving_benchmark_refuses_a_corrupt_checkpoint_before_ray(tmp_path):
    from distdl.bench.serve import make_checkpoint

    checkpoint = Path(make_checkpoint("digits", tmp_path))
    (checkpoint / "model.pt").write_bytes((checkpoint / "model.pt").read_bytes()[:100])
    done = run_cli("bench", "serve", "--checkpoint", str(checkpoint), "--seconds", "1",
                   timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines() == [f"error: corrupt checkpoint weights {checkpoint}/model.pt: "
                                        "not a state_dict that torch.load(weights_only=True) "
                                        "reads (RuntimeError)"]


def test_the_training_benchmark_refuses_gpu_recipes(tmp_path):
    done = run_cli("bench", "train", "--recipe", "shapes_resnet18_gpu", timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert "use distdl bench step" in done.stderr


def test_an_address_where_no_ray_answers_is_one_line_at_once():
    done = run_cli("train", "--recipe", "debug", "--address", "127.0.0.1:1", timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert "no Ray cluster answers at 127.0.0.1:1" in done.stderr


def test_evaluating_a_missing_checkpoint_is_one_line(tmp_path):
    done = run_cli("evaluate", str(tmp_path / "nothing"), timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines() == [f"error: checkpoint not found: {tmp_path / 'nothing'}"]
    empty = run_cli("evaluate", str(tmp_path), timeout=60)
    assert empty.returncode == 2, empty.stderr[-2000:]
    assert empty.stderr.splitlines() == [
        f"error: not a distdl checkpoint: {tmp_path} has no meta.json"]


SUBMITTED = [
    (["bogus"], "distdl: error: argument command: invalid choice: 'bogus'"),
    (["train", "--recipe", "nosuch"], "error: unknown recipe 'nosuch'"),
    (["train", "--epochs", "3"], "distdl: error: unrecognized arguments: --epochs 3"),
    (["train", "--set", "model.name=vgg99"], "error: unknown model 'vgg99'"),
    (["train", "--config", "no/such.yaml"], "error: config file not found: {tmp}/no/such.yaml"),
    (["tune", "--set", "tune.space={data.source: {grid: [digits, mnist]}}"],
     "error: tune.space cannot vary data.source"),
]


@pytest.mark.parametrize("command, message", SUBMITTED, ids=[c[1][:30] for c in SUBMITTED])
def test_a_job_command_with_a_mistake_is_refused_before_submitting(command, message, tmp_path):
    """Nothing answers at the address: the job's command is checked first, here."""
    done = run_cli("submit", "--address", "127.0.0.1:1", "--working-dir", str(tmp_path), "--",
                   *command, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines() == [done.stderr.strip()], done.stderr[-2000:]
    assert done.stderr.startswith(message.replace("{tmp}", str(tmp_path))), done.stderr
    assert "submitted" not in done.stdout


def test_a_good_job_command_goes_on_to_the_cluster(tmp_path):
    """The local check passes what is right: then the missing cluster is the one line."""
    (tmp_path / "search.yaml").write_text("train: {epochs: 1}\n")
    done = run_cli("submit", "--address", "127.0.0.1:1", "--working-dir", str(tmp_path), "--",
                   "train", "--recipe", "debug", "--config", "search.yaml", timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr[-2000:]
    assert "no Ray cluster answers at http://127.0.0.1:1" in done.stderr


def test_serve_update_names_what_it_lacks_before_ray_starts(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    done = run_cli("serve", "update", "vision", "--checkpoint", str(tmp_path), env=env,
                   timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    assert done.stderr.splitlines() == ["error: serve update changes an application on a "
                                        "running Ray: give its --address (or set RAY_ADDRESS)"]
    missing = run_cli("serve", "update", "vision", "--checkpoint", str(tmp_path / "none"),
                      address="127.0.0.1:1", timeout=60)
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1, missing.stderr[-2000:]
    assert f"checkpoint {tmp_path / 'none'} does not exist" in missing.stderr
