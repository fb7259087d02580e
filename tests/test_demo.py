"""``kdcore demo``: the shipped digits data, the experiment's mechanics on a short schedule, its
report files, and (slow) the claim the README makes: distillation beats the scratch baseline."""

from __future__ import annotations

import json

import pytest
import torch

from kdcore import cli, demo
from kdcore.demo.report import METHODS
from kdcore_plugins.zoo import digits


def test_digits_ship_with_kdcore():
    splits = digits()
    assert (len(splits["train"]), len(splits["val"])) == (1347, 450)
    x, y = splits["val"][:]
    assert x.shape == (450, 64) and 0 <= float(x.min()) and float(x.max()) <= 1
    assert torch.bincount(y, minlength=10).min() >= 44  # every class is held out in proportion
    assert digits(images=True)["train"][0][0].shape == (1, 8, 8)


def test_short_demo_writes_its_report(tmp_path):
    output = tmp_path / "demo"
    text = demo.run(demo.Settings(seeds=2, epochs=1, student_width=8, output_dir=output), say=lambda line: None)
    results = json.loads((output / "demo.json").read_text())
    names = [row["name"] for row in results["rows"]]
    assert names == ["teacher", "teacher_int8", "teacher_pruned", "scratch", "response_kd", "born_again", "ensemble",
                     "takd", "self_distill"]
    assert all(len(row["accuracy"]) == 2 and row["parameters"] > 0 and row["latency_us"] > 0
               for row in results["rows"])
    by_name = {row["name"]: row for row in results["rows"]}
    assert by_name["teacher"]["teacher_agreement"] == [1.0, 1.0]
    assert by_name["teacher_pruned"]["parameters"] <= by_name["scratch"]["parameters"]
    assert by_name["teacher_int8"]["size_kb"] < by_name["teacher"]["size_kb"] / 3
    assert set(results["verdicts"]) == set(METHODS)
    assert all(f"| {name} |" in text for name in names) and "beat scratch" in text
    assert (output / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (output / "seed1" / "born_again" / "stages" / "1-gen2" / "student.pt").exists()


def test_demo_never_replaces_what_it_did_not_write(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    assert cli.main(["demo", "--output-dir", str(tmp_path / "mine")]) == 2
    assert "exists and was not written by `kdcore demo`" in capsys.readouterr().err
    assert cli.main(["demo", "--seeds", "0"]) == 2
    assert "--seeds must be at least 1, got 0" in capsys.readouterr().err


@pytest.mark.slow
def test_distillation_beats_scratch_on_the_demo(tmp_path):
    demo.run(demo.Settings(output_dir=tmp_path / "demo"), say=lambda line: None)
    results = json.loads((tmp_path / "demo" / "demo.json").read_text())
    assert results["verdicts"]["response_kd"].startswith("beat scratch"), results["verdicts"]
