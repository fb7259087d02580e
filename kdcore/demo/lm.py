"""``kdcore demo --suite lm``: the language-model methods against a scratch student of the same
size, on the Shakespeare that ships with kdcore (byte level, no download), over paired seeds.

The suite is a list of sections (:data:`SECTIONS`), each training its own models and returning
scored rows (:class:`Section`); :func:`run` runs them in order and writes one report
(:mod:`kdcore.demo.lm_report`). The section here, :func:`text_section`:

* a byte-level GPT-2 teacher, trained once (on seed 0, whatever the students' seeds: the
  comparison is between students of one given teacher, and a teacher per seed would double the
  suite's costliest run);
* the teacher's top-k next-byte log-probabilities over the training windows, written to a
  teacher-logit cache with :func:`kdcore.cache.write_teacher_cache`;
* per seed, students of one smaller size: scratch (``supervised``, labels only), ``llm_kd``
  (the live teacher's next-byte distributions), ``seq_kd`` (the teacher's distributions on its
  own sampled continuations of prompts), ``gkd`` (on-policy: the teacher's distributions on the
  student's own continuations) and ``cached_kd`` (the cache, no teacher model);
* every model scored on the held-out windows' labelled positions (:mod:`kdcore.demo.lm_scores`).

Every student sees the same training windows. The token-level methods learn at every position;
``seq_kd`` and ``gkd`` continue each window's first ``prompt_len`` bytes by generation and learn
on the continuation only. The held-out windows are scored after their first ``prompt_len`` bytes,
where every method was trained.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from kdcore import cache
from kdcore.demo import reasoning
from kdcore.demo.directory import claim
from kdcore.demo.experiment import fit, one_thread, with_checkpoint
from kdcore.demo.lm_report import write
from kdcore.demo.lm_scores import LMRow, Section, score
from kdcore.engine.builders import build_model, build_splits
from kdcore.engine.config import DataSpec, ModelSpec
from kdcore.engine.data import call_model


CACHE_DIRECTORY = "teacher-cache"  # under the output directory: the cache cached_kd trains from


@dataclass(frozen=True)
class Settings:
    """The suite's data, models and budget. The defaults keep the whole suite within 20 minutes on
    2 CPU cores (the README has the measured time and what was tried)."""

    seeds: tuple[int, ...] = (0, 1)
    epochs: int = 4  # per student run
    teacher_epochs: int = 4
    seq_len: int = 128  # bytes per training and held-out window
    prompt_len: int = 64  # the prompt that seq_kd and gkd continue; held-out windows are scored after it
    max_bytes: int | None = None  # of the shipped text (None: all of it); the last 10% is held out
    train_fraction: float = 0.5  # of the training windows that students see; the teacher sees them all
    teacher_layers: int = 4
    teacher_width: int = 128
    student_layers: int = 1
    student_width: int = 64
    cache_k: int = 32  # teacher log-probabilities kept per position for cached_kd
    output_dir: Path = Path("runs/demo-lm")


@dataclass(frozen=True)
class Contender:
    """A student's row: its method, which teacher it gets (``"live"``: the teacher model;
    ``"cache"``: the teacher-logit cache; ``"none"``) and whether it trains on prompted windows."""

    name: str
    method: dict[str, Any]
    teacher: str
    prompted: bool
    description: str


def gpt2(layers: int, width: int, positions: int) -> dict[str, Any]:
    """A byte-level GPT-2 (256 tokens, no special tokens) with ``layers`` blocks of ``width``, one
    attention head per 32 dimensions."""
    return {"model": "hf_causal_lm", "options": {
        "model_type": "gpt2", "vocab_size": 256, "n_positions": positions, "n_embd": width, "n_layer": layers,
        "n_head": max(1, width // 32), "bos_token_id": None, "eos_token_id": None}}


def contenders(settings: Settings) -> list[Contender]:
    """The scratch student and the language-model methods, each with the settings that did best
    in runs on seed 0 (the README lists what else was tried)."""
    new_tokens = settings.seq_len - settings.prompt_len
    generation = f"{settings.prompt_len}-byte prompts continued by {new_tokens} bytes"
    return [
        Contender("scratch", {"name": "supervised"}, "none", False, "labels only, every position"),
        Contender("llm_kd", {"name": "llm_kd", "divergence": "forward_kl", "temperature": 1.0, "kd_weight": 1.0,
                             "ce_weight": 0.0}, "live", False, "forward KL to the teacher at every position, T = 1"),
        Contender("seq_kd", {"name": "seq_kd", "max_new_tokens": new_tokens, "do_sample": True, "kd_weight": 1.0,
                             "ce_weight": 0.0}, "live", True,
                  f"forward KL to the teacher on its own sampled continuations, {generation}"),
        Contender("gkd", {"name": "gkd", "max_new_tokens": new_tokens, "lmbda": 1.0, "divergence": "forward_kl"},
                  "live", True, f"forward KL to the teacher on the student's own samples at every step, {generation}"),
        Contender("cached_kd", {"name": "cached_kd", "divergence": "forward_kl", "sparse_mode": "tail"}, "cache",
                  False, f"forward KL to the teacher's top-{settings.cache_k} cache at every position"),
    ]


class TextRuns:
    """Trains the section's runs, each in ``seed<N>/<directory>`` of the output directory: one
    config shape, the text windows of the settings."""

    def __init__(self, settings: Settings, say: Callable[[str], None]) -> None:
        self.settings, self.say = settings, say

    def data(self, *, prompted: bool = False, teacher: bool = False,
             teacher_cache: Path | None = None) -> dict[str, Any]:
        options = {"seq_len": self.settings.seq_len, "max_bytes": self.settings.max_bytes,
                   "prompt_len": self.settings.prompt_len if prompted else 0,
                   "train_fraction": 1.0 if teacher else self.settings.train_fraction}
        return {"dataset": "text", "options": options, "batch_size": 32, "eval_batch_size": 64,
                "teacher_cache": None if teacher_cache is None else str(teacher_cache)}

    def train(self, directory: str, seed: int, method: dict[str, Any], student: dict[str, Any],
              teachers: list[dict[str, Any]], epochs: int, *, prompted: bool = False, teacher: bool = False,
              teacher_cache: Path | None = None) -> tuple[Path, float]:
        """Trains one run; returns its student's state-dict file and the seconds it took."""
        started = time.perf_counter()
        path = fit({
            "method": method, "student": student, "teachers": teachers,
            "data": self.data(prompted=prompted, teacher=teacher, teacher_cache=teacher_cache),
            "optimizer": {"name": "adamw", "lr": 0.003, "weight_decay": 0.01},
            "scheduler": {"name": "cosine", "warmup_steps": 50, "min_lr_ratio": 0.1},
            "training": {"epochs": epochs, "max_grad_norm": 1.0, "log_every": 1000},
            "eval": {"task": "language_modeling"},
            "seed": seed, "output_dir": str(Path(self.settings.output_dir) / f"seed{seed}" / directory),
            "device": "cpu",
        }, self.say)
        return path, time.perf_counter() - started


