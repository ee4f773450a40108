"""A search's saved settings: written once, read back on --resume, from a path or a URI."""

from __future__ import annotations

import pytest

from distdl import cli, config, recipes
from distdl.errors import UserError
from distdl.tune import tuner


def _settings(*overrides: str) -> config.Config:
    return config.resolve(recipes.get("digits_tune"), None, list(overrides))


def test_a_search_that_saved_no_settings_has_no_resumed_config(tmp_path):
    """A search started before distdl saved its settings has no config.yaml: resumed_config
    is None, and cmd_tune then goes on with the arguments' settings."""
    (tmp_path / "old").mkdir()
    assert tuner.saved_config(str(tmp_path / "old")) is None
    assert tuner.resumed_config(str(tmp_path / "old"), _settings("train.epochs=3")) is None


def test_settings_saved_under_a_uri_read_back_and_refuse_changes(tmp_path):
    experiment = f"file://{tmp_path}/search"
    saved = _settings("train.epochs=3", "model.width=8")
    tuner.save_config(experiment, saved)
    assert tuner.saved_config(experiment).to_dict() == saved.to_dict()
    assert tuner.resumed_config(experiment, None).to_dict() == saved.to_dict()
    with pytest.raises(UserError, match=r"change its model\.width, train\.epochs: drop them"):
        tuner.resumed_config(experiment, _settings("train.epochs=4", "model.width=16"))


def test_the_train_command_gets_a_local_copy_of_settings_stored_elsewhere(tmp_path):
    """`distdl train --config` reads a local file: storage under a URI is copied to --output."""
    saved = _settings("train.epochs=3")
    path = cli._local_config_file(saved, f"file://{tmp_path}/storage/search", tmp_path / "out")
    assert path == f"{tmp_path}/out/config.yaml"
    assert config.resolve(recipes.get("digits_tune"), path, []).to_dict() == saved.to_dict()
    local = cli._local_config_file(saved, f"{tmp_path}/search", tmp_path / "out")
    assert local == f"{tmp_path}/search/config.yaml"
