"""``kdcore report``: the transfer figures of a finished run (against a baseline run), written as
``report.json`` and ``report.png`` and summed up in a few lines.

The report directory (``RUN_DIR/report`` unless told otherwise) is only ever written by the
report: a ``report.json`` that is not a transfer report, or a ``report.png`` without one, is left
alone and the report refused. Each file is written to a temporary file and renamed, so a report
interrupted midway leaves the previous files or the new ones; ``report.json`` is written first, so
a ``report.png`` beside it is the report's own.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from kdcore.engine import distributed
from kdcore.transfer.figures import figures_of
from kdcore.transfer.plot import plot_report
from kdcore.transfer.runs import FinishedRun, ReportError, score

REPORT_NAME, PLOT_NAME = "report.json", "report.png"
KIND = "kdcore transfer report"  # what report.json says it is: a report directory holding it is the report's


def write_report(run_dir: str | Path, *, baseline_dir: str | Path | None = None, output: str | Path | None = None,
                 device: str | None = None) -> tuple[dict[str, Any], Path]:
    """Scores the run in ``run_dir`` (its final student and first teacher on its held-out split)
    and, given ``baseline_dir``, that run's student; writes ``report.json`` (the figures and what
    they were computed from) and ``report.png`` into ``output`` (default ``run_dir/report``).
    ``device`` (``auto`` / ``cpu`` / ``cuda``) overrides the run's. Returns the record written
    and the directory."""
    run = FinishedRun.open(run_dir)
    baseline = None if baseline_dir is None else FinishedRun.open(baseline_dir)
    output = Path(output) if output is not None else run.path / "report"
    _check_output(output)
    procs = distributed.start(device or run.config.device)
    try:
        rows = score(run, baseline, procs.device)
    finally:
        procs.close()
    record = {
        "kind": KIND, "run": str(run.path), "baseline": None if baseline is None else str(baseline.path),
        "method": run.config.method.name, "teacher": run.config.teachers[0].model_dump(mode="json"),
        "task": run.config.eval.task, "ignore_index": run.config.data.ignore_index,
        "figures": figures_of(rows, bins=run.config.eval.ece_bins),
    }
    output.mkdir(parents=True, exist_ok=True)
    _write_atomic(output / REPORT_NAME, json.dumps(record, indent=2) + "\n")
    plot_report(record["figures"], output / PLOT_NAME)
    return record, output


def summary(record: dict[str, Any], output: Path) -> str:
    """A few lines: each model's accuracy, agreement, KL and ECE, the inherited-error rates, the
    per-class correlation and where the files are."""
    f = record["figures"]
    lines = [f"{f['rows']:,} held-out rows ({record['task']}), teacher accuracy {_percent(f['teacher_accuracy'])}, "
             f"{f['teacher_errors']:,} teacher errors"]
    for label, prefix in [("student", ""), ("baseline", "baseline_")][:2 if record["baseline"] else 1]:
        lines.append(f"{label:<9} accuracy {_percent(f[prefix + 'accuracy'])}  agreement "
                     f"{_percent(f[prefix + 'agreement'])}  KL to teacher {f[prefix + 'kl_to_teacher']:.4f}  "
                     f"ECE {f[prefix + 'ece']:.4f}  repeats {_percent(f[prefix + 'inherited_error_rate'])} of the "
                     "teacher's errors")
    r = f["gap_teacher_correlation"]
    if record["baseline"]:
        lines.append("per-class gap over the baseline vs the teacher's per-class accuracy: "
                     + ("r undefined (constant, or under two classes)" if r is None else f"r = {r:+.2f}"))
    lines.append(f"wrote {output / REPORT_NAME} and {output / PLOT_NAME}")
    return "\n".join(lines)


def _percent(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _check_output(output: Path) -> None:
    """Refuses an ``output`` that is a file, or that holds a ``report.json`` or ``report.png`` the
    report did not write (:data:`KIND` in ``report.json`` says it did)."""
    if output.exists() and not output.is_dir():
        raise FileExistsError(f"--output {output} exists and is not a directory")
    ours = False
    if (output / REPORT_NAME).exists():
        try:
            ours = json.loads((output / REPORT_NAME).read_text()).get("kind") == KIND
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise FileExistsError(f"{output / REPORT_NAME} exists and is not a transfer report; the report replaces "
                                  "only its own files: choose another --output")
    if (output / PLOT_NAME).exists() and not ours:
        raise FileExistsError(f"{output / PLOT_NAME} exists beside no transfer report; the report replaces only its "
                              "own files: choose another --output")
    created = not output.exists()
    try:  # before minutes of scoring, not after; a refused report leaves no directory behind
        output.mkdir(parents=True, exist_ok=True)
        probe = output / f".report.{os.getpid()}.probe"
        probe.write_bytes(b"")
        probe.unlink()
        if created:
            output.rmdir()
    except OSError as exc:
        raise ReportError(f"--output {output}: cannot write there ({exc.strerror or exc}); choose another "
                          "--output") from None


def _write_atomic(path: Path, text: str) -> None:
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        temporary.write_text(text)
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)
