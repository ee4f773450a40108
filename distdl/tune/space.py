"""The search space of `tune.space`: parsed, checked against the Config, turned into Tune's.

A space maps dotted config fields to one sampling spec each:

    optim.lr:           {loguniform: [1.0e-4, 1.0e-1]}   # low, high; both > 0
    optim.weight_decay: {uniform: [0.0, 1.0e-3]}
    model.width:        {choice: [8, 16, 32]}
    model.depth:        {randint: [1, 3]}                 # both ends included
    train.batch_size:   {randint: [32, 256, 32]}          # with a step: 32, 64, ..., 256
    optim.optimizer:    {grid: [sgd, adamw]}              # every value, num_samples times each

Every bound and listed value is checked by building a Config with it, so a value the field
would refuse (a negative learning rate, a string for an int) fails here, before Ray starts. An
integer range is checked at its two lowest values and its highest (`_checked_values`).
No Ray import at module level: the checks run in unit tests without Ray.
"""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass
from typing import Any

from distdl.config import Config, merge
from distdl.errors import UserError

RANGE_KINDS = ("loguniform", "uniform", "randint")
LIST_KINDS = ("choice", "grid")
# Resources per trial are fixed for the whole search (they size its concurrency), epochs are the
# budget that ASHA divides into rungs, and the run name is set per trial: none of these can vary.
FIXED_FIELDS = ("name", "train.epochs", "train.num_workers", "train.cpus_per_worker",
                "train.use_gpu")
# The search loads its data once, from the base config, for every trial (tuner.run): a trial's
# data.source, split or image size would be recorded in its checkpoints but never used. Only
# data.cache_max_mb is read per trial (trainer.worker_spec: whether its workers hold their
# shard in memory), so it alone may vary.
PER_TRIAL_DATA_FIELDS = ("data.cache_max_mb",)


@dataclass(frozen=True)
class Param:
    """One searched field: how it is sampled and from what."""

    field: str
    kind: str
    values: tuple[Any, ...]
    """[low, high] for the range kinds, the candidates for choice and grid."""
    step: int = 1
    """randint only: the values drawn are low, low + step, ..., high."""


def parse(cfg: Config) -> list[Param]:
    """Check `cfg.tune` as a whole against `cfg`; raises UserError naming the problem and the fix."""
    space = cfg.tune.space
    if not space:
        raise UserError("tune.space is empty; add at least one field to search, e.g. "
                        "--set 'tune.space={optim.lr: {loguniform: [1.0e-4, 1.0e-1]}}' or a "
                        "tune.space section in the --config file")
    if cfg.tune.scheduler == "asha" and cfg.tune.grace_period > cfg.train.epochs:
        raise UserError(f"tune.grace_period ({cfg.tune.grace_period}) must not exceed "
                        f"train.epochs ({cfg.train.epochs})")
    params = [_param(name, spec) for name, spec in space.items()]
    for param in params:
        _check_values(cfg, param)
    return params


def _param(name: str, spec: Any) -> Param:
    _check_not_nested(name, spec)
    _check_field(name)
    if not isinstance(spec, dict) or len(spec) != 1:
        raise UserError(f"tune.space.{name} must be one mapping such as {{loguniform: [low, high]}}"
                        f"; got {spec!r}")
    ((kind, values),) = spec.items()
    if kind == "randint":
        return _int_range(name, values)
    if kind in RANGE_KINDS:
        return Param(name, kind, _range(name, kind, values))
    if kind in LIST_KINDS:
        if not isinstance(values, list) or not values:
            raise UserError(f"tune.space.{name}.{kind} needs a non-empty list of values")
        return Param(name, kind, tuple(values))
    raise UserError(f"tune.space.{name}: unknown kind '{kind}'; "
                    f"choose one of: {', '.join(RANGE_KINDS + LIST_KINDS)}")


def _range(name: str, kind: str, values: Any) -> tuple[float, float]:
    where = f"tune.space.{name}.{kind}"
    if not isinstance(values, list) or len(values) != 2:
        raise UserError(f"{where} needs [low, high]; got {values!r}")
    try:
        if any(isinstance(v, bool) for v in values):
            raise TypeError  # float(True) would pass
        # float() also reads YAML 1.1's 1e-4 (no dot), which YAML leaves a string.
        low, high = (float(v) for v in values)
    except (TypeError, ValueError):
        raise UserError(f"{where} needs two numbers [low, high]; got {values!r}") from None
    if low >= high:
        raise UserError(f"{where}: low ({low:g}) must be below high ({high:g})")
    if kind == "loguniform" and low <= 0:
        raise UserError(f"{where}: a log scale needs bounds > 0; got low {low:g}")
    return low, high


def _int_range(name: str, values: Any) -> Param:
    """randint: [low, high] or [low, high, step]; low and high are both drawn."""
    where = f"tune.space.{name}.randint"
    if not isinstance(values, list) or len(values) not in (2, 3):
        raise UserError(f"{where} needs [low, high] or [low, high, step]; got {values!r}")
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise UserError(f"{where} needs integer bounds; got {values!r}")
    low, high, step = (*values, 1)[:3]
    if low >= high:
        raise UserError(f"{where}: low ({low}) must be below high ({high})")
    if step < 1:
        raise UserError(f"{where}: the step must be >= 1; got {step}")
    if low % step or high % step:
        raise UserError(f"{where}: low and high must be multiples of the step ({step}); got "
                        f"{values!r}, {_step_hint(low, high, step)}")
    return Param(name, "randint", (low, high), step)


