"""The configs in examples/configs run as their comments say (shortened here with overrides; the
slow test runs teacher.yaml, response_kd.yaml and scratch.yaml as shipped)."""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch
import yaml

import kdcore

CONFIGS = Path(__file__).resolve().parents[1] / "examples" / "configs"


def test_teacher_then_response_kd_and_scratch(tmp_path):
    short = ["training.epochs=1"]
    kdcore.Distiller(CONFIGS / "teacher.yaml", overrides=[*short, f"output_dir={tmp_path / 'teacher'}"]).fit()
    metrics = kdcore.Distiller(CONFIGS / "response_kd.yaml", overrides=[
        *short, f"output_dir={tmp_path / 'kd'}", f"teachers.0.checkpoint={tmp_path / 'teacher' / 'student.pt'}"]).fit()
    assert {"accuracy", "teacher_agreement", "kl_to_teacher", "teacher_accuracy"} <= set(metrics)
    metrics = kdcore.Distiller(CONFIGS / "scratch.yaml", overrides=[*short, f"output_dir={tmp_path / 'scratch'}"]).fit()
    assert "accuracy" in metrics and "teacher_agreement" not in metrics


def test_scratch_is_response_kd_without_its_teacher():
    """The baseline differs from the distilled student only in how it learns, so the README's
    comparison of the two measures distillation and nothing else."""
    kd, scratch = (yaml.safe_load((CONFIGS / name).read_text()) for name in ("response_kd.yaml", "scratch.yaml"))
    assert kd.pop("method")["name"] == "response_kd" and scratch.pop("method") == {"name": "supervised"}
    assert kd.pop("teachers") and "teachers" not in scratch
    assert kd.pop("output_dir") != scratch.pop("output_dir")
    assert kd == scratch


