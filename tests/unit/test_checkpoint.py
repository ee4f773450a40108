import json

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
    (tmp_path / "meta.json").write_text(json.dumps(_meta()))
    (tmp_path / "model.pt").write_bytes(b"\x00garbage")
    with pytest.raises(UserError, match="corrupt checkpoint weights"):
        checkpoint.load_model(tmp_path)


def test_metrics_keep_one_line_per_epoch_when_epochs_rerun(tmp_path):
    for epoch, started in [(1, 10.0), (2, 20.0), (3, 30.0), (2, 40.0)]:
        rundir.record_epoch(tmp_path, {"epoch": epoch, "started_at": started})
    assert rundir.read_metrics(tmp_path) == [{"epoch": 1, "started_at": 10.0},
                                             {"epoch": 2, "started_at": 40.0}]
