"""The ``kdcore`` command (also ``python -m kdcore``): ``distill``, ``eval``, ``plugins``, ``bench``.

Errors a user can fix (a bad config, a missing file, a run that already exists) print one line
naming the problem and exit with status 2; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
from collections.abc import Sequence

from kdcore import plugins


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdcore", description="Knowledge distillation for PyTorch.")
    parser.add_argument("--disable-plugins", action="store_true",
                        help=f"do not load third-party plugins (the same as {plugins.DISABLE_ENV}=1)")
    parser.add_argument("--disable-plugin", action="append", default=[], metavar="NAME",
                        help="skip the plugin or package NAME (repeatable; the same as "
                             f"{plugins.DISABLE_ENV}=NAME,...)")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    listing = commands.add_parser("plugins", help="list the installed plugins and what each registers",
                                  description="List every plugin kdcore found: its package and version, whether "
                                              "it is built in, and the methods, losses, backends, callbacks and "
                                              "hooks it provides. Failed and disabled plugins are listed too.")
    listing.add_argument("--json", action="store_true", help="print a JSON list instead of a table")
    listing.set_defaults(run=plugins_command)

    distill = commands.add_parser("distill", help="run a distillation config",
                                  description="Train as the YAML config says: every stage of its method, evaluating "
                                              "after each epoch and checkpointing after each epoch and stage into "
                                              "its output_dir. Under `torchrun --nproc-per-node N` the same config "
                                              "trains with DDP.")
    distill.add_argument("config", help="the run's YAML config")
    distill.add_argument("--resume", action="store_true",
                         help="continue the run in output_dir from its last checkpoint")
    _add_overrides(distill)
    distill.set_defaults(run=distill_command)

    evaluate = commands.add_parser("eval", help="score a trained student on the held-out split",
                                   description="Evaluate the final student of a config's run (output_dir/student.pt, "
                                               "or --checkpoint) on the held-out split against the run's teachers; "
                                               "prints the metrics as JSON.")
    evaluate.add_argument("config", help="the run's YAML config")
    evaluate.add_argument("--checkpoint", help="a student state-dict file (default: OUTPUT_DIR/student.pt)")
    _add_overrides(evaluate)
    evaluate.set_defaults(run=eval_command)

    bench = commands.add_parser("bench", help="run the kernel benchmarks (from a source checkout)",
                                description="Runs benchmarks.kd_loss with the arguments that follow; see "
                                            "`kdcore bench --help-bench`. Needs kdcore's source tree as the "
                                            "working directory.", add_help=True)
    bench.add_argument("--help-bench", action="store_true", help="show the benchmark's own options")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for benchmarks.kd_loss")
    bench.set_defaults(run=bench_command)
    return parser


def _add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set optimizer.lr=0.01 (repeatable; values are YAML)")


def distill_command(args: argparse.Namespace) -> int:
    from kdcore.engine.distiller import Distiller

    metrics = Distiller(args.config, overrides=args.overrides).fit(resume=args.resume)
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(metrics))
    return 0


def eval_command(args: argparse.Namespace) -> int:
    from kdcore.engine.distiller import Distiller

    metrics = Distiller(args.config, overrides=args.overrides).evaluate(args.checkpoint)
    print(json.dumps(metrics, indent=2))
    return 0


def bench_command(args: argparse.Namespace) -> int:
    sys.path.insert(0, os.getcwd())
    try:
        benchmark = importlib.import_module("benchmarks.kd_loss")
    except ModuleNotFoundError:
        raise _UsageError("kdcore bench runs the benchmarks of kdcore's source tree; run it from the repository "
                          f"root (the working directory {os.getcwd()} has no benchmarks/ package)") from None
    benchmark.main(["--help"] if args.help_bench else args.args)
    return 0


class _UsageError(Exception):
    """A problem the user can fix; printed as one line."""


def plugins_command(args: argparse.Namespace) -> int:
    found = plugins.list_plugins()
    if args.json:
        print(json.dumps([info.as_dict() for info in found], indent=2))
        return 0
    for info in found:
        origin = "built-in" if info.builtin else "third-party"
        print(f"{info.name}  [{info.package_label or '-'}, {origin}]  {info.module}")
        if info.status != "loaded":
            print(f"    {info.status}" + (f": {info.error}" if info.error else ""))
        for kind, names in info.registers.items():
            print(f"    {kind}: {', '.join(names)}")
        if info.hooks:
            print(f"    hooks: {', '.join(info.hooks)}")
        for warning in info.warnings:
            print(f"    warning: {warning}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    from kdcore.engine.config import ConfigError

    args = build_parser().parse_args(argv)
    if args.disable_plugins:
        plugins.reload(disable=True)
    elif args.disable_plugin:
        plugins.reload(disable=",".join(args.disable_plugin))
    try:
        return args.run(args)
    except (ConfigError, FileExistsError, FileNotFoundError, _UsageError) as exc:
        print(f"kdcore {args.command}: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
