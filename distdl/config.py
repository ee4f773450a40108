"""Typed run configuration: dataclasses, YAML files and `--set section.field=value` overrides.

Every field is checked when the config is built, so a typo or a value of the wrong type fails
before Ray starts, with a message that names the field and the fix.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from distdl.errors import UserError


IMAGE_SIDES = (4, 1024)
"""The sides in pixels that images are trained at, from data.image_size or a file source."""
MAX_WIDTH = 65_536  # model.width: far past any model a node can hold, short of torch's overflows
MAX_CPUS_PER_WORKER = 1024
MAX_NAME_BYTES = 200  # a folder name, with room for the suffixes Ray Train adds (255 at most)
FILE_SOURCES = ("imagefolder", "parquet", "cifar10")  # data.source kinds that name a path


@dataclass(kw_only=True)
class DataConfig:
    source: str = "digits"
    """Dataset name or URI: digits, shapes, imagefolder:PATH, parquet:PATH or cifar10:PATH (a
    relative PATH is made absolute)."""
    val_fraction: float = 0.2
    """Share of the examples held out for validation (a seeded, deterministic split)."""
    image_size: int | None = None
    """Side in pixels that images are resized to; None keeps the source's own size."""
    num_samples: int = 4000
    """How many images the generated `shapes` source makes (train and validation together)."""
    image_column: str = "image"
    """Parquet sources: the column of encoded images (bytes) or pixel arrays."""
    label_column: str = "label"
    """Parquet sources: the column of class labels (integers or strings)."""
    cache_max_mb: int = 2048
    """A worker keeps its shard in memory as tensors when it is smaller than this (MiB)."""
    seed: int = 0
    """Seed of the train/validation split and of generated data."""

    def __post_init__(self) -> None:
        _check(0.0 < self.val_fraction < 1.0, "data.val_fraction must be between 0 and 1")
        _check_seed(self.seed, "data.seed")
        low, high = IMAGE_SIDES
        _check(self.image_size is None or low <= self.image_size <= high,
               f"data.image_size must be between {low} and {high} pixels (or null)")
        _check(self.num_samples >= 20, "data.num_samples must be at least 20")
        _check(self.cache_max_mb >= 0, "data.cache_max_mb must be >= 0")
        kind, _, path = self.source.partition(":")
        if kind in FILE_SOURCES and path:
            # So that config.yaml, the checkpoints' meta.json (read by `distdl evaluate`) and
            # Tune's trials, which run in folders of their own, name the same files from anywhere.
            self.source = f"{kind}:{Path(path).expanduser().resolve()}"


@dataclass(kw_only=True)
class ModelConfig:
    name: str = "small_cnn"
    """small_cnn, resnet18, or torchvision:NAME for any torchvision classifier (random init)."""
    width: int = 32
    """Channels of the first convolution; later stages scale from it."""
    depth: int = 2
    """small_cnn: number of conv blocks (each halves the resolution)."""
    dropout: float = 0.1
    """Dropout before the classifier."""
    batch_norm: bool = True
    """small_cnn: batch norm after each convolution (off for exact DDP-vs-single checks)."""

    def __post_init__(self) -> None:
        _check(1 <= self.width <= MAX_WIDTH, f"model.width must be between 1 and {MAX_WIDTH}")
        _check(1 <= self.depth <= 6, "model.depth must be between 1 and 6")
        _check(0.0 <= self.dropout < 1.0, "model.dropout must be in [0, 1)")


@dataclass(kw_only=True)
class OptimConfig:
    optimizer: Literal["sgd", "adamw"] = "adamw"
    """SGD with Nesterov momentum, or AdamW."""
    lr: float = 3e-3
    """Peak learning rate for the global batch (it does not change with the worker count)."""
    momentum: float = 0.9
    """SGD momentum (AdamW uses it as beta1)."""
    weight_decay: float = 5e-4
    """Decoupled weight decay, applied to weights but not to biases and norms."""
    schedule: Literal["cosine", "onecycle", "constant"] = "cosine"
    """cosine: linear warm-up then cosine decay to zero; onecycle: PyTorch's OneCycleLR."""
    warmup_epochs: float = 1.0
    """Epochs of linear warm-up before the cosine decay (at most half the run)."""
    label_smoothing: float = 0.0
    """Cross-entropy label smoothing."""

    def __post_init__(self) -> None:
        _check(self.lr > 0, "optim.lr must be > 0")
        _check(0.0 <= self.momentum < 1.0, "optim.momentum must be in [0, 1)")
        _check(self.weight_decay >= 0, "optim.weight_decay must be >= 0")
        _check(self.warmup_epochs >= 0, "optim.warmup_epochs must be >= 0")
        _check(0.0 <= self.label_smoothing < 1.0, "optim.label_smoothing must be in [0, 1)")


