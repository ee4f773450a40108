"""The run directory of `distdl train`: config.yaml, metrics.jsonl, result.json, curves.png."""

from __future__ import annotations

import copy
import hashlib
import json
import re
import tempfile
from pathlib import Path
from typing import Any

import yaml

from distdl.config import MAX_NAME_BYTES, Config, dump_yaml, parse_yaml
from distdl.errors import UserError

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.jsonl"
RESULT_FILE = "result.json"
CURVES_FILE = "curves.png"

# A report to Ray Train may carry several epochs (worker.py holds back short ones): the latest
# as its metrics, the ones before it in a list under this key, and in its checkpoint's meta.
EARLIER_EPOCHS = "earlier_epochs"


def default_run_dir(storage: str, name: str) -> Path:
    """STORAGE/NAME for local storage (checkpoints and run files side by side); for a URI,
    ./runs/URI/NAME, the URI made one folder name (s3://bucket/runs: s3-bucket-runs), so that
    runs of one name in two storages keep their files apart."""
    if "://" in storage:
        return Path("runs") / _folder_name(storage) / name
    return Path(storage).expanduser().resolve() / name


def _folder_name(uri: str) -> str:
    """`uri` as one folder name: readable, and with a hash of the URI so that no two storages
    share one. Credentials stay out of it: the query (endpoints, keys) and any user:password@
    are left out of both."""
    scheme, _, rest = uri.partition("?")[0].partition("://")
    host, slash, path = rest.partition("/")
    where = f"{scheme}://{host.rpartition('@')[2]}{slash}{path}"
    readable = re.sub(r"[^A-Za-z0-9._]+", "-", where).strip("-.")[:MAX_NAME_BYTES - 9]
    return f"{readable}-{hashlib.sha256(where.encode()).hexdigest()[:8]}"


def check_writable(run_dir: Path, flags: str = "--output or --storage") -> None:
    """Refuse an output folder that could not be created or written, before any work starts;
    `flags` name the options that choose it."""
    folder = Path(run_dir).expanduser().absolute()
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise UserError(f"cannot write to {run_dir}: {folder} is a file; choose another {flags}")
    if not can_write_in(folder):
        raise UserError(f"cannot write to {run_dir}: {folder} is not writable")


def can_write_in(folder: Path) -> bool:
    """Whether a file can be made in `folder`, by making one that is gone at once. os.access
    says yes to root anywhere, /proc and /sys included, where the real write fails later. On
    Linux the file has no name (O_TMPFILE), so nothing shows up in the user's folder."""
    try:
        tempfile.TemporaryFile(dir=folder).close()
    except OSError:
        return False
    return True


# What a resumed run must keep: its checkpoints hold this model trained on this data, and its
# optimizer state and schedule position were made with these optimizer settings and this batch
# (the schedule counts steps). train.epochs may grow; other settings may change, and so may
# these two, which change no weights: dropout, and whether shards are held in memory.
RESUME_KEEPS = ("model", "data", "optim", "train.batch_size")
RESUME_MAY_CHANGE = ("model.dropout", "data.cache_max_mb")


def epochs_recorded(cfg: Config, run_dir: Path) -> int:
    """The last epoch the run directory records (0 for a new run). A rerun resumes from the
    run's checkpoints: a run directory of another run, or settings a resume cannot keep, are a
    UserError."""
    previous = read_metrics(run_dir)
    if not previous:
        return 0
    started_as = read_config(run_dir)
    if started_as.get("name", cfg.name) != cfg.name:
        raise UserError(f"{run_dir} holds run '{started_as['name']}', not '{cfg.name}'; choose "
                        "another --output, or give --name "
                        f"{started_as['name']} to continue that run")
    changed = resume_changes(started_as, cfg.to_dict(), RESUME_KEEPS) if started_as else []
    if changed:
        raise UserError(f"run '{cfg.name}' in {run_dir} was trained with other "
                        f"{' and '.join(changed)} settings, so it cannot be resumed with these; "
                        "choose another --name")
    return previous[-1]["epoch"]


def finished(run_dir: Path, recorded: int, epochs: int) -> bool:
    """Whether a run directory recording `recorded` epochs has all `epochs` and its result."""
    return recorded >= epochs and (run_dir / RESULT_FILE).is_file()


