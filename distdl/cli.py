"""The `distdl` command: parse, call the library, print for people. No logic of its own."""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path

from distdl.config import IMAGE_SIDES
from distdl.errors import UserError, error_line
from distdl.inference import AUTO_WAIT_MS, BATCH_WAIT_MS, MAX_BATCH_SIZE, parse_batch_wait

STARTED = time.time()  # the command's start, for the benchmark's fixed-overhead figure


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line, not usage text."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _bounded(kind: type, low: float, high: float = math.inf, *, above: bool = False):
    """An argparse type: a finite `kind` from `low` (exclusive where `above`) to `high`."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not (math.isfinite(value) and (value > low if above else value >= low)
                and value <= high):
            bound = f"above {_plain(low)}" if above else f"at least {_plain(low)}"
            bound += f" and at most {_plain(high)}" if high != math.inf else ""
            raise argparse.ArgumentTypeError(f"must be {bound}, got {text}")
        return value
    return parse


def _plain(number: float) -> str:
    """178956970, not 1.78957e+08; 0.001 stays 0.001."""
    return str(int(number)) if float(number).is_integer() else f"{number:g}"


COUNT = _bounded(int, 1)
PORT = _bounded(int, 1, 65535)
POSITIVE = _bounded(float, 0, above=True)
NON_NEGATIVE = _bounded(float, 0)
_HOST_NAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def _host(text: str) -> str:
    """An argparse type: an IP address or a host name. `serve build` writes it for a cluster
    where it may resolve and this machine may not, so only its form is checked."""
    try:
        ipaddress.ip_address(text)
    except ValueError:
        # A name's last label is never all digits: 192.168.1.300 is a mistyped address.
        if (len(text) > 253 or not _HOST_NAME.fullmatch(text)
                or text.rstrip(".").rsplit(".", 1)[-1].isdigit()):
            raise argparse.ArgumentTypeError(
                f"expected an IP address or host name, such as 0.0.0.0 or 127.0.0.1, got "
                f"{text!r}") from None
    return text


def _nonempty(text: str) -> str:
    """An argparse type: text that says something (an unset shell variable gives "")."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must not be empty")
    return text


def _api_key(text: str) -> str:
    """An argparse type: a key that an HTTP header can carry (it is not echoed: a secret)."""
    if not text:  # from an unset shell variable, most likely: serving without a key is no fix
        raise argparse.ArgumentTypeError("must not be empty (nor DISTDL_API_KEY, its default)")
    if not (text.isascii() and text.isprintable() and " " not in text):
        raise argparse.ArgumentTypeError("must be printable ASCII without spaces, as HTTP "
                                         "headers carry it")
    return text


def _print_config_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config, every field, as YAML that --config "
                             "reads, and exit (starts nothing)")


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default=None,
                        help="named preset: digits_cpu (default; digits_tune for tune), "
                             "shapes_resnet18_gpu, debug")
    parser.add_argument("--config", help="YAML file with config sections (data, model, optim, train, tune)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field, e.g. --set train.epochs=5 (repeatable)")
    parser.add_argument("--name", type=_nonempty,
                        help="run name (default from the recipe); rerun a name to resume")


def _default_storage() -> str:
    return os.environ.get("DISTDL_STORAGE") or "runs"  # set but empty: as if unset


def _ray_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="existing Ray cluster (default: RAY_ADDRESS, else a local "
                                          "Ray on 127.0.0.1)")


