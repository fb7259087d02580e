"""The ``kdcore`` command (also ``python -m kdcore``): ``distill``, ``eval``, ``report``,
``cache-teacher``, ``demo``, ``plugins``, ``bench``.

Errors a user can fix (a bad config, a missing file, a busy or already used output directory)
print one line naming the problem and exit with status 2. A loss that stops being finite prints
its one line and exits with status 1, as does an exception in a plugin's code, which also prints
which plugin raised where and the traceback of the plugin's frames; anything else is a bug and
keeps its traceback.

The parser is built without importing torch (``kdcore --help`` answers at once); each command
imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import importlib.util
import json
import os
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pluggy

from kdcore import plugins

MAX_DEMO_SEEDS = 100  # a count beyond it is a typo: each seed trains every method
BENCHMARKS = ("kd_loss", "kd_loss_sparse", "fused_linear_kd")  # modules of the source tree's benchmarks/ package



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
                                               "or --checkpoint) on the held-out split against the run's teachers "
                                               "(or the held-out split's teacher-logit cache); prints the metrics "
                                               "as JSON.")
    evaluate.add_argument("config", help="the run's YAML config")
    evaluate.add_argument("--checkpoint", help="a student state-dict file (default: OUTPUT_DIR/student.pt)")
    _add_overrides(evaluate)
    evaluate.set_defaults(run=eval_command)

    report = commands.add_parser("report", help="what a distilled student inherits from its teacher",
                                 description="Scores a finished run's student and its first teacher (and, with "
                                             "--baseline, another run's student, e.g. one trained without the "
                                             "teacher) on the run's held-out split: accuracy, agreement, KL, "
                                             "calibration, the share of the teacher's errors each student repeats, "
                                             "and the per-class gap over the baseline against the teacher's "
                                             "per-class accuracy. Writes report.json and report.png and prints a "
                                             "summary.")
    report.add_argument("run_dir", metavar="RUN_DIR", help="the output_dir of a finished `kdcore distill` run")
    report.add_argument("--baseline", metavar="RUN_DIR",
                        help="a run whose student is compared with RUN_DIR's (same held-out data and classes)")
    report.add_argument("--output", metavar="DIR", help="where report.json and report.png go (default RUN_DIR/report)")
    report.add_argument("--device", choices=("auto", "cpu", "cuda"), help="where the models run (default: the run's)")
    report.set_defaults(run=report_command)

    cache = commands.add_parser("cache-teacher", help="cache a config's teacher as top-k log-probabilities",
                                description="Run one of the config's teachers over the splits of its dataset, "
                                            "in order, and write each position's top-k log-probabilities to sharded "
                                            "caches (manifest + checksums) that kdcore.cache reads back aligned with "
                                            "the student's batches: the train split's in the output directory, the "
                                            "held-out split's in its val/ subdirectory, where a run whose "
                                            "data.teacher_cache names that directory trains from the first and is "
                                            "scored against the second. Running the same command again resumes an "
                                            "interrupted cache.")
    cache.add_argument("config", help="the run's YAML config (its teachers and data sections are used)")
    cache.add_argument("--output", help="the cache directory (default: the config's data.teacher_cache)")
    cache.add_argument("--k", type=int, default=128, help="entries kept per position (default 128)")
    cache.add_argument("--temperature", type=float, default=1.0, help="the teacher's softmax temperature (default 1)")
    cache.add_argument("--value-dtype", default="bfloat16",
                       help="how log-probabilities are stored: bfloat16 (default) or float16")
    cache.add_argument("--split", choices=("all", "train", "val"), default="all",
                       help="the splits to cache: all (default), train (into OUTPUT) or val (into OUTPUT/val)")
    cache.add_argument("--teacher", type=int, default=0, help="which of the config's teachers (default 0)")
    cache.add_argument("--tokenizer", help="the tokenizer's name, recorded in the manifest")
    cache.add_argument("--batch-size", type=int, default=32, help="examples per teacher forward pass (default 32)")
    cache.add_argument("--examples-per-shard", type=int, default=4096, help="examples per shard file (default 4096)")
    cache.add_argument("--device", default="cpu", help="where the teacher runs (default cpu)")
    _add_overrides(cache)
    cache.set_defaults(run=cache_teacher_command)

    demo = commands.add_parser("demo", help="compare the distillation methods on real data (minutes on a CPU)",
                               description="Trains teachers, a scratch student and students distilled by each "
                                           "method over several seeds and prints a table and whether each method "
                                           "beat scratch. The classification suite (default) runs on the UCI digits "
                                           "(shipped with kdcore), plus the teacher int8-quantized and pruned to the "
                                           "student's size, and writes demo.json and demo.png; --suite lm runs the "
                                           "language-model methods on the shipped Shakespeare and writes lm.json "
                                           "and lm.png.")
    demo.add_argument("--suite", choices=("classification", "lm"), default="classification",
                      help="classification (default): every classification method on the digits; lm: scratch, "
                           "llm_kd, seq_kd, gkd and cached_kd students of a byte-level GPT-2 teacher on the "
                           "Shakespeare")
    demo.add_argument("--seeds", help="a count (seeds 0 to N-1) or a comma list of seeds, e.g. 7,8,9; each method "
                                      "and its scratch baseline share every seed (default 3; 2 with --suite lm)")
    demo.add_argument("--methods", help="a comma list of the classification methods to run (default: all of them)")
    demo.add_argument("--sweep", choices=("capacity",),
                      help="capacity: students from far smaller than the default up to the teacher's size, "
                           "each trained from scratch, by response_kd and by takd; writes capacity.json and "
                           "capacity.png")
    demo.add_argument("--epochs", type=int, help="epochs per student run (default 40, teachers train half as many; "
                                                 "with --suite lm 4, the teacher 4)")
    demo.add_argument("--student-width", type=int, help="hidden units of the classification suite's student MLP, and "
                                                         "its CNN student's width scale (default 32)")
    demo.add_argument("--train-fraction", type=float,
                      help="the share of the training split students see; teachers see all of it (default 0.25; 0.5 "
                           "with --suite lm)")
    demo.add_argument("--output-dir", help="where runs and results go (default runs/demo, runs/demo-capacity with "
                                            "--sweep capacity, runs/demo-lm with --suite lm)")
    demo.set_defaults(run=demo_command)

    bench = commands.add_parser("bench", help="run the kernel benchmarks (from a source checkout)",
                                description="Runs benchmarks.<NAME> with the arguments that follow; see "
                                            "`kdcore bench [--benchmark NAME] --help-bench`. Needs kdcore's source "
                                            "tree as the working directory.")
    bench.add_argument("--benchmark", choices=BENCHMARKS, default=BENCHMARKS[0],
                       help=f"which benchmark (default {BENCHMARKS[0]})")
    bench.add_argument("--help-bench", action="store_true", help="show the benchmark's own options")
    bench.add_argument("args", nargs=argparse.REMAINDER, help="arguments for the benchmark")
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
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun, one copy of the (all-reduced) metrics
        print(json.dumps(metrics, indent=2))
    return 0


def report_command(args: argparse.Namespace) -> int:
    from kdcore.transfer import report
    from kdcore.transfer.runs import ReportError

    if importlib.util.find_spec("matplotlib") is None:  # checked before the models run
        raise _UsageError("the report draws report.png with matplotlib: pip install matplotlib (or kdcore[demo])")
    try:
        record, output = report.write_report(args.run_dir, baseline_dir=args.baseline, output=args.output,
                                             device=args.device)
    except ReportError as exc:  # runs that cannot be compared: a problem the user fixes by choosing others
        raise _UsageError(str(exc)) from None
    print(report.summary(record, output))
    return 0


def cache_teacher_command(args: argparse.Namespace) -> int:
    from kdcore import cache
    from kdcore.engine.builders import build_model, build_splits, build_tokenizers
    from kdcore.engine.config import parse_config
    from kdcore.engine.data import call_model

    if args.value_dtype not in cache.VALUE_DTYPES:
        raise _UsageError(f"--value-dtype must be one of {sorted(cache.VALUE_DTYPES)}, got {args.value_dtype!r}")
    config = parse_config(args.config, args.overrides)
    output = args.output or config.data.teacher_cache
    if output is None:
        raise _UsageError("--output: give the cache directory, or set data.teacher_cache in the config")
    if not 0 <= args.teacher < len(config.teachers):
        raise _UsageError(f"--teacher {args.teacher}: the config has {len(config.teachers)} teacher(s)")
    spec = config.teachers[args.teacher]
    key = f"teachers.{args.teacher}"
    model = build_model(spec, key).to(args.device).eval()
    # the splits as the dataset gives them: a data.teacher_cache in the config is what this writes
    train, val = build_splits(config.data.model_copy(update={"teacher_cache": None}),
                              build_tokenizers(config.student, config.teachers))
    if isinstance(train[0], dict) and "teacher_view" in train[0]:
        raise _UsageError(f"data.dataset {config.data.dataset!r} gives the teachers their own tokenization; a cache "
                          "holds teacher distributions over the student's tokens, so it cannot be written for a "
                          "teacher with another tokenizer (distil with method cross_tokenizer_kd instead)")
    model_id = cache.model_id(spec.model, spec.options, spec.checkpoint)
    targets = {"train": (train, Path(output)), "val": (val, cache.held_out_path(output))}

    def report(done: int, total: int, *, split: str) -> None:
        print(f"cached {done}/{total} {split} examples", file=sys.stderr)

    for split in ("train", "val") if args.split == "all" else (args.split,):
        dataset, path = targets[split]
        cache.write_teacher_cache(lambda inputs: call_model(model, inputs), dataset, path, k=args.k,
                                  model_id=model_id, temperature=args.temperature, value_dtype=args.value_dtype,
                                  tokenizer=args.tokenizer, batch_size=args.batch_size,
                                  examples_per_shard=args.examples_per_shard, device=args.device,
                                  progress=functools.partial(report, split=split))
        done = cache.TeacherCache(path)
        print(json.dumps({"split": split, "path": str(path), "examples": len(done), "k": done.spec.k,
                          "bytes_per_position": round(done.bytes_per_position, 2), "checksum": done.checksum}))
    return 0


def demo_command(args: argparse.Namespace) -> int:
    import dataclasses

    from kdcore import demo

    if importlib.util.find_spec("matplotlib") is None:  # checked now, not after minutes of training
        raise _UsageError("the demo draws its plot with matplotlib: pip install matplotlib (or kdcore[demo])")
    classification_only = {"methods": args.methods, "sweep": args.sweep, "student-width": args.student_width}
    if args.suite == "lm" and any(value is not None for value in classification_only.values()):
        name = next(name for name, value in classification_only.items() if value is not None)
        raise _UsageError(f"--{name} belongs to the classification suite; --suite lm runs its own rows (scratch, "
                          "llm_kd, seq_kd, gkd, cached_kd, and the addition task's) with its own students")
    if args.sweep and (args.methods is not None or args.student_width is not None):
        raise _UsageError("--sweep capacity trains its own students (scratch, response_kd and takd at seven widths): "
                          "--methods and --student-width belong to the method comparison; give one or the other")
    given: dict[str, Any] = {}
    for name, value in (("epochs", args.epochs), ("student_width", args.student_width)):
        if value is not None and value < 1:
            raise _UsageError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if value is not None:
            given[name] = value
    if args.train_fraction is not None:
        if not 0 < args.train_fraction <= 1:
            raise _UsageError(f"--train-fraction must lie in (0, 1], got {args.train_fraction}")
        given["train_fraction"] = args.train_fraction
    if args.seeds is not None:
        given["seeds"] = _seeds(args.seeds)
    if args.suite == "lm":
        from kdcore.demo import lm

        settings = dataclasses.replace(lm.Settings(), **given, output_dir=Path(args.output_dir or "runs/demo-lm"))
        job = functools.partial(lm.run, settings)
    else:
        settings = dataclasses.replace(demo.Settings(), **given, methods=_methods(args.methods), output_dir=Path(
            args.output_dir or ("runs/demo-capacity" if args.sweep else "runs/demo")))
        try:
            demo.chosen_contenders(settings)
        except ValueError as exc:
            raise _UsageError(str(exc)) from None
        job = functools.partial(demo.sweep if args.sweep else demo.run, settings)
    try:
        print(job())
    except demo.DemoDirectoryError as exc:
        raise _UsageError(str(exc)) from None
    return 0


def _methods(text: str | None) -> tuple[str, ...] | None:
    """``--methods``: a comma list of names (None: every method)."""
    if text is None:
        return None
    names = tuple(name.strip() for name in text.split(","))
    if not all(names):
        raise _UsageError(f"--methods takes a comma list of method names (e.g. response_kd,dkd), got {text!r}")
    return names


def _seeds(text: str) -> tuple[int, ...]:
    """``--seeds``: a count N (seeds 0 … N-1) or a comma list of distinct seeds, each in
    [0, 2**32) (what torch and numpy accept)."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts):
        raise _UsageError(f"--seeds takes a count or a comma list of seeds, integers from 0 (e.g. 3 or 7,8,9), "
                          f"got {text!r}")
    if len(parts) == 1:
        count = int(parts[0])
        if not 1 <= count <= MAX_DEMO_SEEDS:
            raise _UsageError(f"--seeds must be a count from 1 to {MAX_DEMO_SEEDS}, got {count}")
        return tuple(range(count))
    seeds = tuple(int(part) for part in parts)
    if len(set(seeds)) != len(seeds):
        raise _UsageError(f"--seeds lists a seed twice: {text!r} (paired seeds must be distinct)")
    if max(seeds) >= 2**32:
        raise _UsageError(f"--seeds: {max(seeds)} is not below 2**32, the largest seed torch and numpy take")
    return seeds