def text_section(settings: Settings, say: Callable[[str], None]) -> Section:
    """Trains the teacher, writes its cache, trains every student on every seed and scores them."""
    s = settings
    runs = TextRuns(s, say)
    teacher_spec = gpt2(s.teacher_layers, s.teacher_width, s.seq_len)
    student_spec = gpt2(s.student_layers, s.student_width, s.seq_len)
    teacher_path, teacher_seconds = runs.train("teacher", 0, {"name": "supervised"}, teacher_spec, [],
                                               s.teacher_epochs, teacher=True)
    teacher_spec = with_checkpoint(teacher_spec, teacher_path)
    cache_path = write_cache(runs, teacher_spec, s.cache_k)
    trained: dict[tuple[str, int], tuple[Path, float]] = {}
    for seed in s.seeds:
        for contender in contenders(s):
            teachers = [teacher_spec] if contender.teacher == "live" else []
            trained[contender.name, seed] = runs.train(
                contender.name, seed, contender.method, student_spec, teachers, s.epochs, prompted=contender.prompted,
                teacher_cache=cache_path if contender.teacher == "cache" else None)

    started = time.perf_counter()
    _, held_out = build_splits(DataSpec(**runs.data(prompted=True)))
    students = {key: _load(with_checkpoint(student_spec, path)) for key, (path, _) in trained.items()}
    teacher_score, scores = score(held_out, _load(teacher_spec), students, "scratch")
    say(f"  held-out scores in {time.perf_counter() - started:.1f} s")
    teacher_row = LMRow("teacher", f"GPT-2 {s.teacher_layers}x{s.teacher_width}, labels only, seed 0 "
                                   f"({s.teacher_epochs} epochs)", parameters=_parameters(teacher_spec))
    teacher_row.add(teacher_score.perplexity, teacher_score.figures, teacher_seconds)
    rows = [teacher_row]
    for contender in contenders(s):
        row = LMRow(contender.name, contender.description, None if contender.name == "scratch" else "scratch",
                    parameters=_parameters(student_spec))
        for seed in s.seeds:
            result = scores[contender.name, seed]
            row.add(result.perplexity, result.figures, trained[contender.name, seed][1])
        rows.append(row)
    return Section("text", describe(s, teacher_row.parameters, rows[-1].parameters, len(held_out)), rows)


