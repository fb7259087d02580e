"""The reasoning experiment: do rationales make a small student better than answers alone?

Hsieh et al. (2023, "Distilling Step-by-Step") train small students on a larger model's
rationales as well as its answers and report that they beat students trained on the answers
alone, with less data and fewer parameters. This tests the claim on the ``addition`` task
(:mod:`kdcore_plugins.addition`: multi-digit sums with written carry steps as rationales), where a
rationale is checkably right and a problem can be made wider than any trained on. For each seed,
on the same training problems (the same for every seed):

* ``teacher``: a byte-level GPT-2 (``hf_causal_lm``, ``Plan.teacher_width`` wide) trained on
  rationale + answer (``supervised``);
* ``answer_only``: the student (a GPT-2 ``Plan.student_width`` wide, as deep) trained on the
  answers alone: the scratch baseline;
* ``rationale_data``: the student by ``reasoning_kd`` with ``source: data``: the dataset's
  rationales (written by code, always right);
* ``rationale_teacher``: the student by ``reasoning_kd`` with ``source: teacher``: the seed's
  teacher writes rationale and answer for every training prompt (greedy decoding, at every step),
  as the larger model does in the paper.

Every model is scored by exact match of its answer: it continues each held-out prompt greedily
(the rationale students write their own rationale first, as ``reasoning_kd`` trains them to; the
paper's students instead answer directly and learn rationales as a second task) and the number
after the answer marker is compared with the sum, on held-out problems of the trained widths
(``in_distribution``) and on wider ones (``longer``). Each rationale student gets a verdict
against ``answer_only`` on each, seed by seed (:func:`kdcore.demo.report.verdict`).
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from kdcore.demo.experiment import Row, fit, with_checkpoint
from kdcore.demo.report import mean_std, verdict
from kdcore.engine.builders import build_model
from kdcore.engine.config import ModelSpec
from kdcore.engine.data import Batch
from kdcore.integrations.generation import GenerationOptions, continue_prompts
from kdcore_plugins.addition import ANSWER_MARKER, END, Problems, addition, parse_answer, prompt, target

MARKER = "reasoning.json"
DIRECTORY = "reasoning"  # under the caller's output directory
SPLITS = {"in_distribution": "val", "longer": "long"}  # held-out sets and the dataset splits they are
BASELINE = "answer_only"
VARIANTS = ("rationale_data", "rationale_teacher")
VOCAB = 128  # the task's bytes are ASCII
SLACK = 8  # positions past the longest right line that a wrong continuation may still run


class RunSettings(Protocol):
    """What the experiment reads from the settings it is given."""

    seeds: tuple[int, ...]
    output_dir: Path


@dataclass(frozen=True)
class Plan:
    """The task, the models and their training (the defaults are the README's numbers)."""

    train_size: int = 4096
    held_out_size: int = 512  # problems in each held-out set
    columns: tuple[int, int] = (2, 3)  # digits of the longer operand, trained and in_distribution
    long_columns: tuple[int, int] = (4, 4)  # of the longer problems
    epochs: int = 12  # every model, over the same training problems
    batch_size: int = 64
    layers: int = 2
    teacher_width: int = 64
    student_width: int = 48
    teacher_lr: float = 5e-3
    student_lr: float = 1e-2
    warmup_steps: int = 20  # then cosine decay

    def data_options(self) -> dict[str, Any]:
        return {"train_size": self.train_size, "val_size": self.held_out_size, "long_size": self.held_out_size,
                "columns": list(self.columns), "long_columns": list(self.long_columns), "seed": 0}


def gpt2(width: int, layers: int, positions: int) -> dict[str, Any]:
    """A byte-level GPT-2 without dropout that ends a line at :data:`END` (one head per 16 units)."""
    return {"model": "hf_causal_lm", "options": {
        "model_type": "gpt2", "vocab_size": VOCAB, "n_positions": positions, "n_embd": width, "n_layer": layers,
        "n_head": max(1, width // 16), "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        "bos_token_id": None, "eos_token_id": ord(END)}}


def accuracy(model: torch.nn.Module, problems: Problems, max_new_tokens: int) -> float:
    """The share of ``problems`` (an answer-only view: its labels mark the prompts) whose sum
    ``model`` gives after the answer marker, continuing each prompt greedily."""
    batch = Batch({"input_ids": problems.input_ids}, problems.labels)
    options = GenerationOptions(max_new_tokens=max_new_tokens, eos_token_id=ord(END))
    continued = continue_prompts(model, batch, -100, options, method="reasoning experiment")
    right = 0
    for labels, (a, b) in zip(continued.labels.tolist(), problems.problems):
        text = bytes(token for token in labels if token >= 0).decode("ascii", errors="replace")
        right += parse_answer(text) == a + b
    return right / len(problems)


def run(settings: RunSettings, say: Callable[[str], None] = print, plan: Plan = Plan()) -> dict[str, Any]:
    """Trains and scores every row over ``settings.seeds`` (see the module docstring) and returns
    the results; they are also written to ``reasoning.json`` in ``settings.output_dir / "reasoning"``
    (a new directory: the caller has claimed ``settings.output_dir``, see
    :func:`kdcore.demo.directory.claim`), beside each run's directory."""
    started = time.perf_counter()
    root = Path(settings.output_dir) / DIRECTORY
    root.mkdir(parents=True)
    held_out = addition(**plan.data_options(), rationale=False)
    problems = [problem for split in held_out.values() for problem in split.problems]
    positions = max(len(prompt(a, b) + target(a, b, True)) for a, b in problems) + SLACK
    new_tokens = positions - max(len(prompt(a, b)) for a, b in problems)  # the most a continuation can take
    teacher = gpt2(plan.teacher_width, plan.layers, positions)
    student = gpt2(plan.student_width, plan.layers, positions)
    reasoning = {"name": "reasoning_kd", "answer_marker": ANSWER_MARKER}
    rows = {
        "teacher": Row("teacher", f"GPT-2 {plan.layers}x{plan.teacher_width}, rationale + answer", "lm"),
        BASELINE: Row(BASELINE, f"GPT-2 {plan.layers}x{plan.student_width}, answers only (scratch)", "lm"),
        "rationale_data": Row("rationale_data", "the student, reasoning_kd on the dataset's rationales", "lm",
                              BASELINE),
        "rationale_teacher": Row("rationale_teacher", "the student, reasoning_kd on the teacher's rationales "
                                                      "(source: teacher)", "lm", BASELINE),
    }
    scores: dict[str, dict[str, list[float]]] = {name: {split: [] for split in SPLITS} for name in rows}
    for seed in settings.seeds:
        train = functools.partial(_train, root, plan, seed, say)
        trained = {"teacher": train("teacher", {"name": "supervised"}, teacher, plan.teacher_lr, rationale=True)}
        trained[BASELINE] = train(BASELINE, {"name": "supervised"}, student, plan.student_lr, rationale=False)
        trained["rationale_data"] = train("rationale_data", {**reasoning, "source": "data"}, student,
                                          plan.student_lr, rationale=True)
        trained["rationale_teacher"] = train(
            "rationale_teacher", {**reasoning, "source": "teacher", "max_new_tokens": new_tokens,
                                  "eos_token_id": ord(END)},
            student, plan.student_lr, rationale=True, teachers=[with_checkpoint(teacher, trained["teacher"])])
        for name, path in trained.items():
            spec = with_checkpoint(teacher if name == "teacher" else student, path)
            model = build_model(ModelSpec(**spec), "reasoning").eval()
            for split, key in SPLITS.items():
                scores[name][split].append(accuracy(model, held_out[key], new_tokens))
            rows[name].parameters = sum(p.numel() for p in model.parameters())
        say(f"  seed {seed}  " + "  ".join(f"{name} {100 * scores[name]['in_distribution'][-1]:.1f}/"
                                          f"{100 * scores[name]['longer'][-1]:.1f}" for name in rows)
            + "  (% right: in-distribution/longer)")

    verdicts = {}
    for split in SPLITS:
        judged = {name: dataclasses.replace(row, accuracy=scores[name][split]) for name, row in rows.items()}
        verdicts[split] = {name: verdict(judged[name], judged[BASELINE]) for name in VARIANTS}
    results = {
        "task": {"example": prompt(47, 85) + target(47, 85, True).rstrip(END), "answer_marker": ANSWER_MARKER,
                 **plan.data_options()},
        "plan": {key: list(value) if isinstance(value, tuple) else value
                 for key, value in dataclasses.asdict(plan).items()},
        "seeds": list(settings.seeds),
        "rows": {name: {"description": row.description, "parameters": row.parameters, "accuracy": scores[name]}
                 for name, row in rows.items()},
        "verdicts": verdicts,
        "seconds": time.perf_counter() - started,
    }
    results["text"] = summary(results)
    (root / MARKER).write_text(json.dumps(results, indent=2) + "\n")
    return results


def _train(root: Path, plan: Plan, seed: int, say: Callable[[str], None], name: str, method: dict[str, Any],
           model: dict[str, Any], lr: float, *, rationale: bool, teachers: Sequence[dict[str, Any]] = ()) -> Path:
    """Trains row ``name`` of seed ``seed`` on the training problems, with (``rationale``) or without
    their rationales, in ``root/seed<seed>/<name>``; returns the student's state-dict file."""
    return fit({
        "method": method, "student": model, "teachers": list(teachers),
        "data": {"dataset": "addition", "batch_size": plan.batch_size, "eval_batch_size": 512,
                 "options": {**plan.data_options(), "rationale": rationale}},
        "optimizer": {"name": "adamw", "lr": lr},
        "scheduler": {"name": "cosine", "warmup_steps": plan.warmup_steps},
        "training": {"epochs": plan.epochs, "log_every": 1000}, "eval": {"task": "language_modeling"},
        "seed": seed, "output_dir": str(root / f"seed{seed}" / name), "device": "cpu",
    }, say)


def summary(results: dict[str, Any]) -> str:
    """The results as a table (mean ± std over seeds, then each seed) and the verdicts."""
    task = results["task"]
    lines = [f"addition, {task['train_size']} training problems of {_range(task['columns'])} columns; exact-match "
             f"answers, greedy, on {task['val_size']} held-out problems of those widths (in-distribution) and "
             f"{task['long_size']} of {_range(task['long_columns'])} columns (longer); seeds "
             f"{', '.join(map(str, results['seeds']))}.", "",
             "| model | params | in-distribution % | longer % |", "|---|---|---|---|"]
    for name, row in results["rows"].items():
        cells = []
        for split in SPLITS:
            values = [100 * v for v in row["accuracy"][split]]
            mean, spread = mean_std(values)
            cells.append(f"{mean:.1f} ± {spread:.1f} ({', '.join(f'{v:.1f}' for v in values)})")
        lines.append(f"| {name} | {row['parameters']:,} | {cells[0]} | {cells[1]} |")
    lines.append("")
    for split, judged in results["verdicts"].items():
        lines += [f"{name}, {split.replace('_', '-')}: {v['text']}" for name, v in judged.items()]
    lines.append(f"{results['seconds']:.0f} s in all")
    return "\n".join(lines)


def _range(bounds: list[int]) -> str:
    return str(bounds[0]) if bounds[0] == bounds[1] else f"{bounds[0]}-{bounds[1]}"
