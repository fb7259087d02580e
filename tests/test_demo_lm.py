"""``kdcore demo --suite lm``: the suite's mechanics on tiny models and a few kilobytes of text, its
report files, its command-line errors, and (slow) the verdicts the README reports."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kdcore import cli
from kdcore.demo import lm, reasoning
from kdcore_plugins.zoo import text

METHODS = ["scratch", "llm_kd", "seq_kd", "gkd", "cached_kd"]


def tiny(output_dir, seeds=(0, 3)) -> lm.Settings:
    return lm.Settings(seeds=seeds, epochs=1, teacher_epochs=1, seq_len=32, prompt_len=16, max_bytes=6000,
                       teacher_layers=1, teacher_width=32, student_layers=1, student_width=16, cache_k=8,
                       output_dir=output_dir)


def test_students_see_a_fixed_share_of_the_training_windows():
    whole, half = text(seq_len=64), text(seq_len=64, train_fraction=0.5, prompt_len=32)
    assert len(half["train"]) == round(len(whole["train"]) / 2) and len(half["val"]) == len(whole["val"])
    assert torch.equal(half["train"].input_ids, text(seq_len=64, train_fraction=0.5)["train"].input_ids)
    assert (half["train"].labels[:, :31] == -100).all() and (half["train"].labels[:, 31:] >= 0).all()


def test_tiny_suite_writes_its_report(tmp_path):
    output = tmp_path / "lm"
    plan = reasoning.Plan(train_size=64, held_out_size=8, epochs=1, batch_size=32, teacher_width=16, student_width=8)
    printed = lm.run(tiny(output), say=lambda line: None, reasoning_plan=plan)
    results = json.loads((output / "lm.json").read_text())
    assert results["primary_metric"] == "token_accuracy" and results["settings"]["seeds"] == [0, 3]
    (section,) = results["sections"]
    rows = {row["name"]: row for row in section["rows"]}
    assert list(rows) == ["teacher", *METHODS]
    assert len(rows["teacher"]["perplexity"]) == 1 and rows["teacher"]["teacher_agreement"] == [1.0]
    assert rows["teacher"]["parameters"] > rows["scratch"]["parameters"] == rows["gkd"]["parameters"] > 0
    for name in METHODS:
        row = rows[name]
        assert all(len(row[key]) == 2 for key in ("perplexity", "token_accuracy", "teacher_agreement",
                                                    "kl_to_teacher", "ece", "inherited_error_rate", "seconds"))
        # figures over the held-out windows' positions after the prompt, against scratch of the same seed
        figures = row["transfer"][1]
        assert figures["rows"] == 17 * 18 and figures["baseline_accuracy"] == rows["scratch"]["token_accuracy"][1]
        assert figures["teacher_accuracy"] == rows["teacher"]["token_accuracy"][0]
        assert all(1 < value < math.inf for value in row["perplexity"])
        assert all(0 <= value < math.inf for value in row["kl_to_teacher"] + row["seconds"])
        assert (output / "seed3" / name / "student.pt").exists()
    assert rows["scratch"]["baseline"] is None and {rows[name]["baseline"] for name in METHODS[1:]} == {"scratch"}
    assert set(results["verdicts"]) == set(METHODS[1:])
    for name, judged in results["verdicts"].items():
        gains = [a - b for a, b in zip(rows[name]["token_accuracy"], rows["scratch"]["token_accuracy"])]
        assert set(judged) == {"beat_scratch", "mean_gain_points", "wins", "seeds", "text"}
        assert judged["wins"] == sum(g > 0 for g in gains) and judged["seeds"] == 2
        assert judged["mean_gain_points"] == pytest.approx(100 * sum(gains) / 2)
        assert judged["beat_scratch"] == (judged["mean_gain_points"] > 0 and judged["wins"] == 2)
        assert "points of token accuracy" in judged["text"] and f"{name}: {judged['text']}" in printed
    assert all(f"| {name} |" in printed for name in rows)
    assert (output / "teacher-cache" / "manifest.json").exists()
    assert (output / "lm.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert printed.splitlines()[-1].endswith(f"results in {output / 'lm.json'} and {output / 'lm.png'}")
    # the rationale experiment runs as the suite's last part, in its own directory
    assert results["reasoning"]["seeds"] == [0, 3] and results["reasoning"]["text"] in printed
    assert (output / "reasoning" / "seed3" / "rationale_data" / "student.pt").exists()
    # a second run replaces the first one's runs, cache and reasoning directory
    lm.run(tiny(output), say=lambda line: None, reasoning_plan=None)
    assert not (output / "reasoning").exists() and json.loads((output / "lm.json").read_text())["reasoning"] is None


def test_the_suite_never_replaces_what_it_did_not_write(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    assert cli.main(["demo", "--suite", "lm", "--output-dir", str(tmp_path / "mine")]) == 2
    assert "exists and was not written by `kdcore demo`" in capsys.readouterr().err
    (tmp_path / "classification").mkdir()
    (tmp_path / "classification" / "demo.json").write_text("{}\n")  # the other suite's results are not its own
    assert cli.main(["demo", "--suite", "lm", "--output-dir", str(tmp_path / "classification")]) == 2
    assert (tmp_path / "classification" / "demo.json").exists()


@pytest.mark.parametrize("arguments, message", [
    (["--methods", "dkd"], "--methods belongs to the classification suite; --suite lm runs its own rows"),
    (["--sweep", "capacity"], "--sweep belongs to the classification suite"),
    (["--student-width", "8"], "--student-width belongs to the classification suite"),
    (["--seeds", "2,2"], "--seeds lists a seed twice: '2,2' (paired seeds must be distinct)"),
    (["--epochs", "0"], "--epochs must be at least 1, got 0"),
    (["--train-fraction", "0"], "--train-fraction must lie in (0, 1], got 0.0"),
])
def test_bad_lm_suite_arguments_are_one_line_errors(tmp_path, capsys, arguments, message):
    assert cli.main(["demo", "--suite", "lm", *arguments, "--output-dir", str(tmp_path / "lm")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err, err
    assert not (tmp_path / "lm").exists()


def test_the_command_line_sets_the_suite(tmp_path, monkeypatch):
    chosen = []
    monkeypatch.setattr(lm, "run", lambda settings: chosen.append(settings) or "")
    assert cli.main(["demo", "--suite", "lm", "--seeds", "4,5", "--epochs", "2", "--train-fraction", "1"]) == 0
    assert cli.main(["demo", "--suite", "lm"]) == 0
    assert chosen[0] == lm.Settings(seeds=(4, 5), epochs=2, train_fraction=1.0)
    assert chosen[1] == lm.Settings() and str(chosen[1].output_dir) == "runs/demo-lm"


@pytest.mark.slow
@pytest.mark.timeout(2400)  # about 9 minutes on an idle machine with one thread; more in a loaded CI
def test_the_lm_suite_as_the_readme_reports_it(tmp_path):
    """The default suite (about 9 minutes on 2 idle CPU cores): llm_kd, seq_kd and cached_kd beat
    scratch on both seeds, in token accuracy and in perplexity; gkd on neither."""
    lm.run(lm.Settings(output_dir=tmp_path / "lm"), say=lambda line: None, reasoning_plan=None)  # see test_reasoning_task
    results = json.loads((tmp_path / "lm" / "lm.json").read_text())
    verdicts, rows = results["verdicts"], {row["name"]: row for row in results["sections"][0]["rows"]}
    for name in ("llm_kd", "seq_kd", "cached_kd"):
        assert verdicts[name]["beat_scratch"] and verdicts[name]["wins"] == 2, (name, verdicts[name])
        assert all(a < b for a, b in zip(rows[name]["perplexity"], rows["scratch"]["perplexity"])), name
    assert not verdicts["gkd"]["beat_scratch"] and verdicts["gkd"]["wins"] == 0
