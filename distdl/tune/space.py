"""The search space of `tune.space`: parsed, checked against the Config, turned into Tune's.

A space maps dotted config fields to one sampling spec each:

    optim.lr:           {loguniform: [1.0e-4, 1.0e-1]}   # low, high; both > 0
    optim.weight_decay: {uniform: [0.0, 1.0e-3]}
    model.width:        {choice: [8, 16, 32]}
    model.depth:        {randint: [1, 3]}                 # both ends included
    optim.optimizer:    {grid: [sgd, adamw]}              # every value, num_samples times each

Every bound and listed value is checked by building a Config with it, so a value the field
would refuse (a negative learning rate, a string for an int) fails here, before Ray starts.
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


@dataclass(frozen=True)
class Param:
    """One searched field: how it is sampled and from what."""

    field: str
    kind: str
    values: tuple[Any, ...]
    """[low, high] for the range kinds, the candidates for choice and grid."""


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
    _check_field(name)
    if not isinstance(spec, dict) or len(spec) != 1:
        raise UserError(f"tune.space.{name} must be one mapping such as {{loguniform: [low, high]}}"
                        f"; got {spec!r}")
    ((kind, values),) = spec.items()
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
    if kind == "randint":
        if not (low.is_integer() and high.is_integer()):
            raise UserError(f"{where} needs integer bounds; got {values!r}")
        return int(low), int(high)
    return low, high


def _check_field(name: str) -> None:
    """The dotted name must be a plain field of a Config section (not a section, not tune)."""
    if not isinstance(name, str):
        raise UserError(f"tune.space: each key names a field as section.field; got {name!r}")
    if name in FIXED_FIELDS:
        raise UserError(f"tune.space cannot vary {name}: it is fixed for the whole search; "
                        "set it outside tune.space")
    section, _, leaf = name.partition(".")
    hints = typing.get_type_hints(Config)
    searchable = [f.name for f in dataclasses.fields(Config)
                  if dataclasses.is_dataclass(hints[f.name]) and f.name != "tune"]
    if section not in searchable or "." in leaf:
        raise UserError(f"tune.space: unknown field '{name}'; use section.field with a section "
                        f"of: {', '.join(searchable)}")
    fields = {f.name for f in dataclasses.fields(hints[section])}
    if leaf not in fields:
        raise UserError(f"tune.space: unknown field '{name}'; {section} has: "
                        f"{', '.join(sorted(fields))}")


def _check_values(cfg: Config, param: Param) -> None:
    """Build a Config with each bound or candidate: the field's own checks judge the value."""
    for value in param.values:
        try:
            apply(cfg, {param.field: value})
        except UserError as exc:
            raise UserError(f"tune.space.{param.field}.{param.kind}: value {value!r} is not "
                            f"valid: {exc}") from None


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
        "loguniform": lambda v: tune.loguniform(*v),
        "uniform": lambda v: tune.uniform(*v),
        "randint": lambda v: tune.randint(v[0], v[1] + 1),  # Tune's high is exclusive
        "choice": lambda v: tune.choice(list(v)),
        "grid": lambda v: tune.grid_search(list(v)),
    }
    return {p.field: samplers[p.kind](p.values) for p in params}
