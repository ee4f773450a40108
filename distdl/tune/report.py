"""What a search leaves behind: tune_result.json, trials.csv and tune_curves.png.

Each trial's epochs come from Tune's own records of the trial; its best checkpoint is that of its
best epoch among the checkpoints Ray Train kept (the best by the search's metric, and the latest).
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs

from distdl.errors import failure_line
from distdl.train.checkpoint import TUNE_RESULT_FILE as RESULT_FILE
from distdl.train.trainer import checkpoint_uri

TRIALS_FILE = "trials.csv"
CURVES_FILE = "tune_curves.png"


@dataclass(frozen=True)
class Trial:
    """One trial's outcome, as tune_result.json lists it."""

    id: str
    config: dict[str, Any]
    """The sampled values (dotted field -> value)."""
    status: str
    """completed, stopped_early or error."""
    epochs_run: int
    stopped_early: bool
    best_metric: float | None
    best_val_accuracy: float | None
    best_checkpoint: str | None
    history: list[dict[str, Any]]
    """One record per epoch: epoch, the metric and val_accuracy."""
    error: str | None = None


def collect(result, *, metric: str, mode: str, epochs: int, storage: str) -> Trial:
    """A Trial from one of Tune's results (a ray.tune.Result)."""
    history = _epochs(result)
    kept = [row for row in history if _exists(storage, row.get("checkpoint_path"))]
    best = _best(kept, metric, mode)
    epochs_run = history[-1]["epoch"] if history else 0
    error = failure_line(result.error) if result.error else None
    stopped = error is None and epochs_run < epochs
    return Trial(
        id=Path(result.path).name,
        config=dict(result.config),
        status="error" if error else ("stopped_early" if stopped else "completed"),
        epochs_run=epochs_run,
        stopped_early=stopped,
        best_metric=best[metric] if best else None,
        best_val_accuracy=best["val_accuracy"] if best else None,
        best_checkpoint=checkpoint_uri(storage, best["checkpoint_path"]) if best else None,
        history=[{"epoch": r["epoch"], metric: r[metric], "val_accuracy": r["val_accuracy"]}
                 for r in history],
        error=error,
    )


def _epochs(result) -> list[dict[str, Any]]:
    """One row per epoch, the last report winning: a resumed trial may repeat an epoch."""
    frame = result.metrics_dataframe
    if frame is None or "epoch" not in frame:
        return []
    rows = {int(r["epoch"]): r for r in frame.to_dict("records") if not _missing(r.get("epoch"))}
    return [{**rows[e], "epoch": e} for e in sorted(rows)]


def _best(rows: list[dict[str, Any]], metric: str, mode: str) -> dict[str, Any] | None:
    rows = [r for r in rows if not _missing(r.get(metric))]
    if not rows:
        return None
    pick = max if mode == "max" else min
    return pick(rows, key=lambda r: r[metric])


def best_trial(trials: list[Trial], mode: str) -> Trial | None:
    scored = [t for t in trials if t.best_metric is not None]
    if not scored:
        return None
    pick = max if mode == "max" else min
    return pick(scored, key=lambda t: t.best_metric)


def summary(trials: list[Trial], *, metric: str, mode: str, experiment: str,
            wall_s: float) -> dict[str, Any]:
    best = best_trial(trials, mode)
    return {
        "best_trial": best.id if best else None,
        "best_config": best.config if best else None,
        "metric": metric,
        "mode": mode,
        "best_metric": best.best_metric if best else None,
        "best_val_accuracy": best.best_val_accuracy if best else None,
        "best_checkpoint": best.best_checkpoint if best else None,
        "trials_run": len(trials),
        "stopped_early": sum(t.stopped_early for t in trials),
        "errors": sum(t.status == "error" for t in trials),
        "experiment": experiment,
        "wall_s": round(wall_s, 2),
        "trials": [{k: v for k, v in asdict(t).items() if k != "history"} for t in trials],
    }


def write(output: Path, result: dict[str, Any], trials: list[Trial]) -> None:
    from distdl.plots import trial_curves  # matplotlib only when files are written

    output.mkdir(parents=True, exist_ok=True)
    (output / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n")
    _write_csv(output / TRIALS_FILE, trials)
    curves = {f"{t.id}{' (stopped)' if t.stopped_early else ''}":
              [(h["epoch"], h["val_accuracy"]) for h in t.history] for t in trials if t.history}
    trial_curves(curves, output / CURVES_FILE)


def _write_csv(path: Path, trials: list[Trial]) -> None:
    fields = sorted({k for t in trials for k in t.config})
    columns = ["id", "status", "epochs_run", "stopped_early", "best_metric", "best_val_accuracy",
               *fields, "best_checkpoint"]
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for t in trials:
            writer.writerow({**{c: getattr(t, c) for c in columns if c not in fields},
                             **{k: t.config.get(k) for k in fields}})


def format_table(result: dict[str, Any]) -> str:
    """The trials of a summary (tune_result.json) as a table for people."""
    trials = result["trials"]
    fields = sorted({k for t in trials for k in t["config"]})
    lines = [f"{'trial':<12} {'status':<14} {'epochs':>6} {result['metric']:>12}  "
             + "  ".join(fields)]
    for t in trials:
        value = "-" if t["best_metric"] is None else f"{t['best_metric']:.4f}"
        values = "  ".join(f"{_short(t['config'].get(k)):>{len(k)}}" for k in fields)
        lines.append(f"{t['id']:<12} {t['status']:<14} {t['epochs_run']:>6} {value:>12}  {values}")
    return "\n".join(lines)


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _exists(storage: str, path: Any) -> bool:
    """Whether a checkpoint directory (a filesystem path under `storage`) is still there."""
    if not isinstance(path, str) or not path:
        return False
    fs = pyarrow.fs.FileSystem.from_uri(storage)[0] if "://" in storage else pyarrow.fs.LocalFileSystem()
    return fs.get_file_info(path).type == pyarrow.fs.FileType.Directory
