"""``kdcore demo --sweep capacity``: where does distillation's gain vanish as the student grows?

The demo's MLP family on the UCI digits (teacher MLP 64-256-256-10 on the whole training split;
students on ``train_fraction`` of it), with students MLP 64-H-10 from far smaller than the demo's
default up to the teacher's own parameter count, each trained three ways on the same seeds: from
scratch, by response KD from the teacher, and by teacher-assistant KD through an assistant whose
parameter count lies halfway (in log scale) between the student's and the teacher's. Mirzadeh et
al. (2020) report that a student far smaller than its teacher learns less from it (the capacity
gap), and that an assistant closes part of that gap; the sweep measures both claims here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from kdcore.demo.experiment import Settings, Trainer, mlp, with_checkpoint
from kdcore.engine.builders import build_model, build_splits
from kdcore.engine.config import DataSpec, ModelSpec

WIDTHS = (4, 8, 16, 32, 64, 256, 1024)  # hidden units; 1024 is about the teacher's parameter count
TEACHER_HIDDEN = [256, 256]
METHODS = ("scratch", "response_kd", "takd")
RESPONSE = {"temperature": 4.0, "kd_weight": 0.7, "ce_weight": 0.3}


def mlp_parameters(hidden: list[int]) -> int:
    widths = [64, *hidden, 10]
    return sum(a * b + b for a, b in zip(widths, widths[1:]))


def assistant_width(width: int) -> int:
    """The hidden width of a one-layer MLP whose parameter count is the geometric mean of the
    student's and the teacher's."""
    target = math.sqrt(mlp_parameters([width]) * mlp_parameters(TEACHER_HIDDEN))
    return max(width, round((target - 10) / (64 + 1 + 10)))


def run(settings: Settings, say: Callable[[str], None] = print, widths: tuple[int, ...] = WIDTHS) -> dict[str, Any]:
    """Trains every point of the sweep (students of each hidden width in ``widths``) and returns the
    results (also written to capacity.json and capacity.png under ``settings.output_dir``, which
    the caller has claimed: :func:`kdcore.demo.directory.claim`)."""
    started = time.perf_counter()
    root = settings.output_dir
    trainer = Trainer(root, settings.epochs, settings.train_fraction, say)
    teacher_spec = mlp(TEACHER_HIDDEN)
    teachers = {s: trainer.train("teacher", s, {"name": "supervised"}, teacher_spec, [], False, teacher=True)
                for s in settings.seeds}
    accuracy = Accuracy(trainer)
    results: dict[str, Any] = {"kind": "capacity", "teacher": {"parameters": mlp_parameters(TEACHER_HIDDEN),
                                           "accuracy": [accuracy(teacher_spec, teachers[s]) for s in settings.seeds]},
                               "points": []}
    for width in widths:
        student = mlp([width])
        assistant = assistant_width(width)
        configs = {"scratch": ({"name": "supervised"}, False),
                   "response_kd": ({"name": "response_kd", **RESPONSE}, True),
                   "takd": ({"name": "takd", "assistants": [mlp([assistant])], **RESPONSE}, True)}
        point = {"width": width, "parameters": mlp_parameters([width]), "assistant_width": assistant}
        for method, (config, taught) in configs.items():
            point[method] = [accuracy(student, trainer.train(
                f"w{width}/{method}", s, config, student, [with_checkpoint(teacher_spec, teachers[s])] if taught else [],
                False)) for s in settings.seeds]
        point["gains"] = {"response_kd": _paired(point["response_kd"], point["scratch"]),
                          "takd": _paired(point["takd"], point["scratch"]),
                          "takd_over_response_kd": _paired(point["takd"], point["response_kd"])}
        results["points"].append(point)
    results["seconds"] = time.perf_counter() - started
    results["settings"] = {**dataclasses.asdict(settings), "output_dir": str(root)}
    (root / "capacity.json").write_text(json.dumps(results, indent=2) + "\n")
    _plot(results, root / "capacity.png")
    return results


class Accuracy:
    """Held-out accuracy of a trained MLP on the students' held-out split."""

    def __init__(self, trainer: Trainer) -> None:
        _, val = build_splits(DataSpec(**trainer.data(False)))
        self.inputs = torch.stack([val[i][0] for i in range(len(val))])
        self.labels = torch.stack([val[i][1] for i in range(len(val))])

    def __call__(self, spec: dict[str, Any], checkpoint: Path) -> float:
        model = build_model(ModelSpec(**with_checkpoint(spec, checkpoint)), "demo").eval()
        with torch.no_grad():
            return float((model(self.inputs).argmax(-1) == self.labels).double().mean())


