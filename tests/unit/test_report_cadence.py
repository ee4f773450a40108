"""When a worker reports its epochs to Ray Train: short ones are held back and sent together."""

import pytest

from distdl.config import TrainConfig
from distdl.train.worker import report_due

CFG = TrainConfig(epochs=10, report_interval_s=1.0)


def _due(epoch, accuracy, since_s, best, cfg=CFG):
    return report_due({"epoch": epoch, "val_accuracy": accuracy}, since_s, best, cfg)


def test_a_short_epoch_that_improves_nothing_waits_for_a_later_report():
    assert not _due(epoch=3, accuracy=0.90, since_s=0.2, best=0.95)
    assert not _due(epoch=3, accuracy=0.95, since_s=0.2, best=0.95)  # a tie is no new best


@pytest.mark.parametrize("epoch, accuracy, since_s, best", [
    (1, 0.50, 0.1, None),  # the first epoch of a run (or of a restart)
    (3, 0.96, 0.1, 0.95),  # a new best validation accuracy
    (3, 0.90, 1.0, 0.95),  # an interval since the last report
    (10, 0.90, 0.1, 0.95),  # the last epoch
])
def test_these_epochs_are_reported_at_once(epoch, accuracy, since_s, best):
    assert _due(epoch, accuracy, since_s, best)


def test_an_interval_of_zero_reports_every_epoch():
    every = TrainConfig(epochs=10, report_interval_s=0.0)
    assert _due(epoch=3, accuracy=0.90, since_s=0.0, best=0.95, cfg=every)
