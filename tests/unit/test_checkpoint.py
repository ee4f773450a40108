import json
import re

import pytest
import torch

from distdl.config import DataConfig, ModelConfig
from distdl.errors import UserError
from distdl.models import build_model
from distdl.train import checkpoint, rundir


def _meta():
    return checkpoint.make_meta(model=ModelConfig(width=8), classes=["a", "b", "c"],
                                input_shape=(1, 8, 8), normalization={"mean": [0.3], "std": [0.2]},
                                data=DataConfig())


def test_checkpoint_round_trips_weights_and_metadata(tmp_path):
    model = build_model(ModelConfig(width=8), num_classes=3, in_channels=1, image_size=8).eval()
    checkpoint.save(tmp_path, model, _meta(), {"epoch": 3, "optimizer": {"state": {}}})
    loaded, meta = checkpoint.load_model(tmp_path)
    x = torch.randn(4, 1, 8, 8)
    assert torch.equal(loaded(x), model(x))
    assert meta == json.loads(json.dumps(_meta()))
    assert checkpoint.load_train_state(tmp_path)["epoch"] == 3


def test_damaged_checkpoints_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="has no meta.json"):
        checkpoint.load_model(tmp_path)
    (tmp_path / "meta.json").write_text("{not json")
    with pytest.raises(UserError, match="corrupt checkpoint metadata"):
        checkpoint.load_model(tmp_path)
    (tmp_path / "meta.json").write_text("[]")
    with pytest.raises(UserError, match="a JSON object was expected"):
        checkpoint.load_model(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps({**_meta(), "model": {"augment": True}}))
    with pytest.raises(UserError, match="its 'model' section cannot be read"):
        checkpoint.load_model(tmp_path)
    (tmp_path / "meta.json").write_text(json.dumps(_meta()))
    (tmp_path / "model.pt").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="corrupt checkpoint weights") as info:
        checkpoint.load_model(tmp_path)
    assert "weights_only=False" not in str(info.value)  # torch's advice would run the file


def test_weights_of_another_model_name_the_tensor_that_differs(tmp_path):
    model = build_model(ModelConfig(width=8), num_classes=3, in_channels=1, image_size=8)
    checkpoint.save(tmp_path, model, {**_meta(), "classes": ["a", "b", "c", "d"]})
    with pytest.raises(UserError, match=r"does not match its meta.json: size mismatch for "):
        checkpoint.load_model(tmp_path)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("input_shape", [1, 8], "input_shape must be [C, H, W], got [1, 8]"),
    ("input_shape", [1, 8, "8"], "input_shape must be [C, H, W]"),
    ("classes", "abc", "classes must be a list of at least two names"),
    ("classes", ["a"], "classes must be a list of at least two names"),
    ("normalization", "x", 'normalization must be {"mean": [...], "std": [...]}, each one'),
    ("normalization", {}, "normalization must be"),
    ("normalization", {"mean": [0.3], "std": [0.0]}, "the std above 0"),
    ("normalization", {"mean": [0.3, 0.3], "std": [0.2, 0.2]}, "one number per channel (1)"),
])
def test_metadata_of_the_wrong_shape_is_named(tmp_path, field, value, message):
    (tmp_path / "meta.json").write_text(json.dumps({**_meta(), field: value}))
    with pytest.raises(UserError, match=re.escape(message)):
        checkpoint.load_meta(tmp_path)


@pytest.mark.parametrize(("model", "message"), [
    ({"name": 5}, "model.name must be"),
    ({"width": 1.5}, "model.width must be"),
])
def test_a_section_of_the_wrong_types_is_named(tmp_path, model, message):
    meta = {**_meta(), "model": {**_meta()["model"], **model}}
    with pytest.raises(UserError, match=f"its 'model' section cannot be read \\({message}"):
        checkpoint.section(meta, "model", ModelConfig, tmp_path)


def test_a_missing_section_is_named(tmp_path):
    meta = {key: value for key, value in _meta().items() if key != "data"}
    with pytest.raises(UserError, match="its 'data' section cannot be read"):
        checkpoint.section(meta, "data", DataConfig, tmp_path)


def test_metrics_keep_one_line_per_epoch_when_epochs_rerun(tmp_path):
    for epoch, started in [(1, 10.0), (2, 20.0), (3, 30.0), (2, 40.0)]:
        rundir.record_epoch(tmp_path, {"epoch": epoch, "started_at": started})
    assert rundir.read_metrics(tmp_path) == [{"epoch": 1, "started_at": 10.0},
                                             {"epoch": 2, "started_at": 40.0}]


def test_a_run_directory_stands_for_its_best_checkpoint(tmp_path):
    ckpt = tmp_path / "run" / "checkpoint_1"
    checkpoint.save(ckpt, build_model(ModelConfig(width=8), num_classes=3, in_channels=1,
                                      image_size=8), _meta())
    assert checkpoint.resolve(str(ckpt)) == str(ckpt)
    rundir.write_result(tmp_path / "run", {"best_checkpoint": str(ckpt)})
    assert checkpoint.resolve(str(tmp_path / "run")) == str(ckpt)
    search = tmp_path / "search"
    search.mkdir()
    (search / checkpoint.TUNE_RESULT_FILE).write_text(json.dumps({"best_checkpoint": "s3://b/c"}))
    assert checkpoint.resolve(str(search)) == "s3://b/c"
    assert checkpoint.resolve(str(tmp_path / "missing")) == str(tmp_path / "missing")
    assert checkpoint.resolve("s3://bucket/run") == "s3://bucket/run"


def test_a_run_directory_without_a_checkpoint_is_a_user_error(tmp_path):
    rundir.write_result(tmp_path, {"best_checkpoint": None})
    with pytest.raises(UserError, match="names no best checkpoint"):
        checkpoint.resolve(str(tmp_path))
    (tmp_path / rundir.RESULT_FILE).write_text("{torn")
    with pytest.raises(UserError, match="cannot read"):
        checkpoint.resolve(str(tmp_path))
    running = tmp_path / "running"
    model = build_model(ModelConfig(width=8), num_classes=3, in_channels=1, image_size=8)
    for stamp in ("2026-01-02_10-00-00.1", "2026-01-02_09-00-00.1"):
        checkpoint.save(running / f"checkpoint_{stamp}", model, _meta())
    with pytest.raises(UserError, match=f"the latest: {running}/checkpoint_2026-01-02_10-00"):
        checkpoint.resolve(str(running))