def _bench_step_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default="resnet18", help="any model name (default resnet18)")
    parser.add_argument("--width", type=COUNT, default=64,
                        help="first convolution's channels (64)")
    parser.add_argument("--image-size", type=_bounded(int, *IMAGE_SIDES), default=32,
                        help="square side (default 32)")
    parser.add_argument("--batch-size", type=COUNT, default=512,
                        help="training batch (default 512)")
    parser.add_argument("--steps", type=COUNT, default=40, help="training steps per turn (40)")
    parser.add_argument("--rounds", type=COUNT, default=3, help="timed turns of each side (3)")
    parser.add_argument("--no-amp", dest="amp", action="store_false",
                        help="GPU: train and predict in float32")
    parser.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                        help="GPU: keep the default memory format")
    parser.add_argument("--compile", action="store_true", help="torch.compile both training models")
    parser.add_argument("--json", help="also write the report to this JSON file")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="distdl", description="Distributed deep learning on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train a model with DDP on Ray Train workers")
    _config_args(train)
    _print_config_arg(train)
    _ray_args(train)
    train.add_argument("--storage", type=_nonempty, default=_default_storage(),
                       help="where checkpoints go: a directory or a URI such as s3://bucket/path "
                            "(default: ./runs or DISTDL_STORAGE)")
    train.add_argument("--output", type=_nonempty,
                       help="run directory (default: STORAGE/NAME for local storage)")

    tune = sub.add_parser("tune", help="search hyperparameters: one distributed training per trial")
    _config_args(tune)
    _print_config_arg(tune)
    _ray_args(tune)
    tune.add_argument("--storage", type=_nonempty, default=_default_storage(),
                      help="where trials and checkpoints go: a directory or a URI "
                           "(default: ./runs or DISTDL_STORAGE)")
    tune.add_argument("--output", type=_nonempty,
                      help="folder for tune_result.json, trials.csv and tune_curves.png "
                           "(default: STORAGE/NAME for local storage)")
    tune.add_argument("--resume", action="store_true",
                      help="continue the interrupted search of the same --name and --storage")

    evaluate = sub.add_parser("evaluate", help="accuracy, per-class accuracy, confusion matrix")
    evaluate.add_argument("checkpoint", help="a distdl checkpoint directory (or URI), or the run "
                          "directory of distdl train or tune, for its best checkpoint")
    evaluate.add_argument("--data", help="dataset to score (default: the validation split of the "
                                         "checkpoint's own dataset)")
    evaluate.add_argument("--output", type=_nonempty, default="evaluation",
                          help="folder for evaluation.json and confusion_matrix.png")
    _ray_args(evaluate)

    _bench_parsers(sub)
    _cluster_parsers(sub)
    _serve_parsers(sub)
    return parser


def _bench_parsers(sub) -> None:
    bench = sub.add_parser("bench", help="benchmarks against bare baselines")
    bench_sub = bench.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    bench_train = bench_sub.add_parser("train", help="distdl training loop vs a bare PyTorch loop")
    _config_args(bench_train)
    bench_train.add_argument("--json", help="also write the report to this JSON file")
    _bench_step_args(bench_sub.add_parser(
        "step", help="one worker's training step and the Predictor vs bare PyTorch, no Ray"))
    bench_serve = bench_sub.add_parser("serve", help="Serve batched and unbatched vs bare FastAPI")
    bench_serve.add_argument("--model", default="digits", choices=["digits", "resnet18"],
                             help="digits (small_cnn, 8x8) or resnet18 (shapes, 32x32)")
    bench_serve.add_argument("--checkpoint", help="serve this checkpoint (or run directory's "
                             "best) instead")
    bench_serve.add_argument("--clients", type=COUNT, default=16, help="concurrent clients (16)")
    bench_serve.add_argument("--seconds", type=_bounded(float, 1), default=15.0,
                             help="per measurement, at least 1 (15)")
    bench_serve.add_argument("--max-batch-size", type=COUNT, default=MAX_BATCH_SIZE,
                             help=f"(default {MAX_BATCH_SIZE})")
    bench_serve.add_argument("--batch-wait-ms", type=_batch_wait, default=BATCH_WAIT_MS,
                             help=f"auto or milliseconds (default {BATCH_WAIT_MS})")
    bench_serve.add_argument("--threads", type=COUNT, help="torch threads (default: all cores)")
    bench_serve.add_argument("--port", type=_bounded(int, 1, 65534), default=8300,
                             help="(default 8300 and 8301)")
    bench_serve.add_argument("--json", help="also write the report to this JSON file")