def _paired(values: list[float], baseline: list[float]) -> dict[str, Any]:
    gains = [a - b for a, b in zip(values, baseline)]
    return {"mean_gain_points": 100 * statistics.fmean(gains), "wins": sum(g > 0 for g in gains),
            "seeds": len(gains)}


def summary(results: dict[str, Any]) -> str:
    """The sweep as a table (mean accuracy, paired gains with wins) and where the gain vanishes."""
    teacher = 100 * statistics.fmean(results["teacher"]["accuracy"])
    lines = [f"Capacity sweep, UCI digits; teacher MLP 64-256-256-10 ({results['teacher']['parameters']:,} "
             f"parameters): {teacher:.1f}%; mean over seeds, gains paired by seed (wins/seeds).", "",
             "| student | params | scratch % | response_kd % (gain) | takd % (gain) | takd − response_kd |",
             "|---|---|---|---|---|---|"]
    for point in results["points"]:
        gains = point["gains"]
        lines.append(
            f"| 64-{point['width']}-10 | {point['parameters']:,} | {100 * statistics.fmean(point['scratch']):.1f} | "
            f"{100 * statistics.fmean(point['response_kd']):.1f} ({_gain(gains['response_kd'])}) | "
            f"{100 * statistics.fmean(point['takd']):.1f} ({_gain(gains['takd'])}) | "
            f"{_gain(gains['takd_over_response_kd'])} |")
    gains = [(point["width"], point["gains"]["response_kd"]) for point in results["points"]]
    best = max(gains, key=lambda item: item[1]["mean_gain_points"])
    lost = [width for width, gain in gains if not _beat(gain)]
    helped = [point["width"] for point in results["points"] if _beat(point["gains"]["takd_over_response_kd"])]
    lines += ["", f"response_kd's gain over scratch is largest at width {best[0]} ({_gain(best[1])}); "
                  + (f"it does not beat scratch at width {', '.join(map(str, lost))}."
                     if lost else "it beats scratch at every width."),
              "takd beats response_kd at width " + ", ".join(map(str, helped)) + "." if helped
              else "takd beats response_kd at no width.",
              "", f"{results['seconds']:.0f} s in all; results in capacity.json and capacity.png under "
                  f"{results['settings']['output_dir']}"]
    return "\n".join(lines)


def _beat(gain: dict[str, Any]) -> bool:
    return gain["mean_gain_points"] > 0 and 2 * gain["wins"] > gain["seeds"]


def _gain(gain: dict[str, Any]) -> str:
    return f"{gain['mean_gain_points']:+.1f}, {gain['wins']}/{gain['seeds']}"


def _plot(results: dict[str, Any], path: Path) -> None:
    """Left: accuracy against parameters (log axis), mean ± std over seeds, one line per method,
    the teacher's accuracy as a horizontal line. Right: each method's gain over scratch, paired by
    seed (mean ± std), against the same axis, with zero marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, (left, right) = plt.subplots(1, 2, figsize=(12, 4.8), dpi=120)
    parameters = [point["parameters"] for point in results["points"]]
    colors = dict(zip(METHODS, ("tab:gray", "tab:blue", "tab:orange")))
    for method in METHODS:
        values = [[100 * a for a in point[method]] for point in results["points"]]
        left.errorbar(parameters, [statistics.fmean(v) for v in values], yerr=[_spread(v) for v in values],
                      marker="o", capsize=3, label=method, color=colors[method])
        if method != "scratch":
            gains = [[100 * (a - b) for a, b in zip(point[method], point["scratch"])] for point in results["points"]]
            right.errorbar(parameters, [statistics.fmean(g) for g in gains], yerr=[_spread(g) for g in gains],
                           marker="o", capsize=3, label=method, color=colors[method])
    teacher = 100 * statistics.fmean(results["teacher"]["accuracy"])
    left.axhline(teacher, color="black", linestyle="--", linewidth=1,
                 label=f"teacher ({results['teacher']['parameters']:,} params)")
    right.axhline(0, color="tab:gray", linewidth=1)
    for axis, label in ((left, "held-out accuracy (%), mean ± std over seeds"),
                        (right, "gain over scratch (points), paired seeds, mean ± std")):
        axis.set_xscale("log")
        axis.set_xlabel("student parameters (log scale)")
        axis.set_ylabel(label)
        axis.legend(fontsize=8, loc="lower right")
    figure.suptitle("UCI digits: distillation's gain against the student's capacity")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0
