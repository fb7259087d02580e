"""The demo's report: a console table, ``demo.json`` and ``demo.png``, and a verdict per method
against the scratch baseline of its architecture, from paired seeds."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from kdcore.demo.experiment import Row, Settings


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired_verdict(values: list[float], baseline: list[float], baseline_name: str,
                   unit: str = "points") -> dict[str, Any]:
    """Whether ``values`` beat ``baseline``, seed by seed (seed i of one against seed i of the
    other, both fractions): a positive mean gain (in points, ``unit`` in the text) *and* better on
    most seeds."""
    gains = [a - b for a, b in zip(values, baseline)]
    wins = sum(gain > 0 for gain in gains)
    mean_gain = 100 * statistics.fmean(gains)
    beat = mean_gain > 0 and 2 * wins > len(gains)
    text = (f"{'beat' if beat else 'did not beat'} {baseline_name} ({mean_gain:+.1f} {unit}; better on "
            f"{wins}/{len(gains)} seeds)")
    return {"beat_scratch": beat, "mean_gain_points": mean_gain, "wins": wins, "seeds": len(gains), "text": text}


def verdict(row: Row, baseline: Row) -> dict[str, Any]:
    """Whether ``row`` beat ``baseline`` in accuracy (:func:`paired_verdict`)."""
    return paired_verdict(row.accuracy, baseline.accuracy, baseline.name)


def verdicts(rows: list[Row]) -> dict[str, dict[str, Any]]:
    """A verdict for every row that has a baseline (the methods, and the pruned teacher)."""
    by_name = {row.name: row for row in rows}
    return {row.name: verdict(row, by_name[row.baseline]) for row in rows if row.baseline is not None}


def pooled_rate(row: Row, key: str) -> float | None:
    """An inherited-error rate (``key``) over every seed's teacher errors together: each seed's
    teacher errs on a handful of held-out examples, too few for a rate per seed to mean much."""
    pairs = [(figures[key], figures["teacher_errors"]) for figures in row.transfer if figures[key] is not None]
    errors = sum(count for _, count in pairs)
    return sum(rate * count for rate, count in pairs) / errors if errors else None


def _percent(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.1f}"


def table(rows: list[Row]) -> str:
    header = ("method", "accuracy %", "agreement %", "KL to teacher", "ECE", "inherited errors %",
              "scratch's %", "params ≠ 0", "stored KB", "latency µs")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        accuracy, spread = mean_std(row.accuracy)
        judged = row.baseline is not None or row.name.startswith("scratch")
        lines.append("| " + " | ".join([
            row.name, f"{100 * accuracy:.1f} ± {100 * spread:.1f}",
            f"{100 * statistics.fmean(row.teacher_agreement):.1f}", f"{statistics.fmean(row.kl_to_teacher):.3f}",
            f"{statistics.fmean(row.ece):.3f}",
            _percent(pooled_rate(row, "inherited_error_rate")) if judged else "—",
            _percent(pooled_rate(row, "baseline_inherited_error_rate")) if judged else "—",
            f"{row.parameters:,}", f"{row.size_kb:.1f}", f"{row.latency_us:.0f}",
        ]) + " |")
    return "\n".join(lines)


def write(rows: list[Row], settings: Settings, seconds: float) -> str:
    """Writes demo.json and demo.png into the output directory; returns the text to print."""
    root = settings.output_dir
    judged = verdicts(rows)
    seeds = ", ".join(map(str, settings.seeds))
    text = "\n".join([
        f"UCI digits, held-out split; teachers trained on the whole training split, students (scratch included) on "
        f"{settings.train_fraction:.0%} of it, {settings.epochs} epoch{'s' if settings.epochs > 1 else ''}; mean ± std "
        f"over seeds {seeds}; agreement, KL and inherited errors against each seed's teacher (inherited errors: of "
        "the held-out examples the teacher gets wrong, all seeds together, the share where the model predicts the "
        "teacher's wrong class; scratch's: the same for the scratch student of each seed); latency: one example, one "
        "CPU thread.",
        "", table(rows), "",
        *(f"{name}: {judged[name]['text']}" for name in judged),
        "", f"{seconds:.0f} s in all; results in {root / 'demo.json'} and {root / 'demo.png'}",
    ])
    (root / "demo.json").write_text(json.dumps({
        "kind": "demo",
        "settings": {**dataclasses.asdict(settings), "output_dir": str(settings.output_dir)},
        "rows": [dataclasses.asdict(row) for row in rows], "verdicts": judged, "seconds": seconds,
    }, indent=2) + "\n")
    _plot(rows, judged, root / "demo.png")
    return text


def _plot(rows: list[Row], judged: dict[str, dict[str, Any]], path: Path) -> None:
    """Left: accuracy per row (mean ± std), green where the verdict says it beat its scratch
    baseline, red where it did not, grey for teachers and baselines; each family's scratch accuracy
    as a dashed line; a bar below the axis is drawn to the axis with its value written. Right: the
    inherited-error rate of each judged row beside its scratch baseline's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row.name for row in rows]
    means = [100 * mean_std(row.accuracy)[0] for row in rows]
    spreads = [100 * mean_std(row.accuracy)[1] for row in rows]
    scratch = {row.family: m for row, m in zip(rows, means) if row.name.startswith("scratch")}
    low = max(0.0, min(scratch.values()) - 8)
    positions = list(range(len(rows)))[::-1]
    colors = ["tab:green" if judged.get(n, {}).get("beat_scratch") else "tab:red" if n in judged else "tab:gray"
              for n in names]
    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 0.42 * len(rows) + 1.6), dpi=120, sharey=True,
                                         gridspec_kw={"width_ratios": [3, 2]})
    shown = [max(m, low) for m in means]
    visible_spreads = [spread if mean >= low else 0.0 for mean, spread in zip(means, spreads)]
    left.barh(positions, [m - low for m in shown], left=low, xerr=visible_spreads, color=colors, capsize=3)
    for y, mean, spread in zip(positions, means, spreads):
        note = f"{mean:.1f}%" + ("  (below the axis)" if mean < low else "")
        left.text((mean + spread if mean >= low else low) + 0.3, y, note, va="center", fontsize=7)
    for family, value in scratch.items():
        left.axvline(value, color="black", linestyle="--", linewidth=0.8)
        left.text(value, len(rows) - 0.4, f"scratch ({family})", fontsize=7, ha="center")
    left.set_yticks(positions, names)
    left.set_xlim(low, 101)
    left.set_xlabel("held-out accuracy (%), mean ± std over seeds")
    left.set_title("green: beat its scratch baseline (paired seeds); red: did not", fontsize=9)
    rates = [pooled_rate(row, "inherited_error_rate") for row in rows]
    baselines = [pooled_rate(row, "baseline_inherited_error_rate") for row in rows]
    for y, rate, base, name in zip(positions, rates, baselines, names):
        if rate is None or (name not in judged and not name.startswith("scratch")):
            continue
        right.barh(y, 100 * rate, color=colors[names.index(name)], height=0.6)
        if base is not None and name in judged:
            right.plot(100 * base, y, marker="|", color="black", markersize=12)
    errors = sum(figures["teacher_errors"] for row in rows if row.name == "scratch" for figures in row.transfer)
    right.set_xlabel(f"inherited errors (%): the share of the teacher's held-out mistakes\ncopied (the MLP "
                     f"teacher's: {errors} over all seeds); tick: scratch's share")
    right.set_xlim(0, 100)
    figure.suptitle("UCI digits: students distilled vs. trained from scratch")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