@dataclass(kw_only=True)
class TrainConfig:
    epochs: int = 15
    """Epochs to train in total; a resumed run continues up to this number."""
    batch_size: int = 64
    """Global batch size: each of N workers takes batch_size / N, so N does not change the math."""
    num_workers: int = 2
    """Ray Train workers, one DDP rank each."""
    use_gpu: bool = False
    """One GPU per worker, NCCL; on CPU, gloo."""
    cpus_per_worker: float = 1.0
    """CPUs reserved per worker; also its torch thread count."""
    amp: bool = True
    """GPU only: automatic mixed precision, bf16 where supported, else fp16 with a grad scaler."""
    channels_last: bool = True
    """Channels-last memory format for convolutions, on GPU and CPU workers alike."""
    compile: bool = False
    """torch.compile the model (slow to start; pays off for long GPU runs)."""
    shm_allreduce: bool = True
    """CPU only: ranks on one node average gradients through shared memory instead of gloo."""
    keep_checkpoints: int = 2
    """Best checkpoints kept by validation accuracy (the latest is always kept too, to resume)."""
    report_interval_s: float = 1.0
    """Epochs shorter than this are reported to Ray Train together, with one checkpoint of the
    latest: at most one report per interval, plus the last epoch and every new best validation
    accuracy. 0 reports, and checkpoints, every epoch."""
    max_failures: int = 2
    """Worker-group restarts from the latest checkpoint before the run fails."""
    seed: int = 0
    """Seed of weight init and of the per-epoch shuffle."""

    def __post_init__(self) -> None:
        _check(self.epochs >= 1, "train.epochs must be >= 1")
        _check(self.num_workers >= 1, "train.num_workers must be >= 1")
        _check(self.batch_size >= self.num_workers,
               "train.batch_size must be at least train.num_workers (one example per worker)")
        _check(self.batch_size % self.num_workers == 0,
               f"train.batch_size ({self.batch_size}) must divide evenly among train.num_workers "
               f"({self.num_workers}), so that the global batch stays what it says; choose a "
               f"multiple of {self.num_workers}, such as "
               f"{self.batch_size // self.num_workers * self.num_workers}")
        _check(0 < self.cpus_per_worker <= MAX_CPUS_PER_WORKER,
               f"train.cpus_per_worker must be above 0 and at most {MAX_CPUS_PER_WORKER}")
        _check_seed(self.seed, "train.seed")
        _check(self.keep_checkpoints >= 1, "train.keep_checkpoints must be >= 1")
        _check(self.report_interval_s >= 0, "train.report_interval_s must be >= 0")
        _check(self.max_failures >= 0, "train.max_failures must be >= 0")

    def batch_size_per_worker(self) -> int:
        return self.batch_size // self.num_workers

    def worker_cpus(self) -> float:
        """CPUs the run's worker group holds (its driver holds none)."""
        return self.num_workers * self.cpus_per_worker


# What each epoch reports (distdl/train/worker.py): the metrics a search can select on.
TRAINING_METRICS = ("epoch", "train_loss", "val_loss", "val_accuracy", "samples_per_s", "epoch_s", "lr")


