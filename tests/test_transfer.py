"""The transfer report: its figures on hand-built logits whose every number is known by
construction, and ``kdcore report`` on small real runs on the digits data (a distilled student, a
scratch baseline, runs it must refuse), one language-model run included."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch

import kdcore
from kdcore import cli
from kdcore.engine.builders import build_splits
from kdcore.engine.config import DataSpec
from kdcore.engine.metrics import Meter
from kdcore.transfer import plot_report, transfer_figures
from kdcore.transfer.figures import LISTED_CLASSES, Rows, figures_of

CLASSES = 4
PNG = b"\x89PNG\r\n\x1a\n"


def logits_of(predictions: list[int], confidence: float, classes: int = CLASSES) -> torch.Tensor:
    """Rows whose softmax gives ``confidence`` to the predicted class and shares the rest evenly."""
    probs = torch.full((len(predictions), classes), (1 - confidence) / (classes - 1), dtype=torch.float64)
    probs[torch.arange(len(predictions)), torch.tensor(predictions)] = confidence
    return probs.log()


# Ten rows per class. The teacher is right on classes 0 and 1, wrong on half of class 2 (it says 1)
# and on all of class 3 (it says 0): 15 errors, per-class accuracy [1, 1, 0.5, 0]. The student
# repeats 6 of those errors, the baseline 2; per class the student is right on [7, 7, 6, 5] rows
# and the baseline on 5 of each, so the student's gap [0.2, 0.2, 0.1, 0] is 0.2 × the teacher's
# accuracy: r = 1.
LABELS = [c for c in range(CLASSES) for _ in range(10)]
TEACHER = [0] * 10 + [1] * 10 + [2] * 5 + [1] * 5 + [0] * 10
STUDENT = ([0] * 7 + [1] * 3) + ([1] * 7 + [2] * 3) + ([2] * 6 + [1] * 3 + [3]) + ([3] * 5 + [0] * 3 + [1] * 2)
BASELINE = ([0] * 5 + [1] * 5) + ([1] * 5 + [2] * 5) + ([2] * 5 + [1] + [3] * 4) + ([3] * 5 + [0] + [2] * 4)
# confidences: the student's equals its accuracy (25/40: calibrated), the baseline's is 0.9 at
# accuracy 0.5 (ECE 0.4), the teacher's 0.7 at accuracy 0.625 (ECE 0.075)
T_CONF, S_CONF, B_CONF = 0.7, 0.625, 0.9


def constructed(**options):
    return transfer_figures(logits_of(STUDENT, S_CONF), logits_of(TEACHER, T_CONF), torch.tensor(LABELS),
                            baseline_logits=logits_of(BASELINE, B_CONF), **options)


def kl(same_class: bool, confidence: float) -> float:
    """KL(teacher ‖ model) of one row: teacher [0.7, 0.1, 0.1, 0.1] against a model giving
    ``confidence`` to the same class or to another one."""
    t_rest, rest = (1 - T_CONF) / 3, (1 - confidence) / 3
    if same_class:
        return T_CONF * math.log(T_CONF / confidence) + 3 * t_rest * math.log(t_rest / rest)
    return (T_CONF * math.log(T_CONF / rest) + t_rest * math.log(t_rest / confidence)
            + 2 * t_rest * math.log(t_rest / rest))


def test_figures_of_a_constructed_case():
    f = constructed()
    assert (f["rows"], f["classes"], f["bins"]) == (40, 4, 15)
    assert f["teacher_accuracy"] == 25 / 40 and f["teacher_errors"] == 15
    assert f["accuracy"] == 25 / 40 and f["baseline_accuracy"] == 20 / 40
    assert f["agreement"] == 25 / 40  # 7 + 7 + 8 + 3
    assert f["baseline_agreement"] == 17 / 40  # 5 + 5 + 6 + 1
    assert f["inherited_error_rate"] == pytest.approx(6 / 15)
    assert f["baseline_inherited_error_rate"] == pytest.approx(2 / 15)
    assert f["kl_to_teacher"] == pytest.approx((25 * kl(True, S_CONF) + 15 * kl(False, S_CONF)) / 40, rel=1e-5)
    assert f["baseline_kl_to_teacher"] == pytest.approx((17 * kl(True, B_CONF) + 23 * kl(False, B_CONF)) / 40, rel=1e-5)
    assert f["ece"] == pytest.approx(0, abs=1e-6)
    assert f["baseline_ece"] == pytest.approx(0.4, abs=1e-6) and f["teacher_ece"] == pytest.approx(0.075, abs=1e-6)
    assert f["per_class"] == {"classes": [0, 1, 2, 3], "restricted": False, "count": [10, 10, 10, 10],
                              "teacher": [1.0, 1.0, 0.5, 0.0], "student": [0.7, 0.7, 0.6, 0.5],
                              "baseline": [0.5, 0.5, 0.5, 0.5]}
    assert f["gap_teacher_correlation"] == pytest.approx(1.0)
    json.dumps(f, allow_nan=False)  # JSON as it is


def test_reliability_bins():
    f = constructed()
    assert len(f["reliability"]) == 15 and f["reliability"][0]["lower"] == 0 and f["reliability"][-1]["upper"] == 1
    filled = [b for b in f["reliability"] if b["count"]]
    assert len(filled) == 1 and filled[0]["count"] == 40
    assert (filled[0]["lower"], filled[0]["upper"]) == pytest.approx((9 / 15, 10 / 15))  # 0.625 · 15 = 9.4
    assert (filled[0]["confidence"], filled[0]["accuracy"]) == pytest.approx((0.625, 0.625))
    assert all(b["confidence"] is None and b["accuracy"] is None for b in f["reliability"] if not b["count"])
    baseline = [b for b in f["baseline_reliability"] if b["count"]]
    assert len(baseline) == 1 and (baseline[0]["lower"], baseline[0]["accuracy"]) == pytest.approx((13 / 15, 0.5))
    assert [b["count"] for b in constructed(bins=2)["reliability"]] == [0, 40]


def test_rows_labelled_ignore_index_are_skipped():
    junk = torch.randn(7, CLASSES)
    f = transfer_figures(torch.cat([logits_of(STUDENT, S_CONF), junk]),
                         torch.cat([logits_of(TEACHER, T_CONF), -junk]), torch.tensor(LABELS + [-1] * 7),
                         baseline_logits=torch.cat([logits_of(BASELINE, B_CONF), junk]), ignore_index=-1)
    assert f == constructed()


def test_a_teacher_without_errors_and_no_baseline():
    f = transfer_figures(logits_of(STUDENT, S_CONF), logits_of(LABELS, T_CONF), torch.tensor(LABELS))
    assert f["teacher_errors"] == 0 and f["inherited_error_rate"] is None and f["baseline_inherited_error_rate"] is None
    assert f["teacher_accuracy"] == 1.0
    assert all(f[f"baseline_{key}"] is None for key in ("accuracy", "agreement", "kl_to_teacher", "ece", "reliability"))
    assert f["per_class"]["baseline"] is None and f["gap_teacher_correlation"] is None
    json.dumps(f, allow_nan=False)


def test_correlation_is_none_when_undefined():
    same = logits_of(STUDENT, S_CONF)  # the baseline is the student: the gap is 0 in every class
    f = transfer_figures(same, logits_of(TEACHER, T_CONF), torch.tensor(LABELS), baseline_logits=same)
    assert f["per_class"]["student"] == f["per_class"]["baseline"] and f["gap_teacher_correlation"] is None
    labels = [0] * 10 + [1] * 10 + [-100] * 20  # classes 2 and 3 absent
    f = transfer_figures(logits_of(STUDENT, S_CONF), logits_of(TEACHER, T_CONF), torch.tensor(labels),
                         baseline_logits=logits_of(BASELINE, B_CONF))
    assert f["per_class"]["teacher"] == [1.0, 1.0, None, None] and f["per_class"]["count"] == [10, 10, 0, 0]
    assert f["gap_teacher_correlation"] is None  # the teacher is perfect on both classes present


def test_a_large_vocabulary_lists_the_classes_among_the_labels():
    vocabulary = LISTED_CLASSES + 500
    labels = torch.tensor([3, 700, vocabulary - 1, 700, -100])
    predictions = [3, 5, vocabulary - 1, 700, 0]
    logits = logits_of(predictions, 0.5, vocabulary).float()
    f = transfer_figures(logits, logits, labels)
    assert f["per_class"]["restricted"] and f["per_class"]["classes"] == [3, 700, vocabulary - 1]
    assert f["per_class"]["count"] == [1, 2, 1] and f["per_class"]["student"] == [1.0, 0.5, 1.0]


def test_figures_agree_with_the_evaluation_metrics():
    student, teacher = torch.randn(300, 7), torch.randn(300, 7)
    labels = torch.randint(7, (300,))
    labels[::5] = -100
    meter = Meter()
    meter.update(student, labels, teacher)
    expected = meter.compute()
    f = transfer_figures(student, teacher, labels)
    assert f["accuracy"] == pytest.approx(expected["accuracy"]) and f["ece"] == pytest.approx(expected["ece"])
    assert f["agreement"] == pytest.approx(expected["teacher_agreement"])
    assert f["kl_to_teacher"] == pytest.approx(expected["kl_to_teacher"], rel=1e-5)
    whole = Rows.of(student, teacher, labels)
    parts = Rows.cat([Rows.of(student[i:i + 64], teacher[i:i + 64], labels[i:i + 64]) for i in range(0, 300, 64)])
    assert figures_of(parts) == figures_of(whole)


@pytest.mark.parametrize("arguments, message", [
    ((torch.randn(5, 4, 2), torch.randn(5, 4), torch.zeros(5, dtype=torch.long)),
     "student_logits must be a floating-point tensor [N, C], got float32 of shape (5, 4, 2)"),
    ((torch.randn(5, 4), torch.randn(5, 3), torch.zeros(5, dtype=torch.long)),
     "teacher_logits has shape (5, 3) but student_logits has (5, 4)"),
    ((torch.randn(5, 4), torch.randn(5, 4), torch.zeros(5)), "labels must be an integer tensor [N], got float32"),
    ((torch.randn(5, 4), torch.randn(5, 4), torch.zeros(4, dtype=torch.long)),
     "labels has 4 rows but student_logits has 5"),
    ((torch.randn(5, 4), torch.randn(5, 4), torch.tensor([0, 1, 4, 2, 3])),
     "labels must be class ids in [0, 4) or ignore_index (-100); found 4"),
    ((torch.randn(2, 4), torch.randn(2, 4), torch.tensor([-100, -100])), "labels: every row is ignore_index"),
])
def test_arguments_that_do_not_fit_are_named(arguments, message):
    with pytest.raises(ValueError) as error:
        transfer_figures(*arguments)
    assert str(error.value).startswith(message), error.value
    with pytest.raises(ValueError, match="baseline_logits has shape"):
        transfer_figures(torch.randn(5, 4), torch.randn(5, 4), torch.zeros(5, dtype=torch.long),
                         baseline_logits=torch.randn(6, 4))


def test_plot_report_draws_with_and_without_a_baseline(tmp_path):
    plot_report(constructed(), tmp_path / "with.png")
    plot_report(transfer_figures(logits_of(STUDENT, S_CONF), logits_of(LABELS, T_CONF), torch.tensor(LABELS)),
                tmp_path / "without.png")
    assert (tmp_path / "with.png").read_bytes()[:8] == PNG and (tmp_path / "without.png").read_bytes()[:8] == PNG
    assert sorted(path.name for path in tmp_path.iterdir()) == ["with.png", "without.png"]  # no temporary left


# -- kdcore report on real runs ---------------------------------------------------------------------


def digits_run(directory: Path, method: str, hidden: list[int], teachers=(), classes: int = 10, **data_options):
    """Trains one epoch of an MLP on the digits (a third of the training split) and returns the
    final metrics."""
    config = {"method": {"name": method}, "student": mlp(hidden, classes), "teachers": list(teachers),
              "data": {"dataset": "digits", "batch_size": 64, "options": {"train_fraction": 0.3, **data_options}},
              "optimizer": {"name": "adamw", "lr": 0.01}, "training": {"epochs": 1, "log_every": 100},
              "output_dir": str(directory), "device": "cpu"}
    return kdcore.Distiller(config, console=False).fit()


def mlp(hidden: list[int], classes: int = 10, checkpoint: Path | None = None) -> dict:
    spec = {"model": "mlp", "options": {"in_features": 64, "num_classes": classes, "hidden": hidden}}
    return {**spec, "checkpoint": str(checkpoint)} if checkpoint else spec


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("transfer")
    digits_run(root / "teacher", "supervised", [64])
    teacher = mlp([64], checkpoint=root / "teacher" / "student.pt")
    metrics = digits_run(root / "kd", "response_kd", [16], [teacher])
    digits_run(root / "scratch", "supervised", [16])
    digits_run(root / "other_data", "supervised", [16], val_fraction=0.3)
    digits_run(root / "other_classes", "supervised", [16], classes=12)
    return root, metrics


def report(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main(["report", *args])
    printed = capsys.readouterr()
    return code, printed.out, printed.err


def test_report_on_a_distilled_run(runs, capsys):
    root, metrics = runs
    code, out, err = report(capsys, str(root / "kd"), "--baseline", str(root / "scratch"))
    assert code == 0, err
    record = json.loads((root / "kd" / "report" / "report.json").read_text())
    assert (root / "kd" / "report" / "report.png").read_bytes()[:8] == PNG
    assert {key: record[key] for key in ("kind", "run", "baseline", "method", "task")} == {
        "kind": "kdcore transfer report", "run": str(root / "kd"), "baseline": str(root / "scratch"),
        "method": "response_kd", "task": "classification"}
    f = record["figures"]
    assert {"accuracy", "agreement", "kl_to_teacher", "ece", "reliability", "inherited_error_rate", "teacher_errors",
            "baseline_inherited_error_rate", "baseline_accuracy", "baseline_ece", "per_class",
            "gap_teacher_correlation"} <= set(f)
    assert f["rows"] == 450 and f["per_class"]["classes"] == list(range(10)) and sum(f["per_class"]["count"]) == 450
    assert f["baseline_accuracy"] is not None and f["gap_teacher_correlation"] is not None
    # the figures of the student are the run's own evaluation of it
    for key, metric in [("accuracy", "accuracy"), ("agreement", "teacher_agreement"), ("ece", "ece"),
                        ("teacher_accuracy", "teacher_accuracy")]:
        assert f[key] == pytest.approx(metrics[metric], abs=1e-9), key
    assert f["kl_to_teacher"] == pytest.approx(metrics["kl_to_teacher"], rel=1e-5)
    assert "450 held-out rows" in out and "baseline " in out and str(root / "kd" / "report" / "report.json") in out
    code, _, err = report(capsys, str(root / "kd"), "--output", str(root / "kd" / "report"))  # replaces its own
    assert code == 0, err
    assert json.loads((root / "kd" / "report" / "report.json").read_text())["baseline"] is None


def test_report_never_replaces_what_it_did_not_write(runs, tmp_path, capsys):
    root, _ = runs
    (tmp_path / "report.json").write_text('{"mine": 1}')
    code, _, err = report(capsys, str(root / "kd"), "--output", str(tmp_path))
    assert code == 2 and "report.json exists and is not a transfer report" in err and err.count("\n") == 1
    assert (tmp_path / "report.json").read_text() == '{"mine": 1}'
    (tmp_path / "report.json").unlink()
    (tmp_path / "report.png").write_bytes(b"mine")
    code, _, err = report(capsys, str(root / "kd"), "--output", str(tmp_path))
    assert code == 2 and "report.png exists beside no transfer report" in err
    (tmp_path / "file").write_text("")
    code, _, err = report(capsys, str(root / "kd"), "--output", str(tmp_path / "file" / "report"))
    assert code == 2 and err.startswith(f"kdcore report: --output {tmp_path / 'file' / 'report'}: cannot write "
                                        "there (Not a directory); choose another --output") and err.count("\n") == 1


def test_runs_the_report_refuses(runs, tmp_path, capsys):
    root, _ = runs
    unfinished = tmp_path / "unfinished"
    shutil.copytree(root / "kd", unfinished, ignore=shutil.ignore_patterns("report"))
    (unfinished / "student.pt").unlink()
    (tmp_path / "empty").mkdir()
    cases = [
        ([str(tmp_path / "missing")], f"{tmp_path / 'missing'} is not a run directory (it does not exist)"),
        ([str(tmp_path / "empty")], f"{tmp_path / 'empty'} is not a run directory: it holds none of the files"),
        ([str(unfinished)], f"{unfinished} is an unfinished run: it has no student.pt"),
        ([str(root / "scratch")], f"{root / 'scratch'}: the run (method 'supervised') has no teacher"),
        ([str(root / "kd"), "--baseline", str(root / "other_data")],
         f"--baseline {root / 'other_data'}: its held-out split is not that of {root / 'kd'} (539 held-out examples "
         "against 450"),
        ([str(root / "kd"), "--baseline", str(root / "other_classes")],
         f"--baseline {root / 'other_classes'}: its student predicts 12 classes, the student of {root / 'kd'} 10"),
    ]
    for args, message in cases:
        code, _, err = report(capsys, *args, "--output", str(tmp_path / "out"))
        assert code == 2 and err.startswith(f"kdcore report: {message}") and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()  # nothing written by a refused report


LM_DATA = {"vocab_size": 64, "seq_len": 16, "train_size": 64, "val_size": 32}


def test_report_on_a_language_model(tmp_path, capsys):
    def lm_run(directory: Path, method: str, dim: int, teachers=()):
        config = {"method": {"name": method}, "student": tiny_lm(dim), "teachers": list(teachers),
                  "data": {"dataset": "synthetic_tokens", "batch_size": 16,
                           "options": LM_DATA},
                  "optimizer": {"name": "adamw", "lr": 0.02}, "training": {"epochs": 1, "log_every": 100},
                  "eval": {"task": "language_modeling"}, "output_dir": str(directory), "device": "cpu"}
        return kdcore.Distiller(config, console=False).fit()

    def tiny_lm(dim: int, checkpoint: Path | None = None) -> dict:
        spec = {"model": "tiny_lm", "options": {"vocab_size": 64, "dim": dim}}
        return {**spec, "checkpoint": str(checkpoint)} if checkpoint else spec

    lm_run(tmp_path / "teacher", "supervised", 32)
    metrics = lm_run(tmp_path / "kd", "response_kd", 8, [tiny_lm(32, tmp_path / "teacher" / "student.pt")])
    code, out, err = report(capsys, str(tmp_path / "kd"))
    assert code == 0, err
    f = json.loads((tmp_path / "kd" / "report" / "report.json").read_text())["figures"]
    _, val = build_splits(DataSpec(dataset="synthetic_tokens", options=LM_DATA))
    labels = torch.stack([val[i]["labels"] for i in range(len(val))])
    assert f["rows"] == int((labels != -100).sum()) and f["classes"] == 64  # every labelled position, flattened
    assert f["accuracy"] == pytest.approx(metrics["token_accuracy"], abs=1e-9)
    assert f["agreement"] == pytest.approx(metrics["teacher_agreement"], abs=1e-9)
    assert f["baseline_accuracy"] is None and "(language_modeling)" in out
