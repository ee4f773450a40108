"""The search space of `distdl tune`: parsing and validation, no Ray instance."""

from __future__ import annotations

import numpy as np
import pytest

from distdl import config, recipes
from distdl.errors import UserError
from distdl.tune import space


def _cfg(tune_section: dict, **train) -> config.Config:
    raw = config.merge(recipes.get("debug"), {"tune": tune_section, "train": train})
    return config.Config.from_dict(raw)


def test_every_kind_parses_and_ranges_read_yaml_1_1_numbers():
    cfg = _cfg({"space": {
        "optim.lr": {"loguniform": ["1e-4", 0.1]},  # YAML 1.1 leaves 1e-4 a string
        "optim.weight_decay": {"uniform": [0, 1e-3]},
        "model.depth": {"randint": [1, 3]},
        "model.width": {"choice": [8, 16]},
        "optim.optimizer": {"grid": ["sgd", "adamw"]},
    }})
    params = {p.field: p for p in space.parse(cfg)}
    assert params["optim.lr"].values == (1e-4, 0.1)
    assert params["model.depth"].values == (1, 3)
    assert params["optim.optimizer"] == space.Param("optim.optimizer", "grid", ("sgd", "adamw"))


def test_an_integer_range_draws_both_ends_and_only_its_steps():
    cfg = _cfg({"space": {"model.depth": {"randint": [1, 3]},
                          "train.batch_size": {"randint": [32, 256, 32]}}})
    samplers = space.to_tune(space.parse(cfg))
    rng = np.random.default_rng(0)
    drawn = {field: set(sampler.sample(size=500, random_state=rng))
             for field, sampler in samplers.items()}
    assert drawn["model.depth"] == {1, 2, 3}
    assert drawn["train.batch_size"] == set(range(32, 257, 32))


def test_a_range_without_a_step_says_how_to_add_one():
    with pytest.raises(UserError, match=r"a range can step over values: \[low, high, step\]"):
        space.parse(_cfg({"space": {"train.batch_size": {"randint": [32, 256]}}}))


def test_the_recipe_space_is_valid():
    cfg = config.Config.from_dict(recipes.get("digits_tune"))
    fields = {p.field for p in space.parse(cfg)}
    assert {"optim.lr", "optim.weight_decay", "optim.label_smoothing", "train.batch_size",
            "model.width"} <= fields


def test_apply_sets_sampled_values_and_keeps_the_rest():
    base = _cfg({"space": {"optim.lr": {"loguniform": [1e-4, 1e-1]}}})
    cfg = space.apply(base, {"optim.lr": 0.02, "model.width": 16, "train.batch_size": 32})
    assert (cfg.optim.lr, cfg.model.width, cfg.train.batch_size) == (0.02, 16, 32)
    assert cfg.optim.weight_decay == base.optim.weight_decay and cfg.name == base.name


