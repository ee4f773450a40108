"""Live progress of a search on the driver: one line per trial epoch and per finished trial."""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from ray import tune


class TrialPrinter(tune.Callback):
    """Prints each trial's epochs and ends, with the count of trials in each state.

    Tune pickles its callbacks with the experiment, so a resumed search prints through the same
    printer; its clock restarts in `setup`.
    """

    def __init__(self, metric: str, emit: Callable[[str], None] = print):
        self.metric, self.emit = metric, emit
        self._started = time.time()
        self._printed: dict[str, Any] = {}  # trial id -> the epoch last printed

    def setup(self, **info: Any) -> None:
        self._started = time.time()

    def on_trial_result(self, iteration: int, trials: list, trial, result: dict, **info: Any) -> None:
        epoch = result.get("epoch", "?")
        if self._printed.get(trial.trial_id) == epoch:
            return  # a resumed trial whose epochs were all trained reports them again
        self._printed[trial.trial_id] = epoch
        value = result.get(self.metric)
        shown = f"{value:.4f}" if isinstance(value, (int, float)) else "-"
        self.emit(f"{self._clock()}  {trial.trial_id}  epoch {epoch:>3}  "
                  f"{self.metric} {shown}  | {_counts(trials)}")

    def on_trial_complete(self, iteration: int, trials: list, trial, **info: Any) -> None:
        epoch = (trial.last_result or {}).get("epoch", 0)
        self.emit(f"{self._clock()}  {trial.trial_id}  done after epoch {epoch}  "
                  f"{format_values(trial.config)}  | {_counts(trials)}")

    def on_trial_error(self, iteration: int, trials: list, trial, **info: Any) -> None:
        self.emit(f"{self._clock()}  {trial.trial_id}  FAILED  {format_values(trial.config)}  "
                  f"| {_counts(trials)}")

    def _clock(self) -> str:
        return f"[{time.time() - self._started:7.1f} s]"


def _counts(trials: list) -> str:
    counts = Counter(t.status.lower() for t in trials)
    return ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))


def format_values(config: dict[str, Any]) -> str:
    """A trial's values for people: field=value, floats to 3 significant digits."""
    return " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                    for k, v in config.items())