@pytest.mark.slow
def test_response_kd_beats_scratch_as_shipped(tmp_path):
    """The configs as shipped, the teacher once and the students on paired seeds: the distilled
    student is more accurate than the scratch one on average and on most seeds (the README has
    ten seeds)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models train fastest on one thread; more contend on busy machines
    try:
        teacher = tmp_path / "teacher"
        kdcore.Distiller(CONFIGS / "teacher.yaml", overrides=[f"output_dir={teacher}"], console=False).fit()
        accuracy = {"scratch": [], "kd": []}
        for seed in range(3):
            accuracy["scratch"].append(kdcore.Distiller(CONFIGS / "scratch.yaml", console=False, overrides=[
                f"seed={seed}", f"output_dir={tmp_path / f'seed{seed}' / 'scratch'}"]).fit()["accuracy"])
            accuracy["kd"].append(kdcore.Distiller(CONFIGS / "response_kd.yaml", console=False, overrides=[
                f"seed={seed}", f"output_dir={tmp_path / f'seed{seed}' / 'kd'}",
                f"teachers.0.checkpoint={teacher / 'student.pt'}"]).fit()["accuracy"])
    finally:
        torch.set_num_threads(threads)
    assert statistics.mean(accuracy["kd"]) > statistics.mean(accuracy["scratch"]), accuracy
    assert sum(kd > scratch for kd, scratch in zip(accuracy["kd"], accuracy["scratch"])) >= 2, accuracy


def test_language_model_teacher_then_student(tmp_path):
    small = ["training.epochs=1", "data.options.train_size=128", "data.options.val_size=64", "data.options.seq_len=16"]
    kdcore.Distiller(CONFIGS / "lm_response_kd.yaml", overrides=[
        *small, "method={name: supervised}", "student.options.dim=128", "teachers=[]",
        f"output_dir={tmp_path / 'teacher'}"]).fit()
    metrics = kdcore.Distiller(CONFIGS / "lm_response_kd.yaml", overrides=[
        *small, f"output_dir={tmp_path / 'kd'}", f"teachers.0.checkpoint={tmp_path / 'teacher' / 'student.pt'}"]).fit()
    assert {"token_accuracy", "perplexity", "teacher_agreement", "kl_to_teacher"} <= set(metrics)


def test_shakespeare_teacher_then_logit_distillation(tmp_path):
    pytest.importorskip("transformers")
    small = ["training.epochs=1", "data.options.max_bytes=4000", "data.options.seq_len=32",
             "scheduler.warmup_steps=0"]
    kdcore.Distiller(CONFIGS / "shakespeare_teacher.yaml", overrides=[*small, f"output_dir={tmp_path / 'teacher'}"]).fit()
    metrics = kdcore.Distiller(CONFIGS / "shakespeare_kd.yaml", overrides=[
        *small, f"output_dir={tmp_path / 'kd'}", f"teachers.0.checkpoint={tmp_path / 'teacher' / 'student.pt'}"]).fit()
    assert {"token_accuracy", "perplexity", "teacher_agreement", "kl_to_teacher", "teacher_perplexity"} <= set(metrics)


def readme_commands(config: str) -> list[list[str]]:
    """The ``kdcore`` commands of the README's shell blocks that name ``config``, as argument lists
    (comments dropped)."""
    import re
    import shlex

    blocks = re.findall(r"```bash\n(.*?)```", (CONFIGS.parents[1] / "README.md").read_text(), re.S)
    lines = [line.split("#")[0].strip() for block in blocks for line in block.splitlines()]
    return [shlex.split(line)[1:] for line in lines if line.startswith("kdcore ") and config in line]


def test_shakespeare_cached_distillation_runs_as_the_readme_says(tmp_path, monkeypatch, capsys):
    """After the teacher config has trained, the README's two commands (cache the teacher, distil
    from the cache) run from the repository root as written (here shortened by overrides), into
    directories of their own, and the student is scored against the cached teacher."""
    pytest.importorskip("transformers")
    import json

    import yaml

    from kdcore import cli

    commands = readme_commands("examples/configs/shakespeare_cached_kd.yaml")
    assert [command[0] for command in commands] == ["cache-teacher", "distill"]
    small = ["--set", "training.epochs=1", "--set", "data.options.max_bytes=4000", "--set", "data.options.seq_len=32",
             "--set", "scheduler.warmup_steps=0"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "examples").symlink_to(CONFIGS.parent)
    assert cli.main(["distill", "examples/configs/shakespeare_teacher.yaml", *small]) == 0
    for command in commands:
        assert cli.main([*command, *small]) == 0, command
    metrics = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert {"token_accuracy", "perplexity", "teacher_agreement", "kl_to_teacher"} <= set(metrics)
    assert metrics["kl_to_teacher"] > 0 and 0 <= metrics["teacher_agreement"] <= 1
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["shakespeare-cache", "shakespeare-cached-kd",
                                                                     "shakespeare-teacher"]
    assert (tmp_path / "runs" / "shakespeare-cache" / "val" / "manifest.json").exists()
    # the same student, data and budget as shakespeare_kd.yaml's, so that the two compare
    cached, live = (yaml.safe_load((CONFIGS / name).read_text()) for name in ("shakespeare_cached_kd.yaml",
                                                                               "shakespeare_kd.yaml"))
    assert cached["data"].pop("teacher_cache") == "runs/shakespeare-cache"
    for key in ("student", "teachers", "data", "optimizer", "scheduler", "training", "eval"):
        assert cached[key] == live[key], key


@pytest.mark.slow
def test_cross_tokenizer_teacher_then_student_and_its_experiment(tmp_path):
    """xtok_teacher.yaml, xtok_kd.yaml and examples/cross_tokenizer_experiment.py, on 20,000
    characters for one epoch: every variant runs and the summary has a verdict for each."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    import json
    import subprocess
    import sys

    small = ["training.epochs=1", "data.options.max_chars=20000", "scheduler.warmup_steps=0"]
    kdcore.Distiller(CONFIGS / "xtok_teacher.yaml", overrides=[*small, f"output_dir={tmp_path / 'teacher'}"]).fit()
    metrics = kdcore.Distiller(CONFIGS / "xtok_kd.yaml", overrides=[
        *small, f"output_dir={tmp_path / 'kd'}", f"teachers.0.checkpoint={tmp_path / 'teacher' / 'student.pt'}"]).fit()
    assert {"byte_perplexity", "teacher_byte_perplexity", "perplexity"} <= set(metrics)
    script = CONFIGS.parent / "cross_tokenizer_experiment.py"
    done = subprocess.run([sys.executable, str(script), "--output", str(tmp_path / "experiment"), "--teacher",
                           str(tmp_path / "teacher"), "--seeds", "1", "--epochs", "1", "--max-chars", "20000"],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((tmp_path / "experiment" / "summary.json").read_text())
    assert set(summary["variants"]) == {"scratch", "uld", "shared_vocab", "shared_vocab_exact", "hybrid"}
    assert all("beat_scratch" in entry for name, entry in summary["variants"].items() if name != "scratch")
    assert "per-byte ppl" in done.stdout