@pytest.mark.parametrize(("section", "message"), [
    ({"space": {}}, "tune.space is empty"),
    ({"space": {"optim.learning_rate": {"uniform": [0.1, 0.2]}}},
     "unknown field 'optim.learning_rate'"),
    ({"space": {"solver.lr": {"uniform": [0.1, 0.2]}}}, "unknown field 'solver.lr'"),
    ({"space": {"optim": {"uniform": [0.1, 0.2]}}}, "unknown field 'optim'"),
    ({"space": {"tune.seed": {"randint": [0, 3]}}}, "unknown field 'tune.seed'"),
    ({"space": {"optim.lr": {"loguniform": [0.1, 0.001]}}}, "low (0.1) must be below high (0.001)"),
    ({"space": {"optim.lr": {"loguniform": [0, 0.1]}}}, "a log scale needs bounds > 0"),
    ({"space": {"optim.weight_decay": {"uniform": [-0.1, 0.0]}}},
     "optim.weight_decay must be >= 0"),
    ({"space": {"model.width": {"uniform": [8, 16]}}}, "model.width must be of type int"),
    ({"space": {"model.depth": {"randint": [1.5, 3]}}}, "needs integer bounds"),
    ({"space": {"model.depth": {"randint": [1, 3, 0]}}}, "the step must be >= 1; got 0"),
    ({"space": {"train.batch_size": {"randint": [30, 250, 32]}}},
     "low and high must be multiples of the step (32); got [30, 250, 32], e.g. [32, 224, 32]"),
    ({"space": {"train.batch_size": {"randint": [32, 256]}}},
     "value 33 is not valid: train.batch_size (33) must divide evenly among train.num_workers"),
    ({"space": {"train.batch_size": {"randint": [6, 12, 3]}}}, "value 9 is not valid"),
    ({"space": {"optim.lr": {"normal": [0, 1]}}}, "unknown kind 'normal'"),
    ({"space": {"optim.lr": {"uniform": [0.1]}}}, "needs [low, high]"),
    ({"space": {"optim.lr": {"choice": []}}}, "needs a non-empty list"),
    ({"space": {"optim.lr": 0.1}}, "must be one mapping"),
    ({"space": {1: {"choice": [1]}}}, "each key names a field as section.field; got 1"),
    ({"space": {"train.num_workers": {"choice": [1, 2]}}}, "cannot vary train.num_workers"),
    ({"space": {"train.epochs": {"randint": [2, 4]}}}, "cannot vary train.epochs"),
    ({"space": {"data.source": {"grid": ["digits", "nosuchdata"]}}},
     "tune.space cannot vary data.source: the data is loaded once for every trial; set it "
     "outside tune.space"),
    ({"space": {"data.image_size": {"choice": [8, 16]}}}, "cannot vary data.image_size"),
    ({"space": {"data.nosuch": {"choice": [1]}}}, "unknown field 'data.nosuch'"),
    ({"space": {"model.name": {"grid": ["small_cnn", "nosuchmodel"]}}},
     "tune.space.model.name.grid: value 'nosuchmodel' is not valid: unknown model 'nosuchmodel'"),
    ({"space": {"model.name": {"choice": ["torchvision:nosuch"]}}},
     "value 'torchvision:nosuch' is not valid: unknown torchvision model 'nosuch'"),
    ({"space": {"train.batch_size": {"randint": [1, 6, 10]}}},
     "got [1, 6, 10], but no two multiples of 10 lie between 1 and 6: lower the step or widen "
     "the range"),
    ({"space": {"train.batch_size": {"randint": [1, 12, 10]}}},
     "but no two multiples of 10 lie between 1 and 12"),
    ({"space": {"optim": {"lr": {"loguniform": ["1e-4", "1e-1"]}}}},
     "tune.space: 'optim' is a section; name each searched field as one dotted key, e.g. "
     "--set 'tune.space={optim.lr: {loguniform: [1e-4, 1e-1]}}'"),
    ({"space": {"optim.lr": {"uniform": [0.1, 0.2]}}, "grace_period": 5},
     "tune.grace_period (5) must not exceed train.epochs (2)"),
])
def test_bad_spaces_are_one_clear_user_error(section, message):
    with pytest.raises(UserError) as info:
        space.parse(_cfg(section))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("section", "message"), [
    ({"metric": "accuracy"}, "tune.metric 'accuracy' is never reported by training"),
    ({"mode": "maximize"}, "tune.mode must be one of max, min"),
    ({"scheduler": "pbt"}, "tune.scheduler must be one of asha, fifo"),
    ({"num_samples": 0}, "tune.num_samples must be >= 1"),
    ({"space": ["optim.lr"]}, "tune.space must be of type dict"),
])
def test_bad_tune_settings_fail_when_the_config_is_built(section, message):
    with pytest.raises(UserError, match=None) as info:
        _cfg(section)
    assert message in str(info.value)


def test_every_data_field_but_the_per_trial_cache_is_fixed():
    """Each data field a trial could not honour is refused; the one read per trial is kept."""
    for field in config.DataConfig.__dataclass_fields__:
        cfg = _cfg({"space": {f"data.{field}": {"choice": [0]}}})
        if f"data.{field}" in space.PER_TRIAL_DATA_FIELDS:
            assert [p.field for p in space.parse(cfg)] == [f"data.{field}"]
        else:
            with pytest.raises(UserError, match=f"cannot vary data.{field}: the data is loaded"):
                space.parse(cfg)
    assert space.PER_TRIAL_DATA_FIELDS == ("data.cache_max_mb",)


def test_a_model_name_space_of_known_models_parses():
    cfg = _cfg({"space": {"model.name": {"choice": ["small_cnn", "resnet18"]}}})
    assert space.parse(cfg)[0].values == ("small_cnn", "resnet18")


def test_a_set_into_a_space_section_says_how_to_write_the_field():
    """`--set tune.space.optim.lr=...` nests the field under a section: the message names the
    dotted form, which works."""
    raw = config.resolve(recipes.get("debug"), None,
                         ["tune.space.optim.lr={loguniform: [1.0e-4, 1.0e-1]}"])
    with pytest.raises(UserError) as info:
        space.parse(raw)
    suggested = str(info.value).split("--set '")[1].split("'")[0]
    assert suggested == "tune.space={optim.lr: {loguniform: [0.0001, 0.1]}}"
    fixed = config.resolve(recipes.get("debug"), None, [suggested])
    assert space.parse(fixed) == [space.Param("optim.lr", "loguniform", (1e-4, 0.1))]
