"""The transfer report's figure: reliability diagrams, inherited-error rates and the per-class gap
against the teacher's per-class accuracy, drawn from :func:`kdcore.transfer.transfer_figures`'s
dictionary (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

STUDENT, BASELINE = "tab:blue", "tab:gray"


def plot_report(figures: dict[str, Any], path: str | Path) -> None:
    """Draws ``figures`` into the PNG file ``path``, three panels side by side: the student's (and
    the baseline's) reliability diagram with the ECE, the inherited-error rates as bars, and the
    per-class gap over the baseline against the teacher's per-class accuracy with Pearson's r in
    the title (without a baseline that panel says so). The file is written whole or not at all
    (a temporary file renamed over ``path``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (reliability, inherited, gaps) = plt.subplots(1, 3, figsize=(15, 4.6), dpi=110)
    _reliability(reliability, figures)
    _inherited(inherited, figures)
    _gaps(gaps, figures)
    figure.suptitle(f"What the student inherits from its teacher ({figures['rows']:,} held-out rows, "
                    f"teacher accuracy {100 * figures['teacher_accuracy']:.1f} %)")
    figure.tight_layout()
    path = Path(path)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        figure.savefig(temporary, format="png")
        os.replace(temporary, path)
    finally:
        plt.close(figure)
        temporary.unlink(missing_ok=True)


def _models(figures: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(label, key prefix, colour) of the student and, when there is one, the baseline."""
    models = [("student", "", STUDENT)]
    if figures["baseline_accuracy"] is not None:
        models.append(("baseline", "baseline_", BASELINE))
    return models


def _reliability(axis, figures: dict[str, Any]) -> None:
    """Accuracy against mean confidence per bin (a marker's area grows with the bin's rows)."""
    axis.plot([0, 1], [0, 1], color="black", linestyle=":", linewidth=1, label="calibrated")
    for label, prefix, color in _models(figures):
        filled = [b for b in figures[f"{prefix}reliability"] if b["count"]]
        sizes = [12 + 150 * b["count"] / figures["rows"] for b in filled]
        axis.plot([b["confidence"] for b in filled], [b["accuracy"] for b in filled], color=color, linewidth=1)
        axis.scatter([b["confidence"] for b in filled], [b["accuracy"] for b in filled], s=sizes, color=color,
                     label=f"{label} (ECE {figures[f'{prefix}ece']:.3f})", zorder=3)
    axis.set_xlim(0, 1.02)
    axis.set_ylim(0, 1.02)
    axis.set_xlabel("confidence (mean over the bin)")
    axis.set_ylabel("accuracy")
    axis.set_title(f"reliability ({figures['bins']} equal-width bins)")
    axis.legend(fontsize=8, loc="upper left")


def _inherited(axis, figures: dict[str, Any]) -> None:
    """The share of the teacher's errors each model repeats."""
    errors = figures["teacher_errors"]
    models = _models(figures)
    for position, (label, prefix, color) in enumerate(models):
        rate = figures[f"{prefix}inherited_error_rate"]
        if rate is None:
            axis.text(position, 0.02, "no teacher error", ha="center", fontsize=8)
            continue
        axis.bar(position, 100 * rate, color=color, width=0.6)
        axis.text(position, 100 * rate + 1, f"{100 * rate:.1f} %\n({round(rate * errors)}/{errors})", ha="center",
                  va="bottom", fontsize=8)
    axis.set_xticks(range(len(models)), [label for label, _, _ in models])
    axis.set_xlim(-0.8, len(models) - 0.2)
    axis.set_ylim(0, 115)
    axis.set_ylabel("% of the teacher's errors repeated")
    axis.set_title(f"inherited errors (over the teacher's {errors:,} errors)")


def _gaps(axis, figures: dict[str, Any]) -> None:
    """Per class: the student's accuracy minus the baseline's against the teacher's accuracy."""
    per_class = figures["per_class"]
    if per_class["baseline"] is None:
        axis.text(0.5, 0.5, "the per-class gap needs a baseline\n(kdcore report RUN --baseline SCRATCH_RUN)",
                  ha="center", va="center", transform=axis.transAxes, fontsize=9)
        axis.set_axis_off()
        return
    points = [(teacher, 100 * (student - baseline)) for teacher, student, baseline
              in zip(per_class["teacher"], per_class["student"], per_class["baseline"]) if teacher is not None]
    axis.axhline(0, color="black", linewidth=0.8)
    axis.scatter([100 * t for t, _ in points], [g for _, g in points], s=14 if len(points) > 100 else 30,
                 alpha=0.5 if len(points) > 100 else 0.9, color=STUDENT)
    r = figures["gap_teacher_correlation"]
    which = "classes among the labels" if per_class["restricted"] else "classes"
    axis.set_title(f"per-class gap vs teacher accuracy: r = {'undefined' if r is None else f'{r:.2f}'} "
                   f"({len(points):,} {which})", fontsize=10)
    axis.set_xlabel("teacher's accuracy on the class (%)")
    axis.set_ylabel("student − baseline accuracy (points)")
