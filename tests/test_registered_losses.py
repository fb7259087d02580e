"""Registered losses in method configs: ``loss: NAME`` trains any logit-level method on a loss a
plugin registered (a third-party package found through its entry point, trained through
``kdcore distill``), ``divergence`` keeps meaning kd_loss's divergences, and every bad choice is a
one-line config error before training."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import types

import pytest
import torch
import yaml

import kdcore
from engine_helpers import classification_config
from kdcore import cli, plugins
from kdcore.engine.data import Batch
from kdcore.engine.named_loss import reduce_rows

# The third-party plugin: a cosine loss with two options of its own, ``eps`` (checked) and ``log``
# (a file that gets one line per call, with the value it returned).
COSINE = '''
import torch.nn.functional as F

import kdcore
from kdcore.engine.named_loss import reduce_rows


def cosine(student_logits, teacher_logits, *, labels=None, ignore_index=-100, temperature=1.0,
           reduction="batchmean", normalizer=None, eps=1e-8, log=None):
    if not eps > 0:
        raise ValueError(f"cosine: eps must be > 0, got {eps}")
    if student_logits.shape[0] > 2 and eps == 0.5:
        raise RuntimeError("cosine broke on a training batch")
    per_row = 1 - F.cosine_similarity(student_logits.float(), teacher_logits.float(), dim=-1, eps=eps)
    loss = reduce_rows(per_row, labels, ignore_index=ignore_index, reduction=reduction, normalizer=normalizer)
    if log is not None:
        with open(log, "a") as f:
            f.write(f"{loss.item()!r}\\n")
    return loss


@kdcore.hookimpl
def kdcore_register_losses(register):
    register("cosine", cosine, description="1 - cosine similarity of the logits")
'''


def digits_mlp(hidden: list[int]) -> dict:
    return {"model": "mlp", "options": {"in_features": 64, "num_classes": 10, "hidden": hidden}}


def test_a_third_party_loss_trains_through_kdcore_distill(tmp_path):
    package = tmp_path / "site"
    package.mkdir()
    (package / "kdcore_cosine.py").write_text(COSINE)
    info = package / "kdcore_cosine-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: kdcore-cosine\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text("[kdcore]\ncosine = kdcore_cosine\n")
    teacher = digits_mlp([32])
    torch.save(plugins.get_model("mlp")(**teacher["options"]).state_dict(), tmp_path / "teacher.pt")
    log = tmp_path / "calls.txt"
    config = {
        "method": {"name": "response_kd", "loss": {"name": "cosine", "eps": 1.0e-6, "log": str(log)},
                   "temperature": 1.0, "ce_weight": 0.0},
        "student": digits_mlp([16]),
        "teachers": [{**teacher, "checkpoint": str(tmp_path / "teacher.pt")}],
        "data": {"dataset": "digits", "batch_size": 32, "options": {"train_fraction": 0.05}},
        "optimizer": {"name": "sgd", "lr": 0.1},
        "training": {"epochs": 1, "log_every": 1},
        "output_dir": str(tmp_path / "run"),
        "device": "cpu",
    }
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(package), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-m", "kdcore", "distill", str(path)], capture_output=True, text=True,
                          env=env)
    assert done.returncode == 0, done.stderr
    assert "accuracy" in json.loads(done.stdout.strip().splitlines()[-1])
    events = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [event["kd"] for event in events if event["event"] == "step"]
    calls = [float(line) for line in log.read_text().splitlines()]
    assert len(steps) == 2 and len(calls) == 1 + len(steps)  # the check when the method is built, then each step
    assert steps == pytest.approx(calls[1:])  # the kd term is the plugin's loss
    assert (tmp_path / "run" / "student.pt").is_file()


@pytest.fixture
def cosine_plugin():
    """The same plugin, registered in this process as package kdcore-cosine 1.0."""
    module = types.ModuleType("kdcore_cosine_in_process")
    exec(COSINE, module.__dict__)
    host = plugins.host()
    host.register(module, "cosine", package="kdcore-cosine", version="1.0")
    yield module
    host.unregister("cosine")


CLASSIFICATION = {"name": "response_kd", "temperature": 1.0}


@pytest.mark.parametrize("method, message", [
    ({**CLASSIFICATION, "loss": "cosin"},
     r"method: response_kd: loss: unknown loss 'cosin' \(did you mean 'cosine'\?\); registered losses: cosine, "
     r"dkd, forward_kl, jsd, .*\(`kdcore plugins` lists what each plugin adds\)"),
    ({**CLASSIFICATION, "loss": {"name": "cosine", "eps": -1.0}},
     r"method: response_kd: loss 'cosine' rejects eps=-1.0: cosine: eps must be > 0, got -1.0"),
    ({**CLASSIFICATION, "loss": {"name": "cosine", "epss": 1}},
     r"method: response_kd: loss 'cosine' rejects epss=1: cosine\(\) got an unexpected keyword argument 'epss'"),
    ({**CLASSIFICATION, "loss": "cosine", "beta": 0.3},
     r"method: response_kd: loss 'cosine' rejects beta=0.3: cosine\(\) got an unexpected keyword argument 'beta'"),
    ({**CLASSIFICATION, "loss": {"name": "cosine", "temperature": 2.0}},
     r"method: response_kd: loss.temperature: temperature is response_kd's own key; set it beside loss "
     r"\(temperature: 2.0\)"),
    ({**CLASSIFICATION, "loss": {"name": "cosine", "normalizer": 2.0}},
     r"method: response_kd: loss.normalizer: every loss receives normalizer from the method; remove it from loss"),
    ({**CLASSIFICATION, "loss": {"eps": 1.0}},
     r"method: response_kd: loss must be a registered loss's name or a mapping \{name: NAME, option: value, \.\.\.\}"),
    ({**CLASSIFICATION, "loss": "jsd", "beta": 1.5},
     r"method: response_kd: loss 'jsd' rejects beta=1.5: kd_loss: beta must lie in \(0, 1\), got 1.5"),
    ({"name": "dml", "loss": "cosine", "divergence": "forward_kl"},
     r"method: dml: loss and divergence are both set; keep loss \(divergence: NAME is the older spelling of "
     r"loss: NAME for kd_loss's divergences\)"),
    ({**CLASSIFICATION, "divergence": "cosine"},
     r"method: response_kd: divergence 'cosine' is a registered loss, not one of kd_loss's divergences; choose it "
     r"with loss: cosine"),
    ({"name": "llm_kd", "loss": "cosine", "fused": True},
     r"method: llm_kd: fused: true runs only kd_loss's divergences \(forward_kl, .*, tvd\), and loss 'cosine' needs "
     r"the logits; set fused: false or choose a divergence"),
    ({"name": "cached_kd", "loss": "cosine"},
     r"method: cached_kd: loss 'cosine' takes dense teacher logits, but a teacher-logit cache holds top-k "
     r"log-probabilities; choose one of kd_loss's divergences \(forward_kl, "),
], ids=["unknown", "bad-option", "unknown-option", "passed-beta", "method-key", "row-option", "no-name",
        "builtin-option", "loss-and-divergence", "divergence-names-a-loss", "fused", "sparse-teacher"])
def test_bad_choices_are_one_line_config_errors(tmp_path, capsys, cosine_plugin, method, message):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(classification_config(tmp_path / "run", method=method)))
    assert cli.main(["distill", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and re.match(f"kdcore distill: {message}", err), err
    assert not (tmp_path / "run").exists()  # refused before training


@pytest.mark.parametrize("name, extra", [
    ("response_kd", {}), ("ensemble", {}), ("dml", {}), ("born_again", {}), ("llm_kd", {}), ("seq_kd", {}),
    ("gkd", {}), ("takd", {"assistants": [{"model": "mlp"}]}), ("fitnets", {"hints": [["a", "b"]]}),
    ("attention_transfer", {"layers": [["a", "b"]], "kd_weight": 0.5}), ("reasoning_kd", {"answer_marker": "A:"}),
])
def test_every_logit_level_method_takes_a_registered_loss(cosine_plugin, name, extra):
    method = plugins.get_method(name)({"loss": {"name": "cosine", "eps": 1.0e-6}, **extra})
    loss = method.response.loss if hasattr(method, "response") else method.loss
    assert (loss.name, loss.fn, dict(loss.options), loss.divergence) == ("cosine", cosine_plugin.cosine,
                                                                          {"eps": 1.0e-6}, None)


def test_a_loss_for_an_output_term_that_is_off_is_an_error():
    with pytest.raises(ValueError, match=r"attention_transfer: loss shape\(s\) the output term, which is off "
                                         r"\(kd_weight: 0, the default\); set kd_weight > 0"):
        plugins.get_method("attention_transfer")({"layers": [["a", "b"]], "loss": "dkd"})


def test_an_import_path_names_a_loss_too():
    loss = plugins.get_method("response_kd")({"loss": "kdcore.functional:kd_loss"}).response.loss
    assert loss.fn is kdcore.kd_loss and loss.divergence is None  # not a registered divergence: no fused path


def test_loss_and_divergence_name_kd_loss_alike():
    s, t = torch.randn(6, 10, requires_grad=True), torch.randn(6, 10)
    labels = torch.tensor([1, -100, 3, 4, -100, 9])
    ctx = kdcore.StageContext(None, None, 0, torch.device("cpu"), {"student": torch.nn.Identity()})
    ctx.normalizer = 8.0
    terms = [plugins.get_method("response_kd")({key: "jsd", "beta": 0.3, "temperature": 2.0}).losses(
        Batch(s, labels), kdcore.Outputs(s, [t]), ctx) for key in ("loss", "divergence")]
    expected = kdcore.kd_loss(s, t, divergence="jsd", beta=0.3, temperature=2.0, labels=labels, normalizer=8.0)
    torch.testing.assert_close(terms[0]["kd"], expected)
    torch.testing.assert_close(terms[1]["kd"], expected)


def test_llm_kd_weighs_a_registered_loss_and_the_labels(cosine_plugin):
    method = plugins.get_method("llm_kd")({"loss": "cosine", "kd_weight": 0.5, "ce_weight": 0.25, "vocab_size": 6})
    student, teacher = torch.randn(2, 4, 8, requires_grad=True), torch.randn(2, 4, 7)
    labels = torch.tensor([[-100, 2, 5, 1], [-100, -100, 0, 3]])
    ctx = kdcore.StageContext(None, None, 0, torch.device("cpu"), {"student": torch.nn.Identity()})
    ctx.normalizer = 10.0  # this micro-batch holds half of the step's labelled tokens
    kd = method.losses(Batch(student, labels), kdcore.Outputs(student, [teacher]), ctx)["kd"]
    cosine = 1 - torch.nn.functional.cosine_similarity(student[..., :6], teacher[..., :6], dim=-1, eps=1e-8)
    ce = torch.nn.functional.cross_entropy(student[..., :6].reshape(-1, 6), labels.reshape(-1), reduction="sum")
    torch.testing.assert_close(kd, 0.5 * cosine[labels != -100].sum() / 10 + 0.25 * ce / 10)
    kd.backward()
    assert student.grad[labels == -100].abs().sum() == 0 and student.grad[..., 6:].abs().sum() == 0


def test_a_loss_that_raises_in_training_names_its_plugin(tmp_path, cosine_plugin):
    method = {"name": "dml", "loss": {"name": "cosine", "eps": 0.5}}  # its check passes, real batches raise
    fault = (r"^plugin 'cosine' \(kdcore-cosine 1.0\) \(loss 'cosine'\) raised in losses: RuntimeError: cosine broke "
             r"on a training batch")
    with pytest.raises(plugins.PluginFault, match=fault) as caught:
        kdcore.Distiller(classification_config(tmp_path, method=method), console=False).fit()
    assert caught.value.name == "cosine"


def test_reduce_rows_reduces_as_kd_loss():
    s, t = torch.randn(3, 5, 7), torch.randn(3, 5, 7)
    labels = torch.randint(0, 7, (3, 5))
    labels[0, :2] = -100
    for reduction in ("none", "sum", "batchmean"):
        for normalizer in ((None, 4.0) if reduction == "batchmean" else (None,)):
            per_row = kdcore.kd_loss(s, t, labels=labels, reduction="none")
            torch.testing.assert_close(reduce_rows(per_row, labels, reduction=reduction, normalizer=normalizer),
                                       kdcore.kd_loss(s, t, labels=labels, reduction=reduction, normalizer=normalizer))
    assert reduce_rows(torch.ones(2), torch.tensor([-100, -100])) == 0
