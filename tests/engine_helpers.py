"""Small run configs and test methods for the engine tests.

The methods are referenced from configs by import path (``engine_helpers:TwoStage``), the way a
user names a method that is not a registered plugin.
"""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch
import kdcore
from kdcore.engine.terms import cross_entropy

FEATURES, CLASSES = 16, 4
DATA = {"dataset": "synthetic_classification", "batch_size": 32,
        "options": {"features": FEATURES, "num_classes": CLASSES, "train_size": 256, "val_size": 96}}


def mlp(hidden: list[int], checkpoint: str | None = None) -> dict[str, Any]:
    spec = {"model": "mlp", "options": {"in_features": FEATURES, "num_classes": CLASSES, "hidden": hidden}}
    return {**spec, "checkpoint": checkpoint} if checkpoint else spec


def classification_config(output_dir: Path, *, method: dict[str, Any], teachers=(), student_hidden=(16,),
                          **sections: Any) -> dict[str, Any]:
    """A small CPU run: a 16-feature, 4-class synthetic task; ``sections`` replace or extend the
    config's sections (``training={"epochs": 2}``)."""
    config = {
        "method": method,
        "student": mlp(list(student_hidden)),
        "teachers": copy.deepcopy(list(teachers)),
        "data": copy.deepcopy(DATA),
        "optimizer": {"name": "sgd", "lr": 0.1},
        "training": {"epochs": 2, "log_every": 1},
        "output_dir": str(output_dir),
        "device": "cpu",
    }
    return merged(config, sections)


def lm_config(output_dir: Path, *, method: dict[str, Any], **sections: Any) -> dict[str, Any]:
    """A small language-modeling run: a 64-token Markov chain, sequences of 16 with padding."""
    config = {
        "method": method,
        "student": {"model": "tiny_lm", "options": {"vocab_size": 64, "dim": 16}},
        "data": {"dataset": "synthetic_tokens", "batch_size": 16,
                 "options": {"vocab_size": 64, "seq_len": 16, "train_size": 128, "val_size": 64}},
        "optimizer": {"name": "adamw", "lr": 0.02},
        "training": {"epochs": 2, "log_every": 1},
        "eval": {"task": "language_modeling"},
        "output_dir": str(output_dir),
        "device": "cpu",
    }
    return merged(config, sections)


def merged(config: dict[str, Any], sections: dict[str, Any]) -> dict[str, Any]:
    """``config`` with ``sections`` merged in (a mapping updates a section, anything else replaces it)."""
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


def train_teacher(directory: Path) -> dict[str, Any]:
    """Trains a wider MLP with labels only; returns its model spec with the checkpoint."""
    config = classification_config(directory, method={"name": "supervised"}, student_hidden=(64, 64),
                                   training={"epochs": 3})
    kdcore.Distiller(config).fit()
    return mlp([64, 64], str(directory / "student.pt"))


def ce(batch, outputs, ctx) -> torch.Tensor:
    return cross_entropy(outputs.student, batch.labels, ctx)


class TwoStage(kdcore.Method):
    """Stage ``first`` distills from the config's teacher; stage ``second`` is a fresh student taught
    by the first stage's student (born-again)."""

    name = "two_stage"

    def plan(self, config):
        return [kdcore.Stage("first"), kdcore.Stage("second", teachers=["previous"])]

    def losses(self, batch, outputs, ctx):
        return {"kd": kdcore.kd_loss(outputs.student, outputs.teachers[0], temperature=2.0, normalizer=ctx.normalizer),
                "ce": ce(batch, outputs, ctx)}


class Probe(kdcore.Method):
    """Checks what a method may rely on while training, and uses every StageContext facility: an
    extra trainable module, a frozen extra module, and a tapped feature."""

    name = "probe"

    def __init__(self, config):
        super().__init__(config)
        self.seen: list[dict[str, Any]] = []

    def setup(self, ctx):
        self.hidden_key = ctx.tap("student", "body.1")
        self.teacher_key = ctx.tap("teacher0", "body.1")
        ctx.add_module("regressor", torch.nn.Linear(16, 64))
        ctx.add_module("frozen", torch.nn.Linear(2, 2), trainable=False)

    def losses(self, batch, outputs, ctx):
        teacher = ctx.raw("teacher0")
        self.seen.append({
            "teacher_training": teacher.training,
            "teacher_grad": outputs.teachers[0].requires_grad,
            "student_training": ctx.raw("student").training,
            "features": sorted(outputs.features),
            "normalizer": ctx.normalizer,
        })
        hint = (ctx.modules["regressor"](outputs.features[self.hidden_key])
                - outputs.features[self.teacher_key]).square().sum()
        return {"hint": ctx.per_example(hint) * 0.01, "ce": ce(batch, outputs, ctx)}


class Mutual(kdcore.Method):
    """Deep mutual learning in miniature: student and teacher0 both train, each on the other."""

    name = "mutual"

    def plan(self, config):
        return [kdcore.Stage("mutual", trainable=("student", "teacher0"))]

    def losses(self, batch, outputs, ctx):
        student, peer = outputs.student, outputs.teachers[0]
        return {"student_kd": kdcore.kd_loss(student, peer.detach(), normalizer=ctx.normalizer),
                "peer_kd": kdcore.kd_loss(peer, student.detach(), normalizer=ctx.normalizer),
                "ce": ce(batch, outputs, ctx)}


def tiny_classifier() -> torch.nn.Module:
    """A model named by import path in a config (``engine_helpers:tiny_classifier``)."""
    return torch.nn.Linear(FEATURES, CLASSES)


