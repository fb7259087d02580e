"""Models that do not fit the data or each other fail before training, as a config error naming the
keys to change, and leave the output directory as it was."""

from __future__ import annotations

import pytest
import yaml

import kdcore
from engine_helpers import CLASSES, FEATURES, classification_config, lm_config, mlp
from kdcore import cli
from kdcore.engine.config import ConfigError


@pytest.mark.parametrize("student, teacher_classes, message", [
    ({"in_features": FEATURES + 1}, CLASSES,
     rf"student: model 'mlp' fails on a batch of data.dataset 'synthetic_classification' \(inputs float32\[2, "
     rf"{FEATURES}\]\): .*; student.options.in_features is {FEATURES + 1} but the inputs have {FEATURES} features: "
     rf"set student.options.in_features={FEATURES}"),
    ({"num_classes": CLASSES - 1}, CLASSES - 1,
     rf"student outputs {CLASSES - 1} classes \(student.options.num_classes\), but data.dataset "
     rf"'synthetic_classification' has labels up to {CLASSES - 1}: the student needs at least {CLASSES}"),
    ({"num_classes": CLASSES + 1}, CLASSES,
     rf"student outputs {CLASSES + 1} classes \(student.options.num_classes\) but teachers.0 outputs {CLASSES} "
     r"classes \(teachers.0.options.num_classes\); the student is distilled from"),
])
def test_models_that_do_not_fit_fail_before_anything_is_written(tmp_path, teacher, capsys, student, teacher_classes,
                                                                message):
    spec = mlp([16])
    spec["options"].update(student)
    teacher_spec = {**teacher, "options": {**teacher["options"], "num_classes": teacher_classes}}
    if teacher_classes != CLASSES:  # an untrained teacher of another class count
        teacher_spec.pop("checkpoint")
        teacher_spec["pretrained"] = True
    directory = tmp_path / "run"
    config = classification_config(directory, method={"name": "response_kd"}, teachers=[teacher_spec], student=spec)
    with pytest.raises(ConfigError, match=message):
        kdcore.Distiller(config, console=False).fit()
    assert not directory.exists()
    directory.mkdir()
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    assert cli.main(["distill", str(path)]) == 2
    assert "Traceback" not in capsys.readouterr().err
    assert list(directory.iterdir()) == []  # a directory that existed is left as it was, empty


def test_a_failed_fresh_run_leaves_a_directory_with_other_files_as_it_found_it(tmp_path, teacher):
    directory = tmp_path / "run"
    directory.mkdir()
    (directory / "notes.txt").write_text("mine")
    spec = mlp([16])
    spec["options"]["in_features"] = FEATURES + 1
    config = classification_config(directory, method={"name": "response_kd"}, teachers=[teacher], student=spec)
    with pytest.raises(ConfigError, match="student.options.in_features"):
        kdcore.Distiller(config, console=False).fit()
    assert sorted(p.name for p in directory.iterdir()) == ["notes.txt"]


def test_teachers_of_another_class_count_combined_by_the_method_are_a_config_error(tmp_path, teacher):
    other = {**mlp([8]), "pretrained": True}
    other["options"]["num_classes"] = CLASSES + 1
    config = classification_config(tmp_path / "run", method={"name": "ensemble"}, teachers=[teacher, other])
    with pytest.raises(ConfigError, match=rf"student outputs {CLASSES} classes \(student.options.num_classes\) but "
                                          rf"teachers.1 outputs {CLASSES + 1} classes \(teachers.1.options"):
        kdcore.Distiller(config, console=False).fit()
    assert not (tmp_path / "run").exists()


def test_a_language_models_vocab_size_is_named(tmp_path):
    config = lm_config(tmp_path / "run", method={"name": "supervised"})
    config["student"]["options"]["vocab_size"] = 32
    with pytest.raises(ConfigError, match=r"student: model 'tiny_lm' fails on a batch .*: index out of range in self; "
                                          r"student.options.vocab_size is 32 but the inputs hold token id \d+"):
        kdcore.Distiller(config, console=False).fit()
