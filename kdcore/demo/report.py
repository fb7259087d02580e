"""The demo's report: a console table, ``demo.json`` and ``demo.png``, and a plain verdict per
method against the scratch baseline."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path

from kdcore.demo.experiment import MARKER, Row, Settings

# rows compared with scratch: students of the scratch model's size, trained another way
METHODS = ("response_kd", "born_again", "ensemble", "takd", "self_distill", "teacher_pruned")


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def verdicts(rows: list[Row]) -> dict[str, str]:
    """For each method, whether it beat scratch (a higher mean accuracy *and* better on most seeds),
    by how much, on how many seeds."""
    by_name = {row.name: row for row in rows}
    scratch = by_name["scratch"]
    base, _ = mean_std(scratch.accuracy)
    out = {}
    for name in METHODS:
        row = by_name[name]
        mean, _ = mean_std(row.accuracy)
        wins = sum(a > b for a, b in zip(row.accuracy, scratch.accuracy))
        difference = 100 * (mean - base)
        verb = "beat" if mean > base and 2 * wins > len(row.accuracy) else "did not beat"
        out[name] = f"{verb} scratch ({difference:+.1f} points; better on {wins}/{len(row.accuracy)} seeds)"
    return out


def table(rows: list[Row]) -> str:
    header = ("method", "accuracy %", "agreement %", "KL to teacher", "ECE", "params ≠ 0", "stored KB", "latency µs")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        accuracy, spread = mean_std(row.accuracy)
        lines.append("| " + " | ".join([
            row.name, f"{100 * accuracy:.1f} ± {100 * spread:.1f}",
            f"{100 * statistics.fmean(row.teacher_agreement):.1f}", f"{statistics.fmean(row.kl_to_teacher):.3f}",
            f"{statistics.fmean(row.ece):.3f}", f"{row.parameters:,}", f"{row.size_kb:.1f}", f"{row.latency_us:.0f}",
        ]) + " |")
    return "\n".join(lines)


def write(rows: list[Row], settings: Settings, seconds: float) -> str:
    """Writes demo.json and demo.png into the output directory; returns the text to print."""
    root = settings.output_dir
    judged = verdicts(rows)
    text = "\n".join([
        f"UCI digits, held-out split; teachers trained on the whole training split, students (scratch included) on "
        f"{settings.train_fraction:.0%} of it, {settings.epochs} epochs; mean ± std over {settings.seeds} seed(s); "
        "agreement and KL against each seed's teacher; latency: one example, one CPU thread.",
        "", table(rows), "",
        *(f"{name}: {verdict}" for name, verdict in judged.items()),
        "", f"{seconds:.0f} s in all; results in {root / MARKER} and {root / 'demo.png'}",
    ])
    (root / MARKER).write_text(json.dumps({
        "settings": {**dataclasses.asdict(settings), "output_dir": str(settings.output_dir)},
        "rows": [dataclasses.asdict(row) for row in rows], "verdicts": judged, "seconds": seconds,
    }, indent=2) + "\n")
    _plot(rows, root / "demo.png")
    return text


def _plot(rows: list[Row], path: Path) -> None:
    """Accuracy per method (mean ± std), the scratch baseline as a line, each bar labelled with its
    accuracy and parameter count."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    means = [100 * mean_std(row.accuracy)[0] for row in rows]
    spreads = [100 * mean_std(row.accuracy)[1] for row in rows]
    scratch = means[[row.name for row in rows].index("scratch")]
    low = max(0.0, min(m for m, row in zip(means, rows) if m > scratch - 20) - 5)
    figure, axis = plt.subplots(figsize=(8, 4.8), dpi=120)
    colors = ["tab:green" if m > scratch else "tab:gray" for m in means]
    positions = range(len(rows))[::-1]
    axis.barh(list(positions), [m - low for m in means], left=low, xerr=spreads, color=colors, capsize=3)
    for y, mean, spread, row in zip(positions, means, spreads, rows):
        axis.text(max(mean + spread, low) + 0.3, y, f"{mean:.1f}%  ({row.parameters:,} params)", va="center", fontsize=7)
    axis.axvline(scratch, color="tab:red", linestyle="--", linewidth=1, label="scratch")
    axis.set_yticks(list(positions), [row.name for row in rows])
    axis.set_xlim(low, 101)
    axis.set_xlabel("held-out accuracy (%), mean ± std over seeds")
    axis.set_title("UCI digits: students distilled vs. trained from scratch (green: beat scratch)")
    axis.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