@dataclass(kw_only=True)
class TuneConfig:
    space: dict[str, dict[str, Any]] = field(default_factory=dict)
    """Search space: dotted field -> {loguniform|uniform: [low, high]}, {randint: [low, high]} or
    [low, high, step], or {choice|grid: [...]} (`distdl.tune.space`)."""
    num_samples: int = 8
    """Configs drawn from the space (with `grid` entries: draws per grid point)."""
    scheduler: Literal["asha", "fifo"] = "asha"
    """asha: stop trials early that trail the others at the same epoch; fifo: run every trial out."""
    metric: str = "val_accuracy"
    """Reported metric that ranks trials and picks the best checkpoint."""
    mode: Literal["max", "min"] = "max"
    """Whether a higher or a lower `metric` is better."""
    grace_period: int = 1
    """asha: epochs every trial trains before it may be stopped."""
    reduction_factor: int = 2
    """asha: about 1/reduction_factor of the trials reaching a rung go on to the next one."""
    max_concurrent_trials: int = 0
    """Trials running at once; 0: as many as the cluster can place (never more)."""
    max_failures: int = 1
    """Restarts of a failed trial driver; its workers restart per train.max_failures."""
    seed: int = 0
    """Seed of the sampled configs: the same seed draws the same trials."""

    def __post_init__(self) -> None:
        _check(self.num_samples >= 1, "tune.num_samples must be >= 1")
        _check_seed(self.seed, "tune.seed")
        _check(self.metric in TRAINING_METRICS,
               f"tune.metric '{self.metric}' is never reported by training; "
               f"choose one of: {', '.join(TRAINING_METRICS)}")
        _check(self.grace_period >= 1, "tune.grace_period must be >= 1 epoch")
        _check(self.reduction_factor >= 2, "tune.reduction_factor must be >= 2")
        _check(self.max_concurrent_trials >= 0, "tune.max_concurrent_trials must be >= 0")
        _check(self.max_failures >= 0, "tune.max_failures must be >= 0")


@dataclass(kw_only=True)
class Config:
    name: str = "digits"
    """Run name: the folder under the storage path; rerunning a name resumes it."""
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tune: TuneConfig = field(default_factory=TuneConfig)

    def __post_init__(self) -> None:
        _check(bool(self.name) and "/" not in self.name and self.name not in (".", ".."),
               "name must be a plain folder name (no '/')")
        _check(len(self.name.encode()) <= MAX_NAME_BYTES,
               f"name must be at most {MAX_NAME_BYTES} bytes: it names folders")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Config:
        return build_section(cls, raw, prefix="")


def _check_seed(seed: int, field: str) -> None:
    _check(0 <= seed < 2**32, f"{field} must be between 0 and {2**32 - 1} (numpy's seed range)")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def build_section(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a nested dict, checking names and types on the way."""
    if not isinstance(raw, dict):
        raise UserError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            raise UserError(f"unknown config field '{prefix}{key}'; known: {', '.join(sorted(names))}")
        kind = hints[key]
        if dataclasses.is_dataclass(kind):
            kwargs[key] = build_section(kind, value, f"{prefix}{key}.")
        else:
            kwargs[key] = _coerce(value, kind, f"{prefix}{key}")
    return cls(**kwargs)


def _coerce(value: Any, kind: Any, name: str) -> Any:
    """Return `value` as type `kind`, or raise UserError naming the field and the expected type."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(value, inner, name)
    if origin is Literal:
        if value not in args:
            raise UserError(f"{name} must be one of {', '.join(map(str, args))}; got {value!r}")
        return value
    if kind is float and not isinstance(value, bool):
        try:
            number = float(value)  # "1e-3" written in a YAML string, say
        except OverflowError:  # an integer of hundreds of digits
            raise UserError(f"{name} must be a finite number; got {_shown(value)}") from None
        except (TypeError, ValueError):
            pass
        else:
            if not math.isfinite(number):
                raise UserError(f"{name} must be a finite number; got {_shown(value)}")
            return number
    if kind in (int, str, bool) and type(value) is kind:
        return value
    if origin is dict and isinstance(value, dict):
        return dict(value)  # free-form mappings (tune.space) are checked by their own parser
    raise UserError(f"{name} must be of type {getattr(kind, '__name__', kind)}; "
                    f"got {_shown(value)}")


def _shown(value: Any, limit: int = 60) -> str:
    """repr(value), cut short: an error line stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


class _Loader(yaml.SafeLoader):
    """YAML with YAML 1.2's numbers. PyYAML follows YAML 1.1, which reads 010 as 8 (octal),
    1:30 as 90 (base 60) and 1e-3 as text: here they are 10, the text '1:30', and 0.001.
    Python's digit groups stay in decimal integers: 50_000 is an int, as YAML 1.1 reads it."""


_INT, _FLOAT = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in (_INT, _FLOAT)]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
# The int resolver comes first: a string of digits is an int, though it matches both.
_Loader.add_implicit_resolver(
    _INT, re.compile(r"^(?:[-+]?[0-9]+(?:_[0-9]+)*|0o[0-7]+|0x[0-9a-fA-F]+)$"),
    list("-+0123456789"))
