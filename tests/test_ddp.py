"""The same config under ``torchrun --nproc-per-node 2`` (DDP over gloo on CPU) trains the same
model as one process: each optimizer step sees the same global batch, the loss is normalized over
it, and the held-out metrics are summed over both shards. Only rank 0 logs and checkpoints."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import kdcore
from engine_helpers import classification_config, cross_tokenizer_config, gpt2_spec, launch, text_config, torchrun

TESTS = Path(__file__).parent


def hf_config(tmp_path):
    """Fused logit distillation between Hugging Face GPT-2s (the teacher freshly initialized from
    the run's seed) on the shipped text."""
    teacher = {**gpt2_spec(layers=2), "pretrained": True}
    method = {"name": "llm_kd", "fused": True, "divergence": "jsd", "ce_weight": 0.5}
    return text_config(tmp_path / "ddp", method=method, teachers=[teacher], max_bytes=1600, training={"epochs": 1, "grad_accum": 2, "log_every": 4})


@pytest.mark.parametrize("method", ["response_kd", "engine_helpers:Probe",
                                    pytest.param("llm_kd", marks=pytest.mark.slow)])
def test_two_processes_match_one(tmp_path, teacher, method):
    if method == "llm_kd":
        pytest.importorskip("transformers")
        config = hf_config(tmp_path)
    else:
        config = classification_config(tmp_path / "ddp", method={"name": method}, teachers=[teacher],
                                       training={"epochs": 2, "grad_accum": 2, "log_every": 4})
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    metrics = torchrun(path, 2)
    config["output_dir"] = str(tmp_path / "single")
    single = kdcore.Distiller(config).fit()

    assert metrics.keys() == single.keys()
    for key in metrics:
        tolerance = 1.5 / 96 if key in ("accuracy", "teacher_agreement", "ece") else 1e-3
        assert metrics[key] == pytest.approx(single[key], rel=1e-3, abs=tolerance), key
    ddp_weights = torch.load(tmp_path / "ddp" / "student.pt", weights_only=True)
    single_weights = torch.load(tmp_path / "single" / "student.pt", weights_only=True)
    for key in single_weights:
        torch.testing.assert_close(ddp_weights[key], single_weights[key], rtol=1e-4, atol=1e-5)
    ddp_log = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    single_log = [json.loads(line) for line in (tmp_path / "single" / "metrics.jsonl").read_text().splitlines()]
    assert [(e["event"], e.get("step")) for e in ddp_log] == [(e["event"], e.get("step")) for e in single_log]
    for ours, theirs in zip(ddp_log, single_log):
        if ours["event"] == "step":
            assert ours["total"] == pytest.approx(theirs["total"], rel=1e-4)


@pytest.mark.slow
def test_cross_tokenizer_distillation_under_two_processes_matches_one(tmp_path):
    """cross_tokenizer_kd (teacher and student with different tokenizers, aligned in the data
    pipeline, hybrid loss plus cross-entropy) under DDP with accumulation: the same weights, logged
    losses and held-out metrics as one process."""
    pytest.importorskip("transformers")
    pytest.importorskip("tokenizers")
    config = cross_tokenizer_config(tmp_path / "ddp", method={"name": "cross_tokenizer_kd", "loss": "hybrid", "ce_weight": 0.5})
    config["teachers"][0]["pretrained"] = True  # a fresh teacher from the run's seed, the same in both runs
    config["training"] = {"epochs": 1, "grad_accum": 2, "log_every": 2}
    path = tmp_path / "ddp.yaml"
    path.write_text(yaml.safe_dump(config))
    metrics = torchrun(path, 2)
    config["output_dir"] = str(tmp_path / "single")
    single = kdcore.Distiller(config).fit()
    assert metrics.keys() == single.keys() and "byte_perplexity" in metrics
    for key in metrics:
        assert metrics[key] == pytest.approx(single[key], rel=1e-3, abs=1.5 / 300 if key == "ece" else 1e-6), key
    ddp_weights = torch.load(tmp_path / "ddp" / "student.pt", weights_only=True)
    single_weights = torch.load(tmp_path / "single" / "student.pt", weights_only=True)
    for key in single_weights:
        torch.testing.assert_close(ddp_weights[key], single_weights[key], rtol=1e-4, atol=1e-5)
    logs = [[json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("ddp", "single")]
    steps = [[e for e in log if e["event"] == "step"] for log in logs]
    assert len(steps[0]) == len(steps[1]) > 1
    for ours, theirs in zip(*steps):
        assert ours["kd"] == pytest.approx(theirs["kd"], rel=1e-4) and ours["ce"] == pytest.approx(theirs["ce"], rel=1e-4)


def test_on_policy_distillation_under_two_processes(tmp_path):
    """gkd samples on each process (its own half of every batch) and trains through DDP."""
    pytest.importorskip("transformers")
    config = hf_config(tmp_path)
    config["method"] = {"name": "gkd", "lmbda": 0.5, "max_new_tokens": 6}
    path = tmp_path / "gkd.yaml"
    path.write_text(yaml.safe_dump(config))
    metrics = torchrun(path, 2)
    assert metrics["perplexity"] == metrics["perplexity"] and metrics["perplexity"] < 1e4
    steps = [json.loads(line) for line in (tmp_path / "ddp" / "metrics.jsonl").read_text().splitlines()]
    assert [e["step"] for e in steps if e["event"] == "step"] == [3, 7, 10]  # log_every 4, then the last


@pytest.mark.slow
@pytest.mark.parametrize("parallel, launches", [("ddp", 30), ("fsdp", 12)])
def test_two_process_launches_exit_cleanly(tmp_path, parallel, launches):
    """Every rank leaves with status 0 after a successful run: the DDP wrappers are released before
    the process group is destroyed (a wrapper torn down after its group aborts its process with
    'terminate called without an active exception', a few launches in fifty); sharded models too."""
    failures = []
    for attempt in range(launches):
        config = classification_config(tmp_path / f"run{attempt}", method={"name": "supervised"},
                                       training={"epochs": 1, "log_every": 4, "parallel": parallel})
        path = tmp_path / f"run{attempt}.yaml"
        path.write_text(yaml.safe_dump(config))
        done = launch(2, "-m", "kdcore", "distill", str(path), timeout=300)
        if done.returncode != 0:
            failures.append((attempt, done.stderr[-1500:]))
    assert not failures, f"{len(failures)} of {launches} launches failed; the first: {failures[0]}"


def test_every_rank_stops_on_a_busy_directory(tmp_path):
    """Rank 0 holds the directory's lock for the run; when it cannot take it, every rank stops
    with the message (none waits in a collective for a rank that left)."""
    from kdcore.engine.rundir import RunDirectory

    config = classification_config(tmp_path / "run", method={"name": "supervised"}, training={"epochs": 1})
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    with RunDirectory(tmp_path / "run") as held:
        held.acquire()
        done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                               "-m", "kdcore", "distill", str(path)], env=env, capture_output=True, text=True,
                              timeout=300)
    assert done.returncode != 0
    assert done.stderr.count(f"is in use by another run (pid {os.getpid()} on host") == 2  # both ranks say it
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [".lock"]