def write_cache(runs: TextRuns, teacher_spec: dict[str, Any], k: int) -> Path:
    """The teacher's top-``k`` log-probabilities at every position of the training windows (those
    cached_kd trains on), in ``teacher-cache`` under the output directory."""
    started = time.perf_counter()
    teacher = _load(teacher_spec)
    train, _ = build_splits(DataSpec(**runs.data()))
    path = cache.write_teacher_cache(lambda inputs: call_model(teacher, inputs), train, Path(runs.settings.output_dir) / CACHE_DIRECTORY,
                                     k=k, model_id=cache.model_id(teacher_spec["model"], teacher_spec["options"],
                                                                  teacher_spec["checkpoint"]), batch_size=64)
    runs.say(f"  teacher cache (top-{k}, {len(train)} windows) written in {time.perf_counter() - started:5.1f} s")
    return path


def describe(s: Settings, teacher_parameters: int, student_parameters: int, held_out_windows: int) -> str:
    """What the section measured, printed above its table."""
    text = "the shipped Shakespeare" if s.max_bytes is None else f"the first {s.max_bytes:,} bytes of the Shakespeare"
    share = "all" if s.train_fraction == 1 else f"{s.train_fraction:.0%}"
    return (f"Byte-level language modelling on {text} ({s.seq_len}-byte windows, the last 10% held out). Teacher: "
            f"GPT-2 {s.teacher_layers}x{s.teacher_width} ({teacher_parameters:,} parameters), trained once (seed 0) "
            f"for {_epochs(s.teacher_epochs)} on every training window; students: GPT-2 {s.student_layers}x"
            f"{s.student_width} ({student_parameters:,} parameters), {_epochs(s.epochs)} on {share} of them (the "
            f"same windows for each), on seeds {', '.join(map(str, s.seeds))}, every method's seed-i student against "
            f"scratch's. seq_kd and gkd continue each window's first {s.prompt_len} bytes with "
            f"{s.seq_len - s.prompt_len} generated ones and learn on those; the others learn at every byte. Scored "
            f"on the last {s.seq_len - s.prompt_len + 1} next-byte predictions of each of the {held_out_windows} "
            f"held-out windows (each after at least {s.prompt_len} bytes of context); mean ± std over seeds; "
            "agreement, KL and inherited errors against the teacher (inherited errors: of the positions the teacher "
            "gets wrong, the share where the model predicts the teacher's wrong byte; scratch's: the same for the "
            "scratch student of that seed); train s: each run's wall-clock seconds.")


def _epochs(count: int) -> str:
    return f"{count} epoch{'' if count == 1 else 's'}"


def _load(spec: dict[str, Any]) -> nn.Module:
    return build_model(ModelSpec(**spec), "demo").eval()


def _parameters(spec: dict[str, Any]) -> int:
    return sum(p.numel() for p in _load(spec).parameters())


#: the suite's sections, run in order
SECTIONS: tuple[Callable[[Settings, Callable[[str], None]], Section], ...] = (text_section,)


def run(settings: Settings, say: Callable[[str], None] = print,
        reasoning_plan: reasoning.Plan | None = reasoning.Plan()) -> str:
    """Runs every section, then the rationale experiment on generated addition
    (:mod:`kdcore.demo.reasoning`, in ``reasoning/``, with ``reasoning_plan``; None skips it), and
    returns the report (also written to lm.json and lm.png under ``settings.output_dir``)."""
    started = time.perf_counter()
    with claim(Path(settings.output_dir), "lm", sections=(reasoning.DIRECTORY, CACHE_DIRECTORY)), one_thread():
        sections = [section(settings, say) for section in SECTIONS]
        rationales = None if reasoning_plan is None else reasoning.run(settings, say, reasoning_plan)
        return write(sections, settings, time.perf_counter() - started, rationales)
