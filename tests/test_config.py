"""Run configs: YAML files and Python objects validated on load, with errors naming the key, what
is allowed and what was given."""

from __future__ import annotations

import pytest
import yaml

import kdcore
from engine_helpers import classification_config
from kdcore.engine.config import ConfigError, ModelSpec, RunConfig, check_names, parse_config


@pytest.fixture
def config(tmp_path, teacher):
    return classification_config(tmp_path / "run", method={"name": "response_kd", "temperature": 2.0},
                                 teachers=[teacher])


def rejected(config, match, overrides=()):
    with pytest.raises(ConfigError, match=match):
        kdcore.Distiller(config, overrides=overrides)


def test_yaml_mapping_and_objects_give_the_same_config(tmp_path, config):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    from_yaml, from_mapping = parse_config(path), parse_config(config)
    built = RunConfig(method={"name": "response_kd", "temperature": 2.0}, student=ModelSpec(**config["student"]),
                      teachers=[ModelSpec(**config["teachers"][0])], data=config["data"],
                      optimizer=config["optimizer"], training=config["training"], output_dir=config["output_dir"],
                      device="cpu")
    assert from_yaml == from_mapping == parse_config(built)
    assert from_yaml.method.options() == {"temperature": 2.0}
    assert from_yaml.scheduler.name == "constant" and from_yaml.training.grad_accum == 1  # defaults


def test_overrides(config):
    parsed = parse_config(config, ["optimizer.lr=0.5", "training.grad_accum=2", "teachers.0.options.hidden=[8]",
                                   "method.beta=0.3"])
    assert parsed.optimizer.lr == 0.5 and parsed.training.grad_accum == 2
    assert parsed.teachers[0].options["hidden"] == [8] and parsed.method.options()["beta"] == 0.3
    assert config["optimizer"]["lr"] == 0.1  # the caller's mapping is not modified
    with pytest.raises(ConfigError, match=r"override 'optimizer': expected KEY=VALUE, e.g. optimizer.lr=0.01"):
        parse_config(config, ["optimizer"])
    with pytest.raises(ConfigError, match=r"override 'output_dir.x=1': output_dir is not a section"):
        parse_config(config, ["output_dir.x=1"])


@pytest.mark.parametrize("edit, match", [
    (lambda c: c["optimizer"].update(name="adamx"),
     r"optimizer.name: Input should be 'adamw', 'adam' or 'sgd' \(got 'adamx'\)"),
    (lambda c: c["optimizer"].update(lrr=1),
     r"optimizer.lrr: unknown key \(did you mean 'lr'\?\); allowed keys: name, lr, weight_decay"),
    (lambda c: c.update(optimzer={}), r"optimzer: unknown key \(did you mean 'optimizer'\?\); allowed keys: method,"),
    (lambda c: c["teachers"][0].update(checkpiont="x"), r"teachers.0.checkpiont: unknown key \(did you mean "
                                                         r"'checkpoint'\?\); allowed keys: model, options, checkpoint"),
    (lambda c: c["training"].update(epochs="three"), r"training.epochs: Input should be a valid integer.*'three'"),
    (lambda c: c["training"].update(epochs=0), r"training.epochs: Input should be greater than 0 \(got 0\)"),
    (lambda c: c["training"].update(precision="fp8"), r"training.precision: Input should be 'fp32' or 'bf16'"),
    (lambda c: c.pop("data"), r"config: data: required key is missing"),
    (lambda c: c["teachers"][0].pop("checkpoint"),
     r"teachers.0: a teacher needs trained weights: give checkpoint: PATH \(a state-dict file\), or pretrained: true"),
    (lambda c: c["teachers"][0].update(checkpoint="missing.pt"),
     r"teachers.0.checkpoint: file 'missing.pt' does not exist \(relative paths are relative to "),
    (lambda c: c["method"].update(name="respons_kd"),
     r"method.name: unknown method 'respons_kd' \(did you mean 'response_kd'\?\); registered methods: .*supervised"),
    (lambda c: c["method"].update(temprature=2),
     r"method: response_kd: unknown config keys \['temprature'\]; it takes alpha, beta, ce_weight, divergence, kd_weight, loss, temperature"),
    (lambda c: c["method"].update(divergence="kl"), r"method: response_kd: divergence must be one of 'forward_kl'"),
    (lambda c: c["student"].update(model="mlpp"), r"student.model: unknown model 'mlpp' \(did you mean 'mlp'\?\)"),
    (lambda c: c["student"].update(model="torch.nn:Linearr"),
     r"student.model: cannot import 'torch.nn:Linearr': AttributeError"),
    (lambda c: c["data"].update(dataset="cifar"), r"data.dataset: unknown dataset 'cifar'; registered datasets: "),
    (lambda c: c.update(callbacks=["nope"]), r"callbacks.0: unknown callback 'nope'; registered callbacks:"),
    (lambda c: c.update(callbacks=[{"every": 2}]), r"callbacks.0: a callback given as a mapping needs a 'name' key"),
])
def test_bad_configs_name_the_key(config, edit, match):
    edit(config)
    rejected(config, match)


def test_bad_yaml_files(tmp_path):
    with pytest.raises(ConfigError, match=r"config file '.*nope.yaml' does not exist"):
        parse_config(tmp_path / "nope.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match=r"list.yaml: a config is a mapping of sections .*, got list"):
        parse_config(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("method: {name: x\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: not valid YAML"):
        parse_config(tmp_path / "broken.yaml")


def test_models_that_do_not_fit(tmp_path, config):
    config["teachers"][0]["options"]["hidden"] = [8]
    run = kdcore.Distiller(config)
    with pytest.raises(ConfigError, match=r"teachers.0.checkpoint: '.*student.pt' does not fit the model: "
                                          r"Error\(s\) in loading state_dict for MLP: Unexpected key\(s\) in state_dict: \"body.2.weight\""):
        run.fit()
    config["student"]["options"]["widht"] = 3
    with pytest.raises(ConfigError, match=r"student.options: model 'mlp' rejected its options .*widht"):
        kdcore.Distiller(config).fit()


def test_check_names_accepts_import_paths(config):
    config["student"] = {"model": "engine_helpers:tiny_classifier"}
    check_names(parse_config(config))
