"""Numbers and paths on the command line that cannot work end in one line and exit code 2,
before anything starts."""

import pytest

from distdl import cli
from tests.integration.cli import run_cli


@pytest.mark.parametrize("argv, message", [
    (["serve", "build", "ckpt", "--port", "70000"],
     "argument --port: must be at least 1 and at most 65535, got 70000"),
    (["serve", "build", "ckpt", "--max-body-mb", "-1"], "argument --max-body-mb: must be above 0"),
    (["serve", "build", "ckpt", "--threads", "0"], "argument --threads: must be at least 1"),
    (["serve", "build", "ckpt", "--num-cpus", "nan"], "argument --num-cpus: must be at least 0"),
    (["serve", "build", "ckpt", "--target-ongoing-requests", "many"],
     "argument --target-ongoing-requests: expected a number, got 'many'"),
    (["serve", "build", "ckpt", "--batch-wait-ms", "inf"], "milliseconds >= 0 (finite), got 'inf'"),
    (["query", "http://127.0.0.1:1/vision", "x.png", "--timeout", "0"],
     "argument --timeout: must be above 0, got 0"),
    (["cluster", "up", "--workers", "-1"], "argument --workers: must be at least 0, got -1"),
    (["bench", "serve", "--port", "65535"], "argument --port: must be at least 1 and at most 65534"),
])
def test_numbers_out_of_range_are_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2
    assert err.count("\n") == 1 and message in err, err


def test_a_serve_config_written_over_a_folder_is_refused(tmp_path, capsys):
    assert cli.main(["serve", "build", str(tmp_path / "ckpt"), "-o", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: cannot write {tmp_path}: it is a folder; name a " \
                                      "file in it\n"


def test_a_jobs_address_with_a_placeholder_port_is_one_line():
    # In a process of its own: an address sets Ray's environment (RAY_AUTH_MODE) as the
    # command starts, and this session's Ray must not see it.
    done = run_cli("jobs", "list", "--address", "http://127.0.0.1:PORT", timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "nonnumeric port: 'PORT'" in done.stderr