def bench_command(args: argparse.Namespace) -> int:
    sys.path.insert(0, os.getcwd())
    try:
        benchmark = importlib.import_module(f"benchmarks.{args.benchmark}")
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
    args = build_parser().parse_args(argv)
    from kdcore.cache import CacheError
    from kdcore.engine.config import ConfigError
    from kdcore.engine.rundir import RunDirectoryError

    if args.disable_plugins:
        plugins.reload(disable=True)
    elif args.disable_plugin:
        plugins.reload(disable=",".join(args.disable_plugin))
    try:
        return args.run(args)
    except (ConfigError, CacheError, RunDirectoryError, FileExistsError, FileNotFoundError, _UsageError) as exc:
        print(f"kdcore {args.command}: {exc}", file=sys.stderr)
        return 2
    except FloatingPointError as exc:  # a loss that is not finite: the message says what to know, the traceback nothing
        print(f"kdcore {args.command}: {exc}", file=sys.stderr)
        return 1
    except plugins.PluginFault as fault:
        print(f"kdcore {args.command}: {fault}", file=sys.stderr)
        print(_plugin_traceback(fault.__cause__), end="", file=sys.stderr)
        if fault.name:
            print(f"(to run without this plugin: kdcore --disable-plugin {fault.name} {args.command} ...)",
                  file=sys.stderr)
        return 1


def _plugin_traceback(error: BaseException | None) -> str:
    """The traceback of ``error`` from its first frame outside kdcore and pluggy: the plugin's
    code and whatever it called."""
    if error is None:
        return ""
    own = tuple(str(Path(module.__file__).parent) + os.sep for module in (plugins, pluggy))
    frames = traceback.extract_tb(error.__traceback__)
    start = next((i for i, frame in enumerate(frames) if not frame.filename.startswith(own)), 0)
    lines = ["Traceback (the plugin's frames):\n", *traceback.format_list(frames[start:])]
    return "".join(lines + traceback.format_exception_only(type(error), error))


if __name__ == "__main__":
    sys.exit(main())
