from distdl.train import rundir
from distdl.train.recorder import EpochRecorder


def _report(recorder, epoch, started):
    metrics = [{"epoch": epoch, "started_at": started, "node": n} for n in ("a", "b")]
    recorder.after_report(None, metrics, None)


def _epochs(run_dir):
    return [(m["epoch"], m["started_at"]) for m in rundir.read_metrics(run_dir)]


def test_the_recorder_keeps_one_line_per_epoch_through_restores(tmp_path):
    rundir.record_epoch(tmp_path, {"epoch": 1, "started_at": 1.0})  # an earlier command's
    rundir.record_epoch(tmp_path, {"epoch": 2, "started_at": 2.0})
    recorder = EpochRecorder(tmp_path)
    _report(recorder, 2, 20.0)  # this command restored from epoch 1
    _report(recorder, 3, 30.0)
    _report(recorder, 4, 40.0)
    assert _epochs(tmp_path) == [(1, 1.0), (2, 20.0), (3, 30.0), (4, 40.0)]
    _report(recorder, 4, 41.0)  # a worker failed; restored from epoch 3
    _report(recorder, 5, 50.0)
    assert _epochs(tmp_path) == [(1, 1.0), (2, 20.0), (3, 30.0), (4, 41.0), (5, 50.0)]
    assert rundir.read_metrics(tmp_path)[-1]["nodes"] == ["a", "b"]


def test_a_line_being_written_is_not_read_yet(tmp_path):
    rundir.record_epoch(tmp_path, {"epoch": 1, "started_at": 1.0})
    with (tmp_path / rundir.METRICS_FILE).open("a") as f:
        f.write('{"epoch": 2, "star')
    assert _epochs(tmp_path) == [(1, 1.0)]


def test_a_report_of_several_epochs_records_each_of_them(tmp_path):
    recorder = EpochRecorder(tmp_path)
    _report(recorder, 1, 10.0)
    earlier = [{"epoch": e, "started_at": 10.0 * e, "node": "a"} for e in (2, 3)]
    metrics = [{"epoch": 4, "started_at": 40.0, "node": n, rundir.EARLIER_EPOCHS: earlier}
               for n in ("a", "b")]
    recorder.after_report(None, metrics, None)
    assert _epochs(tmp_path) == [(1, 10.0), (2, 20.0), (3, 30.0), (4, 40.0)]
    lines = rundir.read_metrics(tmp_path)
    assert all(m["nodes"] == ["a", "b"] for m in lines)
    assert not any(rundir.EARLIER_EPOCHS in m for m in lines)
