"""The ``kdcore`` command: help for every subcommand, distill / eval round trip, and errors a user
can fix printed as one line with exit status 2."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from engine_helpers import classification_config
from kdcore import cli

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command, expected", [
    ([], ["distill", "eval", "report", "cache-teacher", "demo", "plugins", "bench", "--disable-plugins"]),
    (["demo"], ["--seeds", "--epochs", "--train-fraction", "--output-dir"]),
    (["distill"], ["config", "--resume", "--set KEY=VALUE", "torchrun"]),
    (["eval"], ["config", "--checkpoint"]),
    (["report"], ["RUN_DIR", "--baseline RUN_DIR", "--output DIR", "--device"]),
    (["plugins"], ["--json"]),
    (["bench"], ["--help-bench", "--benchmark {kd_loss,kd_loss_sparse,fused_linear_kd}"]),
    (["cache-teacher"], ["config", "--output", "--k", "--temperature", "--value-dtype", "--split", "--teacher"]),
])
def test_help(capsys, command, expected):
    with pytest.raises(SystemExit) as exit_:
        cli.main([*command, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert all(word in out for word in expected), out


def test_distill_then_eval(tmp_path, teacher, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(classification_config(tmp_path / "run", method={"name": "response_kd"},
                                                         teachers=[teacher])))
    assert cli.main(["distill", str(path), "--set", "training.epochs=1"]) == 0
    printed = capsys.readouterr()
    final = json.loads(printed.out.strip().splitlines()[-1])
    assert "\r" not in printed.err + printed.out  # no progress bar when the output is not a terminal
    assert cli.main(["eval", str(path), "--set", "training.epochs=1"]) == 0
    assert json.loads(capsys.readouterr().out) == pytest.approx(final)
    assert cli.main(["distill", str(path), "--set", "training.epochs=1"]) == 2
    assert "already holds a run (checkpoint.pt, checkpoint.previous.pt, metrics.jsonl, student.pt, stages); resume it" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["distill", "missing.yaml"], "kdcore distill: config file 'missing.yaml' does not exist\n"),
    (["distill", "{config}", "--set", "optimizer.name=adamx"],
     "kdcore distill: {config}: optimizer.name: Input should be 'adamw', 'adam' or 'sgd' (got 'adamx')\n"),
    (["distill", "{config}", "--resume"], "kdcore distill: nothing to resume: "),
    (["eval", "{config}", "--checkpoint", "nope.pt"], "kdcore eval: student.checkpoint: file 'nope.pt' does not exist\n"),
])
def test_user_errors_are_one_line(tmp_path, teacher, capsys, args, message):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(classification_config(tmp_path / "run", method={"name": "supervised"})))
    assert cli.main([a.format(config=path) for a in args]) == 2
    err = capsys.readouterr().err
    assert err.startswith(message.format(config=path)) and err.count("\n") == 1, err


def test_python_m_kdcore_and_bench(tmp_path):
    done = subprocess.run([sys.executable, "-m", "kdcore", "bench", "--benchmark", "fused_linear_kd", "--help-bench"],
                          cwd=ROOT, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""})
    assert done.returncode == 0 and "DTYPE:NxHsxHtxV" in done.stdout, done.stderr
    elsewhere = subprocess.run([sys.executable, "-m", "kdcore", "bench"], cwd=tmp_path, capture_output=True, text=True,
                               env={**os.environ, "PYTHONPATH": ""})  # no benchmarks package reachable
    assert elsewhere.returncode == 2
    assert "kdcore bench: kdcore bench runs the benchmarks of kdcore's source tree" in elsewhere.stderr


@pytest.mark.parametrize("command", [[], ["distill"], ["eval"], ["report"], ["cache-teacher"], ["demo"], ["plugins"],
                                     ["bench"]])
def test_help_imports_no_torch(command):
    """`kdcore ... --help` answers before torch is imported (what makes it instant)."""
    probe = ("import sys\nfrom kdcore import cli\ntry:\n    cli.main(sys.argv[1:] + ['--help'])\nexcept SystemExit:\n"
             "    pass\nloaded = sorted(m for m in sys.modules if m == 'torch' or m.startswith('torch.'))\n"
             "print('LOADED', loaded[:5])")
    done = subprocess.run([sys.executable, "-c", probe, *command], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "LOADED []"


def test_import_kdcore_leaves_dynamo_alone():
    """Using kdcore does not import torch._dynamo (most of a second) until something compiles."""
    probe = ("import sys, torch, kdcore\nkdcore.kd_loss(torch.randn(2, 3), torch.randn(2, 3))\nkdcore.backends()\n"
             "print('DYNAMO', 'torch._dynamo' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "DYNAMO False"


def test_value_dtype_is_checked_by_the_cache(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(classification_config(tmp_path / "run", method={"name": "supervised"})))
    assert cli.main(["cache-teacher", str(path), "--output", str(tmp_path / "c"), "--value-dtype", "int8"]) == 2
    assert "--value-dtype must be one of ['bfloat16', 'float16'], got 'int8'" in capsys.readouterr().err
