"""The `distdl` command: parse, call the library, print for people. No logic of its own."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from distdl.errors import UserError

STARTED = time.time()  # the command's start, for the benchmark's fixed-overhead figure


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line, not usage text."""

    def error(self, message: str) -> None:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _config_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--recipe", default=None,
                        help="named preset: digits_cpu (default; digits_tune for tune), "
                             "shapes_resnet18_gpu, debug")
    parser.add_argument("--config", help="YAML file with config sections (data, model, optim, train, tune)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one field, e.g. --set train.epochs=5 (repeatable)")
    parser.add_argument("--name", help="run name (default from the recipe); rerun a name to resume")


def _ray_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--address", help="existing Ray cluster (default: RAY_ADDRESS, else a local "
                                          "Ray on 127.0.0.1)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="distdl", description="Distributed deep learning on Ray.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    train = sub.add_parser("train", help="train a model with DDP on Ray Train workers")
    _config_args(train)
    _ray_args(train)
    train.add_argument("--storage", default=os.environ.get("DISTDL_STORAGE", "runs"),
                       help="where checkpoints go: a directory or a URI such as s3://bucket/path "
                            "(default: ./runs or DISTDL_STORAGE)")
    train.add_argument("--output", help="run directory (default: STORAGE/NAME for local storage)")

    tune = sub.add_parser("tune", help="search hyperparameters: one distributed training per trial")
    _config_args(tune)
    _ray_args(tune)
    tune.set_defaults(recipe="digits_tune")
    tune.add_argument("--storage", default=os.environ.get("DISTDL_STORAGE", "runs"),
                      help="where trials and checkpoints go: a directory or a URI "
                           "(default: ./runs or DISTDL_STORAGE)")
    tune.add_argument("--output", help="folder for tune_result.json, trials.csv and "
                                       "tune_curves.png (default: STORAGE/NAME for local storage)")
    tune.add_argument("--resume", action="store_true",
                      help="continue the interrupted search of the same --name and --storage")

    evaluate = sub.add_parser("evaluate", help="accuracy, per-class accuracy, confusion matrix")
    evaluate.add_argument("checkpoint", help="a distdl checkpoint directory (or URI)")
    evaluate.add_argument("--data", help="dataset to score (default: the validation split of the "
                                         "checkpoint's own dataset)")
    evaluate.add_argument("--output", default="evaluation",
                          help="folder for evaluation.json and confusion_matrix.png")
    _ray_args(evaluate)

    bench = sub.add_parser("bench", help="benchmarks against bare baselines")
    bench_sub = bench.add_subparsers(dest="bench", required=True, parser_class=_Parser)
    bench_train = bench_sub.add_parser("train", help="distdl training loop vs a bare PyTorch loop")
    _config_args(bench_train)
    bench_train.add_argument("--json", help="also write the report to this JSON file")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _config(args):
    from distdl import config, recipes

    cfg = config.resolve(recipes.get(args.recipe or recipes.DEFAULT), args.config, args.overrides)
    if args.name:
        cfg = config.Config.from_dict({**cfg.to_dict(), "name": args.name})
    return cfg


def cmd_train(args) -> int:
    from distdl import runtime
    from distdl.progress import EpochPrinter
    from distdl.train import trainer

    cfg = _config(args)
    run_dir = Path(args.output) if args.output else trainer.default_run_dir(args.storage, cfg.name)
    runtime.connect(args.address, num_cpus=runtime.local_cpus(
        cfg.train.num_workers * cfg.train.cpus_per_worker))
    print(f"training {cfg.model.name} on {cfg.data.source} with {cfg.train.num_workers} workers; "
          f"run directory {run_dir}")
    try:
        with EpochPrinter(run_dir, cfg.train.epochs):
            result = trainer.train(cfg, storage=args.storage, run_dir=run_dir)
    except trainer.TrainingFailed as exc:
        print(f"error: training failed: {exc}", file=sys.stderr)
        return 1
    print(f"best validation accuracy {result['best_val_accuracy']:.4f} after "
          f"{result['epochs_completed']} epochs in {result['wall_s']:.1f} s")
    print(f"best checkpoint: {result['best_checkpoint']}")
    print(f"run directory:   {run_dir}")
    return 0


def cmd_tune(args) -> int:
    from distdl import runtime
    from distdl.train import trainer
    from distdl.tune import report, space, tuner

    cfg = _config(args)
    params = space.parse(cfg)
    output = Path(args.output) if args.output else trainer.default_run_dir(args.storage, cfg.name)
    runtime.connect(args.address, num_cpus=runtime.local_cpus(tuner.trial_cpus(cfg.train)),
                    dashboard=True)
    print(f"{'resuming' if args.resume else 'searching'} {', '.join(p.field for p in params)} "
          f"for {cfg.tune.metric} ({cfg.tune.mode}): {cfg.tune.num_samples} samples, "
          f"{cfg.tune.scheduler} scheduler, workers per trial: {cfg.train.num_workers}")
    result = tuner.run(cfg, params, storage=args.storage, output=output, resume=args.resume)
    print(report.format_table(result))
    if result["best_trial"] is None:
        print(f"error: no trial reported {cfg.tune.metric}; see {result['experiment']}",
              file=sys.stderr)
        return 1
    print(f"best trial {result['best_trial']}: {cfg.tune.metric} {result['best_metric']:.4f} "
          f"with {result['best_config']}")
    print(f"{result['trials_run']} trials, {result['stopped_early']} stopped early, "
          f"{result['errors']} failed, in {result['wall_s']:.1f} s")
    print(f"best checkpoint: {result['best_checkpoint']}")
    print(f"results:         {output}")
    return 0


def cmd_evaluate(args) -> int:
    from distdl import evaluate, runtime

    runtime.connect(args.address)
    report = evaluate.evaluate(args.checkpoint, data=args.data, output=Path(args.output))
    print(evaluate.format_report(report))
    print(f"confusion matrix: {Path(args.output) / evaluate.CONFUSION_FILE}")
    return 0


def cmd_bench(args) -> int:
    from distdl.bench import train as bench_train

    report = bench_train.run(_config(args), command_started=STARTED)
    print(bench_train.format_report(report))
    print(json.dumps(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return 0


COMMANDS = {"train": cmd_train, "tune": cmd_tune, "evaluate": cmd_evaluate, "bench": cmd_bench}

if __name__ == "__main__":
    sys.exit(main())
