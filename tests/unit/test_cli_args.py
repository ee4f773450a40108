"""Numbers and paths on the command line that cannot work end in one line and exit code 2,
before anything starts."""

import socket
import threading

import pytest

from distdl import cli
from distdl.data.transforms import PILLOW_MAX_PIXELS
from distdl.errors import error_line
from tests.integration.cli import run_cli


@pytest.mark.parametrize("argv, message", [
    (["serve", "build", "ckpt", "--port", "70000"],
     "argument --port: must be at least 1 and at most 65535, got 70000"),
    (["serve", "build", "ckpt", "--max-body-mb", "-1"],
     "argument --max-body-mb: must be at least 0.001"),
    (["serve", "build", "ckpt", "--max-body-mb", "1e-7"],
     "argument --max-body-mb: must be at least 0.001"),
    (["query", "http://127.0.0.1:1/vision", "x.png", "--timeout", "1e10"],
     "argument --timeout: must be above 0 and at most 86400, got 1e10"),
    (["bench", "serve", "--seconds", "0.001"], "argument --seconds: must be at least 1"),
    (["serve", "build", "ckpt", "--threads", "0"], "argument --threads: must be at least 1"),
    (["serve", "build", "ckpt", "--num-cpus", "nan"], "argument --num-cpus: must be at least 0"),
    (["serve", "build", "ckpt", "--target-ongoing-requests", "many"],
     "argument --target-ongoing-requests: expected a number, got 'many'"),
    (["serve", "build", "ckpt", "--batch-wait-ms", "inf"], "milliseconds >= 0 (finite), got 'inf'"),
    (["query", "http://127.0.0.1:1/vision", "x.png", "--timeout", "0"],
     "argument --timeout: must be above 0 and at most 86400, got 0"),
    (["cluster", "up", "--workers", "-1"], "argument --workers: must be at least 0, got -1"),
    (["bench", "serve", "--port", "65535"], "argument --port: must be at least 1 and at most 65534"),
    (["query", "http://127.0.0.1:1/vision", "x.png", "--api-key", "ключ"],
     "argument --api-key: must be printable ASCII without spaces"),
    (["serve", "ckpt", "--api-key", "two words"],
     "argument --api-key: must be printable ASCII without spaces"),
    (["serve", "build", "ckpt", "--max-pixels", str(PILLOW_MAX_PIXELS + 1)],
     f"argument --max-pixels: must be at least 1 and at most {PILLOW_MAX_PIXELS}, got"),
    # Empty, as from an unset shell variable: never a silent default, nor serving without a key.
    (["serve", "ckpt", "--api-key", ""], "argument --api-key: must not be empty"),
    (["train", "--storage", ""], "argument --storage: must not be empty"),
    (["tune", "--output", " "], "argument --output: must not be empty"),
    (["train", "--name", ""], "argument --name: must not be empty"),
])
def test_numbers_out_of_range_are_one_line_and_exit_2(argv, message, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2
    assert err.count("\n") == 1 and message in err, err


@pytest.mark.parametrize("argv, shown", [
    (["serve", "build", "ckpt", "--host", "127.0.0.1:8000"], "'127.0.0.1:8000'"),
    (["serve", "ckpt", "--host", "http://node"], "'http://node'"),
    (["serve", "build", "ckpt", "--host", "node_1"], "'node_1'"),
    (["serve", "build", "ckpt", "--host", "192.168.1.300"], "'192.168.1.300'"),
    (["serve", "build", "ckpt", "--host", "10.0.0"], "'10.0.0'"),
])
def test_what_is_neither_address_nor_host_name_is_one_line_and_exit_2(argv, shown, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2
    assert err.count("\n") == 1 and (
        "argument --host: expected an IP address or host name, such as 0.0.0.0 or 127.0.0.1, "
        f"got {shown} (see ") in err, err


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "fe80::1", "localhost", "head-0.ray.svc."])
def test_addresses_and_host_names_are_hosts(host):
    assert cli.build_parser().parse_args(["serve", "build", "ckpt", "--host", host]).host == host


