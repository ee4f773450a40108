from pathlib import Path

import pytest

from distdl import recipes
from distdl.config import FILE_SOURCES, Config, DataConfig, resolve
from distdl.errors import UserError


def test_defaults_resolve_to_the_digits_recipe():
    cfg = resolve(recipes.get(recipes.DEFAULT), None, [])
    assert cfg.data.source == "digits"
    assert cfg.train.num_workers == 2
    assert cfg.train.batch_size_per_worker() == cfg.train.batch_size // 2


def test_overrides_parse_values_by_field_type(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 7\noptim:\n  lr: 1e-3\n")
    cfg = resolve(recipes.get("debug"), path, ["train.num_workers=4", "optim.lr=2e-4",
                                              "data.image_size=null", "model.batch_norm=false"])
    assert cfg.train.epochs == 7
    assert cfg.train.num_workers == 4
    assert cfg.optim.lr == pytest.approx(2e-4)
    assert cfg.data.image_size is None
    assert cfg.model.batch_norm is False


def test_text_fields_keep_the_text_that_yaml_would_read_as_a_date_or_number():
    cfg = resolve(recipes.get("debug"), None, ["name=2024-01-01", "data.label_column=007",
                                              "data.image_column=1.50"])
    assert (cfg.name, cfg.data.label_column, cfg.data.image_column) == ("2024-01-01", "007", "1.50")
    spaced = resolve(recipes.get("debug"), None, ["tune.space={optim.lr: {choice: [0.1]}}"])
    assert spaced.tune.space == {"optim.lr": {"choice": [0.1]}}  # a mapping stays one


def test_numbers_read_as_yaml_1_2_reads_them(tmp_path):
    """PyYAML alone reads YAML 1.1: 010 as 8 (octal), 1:30 as 90 (base 60), 1e-3 as text."""
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  epochs: 010\ndata:\n  num_samples: 50_000\n")
    cfg = resolve(recipes.get("debug"), path, ["optim.lr=1e-3", "train.batch_size=0x40"])
    assert (cfg.train.epochs, cfg.data.num_samples, cfg.train.batch_size) == (10, 50_000, 64)
    assert cfg.optim.lr == 0.001
    assert resolve(recipes.get("debug"), None, ["train.epochs=007"]).train.epochs == 7
    with pytest.raises(UserError, match="train.epochs must be of type int; got '1:30'"):
        resolve(recipes.get("debug"), None, ["train.epochs=1:30"])


def test_a_run_directory_config_reads_back_as_the_same_config(tmp_path):
    """A run's config.yaml, given back as --config: text that reads as a number stays text."""
    from distdl.train import rundir

    cfg = resolve(recipes.get("debug"), None, ["name=1e-3", "data.label_column=010"])
    path = tmp_path / "config.yaml"
    path.write_text(rundir.config_text(cfg.to_dict(), {"distdl": "test"}))
    assert resolve(recipes.get("debug"), path, []) == cfg


def test_a_config_file_replaces_the_recipe_search_space(tmp_path):
    path = tmp_path / "search.yaml"
    path.write_text("tune:\n  num_samples: 3\n  space:\n    optim.lr: {choice: [0.1, 0.01]}\n")
    recipe = recipes.get("digits_tune")
    cfg = resolve(recipe, path, [])
    assert len(recipe["tune"]["space"]) > 1  # the recipe searches more than the file does
    assert cfg.tune.space == {"optim.lr": {"choice": [0.1, 0.01]}}
    assert cfg.tune.num_samples == 3
    assert cfg.tune.metric == recipe["tune"]["metric"]  # the section's other fields still merge


def test_config_round_trips_through_a_dict():
    cfg = resolve(recipes.get("shapes_resnet18_gpu"), None, [])
    assert Config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("assignment, message", [
    ("train.epochz=3", "unknown config field 'train.epochz'"),
    ("train.epochs=three", "train.epochs must be of type int"),
    ("train.epochs=2.5", "train.epochs must be of type int"),
    ("optim.optimizer=adam", "optim.optimizer must be one of sgd, adamw"),
    ("optim.lr=-1", "optim.lr must be > 0"),
    ("train.use_gpu=maybe", "train.use_gpu must be of type bool"),
    ("nosuch.field=1", "unknown config field 'nosuch'"),
    ("train", "--set expects section.field=value"),
    ("train.cpus_per_worker=.inf", "train.cpus_per_worker must be a finite number"),
    ("optim.lr=.nan", "optim.lr must be a finite number"),
    ("train.num_workers=3", r"train.batch_size \(64\) must divide evenly among "
                            r"train.num_workers \(3\).*such as 63"),
    ("optim.lr=1" + "0" * 400, r"optim.lr must be a finite number; got 1000.*\.\.\.$"),
    ("optim.lr=" + "[" * 5000, r"optim.lr must be of type float; got '\[\[.*\.\.\.$"),
    ("data.seed=-1", "data.seed must be between 0 and 4294967295"),
    (f"train.seed={2**32}", "train.seed must be between 0 and 4294967295"),
    ("tune.seed=-1", "tune.seed must be between 0 and 4294967295"),
    (f"model.width={10**30}", "model.width must be between 1 and 65536"),
    ("train.cpus_per_worker=1000000", "train.cpus_per_worker must be above 0 and at most 1024"),
    ("name=" + "x" * 201, "name must be at most 200 bytes"),
])
def test_bad_overrides_name_the_field(assignment, message):
    with pytest.raises(UserError, match=message):
        resolve(recipes.get("debug"), None, [assignment])


def test_unknown_recipe_lists_the_choices():
    with pytest.raises(UserError, match="unknown recipe 'nope'.*digits_cpu"):
        recipes.get("nope")


def test_missing_and_malformed_config_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        resolve({}, tmp_path / "absent.yaml", [])
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        resolve({}, bad, [])
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00train")
    with pytest.raises(UserError, match="is not UTF-8 text"):
        resolve({}, binary, [])
    with pytest.raises(UserError, match=f"config file is a folder, not a file: {tmp_path}"):
        resolve({}, tmp_path, [])
    deep = tmp_path / "deep.yaml"
    deep.write_text("train: " + "[" * 5000 + "]" * 5000 + "\n")
    with pytest.raises(UserError, match="nests deeper than a config can"):
        resolve({}, deep, [])


def test_file_sources_name_absolute_paths(tmp_path, monkeypatch):
    from distdl.data import sources

    monkeypatch.chdir(tmp_path)
    cfg = resolve(recipes.get("debug"), None, ["data.source=imagefolder:pets/train"])
    assert cfg.data.source == f"imagefolder:{tmp_path / 'pets' / 'train'}"
    assert DataConfig(source="parquet:~/x.parquet").source == f"parquet:{Path.home() / 'x.parquet'}"
    assert DataConfig(source="digits").source == "digits"
    assert set(sources._FILE_LOADERS) == set(FILE_SOURCES)  # the kinds made absolute
