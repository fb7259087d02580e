"""Checkpoints and resume: a run interrupted anywhere (an exception, SIGKILL, between stages) and
resumed ends exactly as the uninterrupted run with the same seed: the same weights, metrics and
log. The student uses dropout, so the RNG states must be restored too."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import kdcore
from engine_helpers import FEATURES, CLASSES, classification_config
from kdcore.engine import checkpoint
from kdcore.engine.config import ConfigError
from kdcore.engine.rundir import RunDirectoryError

TESTS = Path(__file__).parent


def resumable_config(directory, teacher):
    return classification_config(
        directory, method={"name": "engine_helpers:TwoStage"}, teachers=[teacher],
        student={"model": "mlp", "options": {"in_features": FEATURES, "num_classes": CLASSES, "hidden": [16],
                                             "dropout": 0.2}},
        optimizer={"name": "adamw", "lr": 0.01}, scheduler={"name": "cosine"},
        checkpoint={"every_steps": 3}, seed=7)


@pytest.fixture(scope="module")
def reference(tmp_path_factory, teacher):
    directory = tmp_path_factory.mktemp("reference")
    metrics = kdcore.Distiller(resumable_config(directory, teacher)).fit()
    return directory, metrics


def log(directory):
    records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    for record in records:  # what measures time differs from run to run
        record.pop("examples_per_s", None)
        record.pop("seconds", None)
    return records


def assert_same_run(directory, metrics, reference):
    ref_dir, ref_metrics = reference
    assert metrics == ref_metrics
    assert log(directory) == log(ref_dir)
    for name in ("student.pt", "stages/0-first/student.pt", "stages/1-second/student.pt"):
        a, b = torch.load(directory / name, weights_only=True), torch.load(ref_dir / name, weights_only=True)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


class Crash(Exception):
    pass


class CrashAt:
    def __init__(self, stage, step=None):
        self.stage, self.step = stage, step

    @kdcore.hookimpl
    def kdcore_step_end(self, stage, step):
        if self.step is not None and (stage.name, step) == (self.stage, self.step):
            raise Crash

    @kdcore.hookimpl
    def kdcore_stage_end(self, stage):
        if self.step is None and stage.name == self.stage:
            raise Crash


@pytest.mark.parametrize("stage, step", [
    ("first", 1),     # before any checkpoint of the stage: redone from the start
    ("first", 10),    # second epoch, one step after a mid-epoch checkpoint
    ("first", None),  # after the stage ended (the next one starts fresh)
    ("second", 15),   # the last step of the run, before the final evaluation
])
def test_resume_after_an_exception_is_exact(tmp_path, teacher, reference, stage, step):
    config = resumable_config(tmp_path, teacher)
    with pytest.raises(Crash):
        kdcore.Distiller(config, callbacks=[CrashAt(stage, step)]).fit()
    if step == 1:  # no checkpoint yet: a fresh run is refused (the log is there), a resume starts over
        assert not (tmp_path / "checkpoint.pt").exists()
        with pytest.raises(RunDirectoryError, match=r"already holds a run \(metrics.jsonl\)"):
            kdcore.Distiller(config).fit()
    metrics = kdcore.Distiller(config).fit(resume=True)
    assert_same_run(tmp_path, metrics, reference)


def test_sigkill_mid_stage_then_cli_resume_is_exact(tmp_path, teacher, reference):
    config_path = tmp_path / "run.yaml"
    config_path.write_text(yaml.safe_dump(resumable_config(tmp_path / "run", teacher)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(TESTS), os.environ.get("PYTHONPATH")]))}
    killer = f"""
import os, signal
import kdcore

class KillAt:
    @kdcore.hookimpl
    def kdcore_step_end(self, stage, step):
        if stage.name == "second" and step == 5:
            os.kill(os.getpid(), signal.SIGKILL)

kdcore.Distiller({str(config_path)!r}, callbacks=[KillAt()]).fit()
"""
    killed = subprocess.run([sys.executable, "-c", killer], env=env, capture_output=True, text=True)
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    saved = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert (saved["stage"], saved["stage_state"]["epoch"], saved["stage_state"]["step"]) == (1, 0, 3)
    resumed = subprocess.run([sys.executable, "-m", "kdcore", "distill", str(config_path), "--resume"], env=env,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr
    metrics = json.loads(resumed.stdout.strip().splitlines()[-1])
    assert_same_run(tmp_path / "run", metrics, reference)


def test_resuming_a_finished_run_changes_nothing(reference, teacher):
    directory, metrics = reference
    before = (directory / "metrics.jsonl").read_text()
    assert kdcore.Distiller(resumable_config(directory, teacher)).fit(resume=True) == metrics
    assert (directory / "metrics.jsonl").read_text() == before


def test_run_directory_guards(tmp_path, teacher, reference):
    with pytest.raises(RunDirectoryError, match=r"already holds a run \(checkpoint.pt, checkpoint.previous.pt, "
                                                r"metrics.jsonl, student.pt, stages\); resume it"):
        kdcore.Distiller(resumable_config(reference[0], teacher)).fit()
    with pytest.raises(RunDirectoryError, match=r"nothing to resume: .*checkpoint.pt does not exist"):
        kdcore.Distiller(resumable_config(tmp_path, teacher)).fit(resume=True)
    changed = resumable_config(reference[0], teacher)
    changed["optimizer"]["lr"] = 0.5
    changed["training"]["epochs"] = 3
    with pytest.raises(ConfigError, match=r"the config differs from the one it was started with at "
                                          r"optimizer.lr, training.epochs; resume with the same config"):
        kdcore.Distiller(changed).fit(resume=True)


def test_a_moved_run_resumes(tmp_path, teacher, reference):
    moved = tmp_path / "moved"
    shutil.copytree(reference[0], moved)
    assert kdcore.Distiller(resumable_config(moved, teacher)).fit(resume=True) == reference[1]


def test_checkpoint_writes_are_atomic(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    checkpoint.save_atomic({"generation": 1}, path)

    def torn_save(obj, handle):
        handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", torn_save)
    with pytest.raises(OSError, match="disk full"):
        checkpoint.save_atomic({"generation": 2}, path)
    assert checkpoint.load(path) == {"generation": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint.pt"]  # no temporary file left behind


def test_rng_state_round_trips():
    import random

    import numpy as np

    state = checkpoint.rng_state()
    first = (random.random(), np.random.rand(), torch.rand(3))
    checkpoint.set_rng_state(state)
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[:2] == second[:2] and torch.equal(first[2], second[2])