def test_a_serve_config_written_over_a_folder_is_refused(tmp_path, capsys):
    assert cli.main(["serve", "build", str(tmp_path / "ckpt"), "-o", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: cannot write {tmp_path}: it is a folder; name a " \
                                      "file in it\n"


@pytest.mark.parametrize("argv", [
    ["serve", "build", "ckpt", "-o", "/proc/serve.yaml"],
    ["bench", "step", "--json", "/proc/step.json"],
])
def test_a_file_in_a_folder_that_takes_none_is_refused_before_any_work(argv, capsys):
    # As root, os.access says /proc is writable; the write itself would fail later.
    assert cli.main(argv) == 2
    assert capsys.readouterr().err == (f"error: cannot write {argv[-1]}: /proc is not "
                                       "writable\n")


def test_a_jobs_address_with_a_placeholder_port_is_one_line():
    # In a process of its own: an address sets Ray's environment (RAY_AUTH_MODE) as the
    # command starts, and this session's Ray must not see it.
    done = run_cli("jobs", "list", "--address", "http://127.0.0.1:PORT", timeout=60)
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert "nonnumeric port: 'PORT'" in done.stderr


@pytest.mark.parametrize("action, dir_, message", [
    ("up", "{tmp}/file", "--dir {tmp}/file: {tmp}/file is a file, not a folder; choose another --dir"),
    ("up", "{tmp}/file/sub", "--dir {tmp}/file/sub: cannot create the folder (Not a directory); "
                             "choose a folder you can write"),
    ("up", "/proc/distdl", "--dir /proc/distdl: cannot create the folder (No such file or "
                           "directory); choose a folder you can write"),
    ("status", "{tmp}/empty", "cannot read {tmp}/empty/cluster.json: it is empty or not valid "
                              "JSON; if a cluster of it still runs"),
    ("down", "{tmp}/corrupt", "cannot read {tmp}/corrupt/cluster.json: it is empty or not valid "
                              "JSON"),
    ("down", "{tmp}/other", "cannot read {tmp}/other/cluster.json: it does not record a "
                            "cluster's nodes"),
    ("up", "{tmp}/corrupt", "cannot read {tmp}/corrupt/cluster.json"),
])
def test_a_cluster_folder_that_cannot_be_used_is_one_line(action, dir_, message, tmp_path,
                                                          capsys):
    """These fail before any node starts: no Ray."""
    (tmp_path / "file").write_text("")
    for name, text in (("empty", ""), ("corrupt", '{"nodes": ['), ("other", '{"nodes": 3}')):
        (tmp_path / name).mkdir()
        (tmp_path / name / "cluster.json").write_text(text)
    assert cli.main(["cluster", action, "--dir", dir_.replace("{tmp}", str(tmp_path))]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message.replace("{tmp}", str(tmp_path)) in err, err


def test_a_jobs_address_that_is_not_a_dashboard_is_one_line_without_its_bytes():
    """A Ray GCS port speaks HTTP/2 (gRPC): its first bytes are binary, not a status line."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()

    def answer_as_http2() -> None:
        with server:
            connection, _ = server.accept()
            with connection:
                connection.recv(4096)
                connection.sendall(b"\x00\x00\x06\x04\x00\x00\x00\x00\x00\x00\x05\x00\x00@\x00"
                                   b"\x00\x00\x08\x07\x00\x00\x00\x00\x00\x00\x00\x00\x00")

    threading.Thread(target=answer_as_http2, daemon=True).start()
    address = f"127.0.0.1:{server.getsockname()[1]}"
    done = run_cli("jobs", "list", "--address", address, timeout=60)
    assert done.returncode == 2, done.stderr
    assert done.stderr == (
        f"error: the server at http://{address} does not answer as a Ray dashboard (not "
        "HTTP/1.1: a Ray GCS or client port?); give --address the dashboard's "
        "http://HOST:PORT (8265 unless set otherwise)\n")


def test_a_jobs_usage_mistake_is_its_error_line():
    """A job whose command argparse refused: its log ends with usage text and the line."""
    log = ("usage: distdl train [-h] [--recipe RECIPE]\n"
           "distdl train: error: unrecognized arguments: --bogus (see distdl train --help)\n")
    assert error_line(log) == ("distdl train: error: unrecognized arguments: --bogus (see "
                               "distdl train --help)")
    assert error_line("distdl: error: argument command: invalid choice: 'x'\n") == (
        "distdl: error: argument command: invalid choice: 'x'")
    assert error_line("usage: distdl\nall is well\n") is None
    assert cli._first_line("Job entrypoint command failed with exit code 2, last available "
                           "logs:\nusage: ...\n") == ("Job entrypoint command failed with exit "
                                                      "code 2, last available logs:")
    assert cli._first_line(None) == "no message from Ray"


@pytest.mark.parametrize("args, message", [
    (["--model", "torchvision:alexnet", "--image-size", "8"],
     "error: model torchvision:alexnet cannot train on 2 images of 3x8x8 (C x H x W) at a time"),
    (["--model", "resnet18", "--image-size", "8", "--batch-size", "1"],
     "Expected more than 1 value per channel when training"),
    (["--image-size", "1024"], "lower --steps, --batch-size or --image-size"),
    (["--batch-size", "4", "--steps", "2"], "--batch-size x --steps must be at least that"),
])
def test_a_step_benchmark_that_cannot_run_is_one_line_before_it_starts(args, message, capsys):
    assert cli.main(["bench", "step", *args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err


def test_print_config_shows_every_field_and_reads_back_as_the_same_config(tmp_path):
    shown = run_cli("train", "--print-config", "--set", "train.epochs=7", "--name", "1e-3",
                    cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert "  epochs: 7\n" in shown.stdout and "  use_gpu: false\n" in shown.stdout
    saved = tmp_path / "shown.yaml"
    saved.write_text(shown.stdout)
    again = run_cli("train", "--print-config", "--config", str(saved), cwd=tmp_path)
    assert again.returncode == 0 and again.stdout == shown.stdout, again.stderr
    assert list(tmp_path.iterdir()) == [saved]  # nothing else made: no run folder, no storage


def test_tune_prints_its_own_recipe_with_the_overrides(tmp_path):
    shown = run_cli("tune", "--print-config", "--set", "tune.num_samples=3", cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    tune = shown.stdout[shown.stdout.index("\ntune:\n"):]
    assert "\n  num_samples: 3\n" in tune and "\n  space:\n" in tune
    assert not list(tmp_path.iterdir())


def test_a_path_under_a_user_that_does_not_exist_is_one_line(capsys):
    assert cli.main(["evaluate", "~no-such-user-of-distdl/checkpoint"]) == 2
    assert capsys.readouterr().err == ("error: a path starts with ~NAME, and there is no user "
                                       "NAME: write ~/ for your home folder\n")