def _step_hint(low: int, high: int, step: int) -> str:
    """The multiples of `step` within [low, high] as an example range, where there are two."""
    inner_low, inner_high = -(-low // step) * step, high // step * step  # low up, high down
    if inner_low < inner_high:
        return f"e.g. [{inner_low}, {inner_high}, {step}]"
    return (f"but no two multiples of {step} lie between {low} and {high}: lower the step or "
            "widen the range")


def _check_not_nested(name: Any, spec: Any) -> None:
    """A section holding fields, as `--set tune.space.optim.lr=...` or a nested YAML mapping
    make: each searched field is one dotted key, so say how to write it."""
    if not (isinstance(name, str) and name in _searchable_sections() and isinstance(spec, dict)
            and spec and not set(spec) & {*RANGE_KINDS, *LIST_KINDS}):
        return
    leaf, sampler = next(iter(spec.items()))
    raise UserError(f"tune.space: '{name}' is a section; name each searched field as one dotted "
                    f"key, e.g. --set 'tune.space={{{name}.{leaf}: {_flow(sampler)}}}' (a --set "
                    f"of tune.space.{name}.{leaf}=... nests it instead)")


def _flow(value: Any) -> str:
    """`value` as one line of YAML flow style, as it would be written in a --set."""
    import yaml

    return yaml.safe_dump(value, default_flow_style=True, width=10**6).strip()


def _searchable_sections() -> list[str]:
    hints = typing.get_type_hints(Config)
    return [f.name for f in dataclasses.fields(Config)
            if dataclasses.is_dataclass(hints[f.name]) and f.name != "tune"]


def _check_field(name: str) -> None:
    """The dotted name must be a plain field of a Config section (not a section, not tune)."""
    if not isinstance(name, str):
        raise UserError(f"tune.space: each key names a field as section.field; got {name!r}")
    if name in FIXED_FIELDS:
        raise UserError(f"tune.space cannot vary {name}: it is fixed for the whole search; "
                        "set it outside tune.space")
    section, _, leaf = name.partition(".")
    hints = typing.get_type_hints(Config)
    searchable = _searchable_sections()
    if section not in searchable or "." in leaf:
        raise UserError(f"tune.space: unknown field '{name}'; use section.field with a section "
                        f"of: {', '.join(searchable)}")
    fields = {f.name for f in dataclasses.fields(hints[section])}
    if leaf not in fields:
        raise UserError(f"tune.space: unknown field '{name}'; {section} has: "
                        f"{', '.join(sorted(fields))}")
    if name.startswith("data.") and name not in PER_TRIAL_DATA_FIELDS:
        raise UserError(f"tune.space cannot vary {name}: the data is loaded once for every "
                        "trial; set it outside tune.space")


def _check_values(cfg: Config, param: Param) -> None:
    """Build a Config with each bound or candidate: the field's own checks judge the value.
    A model name is checked against the models too, as `distdl train` does before Ray starts:
    a Config takes any string, and a bad name would fail only inside its trials."""
    for value in _checked_values(param):
        try:
            trial = apply(cfg, {param.field: value})
            if param.field == "model.name":
                from distdl.model_names import check_name

                check_name(trial.model.name)
        except UserError as exc:
            hint = ("; a range can step over values: [low, high, step]"
                    if param.kind == "randint" and param.step == 1 else "")
            raise UserError(f"tune.space.{param.field}.{param.kind}: value {value!r} is not "
                            f"valid: {exc}{hint}") from None


def _checked_values(param: Param) -> tuple[Any, ...]:
    """The values that stand for all: a field's bounds are checked at the ends of a range. An
    integer range's two lowest values are checked too: when both divide by n, so does the step,
    and then every value does (train.batch_size must divide among train.num_workers)."""
    if param.kind != "randint":
        return param.values
    low, high = param.values
    return (low, low + param.step, high)


def apply(cfg: Config, values: dict[str, Any]) -> Config:
    """`cfg` with the sampled `values` (dotted field -> value) set, validated like any config."""
    nested: dict[str, Any] = {}
    for name, value in values.items():
        section, _, leaf = name.partition(".")
        nested.setdefault(section, {})[leaf] = value
    return Config.from_dict(merge(cfg.to_dict(), nested))


def to_tune(params: list[Param]) -> dict[str, Any]:
    """Tune's param_space: one sampler per dotted field."""
    from ray import tune

    samplers = {
        "loguniform": lambda p: tune.loguniform(*p.values),
        "uniform": lambda p: tune.uniform(*p.values),
        "randint": _int_sampler,
        "choice": lambda p: tune.choice(list(p.values)),
        "grid": lambda p: tune.grid_search(list(p.values)),
    }
    return {p.field: samplers[p.kind](p) for p in params}


def _int_sampler(param: Param) -> Any:
    """Both ends drawn: Tune's randint, and its qrandint for a step of 1, exclude the high end."""
    from ray import tune

    low, high = param.values
    if param.step == 1:
        return tune.randint(low, high + 1)
    return tune.qrandint(low, high, param.step)