_Loader.add_implicit_resolver(
    _FLOAT, re.compile(r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?"
                       r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"),
    list("-+.0123456789"))


def _construct_int(loader: _Loader, node: yaml.ScalarNode) -> int:
    text = loader.construct_scalar(node)
    if text.startswith(("0o", "0x")):
        return int(text[2:], 8 if text[1] == "o" else 16)
    return int(text)  # decimal, leading zeros and digit groups too


_Loader.add_constructor(_INT, _construct_int)


def parse_yaml(text: str) -> Any:
    """Parse YAML text as distdl reads every config: YAML with YAML 1.2's numbers."""
    return yaml.load(text, Loader=_Loader)  # a SafeLoader: it builds no Python objects


class _Dumper(yaml.SafeDumper):
    """Writes what parse_yaml reads back the same: it quotes the text that _Loader would read
    as a number (a run named 1e-3), and only that."""

    yaml_implicit_resolvers = _Loader.yaml_implicit_resolvers


def dump_yaml(data: Any) -> str:
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        problem = "is a folder, not a file" if path.is_dir() else "not found"
        raise UserError(f"config file {problem}: {path}")
    try:
        raw = parse_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
    except RecursionError:  # thousands of nested brackets
        raise UserError(f"config file {path} nests deeper than a config can") from None
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text (is it a YAML file?)") from None
    except OSError as exc:
        raise UserError(f"cannot read config file {path}: {exc.strerror or exc}") from None
    if not isinstance(raw, dict):
        raise UserError(f"config file {path} must hold a mapping at the top level")
    return raw


def apply_override(raw: dict[str, Any], assignment: str) -> None:
    """Apply one `section.field=value` to a nested dict; the value is parsed as YAML (3, 1e-3, true)."""
    key, sep, text = assignment.partition("=")
    if not sep or not key:
        raise UserError(f"--set expects section.field=value, got '{assignment}'")
    try:
        value = parse_yaml(text) if text else ""
    except (yaml.YAMLError, RecursionError):  # RecursionError: thousands of nested brackets
        value = text
    if value is not None and not isinstance(value, str) and _is_text_field(key.strip()):
        value = text  # --set name=2024-01-01 names a run; YAML would read a date
    *parents, leaf = key.strip().split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"--set {key}: '{part}' is not a section")
    node[leaf] = value


def _is_text_field(key: str) -> bool:
    """Whether `key` (a dotted field name) names a str field of Config, optional or not."""
    kind: Any = Config
    for part in key.split("."):
        hints = typing.get_type_hints(kind) if dataclasses.is_dataclass(kind) else {}
        if part not in hints:
            return False
        kind = hints[part]
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        return str in typing.get_args(kind)
    return kind is str


def merge(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """Layer `extra` over a copy of `base`: sections merge field by field, and each field of
    `extra` replaces the base's value whole, as `--set` does. A mapping-valued field is a value
    too: a config file's tune.space is the search space, not an addition to the recipe's."""
    out = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = {**out[key], **value}
        else:
            out[key] = value
    return out


def resolve(recipe: dict[str, Any], path: str | Path | None, overrides: list[str]) -> Config:
    """Layer a recipe, an optional YAML file and `--set` assignments, then validate."""
    raw = copy.deepcopy(merge(recipe, load_yaml(path)) if path else recipe)
    for assignment in overrides:
        apply_override(raw, assignment)
    return Config.from_dict(raw)
