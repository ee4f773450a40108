from distdl.progress import EpochPrinter
from distdl.train import rundir


def _epoch(n, started):
    return {"epoch": n, "started_at": started, "train_loss": 1.0, "val_loss": 1.0,
            "val_accuracy": 0.5, "samples_per_s": 100.0, "epoch_s": 1.0}


def test_prints_new_and_rerun_epochs_once(tmp_path):
    rundir.record_epoch(tmp_path, _epoch(1, 1.0))  # from an earlier run: not printed again
    lines = []
    with EpochPrinter(tmp_path, epochs=3, emit=lines.append, interval_s=0.01):
        rundir.record_epoch(tmp_path, _epoch(2, 2.0))
        rundir.record_epoch(tmp_path, _epoch(2, 3.0))  # epoch 2 again, after a restore
        rundir.record_epoch(tmp_path, _epoch(3, 4.0))
    assert [line.split()[1] for line in lines][-2:] == ["2/3", "3/3"]
    assert not any(line.split()[1] == "1/3" for line in lines)