def batchnorm_classifier(in_features: int = FEATURES, num_classes: int = CLASSES, hidden=(32,)) -> torch.nn.Module:
    """A classifier with buffers that training changes (BatchNorm running statistics); takes the
    options of ``mlp`` (one hidden layer)."""
    width = hidden[0]
    return torch.nn.Sequential(torch.nn.Linear(in_features, width), torch.nn.BatchNorm1d(width), torch.nn.ReLU(),
                               torch.nn.Linear(width, num_classes))


def gpt2_spec(layers: int = 1, width: int = 32, checkpoint: str | None = None) -> dict[str, Any]:
    """A byte-level GPT-2 (``hf_causal_lm``) without dropout."""
    spec = {"model": "hf_causal_lm", "options": {
        "model_type": "gpt2", "vocab_size": 256, "n_positions": 64, "n_embd": width, "n_layer": layers, "n_head": 2,
        "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0, "bos_token_id": None, "eos_token_id": None}}
    return {**spec, "checkpoint": checkpoint} if checkpoint else spec


def text_config(output_dir: Path, *, method: dict[str, Any], teachers=(), prompt_len: int = 6, max_bytes: int = 3000,
                **sections: Any) -> dict[str, Any]:
    """A small CPU language-modelling run on the shipped text (16-byte windows of its first
    ``max_bytes``, prompts of ``prompt_len`` bytes), GPT-2 student of one layer."""
    config = {
        "method": method,
        "student": gpt2_spec(),
        "teachers": copy.deepcopy(list(teachers)),
        "data": {"dataset": "text", "batch_size": 8, "eval_batch_size": 32,
                 "options": {"seq_len": 16, "prompt_len": prompt_len, "max_bytes": max_bytes}},
        "optimizer": {"name": "adamw", "lr": 0.003},
        "training": {"epochs": 1, "log_every": 1},
        "eval": {"task": "language_modeling"},
        "output_dir": str(output_dir),
        "device": "cpu",
    }
    config.update(sections)
    return config


#: the tokenizers that ship with kdcore, student's and teacher's
STUDENT_TOKENIZER, TEACHER_TOKENIZER = "shakespeare-unigram-512", "shakespeare-bpe-1024"


def tokenized_gpt2_spec(vocab: int, tokenizer: str, width: int = 32) -> dict[str, Any]:
    """A one-layer GPT-2 without dropout that names its tokenizer."""
    return {"model": "hf_causal_lm", "tokenizer": tokenizer,
            "options": {"model_type": "gpt2", "vocab_size": vocab, "n_positions": 48, "n_embd": width, "n_layer": 1,
                        "n_head": 2, "bos_token_id": 0, "eos_token_id": 0, "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                        "attn_pdrop": 0.0}}


def cross_tokenizer_config(output_dir: Path, *, method: dict[str, Any], teachers: bool = True, prompt_chars: int = 0,
                           epochs: int = 1, **data_options: Any) -> dict[str, Any]:
    """A small run on the shipped text (64-character windows of its first 4,000 characters) of a
    unigram-tokenizer student and a byte-level-BPE teacher (which still needs a checkpoint or
    ``pretrained``)."""
    return {
        "method": method,
        "student": tokenized_gpt2_spec(512, STUDENT_TOKENIZER),
        "teachers": [tokenized_gpt2_spec(1024, TEACHER_TOKENIZER, width=48)] if teachers else [],
        "data": {"dataset": "aligned_text", "batch_size": 8, "eval_batch_size": 16,
                 "options": {"window_chars": 64, "student_length": 47, "teacher_length": 47, "max_chars": 4000,
                             "prompt_chars": prompt_chars, **data_options}},
        "optimizer": {"name": "adamw", "lr": 0.003},
        "training": {"epochs": epochs, "log_every": 1},
        "eval": {"task": "language_modeling"},
        "output_dir": str(output_dir),
        "seed": 3,
    }


TESTS = Path(__file__).parent


def torchrun(config_path: Path, processes: int, *args: str) -> dict[str, float]:
    """``kdcore distill config_path *args`` under ``torchrun --nproc-per-node processes`` (gloo on
    CPU); returns the final metrics the first process prints."""
    done = launch(processes, "-m", "kdcore", "distill", str(config_path), *args)
    assert done.returncode == 0, done.stderr[-4000:]
    printed = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1, done.stdout  # only rank 0 prints
    return json.loads(printed[0])


def launch(processes: int, *argv: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc-per-node processes *argv``, with the tests' helpers importable."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}", *argv]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def kill_at(config_path: Path, processes: int, step: int, script: Path) -> None:
    """Runs ``config_path`` on ``processes`` processes until the first one is SIGKILLed after
    optimizer step ``step`` (``script`` is where the launched program is written)."""
    script.write_text("import kdcore\nfrom engine_helpers import KillAt\n"
                      f"kdcore.Distiller({str(config_path)!r}, callbacks=[KillAt({step})]).fit()\n")
    done = launch(processes, str(script))
    assert "Signal 9 (SIGKILL)" in done.stderr or "exitcode  : -9" in done.stderr, done.stderr[-4000:]


class KillAt:
    """A callback that SIGKILLs the first process after optimizer step ``step``, as a crash or a
    preempted machine would."""

    def __init__(self, step: int) -> None:
        self.step = step

    @kdcore.hookimpl
    def kdcore_step_end(self, step):
        if step == self.step and int(os.environ.get("RANK", "0")) == 0:
            os.kill(os.getpid(), signal.SIGKILL)


class Crash(Exception):
    """What :class:`CrashAfterStep` raises: a run dying mid-stage."""


class CrashAfterStep:
    """A callback that raises :class:`Crash` after optimizer step ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    @kdcore.hookimpl
    def kdcore_step_end(self, step):
        if step == self.step:
            raise Crash