def _batch_wait(text: str) -> float | str:
    try:
        return parse_batch_wait(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _serve_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("checkpoints", nargs="+", metavar="CHECKPOINT",
                        help="checkpoint directory (or a run directory, for its best "
                             "checkpoint), or NAME=DIR to mount it at /NAME (default: its "
                             "task's prefix, /vision)")
    scale = parser.add_argument_group("replicas")
    scale.add_argument("--replicas", type=COUNT, help="a fixed number of replicas (default 1)")
    scale.add_argument("--min-replicas", type=_bounded(int, 0),
                       help="autoscale from this many replicas ...")
    scale.add_argument("--max-replicas", type=COUNT, help="... up to this many")
    scale.add_argument("--target-ongoing-requests", type=POSITIVE, default=16.0,
                       help="autoscaling target of requests in flight per replica (default 16)")
    scale.add_argument("--num-cpus", type=NON_NEGATIVE, default=1.0,
                       help="CPUs per replica (default 1)")
    scale.add_argument("--num-gpus", type=NON_NEGATIVE, default=0.0,
                       help="GPUs per replica (default 0)")
    scale.add_argument("--threads", type=COUNT,
                       help="torch threads per replica (default: its CPUs)")
    batch = parser.add_argument_group("batching and limits")
    batch.add_argument("--max-batch-size", type=COUNT, default=MAX_BATCH_SIZE,
                       help="requests scored together; 1 turns batching off "
                            f"(default {MAX_BATCH_SIZE})")
    batch.add_argument("--batch-wait-ms", type=_batch_wait, default=BATCH_WAIT_MS,
                       help="how long a batch waits to fill: milliseconds, or auto: as long "
                            f"as a lone image's forward pass, {AUTO_WAIT_MS[0]:g} to "
                            f"{AUTO_WAIT_MS[1]:g} ms (default {BATCH_WAIT_MS})")
    batch.add_argument("--max-queued-requests", type=COUNT, default=256,
                       help="beyond this many waiting requests, answer 503 (default 256)")
    batch.add_argument("--max-body-mb", type=_bounded(float, 0.001), default=8.0,
                       help="larger request bodies get 413 (default 8)")
    # At most Pillow's own decompression-bomb limit, past which it refuses any one image.
    batch.add_argument("--max-pixels", type=_bounded(int, 1, 178_956_970), default=16_000_000,
                       help="a request whose encoded images hold more pixels, one image or "
                            "all together, gets 413 before decoding (default 16000000, at most "
                            "178956970)")
    batch.add_argument("--max-instances", type=COUNT, default=64,
                       help="images per request (default 64)")
    batch.add_argument("--body-timeout", type=POSITIVE, default=10.0,
                       help="seconds a request's body may take to arrive; slower ones get 408 "
                            "(default 10)")
    parser.add_argument("--access-log", action="store_true",
                        help="log every request in the replicas' Serve logs (off by default: "
                             "it costs CPU on every request)")
    parser.add_argument("--host", type=_host, default="127.0.0.1",
                        help="HTTP host (default 127.0.0.1)")
    parser.add_argument("--port", type=PORT, default=8000, help="HTTP port (default 8000)")


def _serve_parsers(sub) -> None:
    serve = sub.add_parser("serve", help="serve checkpoints over HTTP with Ray Serve "
                                         "(also: serve build, serve update)")
    _serve_options(serve)
    _ray_args(serve)
    serve.add_argument("--api-key", type=_api_key, default=os.environ.get("DISTDL_API_KEY"),
                       help="require this key from clients (default: DISTDL_API_KEY)")
    serve.add_argument("--ingress", choices=["haproxy", "proxy", "direct"],
                       help="how HTTP reaches the replicas of a Ray that distdl starts: haproxy "
                            "(the default where its binary is installed, as ray[serve] does on "
                            "Linux): HAProxy on --port, forwarding to the replicas' own ports; "
                            "proxy: Serve's Python proxy (the default elsewhere); direct: as "
                            "proxy, and each replica also answers on a port of its own (printed)")
    serve.add_argument("--detach", action="store_true",
                       help="deploy and return, leaving Serve running on the cluster (--address)")

    build = sub.add_parser("serve build", help="write a Serve config file for checkpoints")
    _serve_options(build)
    build.add_argument("-o", "--output", type=_nonempty, default="serve.yaml",
                       help="(default serve.yaml)")

    update = sub.add_parser("serve update", help="swap the model of a running application")
    update.add_argument("name", help="the application, e.g. vision")
    update.add_argument("--checkpoint", required=True,
                        help="the new checkpoint directory, or a run directory")
    _ray_args(update)

    query = sub.add_parser("query", help="send images or a JSON file to a distdl endpoint")
    query.add_argument("url", help="e.g. http://127.0.0.1:8000/vision")
    query.add_argument("files", nargs="+", help="image files, or one .json file of instances")
    query.add_argument("--api-key", type=_api_key, default=os.environ.get("DISTDL_API_KEY"),
                       help="(default: DISTDL_API_KEY)")
    query.add_argument("--timeout", type=_bounded(float, 0, 86400, above=True), default=30.0,
                       help="seconds, at most a day (default 30)")


def _cluster_parsers(sub) -> None:
    cluster = sub.add_parser("cluster", help="a multi-node Ray cluster on this machine (127.0.0.1)")
    cluster_sub = cluster.add_subparsers(dest="action", required=True, parser_class=_Parser)
    for action, text in (("up", "start a head and worker nodes"), ("down", "stop them"),
                         ("status", "nodes and resources")):
        p = cluster_sub.add_parser(action, help=text)
        p.add_argument("--dir", default=Path("~/.distdl/local-cluster"), type=Path,
                       help="folder for cluster.json, the token, logs and storage/ "
                            "(default: ~/.distdl/local-cluster)")
    cluster_sub.choices["up"].add_argument("--workers", type=_bounded(int, 0), default=2,
                                           help="worker nodes besides the head, 1 CPU each")

    submit = sub.add_parser("submit", help="run a distdl command as a Ray job: submit -- train ...")
    _jobs_address(submit)
    submit.add_argument("--follow", action="store_true", help="stream the job's log")
    submit.add_argument("--no-wait", action="store_true", help="print the job id and return")
    submit.add_argument("--working-dir", default=".", type=Path,
                        help="folder uploaded with the job (default: .)")
    submit.add_argument("argv", nargs=argparse.REMAINDER, help="-- then the distdl command")

    jobs = sub.add_parser("jobs", help="list, inspect, read the logs of, or stop Ray jobs")
    jobs_sub = jobs.add_subparsers(dest="action", required=True, parser_class=_Parser)
    _jobs_address(jobs_sub.add_parser("list", help="every job of the cluster"))
    for action in ("status", "logs", "stop"):
        p = jobs_sub.add_parser(action, help=f"{action} of one job")
        p.add_argument("job_id")
        _jobs_address(p)


def _jobs_address(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="the cluster's dashboard, http://HOST:PORT (default: "
                                          "RAY_API_SERVER_ADDRESS, else http://127.0.0.1:8265)")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(_command_words(sys.argv[1:] if argv is None else argv))
    try:
        address = getattr(args, "address", None) or os.environ.get("RAY_ADDRESS")
        if address:
            from distdl import runtime

            runtime.join_environment(address)
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:
        if "home directory" not in str(exc):
            raise
        # pathlib's expanduser on "~NAME/..." where no user NAME exists, at any of the paths
        # the commands take.
        print("error: a path starts with ~NAME, and there is no user NAME: write ~/ for your "
              "home folder", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _command_words(argv: list[str]) -> list[str]:
    argv = list(argv)
    if argv[:1] == ["serve"] and argv[1:2] in (["build"], ["update"]):
        argv = [f"serve {argv[1]}", *argv[2:]]  # "serve build" and "serve update" are commands
    return argv


def _config(args, default_recipe: str | None = None):
    from distdl import config, recipes

    recipe = recipes.get(args.recipe or default_recipe or recipes.DEFAULT)
    cfg = config.resolve(recipe, args.config, args.overrides)
    if args.name:
        cfg = config.Config.from_dict({**cfg.to_dict(), "name": args.name})
    return cfg


def _print_config(cfg) -> int:
    from distdl.config import dump_yaml

    print(dump_yaml(cfg.to_dict()), end="")
    return 0


def cmd_train(args) -> int:
    from distdl.train import rundir

    cfg = _config(args)
    if args.print_config:
        return _print_config(cfg)
    run_dir = Path(args.output) if args.output else rundir.default_run_dir(args.storage, cfg.name)
    rundir.check_writable(run_dir)
    recorded = rundir.epochs_recorded(cfg, run_dir)
    if rundir.finished(run_dir, recorded, cfg.train.epochs):
        _nothing_to_train(cfg.name, recorded)
        _print_result(rundir.read_result(run_dir), run_dir)
        return 0
    from distdl.train.model_check import ModelCheck

    with ModelCheck() as check:  # first: it imports torch meanwhile, on a core of its own
        return _train(cfg, args, run_dir, recorded, check)


def _train(cfg, args, run_dir: Path, recorded: int, check) -> int:
    from distdl import runtime
    from distdl.progress import EpochPrinter
    from distdl.train import trainer  # Ray Train: a finished run needs none of it

    storage = _check_before_ray(cfg, args.storage)
    stored = None if recorded else trainer.stored_meta(storage, cfg.name)
    if stored is not None:
        _check_stored_run(cfg, stored, storage)
        trained = stored.get("epoch")
        if isinstance(trained, int) and trained >= cfg.train.epochs:
            _nothing_to_train(cfg.name, trained, f" (its latest checkpoint is in {storage})")
            return 0
    runtime.connect(args.address, num_cpus=runtime.local_cpus(cfg.train.worker_cpus()))
    print(f"training {cfg.model.name} on {cfg.data.source} with {cfg.train.num_workers} workers; "
          f"run directory {run_dir}")
    if recorded:
        print(f"continuing run '{cfg.name}' from its latest checkpoint ({recorded} of "
              f"{cfg.train.epochs} epochs recorded)")
    elif stored is not None:
        print(f"continuing run '{cfg.name}' from its latest checkpoint in {storage}/{cfg.name}, "
              f"although {run_dir} records none of its epochs; --name starts a new run")
    try:
        with EpochPrinter(run_dir, cfg.train.epochs):
            result = trainer.train(cfg, storage=storage, run_dir=run_dir, check=check)
    except trainer.TrainingFailed as exc:
        print(f"error: training failed: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; the same command continues from the latest checkpoint",
              file=sys.stderr)
        return 130
    _print_result(result, run_dir)
    return 0


def _nothing_to_train(name: str, trained: int, where: str = "") -> None:
    print(f"run '{name}' has trained {trained} epochs already{where}, so there is nothing to "
          f"train: --set train.epochs=N (more than {trained}) continues it, --name starts "
          "another")


def _check_stored_run(cfg, meta: dict, storage: str) -> None:
    """A run resumed from checkpoints that its run directory does not record must keep what
    the run directory's check keeps (the model, data, optimizer and global batch): Ray Train
    restores them whatever the config says. Checkpoints of older versions record only some."""
    from distdl.train import rundir

    stored = tuple(f for f in rundir.RESUME_KEEPS if rundir.get_field(meta, f) is not None)
    changed = rundir.resume_changes(meta, cfg.to_dict(), stored)
    if changed:
        raise UserError(f"run '{cfg.name}' in {storage} was trained with other "
                        f"{' and '.join(changed)} settings, so it cannot be resumed with these; "
                        "choose another --name")


def _check_before_ray(cfg, storage: str) -> str:
    """Check the model and data names and the storage while no Ray runs yet (a local one
    takes seconds to start); returns the storage, normalized."""
    from distdl.data import sources
    from distdl.model_names import check_name
    from distdl.train import trainer

    check_name(cfg.model.name)
    sources.check_source(cfg.data.source)
    return trainer.normalize_storage(storage)


def _print_result(result: dict, run_dir: Path) -> None:
    accuracy = result["best_val_accuracy"]  # None where no checkpoint was kept
    print(f"best validation accuracy {'none' if accuracy is None else f'{accuracy:.4f}'} after "
          f"{result['epochs_completed']} epochs in {result['wall_s']:.1f} s")
    print(f"best checkpoint: {result['best_checkpoint']}")
    print(f"run directory:   {run_dir}")


TUNE_RECIPE = "digits_tune"  # `distdl tune` without --recipe


def cmd_tune(args) -> int:
    from distdl import runtime
    from distdl.train import rundir
    from distdl.tune import progress, report, space, tuner

    cfg = _config(args, TUNE_RECIPE)
    if args.print_config and not args.resume:
        return _print_config(cfg)
    storage = _check_before_ray(cfg, args.storage)
    saved = _resumed_config(args, cfg, storage) if args.resume else None
    cfg = saved or cfg
    if args.print_config:  # the settings the resumed search continues with
        return _print_config(cfg)
    params = space.parse(cfg)
    output = Path(args.output) if args.output else rundir.default_run_dir(args.storage, cfg.name)
    rundir.check_writable(output)
    tuner.check_experiment(storage, cfg.name, args.resume)
    runtime.connect(args.address, num_cpus=runtime.local_cpus(cfg.train.worker_cpus()),
                    dashboard=True)
    print(f"{'resuming' if args.resume else 'searching'} {', '.join(p.field for p in params)} "
          f"for {cfg.tune.metric} ({cfg.tune.mode}): {cfg.tune.num_samples} samples, "
          f"{cfg.tune.scheduler} scheduler, workers per trial: {cfg.train.num_workers}")
    try:
        result = tuner.run(cfg, params, storage=storage, output=output, resume=args.resume)
    except KeyboardInterrupt:
        # Tune's own Ctrl-C handling is off (tuner.py): it would end the search as if it had
        # finished, with its unrun trials in the summary, and suggest Python to resume it.
        print(f"interrupted; continue the search with: {_resume_command(args, cfg.name)}",
              file=sys.stderr)
        _exit_after_interrupt(130)
    print(report.format_table(result))
    if result["best_trial"] is None:
        print(f"error: no trial reported {cfg.tune.metric}; see {result['experiment']}",
              file=sys.stderr)
        return 1
    print(f"best trial {result['best_trial']}: {cfg.tune.metric} {result['best_metric']:.4f} "
          f"with {progress.format_values(result['best_config'])}")
    print(f"{result['trials_run']} trials, {result['stopped_early']} stopped early, "
          f"{result['errors']} failed, in {result['wall_s']:.1f} s")
    print(f"best checkpoint: {result['best_checkpoint']}")
    config_file = _local_config_file(cfg, result["experiment"], output) if saved else None
    print(f"train with its values: "
          f"{_train_command(args, cfg.name, result['best_config'], config_file)}")
    print(f"results:         {output}")
    return 0


def _exit_after_interrupt(code: int) -> None:
    """End the process now, with Ray shut down if that takes at most 30 s. After a search's
    Ctrl-C, the process once hung at exit (one suite run in four), after its last line: Ray's
    shutdown has been seen to wait forever on its gRPC threads, and Tune's may still be
    winding down. Nothing is left to write: the search resumes from its experiment folder."""
    import ray

    sys.stdout.flush()
    sys.stderr.flush()
    stopping = threading.Thread(target=ray.shutdown, name="ray-shutdown", daemon=True)
    stopping.start()
    stopping.join(30)
    os._exit(code)


def _resumed_config(args, cfg, storage: str):
    """The config a search was started with, which --resume continues (None for a search that
    saved none: then the arguments' config, as before). Any --recipe, --config or --set given
    must agree with it: a search cannot change its settings midway."""
    from distdl.tune import tuner

    experiment = tuner.check_experiment(storage, cfg.name, resume=True)
    given = args.recipe is not None or args.config is not None or bool(args.overrides)
    return tuner.resumed_config(experiment, cfg if given else None)


def _local_config_file(cfg, experiment: str, output: Path) -> str:
    """A local copy of the search's config for `distdl train --config`: its own file in the
    experiment folder, or for storage elsewhere (s3://...) a copy in the output folder."""
    from distdl.tune import tuner

    if "://" not in experiment:
        return tuner.config_path(experiment)
    tuner.save_config(str(output), cfg)
    return tuner.config_path(str(output))


def _resume_command(args, name: str) -> str:
    import shlex

    words = ["distdl", "tune", "--name", name, "--storage", args.storage]
    words += ["--output", args.output] if args.output else []
    words += ["--address", args.address] if args.address else []
    return shlex.join([*words, "--resume"])


def _train_command(args, name: str, values: dict, config_file: str | None = None) -> str:
    """`distdl train` with the search's own settings and then `values` (field -> value): those
    of the arguments, or of `config_file`, the search's saved config, when it resumed with it."""
    import shlex

    if config_file:
        words, overrides = ["distdl", "train", "--config", config_file], []
    else:
        words = ["distdl", "train", "--recipe", args.recipe or TUNE_RECIPE]
        words += ["--config", args.config] if args.config else []
        overrides = args.overrides
    for assignment in [*overrides, *(f"{field}={value!r}" for field, value in values.items())]:
        words += ["--set", assignment]
    words += ["--name", f"{name}-best"]
    words += ["--storage", args.storage] if args.storage != _default_storage() else []
    words += ["--address", args.address] if args.address else []
    return shlex.join(words)


def cmd_evaluate(args) -> int:
    from distdl import evaluate, runtime
    from distdl.train import rundir

    checkpoint = evaluate.locate(args.checkpoint)  # before the seconds that starting Ray takes
    rundir.check_writable(Path(args.output), "--output")
    if args.data:
        from distdl.data import sources

        sources.check_source(args.data)
    runtime.connect(args.address)
    report = evaluate.evaluate(checkpoint, data=args.data, output=Path(args.output))
    print(evaluate.format_report(report))
    print(f"confusion matrix: {Path(args.output) / evaluate.CONFUSION_FILE}")
    return 0


def cmd_bench(args) -> int:
    if args.json:
        _check_writable(args.json)  # before minutes of measuring, not after
    if args.bench == "train":
        report = _bench_train(args)
        if report is None:
            return 1
    elif args.bench == "step":
        from distdl.bench import step as bench_step

        report = bench_step.run(_step_settings(args))
        print(bench_step.format_report(report))
    else:
        from distdl.bench import serve as bench_serve

        report = bench_serve.run(model=args.model, checkpoint=args.checkpoint,
                                 clients=args.clients, seconds=args.seconds,
                                 max_batch_size=args.max_batch_size,
                                 batch_wait_ms=args.batch_wait_ms, threads=args.threads,
                                 port=args.port)
        print(bench_serve.format_report(report))
    print(json.dumps(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


def _bench_train(args) -> dict | None:
    """Runs and prints `distdl bench train`; None where training failed (printed)."""
    from distdl.train.model_check import ModelCheck

    cfg = _config(args)
    with ModelCheck() as check:  # started as `distdl train` starts it, so the start-ups compare
        from distdl.bench import train as bench_train
        from distdl.train.trainer import TrainingFailed

        try:
            report = bench_train.run(cfg, command_started=STARTED, check=check)
        except TrainingFailed as exc:
            print(f"error: training failed: {exc}", file=sys.stderr)
            return None
    print(bench_train.format_report(report))
    return report


def _step_settings(args):
    from distdl.bench.step import StepSettings, check

    settings = StepSettings(model=args.model, width=args.width, image_size=args.image_size,
                            batch_size=args.batch_size, steps=args.steps, amp=args.amp,
                            channels_last=args.channels_last, compile=args.compile,
                            rounds=args.rounds)
    check(settings)
    return settings


def cmd_cluster(args) -> int:
    from distdl import cluster

    if args.action == "up":
        state = cluster.up(args.dir, args.workers)
        print(f"cluster up: head + {args.workers} workers, 1 CPU each")
        print(f"  GCS address: {state['gcs_address']}   (distdl train --address ...)")
        print(f"  dashboard:   {state['dashboard_url']}   (distdl submit --address ...)")
        print(f"  storage:     {state['storage']}")
        print(f"  auth:        export RAY_AUTH_MODE=token "
              f"RAY_AUTH_TOKEN_PATH={state['token_path']}")
    elif args.action == "down":
        pids = cluster.down(args.dir)
        print(f"cluster down: stopped nodes {', '.join(map(str, pids))} and their processes")
    else:
        state, nodes = cluster.status(args.dir)
        print(f"cluster in {state['dir']}: {len(nodes)} nodes, dashboard {state['dashboard_url']}")
        for node in nodes:
            resources = ", ".join(f"{k} {v:g}" for k, v in sorted(node["resources_total"].items())
                                  if not k.startswith(("node:", "memory", "object_store")))
            print(f"  {node['node_id'][:12]}  {'head' if node['is_head_node'] else 'worker'}  "
                  f"{resources}")
    return 0


def cmd_submit(args) -> int:
    from distdl import jobs

    argv = args.argv[1:] if args.argv[:1] == ["--"] else args.argv
    entrypoint = jobs.entrypoint(argv)
    _check_job_command(argv, args.working_dir)
    client = jobs.client(args.address)
    job_id = jobs.submit(client, entrypoint, args.working_dir)
    print(f"submitted job {job_id}")
    if args.no_wait:
        return 0
    if args.follow:
        jobs.follow(client, job_id, lambda text: print(text, end="", flush=True))
    return _job_outcome(client, job_id, show_log=not args.follow)


def _check_job_command(argv: list[str], working_dir: Path) -> None:
    """Parse the job's command here as the job will, and build its config, so that a mistake in
    it is one line and exit code 2 now, not a job that fails on the cluster. A usage mistake
    exits here with argparse's one line."""
    job = build_parser().parse_args(_command_words(argv))
    if not hasattr(job, "overrides"):
        return  # no config: its other arguments are checked where it runs
    if job.config and not Path(job.config).is_absolute():
        job.config = str(working_dir / job.config)  # the job runs in working_dir's copy
    elif job.config and not Path(job.config).is_file():
        return  # a file on the cluster, which this machine may not have
    from distdl.model_names import check_name

    cfg = _config(job, TUNE_RECIPE if job.command == "tune" else None)
    check_name(cfg.model.name)
    if job.command == "tune":
        from distdl.tune import space

        space.parse(cfg)


def _job_outcome(client, job_id: str, *, show_log: bool) -> int:
    from distdl import jobs

    status = jobs.wait(client, job_id)
    print(f"job {job_id} {status}")
    if status == "SUCCEEDED":
        return 0
    text = jobs.logs(client, job_id)
    if show_log:
        print(jobs.log_tail(text), file=sys.stderr)
    line = error_line(text) or _first_line(jobs.info(client, job_id)["message"])
    print(f"error: job {job_id} {status}: {line}", file=sys.stderr)
    return 1


def _first_line(message: str | None) -> str:
    """Ray's job message ends with the whole log of a failed driver: its first line says what."""
    lines = (message or "").strip().splitlines()
    return lines[0] if lines else "no message from Ray"


def cmd_jobs(args) -> int:
    from distdl import jobs

    client = jobs.client(args.address)
    if args.action == "list":
        for job in jobs.list_jobs(client):
            print(f"{job['job_id']}  {job['status']:<9}  {job['entrypoint']}")
    elif args.action == "status":
        print(json.dumps(jobs.info(client, args.job_id), indent=2))
    elif args.action == "logs":
        print(jobs.logs(client, args.job_id), end="")
    else:
        stopped = jobs.stop(client, args.job_id)
        print(f"job {args.job_id}: {'stop requested' if stopped else 'not running'}")
    return 0


def _serve_settings(args):
    from distdl.inference.deploy import ServeOptions
    from distdl.inference.inputs import Limits

    autoscale = args.min_replicas is not None or args.max_replicas is not None
    if autoscale and args.replicas is not None:
        raise UserError("give --replicas or --min-replicas/--max-replicas, not both")
    low = args.min_replicas if args.min_replicas is not None else 1
    high = args.max_replicas if args.max_replicas is not None else max(low, 1)
    if autoscale and low > high:  # argparse has bounded each (min >= 0, max >= 1)
        raise UserError(f"need --min-replicas ({low}) <= --max-replicas ({high})")
    return ServeOptions(
        replicas=None if autoscale else (args.replicas or 1), min_replicas=low, max_replicas=high,
        target_ongoing_requests=args.target_ongoing_requests, max_batch_size=args.max_batch_size,
        batch_wait_ms=args.batch_wait_ms, max_queued_requests=args.max_queued_requests,
        num_cpus=args.num_cpus, num_gpus=args.num_gpus, threads=args.threads,
        limits=Limits(max_body_bytes=int(args.max_body_mb * 1024 * 1024),
                      max_pixels=args.max_pixels, max_instances=args.max_instances,
                      body_timeout_s=args.body_timeout),
        access_log=args.access_log, host=args.host, port=args.port)


def cmd_serve(args) -> int:
    from distdl import runtime
    from distdl.inference import deploy

    options = _serve_settings(args)
    mounts = [deploy.mount(spec) for spec in args.checkpoints]
    config = deploy.serve_config(mounts, options, api_key=args.api_key)
    local = not (args.address or os.environ.get("RAY_ADDRESS"))
    if args.detach and local:
        raise UserError("--detach needs a running cluster (--address or RAY_ADDRESS): a local "
                        "Ray ends with this command")
    if args.ingress and not local:
        raise UserError(f"--ingress {args.ingress} applies to a Ray that distdl starts; on a "
                        "cluster, its nodes' environment chooses: RAY_SERVE_ENABLE_HA_PROXY=1 "
                        "or RAY_SERVE_ENABLE_DIRECT_INGRESS=1, neither for Serve's proxy")
    ingress = (args.ingress or deploy.default_ingress()) if local else None
    if local:
        deploy.check_port_free(options.host, options.port)
        os.environ.update(deploy.ingress_environment(ingress, options.host))
    replicas = options.replicas or options.max_replicas
    address = runtime.connect(args.address, num_cpus=max(
        os.cpu_count() or 1, int(len(mounts) * replicas * options.num_cpus)))
    deploy.deploy(config)
    base = f"http://{options.host}:{options.port}"
    for name, path in mounts:
        print(f"serving {path}\n  at {base}/{name}/predict  (docs: {base}/{name}/docs)")
        for url in deploy.replica_urls(name) if ingress == "direct" else []:
            print(f"  replica, direct: {url}/predict")
    print(f"health: {base}/healthz" + (f"  (ingress: {ingress})" if ingress else ""))
    print(f"swap a model: distdl serve update {mounts[0][0]} --checkpoint NEW --address {address}")
    if args.detach:
        return 0
    print("Ctrl-C stops", flush=True)
    # Service managers (systemd, `docker stop`, Kubernetes) stop with SIGTERM: stop as gracefully.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("stopping: the replicas answer the requests they hold (Ctrl-C again quits now)",
              file=sys.stderr, flush=True)
        deploy.stop([name for name, _ in mounts], local=local)
        print("stopped", file=sys.stderr)
    return 0


def _check_writable(path: str) -> None:
    folder = Path(path).parent
    if not folder.is_dir():
        raise UserError(f"cannot write {path}: no folder {folder}")
    if Path(path).is_dir():
        raise UserError(f"cannot write {path}: it is a folder; name a file in it")
    from distdl.train.rundir import can_write_in

    if not can_write_in(folder):
        raise UserError(f"cannot write {path}: {folder} is not writable")


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def cmd_serve_build(args) -> int:
    import yaml

    from distdl.inference import deploy

    _check_writable(args.output)
    mounts = [deploy.mount(spec) for spec in args.checkpoints]
    config = deploy.serve_config(mounts, _serve_settings(args))
    Path(args.output).write_text(yaml.safe_dump(config, sort_keys=False))
    print(f"wrote {args.output}: serve deploy {args.output}, or embed it as a RayService's "
          "serveConfigV2")
    return 0


def cmd_serve_update(args) -> int:
    from distdl import runtime
    from distdl.inference import deploy

    if not (args.address or os.environ.get("RAY_ADDRESS")):
        # A local Ray started here would hold no application to update.
        raise UserError("serve update changes an application on a running Ray: give its "
                        "--address (or set RAY_ADDRESS)")
    checkpoint, _ = deploy.checked_checkpoint(args.checkpoint)  # before connecting (seconds)
    runtime.connect(args.address)
    version = deploy.update(args.name, checkpoint)
    print(f"application {args.name} now serves {args.checkpoint} (model version {version})")
    return 0


def cmd_query(args) -> int:
    from distdl.inference import client

    reply = client.query(args.url, args.files, api_key=args.api_key, timeout_s=args.timeout)
    print(client.format_reply(reply, args.files))
    return 0


COMMANDS = {"train": cmd_train, "tune": cmd_tune, "evaluate": cmd_evaluate, "bench": cmd_bench,
            "cluster": cmd_cluster, "submit": cmd_submit, "jobs": cmd_jobs, "serve": cmd_serve,
            "serve build": cmd_serve_build, "serve update": cmd_serve_update, "query": cmd_query}

if __name__ == "__main__":
    sys.exit(main())