def clear_result(run_dir: Path) -> None:
    """Remove result.json as a run starts training: until it ends it has none, and an earlier
    result would name checkpoints that training may delete."""
    (Path(run_dir) / RESULT_FILE).unlink(missing_ok=True)


def write_config(run_dir: Path, config: dict[str, Any], provenance: dict[str, Any]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / CONFIG_FILE).write_text(config_text(config, provenance))


def config_text(config: dict[str, Any], provenance: dict[str, Any]) -> str:
    """A resolved config as YAML under a comment header saying what made it."""
    header = "".join(f"# {k}: {v}\n" for k, v in provenance.items())
    return header + dump_yaml(config)


def read_config(run_dir: Path) -> dict[str, Any]:
    """The run directory's config.yaml as a dict ({} where there is none)."""
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        config = parse_yaml(path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read {path}: {str(exc).splitlines()[0]}; fix or delete it, or "
                        "choose another --output") from None
    return config if isinstance(config, dict) else {}


def resume_changes(previous: dict[str, Any], config: dict[str, Any],
                   fields: tuple[str, ...]) -> list[str]:
    """The `fields` (sections, or section.field) that differ between the settings a run was
    started with and `config`, leaving out those in RESUME_MAY_CHANGE."""
    previous, config = _without(previous, RESUME_MAY_CHANGE), _without(config, RESUME_MAY_CHANGE)
    return [name for name in fields if get_field(previous, name) != get_field(config, name)]


def _without(config: dict[str, Any], fields: tuple[str, ...]) -> dict[str, Any]:
    out = copy.deepcopy(config)
    for dotted in fields:
        section, _, name = dotted.rpartition(".")
        node = get_field(out, section) if section else out
        if isinstance(node, dict):
            node.pop(name, None)
    return out


def get_field(config: dict[str, Any], dotted: str) -> Any:
    """The value at `dotted` ("train.batch_size", or a section), None where there is none."""
    for part in dotted.split("."):
        config = config.get(part) if isinstance(config, dict) else None
    return config


def record_epoch(run_dir: Path, metrics: dict[str, Any]) -> None:
    """Add one epoch's line, replacing any lines of this epoch or later (a rewrite of the file).

    After a restore from the checkpoint of epoch k, epochs k+1... run again; dropping their old
    lines keeps exactly one line per epoch.
    """
    kept = [m for m in read_metrics(run_dir) if m["epoch"] < metrics["epoch"]]
    lines = [json.dumps(m) for m in [*kept, metrics]]
    tmp = run_dir / (METRICS_FILE + ".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    tmp.replace(run_dir / METRICS_FILE)


def append_epoch(run_dir: Path, metrics: dict[str, Any]) -> None:
    """Add the line of the epoch after the last one recorded: one write, however long the run."""
    with (run_dir / METRICS_FILE).open("a") as f:
        f.write(json.dumps(metrics) + "\n")


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        return []
    # A line counts once its newline is written: a reader may see a line being appended.
    *complete, _partial = _text(path).split("\n")
    metrics = []
    for number, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            metrics.append(json.loads(line))
        except json.JSONDecodeError:
            metrics.append(None)
        if not isinstance(metrics[-1], dict) or not isinstance(metrics[-1].get("epoch"), int):
            raise UserError(f"cannot read {path}: line {number} is not an epoch's metrics; fix "
                            "or delete it, or choose another --output")
    return metrics


_RESULT_KEYS = {"best_checkpoint", "best_val_accuracy", "epochs_completed", "wall_s"}


def write_result(run_dir: Path, result: dict[str, Any]) -> None:
    # Written beside and renamed: a crash mid-write leaves the old file or none, never half one.
    partial = run_dir / f".{RESULT_FILE}.partial"
    partial.write_text(json.dumps(result, indent=2) + "\n")
    partial.replace(run_dir / RESULT_FILE)


def read_result(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / RESULT_FILE
    try:
        result = json.loads(_text(path))
    except json.JSONDecodeError:
        result = None
    if not isinstance(result, dict) or not _RESULT_KEYS <= result.keys():
        raise UserError(f"cannot read {path}: it is not a finished run's result; delete it "
                        "and rerun to write it again, or choose another --output")
    return result


def _text(path: Path) -> str:
    try:
        return path.read_text()
    except UnicodeDecodeError:
        raise UserError(f"cannot read {path}: it is not UTF-8 text; fix or delete it, or "
                        "choose another --output") from None
