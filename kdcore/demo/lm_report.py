"""The language-model suite's report: a console table per section, ``lm.json`` and ``lm.png``, and
a verdict per method against its scratch student from paired seeds, in the classification demo's
format (:func:`kdcore.demo.report.paired_verdict`) on token accuracy, with perplexity beside it."""

from __future__ import annotations

import dataclasses
import json
import statistics
from pathlib import Path
from typing import Any

from kdcore.demo.lm_scores import LMRow, Section
from kdcore.demo.report import mean_std, paired_verdict

MARKER = "lm.json"
PRIMARY_METRIC = "token_accuracy"  # what the verdicts compare, in points


def verdict(row: LMRow, baseline: LMRow) -> dict[str, Any]:
    """Whether ``row`` beat ``baseline`` in held-out token accuracy, seed by seed; the text adds the
    mean perplexities."""
    judged = paired_verdict(row.token_accuracy, baseline.token_accuracy, baseline.name, "points of token accuracy")
    ours, theirs = statistics.fmean(row.perplexity), statistics.fmean(baseline.perplexity)
    judged["text"] += f"; perplexity {ours:.2f} against {theirs:.2f} ({ours - theirs:+.2f})"
    return judged


def verdicts(sections: list[Section]) -> dict[str, dict[str, Any]]:
    """A verdict for every row with a baseline, against that row of its section."""
    out = {}
    for section in sections:
        by_name = {row.name: row for row in section.rows}
        out.update({row.name: verdict(row, by_name[row.baseline]) for row in section.rows if row.baseline})
    return out


def _spread(values: list[float], scale: float, digits: int) -> str:
    mean, spread = mean_std(values)
    return f"{scale * mean:.{digits}f}" + (f" ± {scale * spread:.{digits}f}" if len(values) > 1 else "")


def _percent_of_known(values: list[float | None]) -> str:
    known = [v for v in values if v is not None]
    return f"{100 * statistics.fmean(known):.1f}" if known else "—"


def table(rows: list[LMRow]) -> str:
    header = ("method", "perplexity", "token accuracy %", "agreement %", "KL to teacher", "ECE", "inherited errors %",
              "scratch's %", "params", "train s")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        student = row.name != "teacher"
        lines.append("| " + " | ".join([
            row.name, _spread(row.perplexity, 1, 2), _spread(row.token_accuracy, 100, 1),
            f"{100 * statistics.fmean(row.teacher_agreement):.1f}", f"{statistics.fmean(row.kl_to_teacher):.3f}",
            f"{statistics.fmean(row.ece):.3f}",
            _percent_of_known(row.inherited_error_rate) if student else "—",
            _percent_of_known(row.baseline_inherited_error_rate) if student else "—",
            f"{row.parameters:,}", f"{statistics.fmean(row.seconds):.0f}",
        ]) + " |")
    return "\n".join(lines)


def write(sections: list[Section], settings: Any, seconds: float, reasoning: dict[str, Any] | None = None) -> str:
    """Writes lm.json and lm.png into ``settings.output_dir``, with the rationale experiment's
    results (:func:`kdcore.demo.reasoning.run`) when given; returns the text to print."""
    root = Path(settings.output_dir)
    judged = verdicts(sections)
    parts = []
    for section in sections:
        parts += [section.text, "", table(section.rows), "",
                  *(f"{row.name}: {judged[row.name]['text']}" for row in section.rows if row.name in judged), ""]
    if reasoning is not None:
        parts += [reasoning["text"], ""]
    text = "\n".join([*parts, f"{seconds:.0f} s in all; results in {root / MARKER} and {root / 'lm.png'}"])
    (root / MARKER).write_text(json.dumps({
        "kind": "lm",
        "settings": {**dataclasses.asdict(settings), "output_dir": str(root)},
        "primary_metric": PRIMARY_METRIC,
        "sections": [{"name": section.name, "text": section.text,
                      "rows": [dataclasses.asdict(row) for row in section.rows]} for section in sections],
        "verdicts": judged, "reasoning": reasoning, "seconds": seconds,
    }, indent=2) + "\n")
    _plot(sections, judged, root / "lm.png")
    return text


def _plot(sections: list[Section], judged: dict[str, dict[str, Any]], path: Path) -> None:
    """One line of panels per section: token accuracy and perplexity per row (mean ± std over
    seeds), green where the verdict says it beat its scratch student, red where it did not, grey for
    the teacher and scratch, scratch's value dashed; and the inherited-error rate of each student
    beside its scratch student's (tick)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    height = sum(0.42 * len(section.rows) + 1.4 for section in sections)
    figure, grid = plt.subplots(len(sections), 3, figsize=(14, height), dpi=120, squeeze=False,
                                sharey="row", gridspec_kw={"width_ratios": [3, 3, 2]})
    for section, (accuracy, perplexity, inherited) in zip(sections, grid):
        names = [row.name for row in section.rows]
        positions = list(range(len(names)))[::-1]
        colors = ["tab:green" if judged.get(n, {}).get("beat_scratch") else "tab:red" if n in judged else "tab:gray"
                  for n in names]
        scratch = next((row for row in section.rows if row.name.startswith("scratch")), None)
        for axis, key, scale, label in ((accuracy, "token_accuracy", 100, "held-out token accuracy (%)"),
                                        (perplexity, "perplexity", 1, "held-out perplexity (lower is better)")):
            values = [mean_std(getattr(row, key)) for row in section.rows]
            means = [scale * mean for mean, _ in values]
            spreads = [scale * spread for _, spread in values]
            axis.barh(positions, means, xerr=spreads, color=colors, capsize=3)
            low = min(m - s for m, s in zip(means, spreads))
            high = max(m + s for m, s in zip(means, spreads))
            axis.set_xlim(max(0.0, low - 0.25 * (high - low) - 1), high + 0.15 * (high - low) + 1)
            for y, mean, spread in zip(positions, means, spreads):
                axis.text(mean + spread, y, f" {mean:.2f}" if scale == 1 else f" {mean:.1f}", va="center", fontsize=7)
            if scratch is not None:
                axis.axvline(scale * mean_std(getattr(scratch, key))[0], color="black", linestyle="--", linewidth=0.8)
            axis.set_xlabel(f"{label}, mean ± std over seeds")
        accuracy.set_yticks(positions, names)
        perplexity.tick_params(labelleft=False)
        accuracy.set_title(f"{section.name}: green beat scratch (paired seeds), red did not", fontsize=9)
        for y, row, color in zip(positions, section.rows, colors):
            known = [v for v in row.inherited_error_rate if v is not None]
            if row.name == "teacher" or not known:
                continue
            inherited.barh(y, 100 * statistics.fmean(known), color=color, height=0.6)
            base = [v for v in row.baseline_inherited_error_rate if v is not None]
            if base and row.name in judged:
                inherited.plot(100 * statistics.fmean(base), y, marker="|", color="black", markersize=12)
        inherited.tick_params(labelleft=False)
        inherited.set_xlim(0, 100)
        inherited.set_xlabel("inherited errors (%): the teacher's wrong\nbytes repeated; tick: scratch's share")
    figure.suptitle("Language models: students distilled vs. trained from scratch")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
