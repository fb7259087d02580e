"""The built-in distillation methods, on small synthetic data: each runs through the Distiller and
its mechanics hold (which parameters train, which stages run in which order with which teachers,
how teachers are combined)."""

from __future__ import annotations

import json

import pytest
import torch

import kdcore
from engine_helpers import CLASSES, FEATURES, classification_config, mlp
from kdcore.engine.config import ConfigError
from kdcore_plugins import ensemble, rkd


def cloned(module):
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


class Watch:
    """Keeps, per stage, the models and extra modules at the stage's start and end."""

    def __init__(self):
        self.start, self.end = {}, {}

    def _grab(self, run):
        ctx = run.context
        return {name: cloned(ctx.raw(name)) for name in ctx.models} | {
            name: cloned(ctx.raw(f"module:{name}")) for name in ctx.modules}

    @kdcore.hookimpl
    def kdcore_stage_start(self, run, stage):
        self.start[stage.name] = self._grab(run)

    @kdcore.hookimpl
    def kdcore_stage_end(self, run, stage):
        self.end[stage.name] = self._grab(run)


def changed(a, b):
    return any(not torch.equal(a[k], b[k]) for k in a)


def run(tmp_path, method, teachers=(), **sections):
    watch = Watch()
    config = classification_config(tmp_path, method=method, teachers=list(teachers), **sections)
    distiller = kdcore.Distiller(config, callbacks=[watch])
    metrics = distiller.fit()
    steps = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return distiller, watch, metrics, [s for s in steps if s["event"] == "step"]


def file(tmp_path, path):
    return torch.load(tmp_path / path, weights_only=True)


def test_fitnets_trains_regressors_and_student_not_teacher(tmp_path, teacher):
    _, watch, _, steps = run(tmp_path, {"name": "fitnets", "hints": [["body.1", "body.3"]]}, [teacher])
    start, end = watch.start["fitnets"], watch.end["fitnets"]
    assert changed(start["regressor0"], end["regressor0"]) and changed(start["student"], end["student"])
    assert not changed(start["teacher0"], end["teacher0"])
    assert end["regressor0"]["weight"].shape == (64, 16)  # student width 16 -> teacher width 64
    assert {"hint", "kd", "ce"} <= set(steps[0]) and steps[-1]["hint"] < steps[0]["hint"]


def test_fitnets_two_stage_schedule(tmp_path, teacher):
    _, watch, _, steps = run(tmp_path, {"name": "fitnets", "hints": [["body.1", "body.3"]], "hint_epochs": 1},
                             [teacher])
    assert list(watch.end) == ["hints", "distill"]
    assert {s["stage"] for s in steps if "hint" in s} == {"hints"}
    assert {s["stage"] for s in steps if "kd" in s} == {"distill"}
    assert not changed(watch.end["hints"]["student"], watch.start["distill"]["student"])  # continues


def test_fitnets_bad_layers(tmp_path, teacher):
    config = classification_config(tmp_path, method={"name": "fitnets", "hints": [["body.9", "body.3"]]},
                                   teachers=[teacher])
    with pytest.raises(ValueError, match=r"tap: student has no submodule 'body.9'; it has body, body.0, body.1"):
        kdcore.Distiller(config).fit()
    with pytest.raises(ConfigError, match=r"fitnets: hints must be a non-empty list of \[student_layer, "
                                          r"teacher_layer\] pairs, got 'body.1'"):
        kdcore.Distiller(classification_config(tmp_path, method={"name": "fitnets", "hints": "body.1"},
                                               teachers=[teacher]))


def test_attention_transfer(tmp_path, teacher):
    student = {"model": "mlp", "options": {"in_features": FEATURES, "num_classes": CLASSES, "hidden": [64]}}
    _, watch, _, steps = run(tmp_path, {"name": "attention_transfer", "layers": [["body.1", "body.3"]]}, [teacher],
                             student=student)
    assert {"attention", "ce"} == set(steps[0]) - {"event", "stage", "epoch", "step", "lr", "examples_per_s", "total"}
    assert steps[-1]["attention"] < steps[0]["attention"]
    config = classification_config(tmp_path / "bad", method={"name": "attention_transfer",
                                                             "layers": [["body.1", "body.3"]]}, teachers=[teacher])
    with pytest.raises(ValueError, match=r"attention_transfer: layers \['body.1', 'body.3'\] give attention maps of "
                                         r"16 and 64 positions"):
        kdcore.Distiller(config).fit()


def test_rkd_relations():
    torch.manual_seed(0)
    e = torch.randn(6, 5)
    d = rkd.distances(e)
    assert d[~torch.eye(6, dtype=torch.bool)].mean() == pytest.approx(1.0)
    assert torch.allclose(rkd.distances(3 * e), d, atol=1e-5)  # scale-free
    a = rkd.angles(e)
    j, i, k = 2, 0, 4
    u, v = e[i] - e[j], e[k] - e[j]
    assert a[j, i, k] == pytest.approx(float(u @ v / (u.norm() * v.norm())), rel=1e-5)


def test_rkd_runs_on_logits_and_layers(tmp_path, teacher):
    _, _, _, steps = run(tmp_path / "logits", {"name": "rkd"}, [teacher])
    assert {"distance", "angle", "ce"} <= set(steps[0])
    _, _, _, steps = run(tmp_path / "layers", {"name": "rkd", "student_layer": "body.1", "teacher_layer": "body.3"},
                         [teacher])
    assert steps[-1]["distance"] < steps[0]["distance"]


def test_byot_exits_train(tmp_path):
    student = {"model": "mlp", "options": {"in_features": FEATURES, "num_classes": CLASSES, "hidden": [32, 32]}}
    _, watch, metrics, steps = run(tmp_path, {"name": "byot", "exits": ["body.1"], "feature_layer": "body.3"},
                                   student=student)
    start, end = watch.start["byot"], watch.end["byot"]
    assert set(start) == {"student", "exit0"} and changed(start["exit0"], end["exit0"])
    assert {"ce", "exit_ce", "exit_kd", "exit_hint"} <= set(steps[0])
    assert "teacher_agreement" not in metrics  # no teacher


def test_pskd_snapshot_is_the_previous_epoch(tmp_path):
    at_epoch_end = {}

    class EpochEnd:
        @kdcore.hookimpl
        def kdcore_epoch_end(self, run, epoch):
            at_epoch_end[epoch] = cloned(run.context.raw("student"))

    watch = Watch()
    config = classification_config(tmp_path, method={"name": "pskd", "alpha": 0.8}, training={"epochs": 3})
    kdcore.Distiller(config, callbacks=[watch, EpochEnd()]).fit()
    snapshot = watch.end["pskd"]["snapshot"]
    assert int(snapshot["epoch"]) == 2
    weights = {k[len("model."):]: v for k, v in snapshot.items() if k.startswith("model.")}
    assert not changed(weights, at_epoch_end[1])


def test_born_again_generations(tmp_path, teacher):
    started = {}

    class AtStart:
        @kdcore.hookimpl
        def kdcore_stage_start(self, run, stage):
            started[stage.name] = [cloned(t) for t in run.context.teachers]

    config = classification_config(tmp_path, method={"name": "born_again", "generations": 3, "ensemble": True},
                                   teachers=[teacher], training={"epochs": 1})
    distiller = kdcore.Distiller(config, callbacks=[AtStart()])
    assert [s.name for s in distiller.stages] == ["gen1", "gen2", "gen3"]
    distiller.fit()
    assert [len(started[g]) for g in ("gen1", "gen2", "gen3")] == [1, 2, 3]
    assert not changed(started["gen3"][2], file(tmp_path, "stages/1-gen2/student.pt"))  # k-1 loads from its file
    assert not changed(started["gen2"][1], file(tmp_path, "stages/0-gen1/student.pt"))
    plain = kdcore.Distiller(classification_config(tmp_path / "plain", method={"name": "born_again"}))
    assert [s.teachers for s in plain.stages] == [[], ["previous"]]  # no teacher: gen1 learns from labels


def test_takd_chain(tmp_path, teacher):
    assistant = mlp([32])
    started = {}

    class AtStart:
        @kdcore.hookimpl
        def kdcore_stage_start(self, run, stage):
            ctx = run.context
            started[stage.name] = (cloned(ctx.raw("student")), cloned(ctx.raw("teacher0")))

    config = classification_config(tmp_path, method={"name": "takd", "assistants": [assistant]}, teachers=[teacher],
                                   training={"epochs": 1})
    kdcore.Distiller(config, callbacks=[AtStart()]).fit()
    assert list(started) == ["assistant1", "student"]
    assert started["assistant1"][0]["body.0.weight"].shape == (32, FEATURES)
    assert not changed(started["student"][1], file(tmp_path, "stages/0-assistant1/student.pt"))
    assert file(tmp_path, "student.pt")["body.0.weight"].shape == (16, FEATURES)
    with pytest.raises(ConfigError, match="takd: the chain starts from a teacher"):
        kdcore.Distiller(classification_config(tmp_path / "x", method={"name": "takd", "assistants": [assistant]}))


def test_ensemble_combinations():
    torch.manual_seed(0)
    teachers = [torch.randn(5, 7), torch.randn(5, 7)]
    fixed = ensemble.Ensemble({"weights": [3, 1]})
    w = fixed.teacher_weights(teachers, [1.0, 1.0])
    assert torch.allclose(w, torch.tensor([0.75, 0.25]))
    mixture = 0.75 * (teachers[0] / 2).softmax(-1) + 0.25 * (teachers[1] / 4).softmax(-1)
    combined = fixed.combined(teachers, 3.0, [2.0, 4.0])
    assert torch.allclose((combined / 3.0).softmax(-1), mixture, atol=1e-6)
    confident = ensemble.Ensemble({"weights": "confidence"}).teacher_weights(teachers, [1.0, 1.0])
    assert confident.shape == (5, 2) and torch.allclose(confident.sum(-1), torch.ones(5))
    top = torch.stack([t.softmax(-1).amax(-1) for t in teachers], -1)
    assert torch.equal(confident.argmax(-1), top.argmax(-1))
    logit = ensemble.Ensemble({"space": "logit"}).combined(teachers, 1.0, [1.0, 1.0])
    assert torch.allclose(logit, (teachers[0] + teachers[1]) / 2)


def test_ensemble_runs_and_checks_its_config(tmp_path, teacher):
    second = {**teacher, "options": dict(teacher["options"])}
    _, watch, metrics, _ = run(tmp_path, {"name": "ensemble", "weights": "confidence", "temperatures": [2.0, 4.0]},
                               [teacher, second])
    assert {"teacher0_accuracy", "teacher1_accuracy", "teacher_agreement"} <= set(metrics)
    with pytest.raises(ConfigError, match=r"ensemble: weights has 3 entries for 2 teachers"):
        kdcore.Distiller(classification_config(tmp_path / "x", method={"name": "ensemble", "weights": [1, 1, 1]},
                                               teachers=[teacher, second]))


def test_dml_trains_both_peers(tmp_path):
    _, watch, metrics, steps = run(tmp_path, {"name": "dml"})
    start, end = watch.start["dml"], watch.end["dml"]
    assert changed(start["student"], end["student"]) and changed(start["teacher0"], end["teacher0"])
    assert {"kd", "ce", "peer_kd", "peer_ce"} <= set(steps[0])
    assert "teacher_agreement" in metrics and "teacher_accuracy" not in metrics  # a trained peer is not scored once
    assert not changed(end["teacher0"], file(tmp_path, "stages/0-dml/teacher0.pt"))


def test_every_method_is_a_registered_plugin():
    methods = kdcore.plugins.host().methods
    assert {"supervised", "response_kd", "dkd", "fitnets", "attention_transfer", "rkd", "byot", "pskd", "born_again",
            "takd", "ensemble", "dml"} <= set(methods.names())
    assert all(methods.entry(name).plugin == f"kdcore.{name}" for name in ("fitnets", "dml", "takd"))


def test_feature_methods_on_spatial_maps(tmp_path):
    """FitNets' 1x1-convolution regressor and attention maps over space, on digits as 8x8 images."""
    data = {"dataset": "digits", "options": {"images": True, "train_fraction": 0.2}, "batch_size": 32}

    def cnn(channels, checkpoint=None):
        spec = {"model": "cnn", "options": {"num_classes": 10, "channels": channels}}
        return {**spec, "checkpoint": str(checkpoint)} if checkpoint else spec

    kdcore.Distiller(classification_config(tmp_path / "teacher", method={"name": "supervised"}, student=cnn([16, 16]),
                                           data=data, training={"epochs": 1})).fit()
    teacher = cnn([16, 16], tmp_path / "teacher" / "student.pt")
    _, watch, _, steps = run(tmp_path / "fitnets", {"name": "fitnets", "hints": [["blocks.1", "blocks.1"]]}, [teacher],
                             student=cnn([8, 8]), data=data, training={"epochs": 1})
    regressor = watch.end["fitnets"]["regressor0"]
    assert regressor["weight"].shape == (16, 8, 1, 1)  # a 1x1 convolution from 8 to 16 channels
    _, _, _, steps = run(tmp_path / "at", {"name": "attention_transfer", "layers": [["blocks.0", "blocks.0"]]},
                         [teacher], student=cnn([8, 8]), data=data, training={"epochs": 2})
    assert steps[-1]["attention"] < steps[0]["attention"]


@pytest.mark.parametrize("method", ["supervised", "pskd", "dml"])
def test_teacherless_methods_refuse_config_teachers(tmp_path, teacher, method):
    with pytest.raises(ConfigError, match=rf"method: {method} trains without a teacher, but the run config lists 1; "
                                          r"remove them \(teachers: \[\]\)"):
        kdcore.Distiller(classification_config(tmp_path, method={"name": method}, teachers=[teacher]))


def test_fitnets_on_sequences(tmp_path):
    """Hints between language models: [N, L, D] features, a linear regressor over D."""
    from engine_helpers import lm_config

    kdcore.Distiller(lm_config(tmp_path / "teacher", method={"name": "supervised"}, training={"epochs": 1},
                               student={"model": "tiny_lm", "options": {"vocab_size": 64, "dim": 32}})).fit()
    teacher = {"model": "tiny_lm", "options": {"vocab_size": 64, "dim": 32},
               "checkpoint": str(tmp_path / "teacher" / "student.pt")}
    watch = Watch()
    config = lm_config(tmp_path / "kd", method={"name": "fitnets", "hints": [["block", "block"]]}, teachers=[teacher],
                       training={"epochs": 1})
    kdcore.Distiller(config, callbacks=[watch]).fit()
    assert watch.end["fitnets"]["regressor0"]["weight"].shape == (32, 16)  # student dim 16 -> teacher dim 32


def test_byot_exit_kd_is_not_t2_scaled_unless_asked(tmp_path):
    """The authors' exit term has no T² (plugins/byot.py); ``t2_scale: true`` multiplies it by T² = 9
    at the default T = 3. The first step runs the same initial models on the same batch."""
    student = {"model": "mlp", "options": {"in_features": FEATURES, "num_classes": CLASSES, "hidden": [32, 32]}}
    method = {"name": "byot", "exits": ["body.1"]}
    _, _, _, plain = run(tmp_path / "plain", method, student=student, training={"epochs": 1})
    _, _, _, scaled = run(tmp_path / "t2", {**method, "t2_scale": True}, student=student, training={"epochs": 1})
    assert scaled[0]["exit_kd"] == pytest.approx(9 * plain[0]["exit_kd"], rel=1e-5)
    with pytest.raises(ConfigError, match=r"method: byot: t2_scale must be true or false, got 'yes'"):
        kdcore.Distiller(classification_config(tmp_path / "x", method={**method, "t2_scale": "yes"}))


def test_pskd_alpha_reaches_alpha_T_in_the_last_epoch(tmp_path, monkeypatch):
    """α_t = α_T (t + 1) / T with t from 0, as in the authors' code; the first epoch trains on the
    labels alone (there is no earlier model yet)."""
    from kdcore_plugins import pskd

    method = pskd.ProgressiveSelfKD({"alpha": 0.8})
    assert method.alpha_at(0, 4) == pytest.approx(0.2) and method.alpha_at(3, 4) == pytest.approx(0.8)
    used = {}
    schedule = pskd.ProgressiveSelfKD.alpha_at

    def spy(self, epoch, epochs):
        used[epoch] = schedule(self, epoch, epochs)
        return used[epoch]

    monkeypatch.setattr(pskd.ProgressiveSelfKD, "alpha_at", spy)
    kdcore.Distiller(classification_config(tmp_path, method={"name": "pskd", "alpha": 0.8},
                                           training={"epochs": 3})).fit()
    assert used == pytest.approx({1: 0.8 * 2 / 3, 2: 0.8})


DIGITS = {"dataset": "digits", "options": {"train_fraction": 0.3}, "batch_size": 32}


def digits_mlp(hidden, checkpoint=None):
    spec = {"model": "mlp", "options": {"in_features": 64, "num_classes": 10, "hidden": hidden}}
    return {**spec, "checkpoint": str(checkpoint)} if checkpoint else spec


def test_dkd_on_digits(tmp_path, monkeypatch):
    """DKD from a digits teacher: the student trains, the teacher does not, and the KD term is
    kdcore.dkd_loss ramped in over ``warmup`` epochs as the authors do (1/2 in the first of 2)."""
    kdcore.Distiller(classification_config(tmp_path / "teacher", method={"name": "supervised"},
                                           student=digits_mlp([64]), data=DIGITS, training={"epochs": 3})).fit()
    computed = []
    dkd_loss = kdcore.dkd_loss

    def spy(*args, **kwargs):
        loss = dkd_loss(*args, **kwargs)
        computed.append(loss.item())
        return loss

    monkeypatch.setattr(kdcore, "dkd_loss", spy)
    _, watch, metrics, steps = run(tmp_path / "dkd", {"name": "dkd", "beta": 2.0, "warmup": 2},
                                   [digits_mlp([64], tmp_path / "teacher" / "student.pt")],
                                   student=digits_mlp([16]), data=DIGITS, training={"epochs": 2},
                                   optimizer={"name": "sgd", "lr": 0.05})
    start, end = watch.start["dkd"], watch.end["dkd"]
    assert changed(start["student"], end["student"]) and not changed(start["teacher0"], end["teacher0"])
    assert {"kd", "ce"} <= set(steps[0]) and len(computed) == len(steps)
    ramp = [0.5 if step["epoch"] == 0 else 1.0 for step in steps]
    assert [step["kd"] for step in steps] == pytest.approx([r * c for r, c in zip(ramp, computed)], rel=1e-6)
    assert metrics["accuracy"] > 0.3 and "teacher_agreement" in metrics  # ten classes: chance is 0.1


@pytest.mark.parametrize("options, pattern", [
    ({"beta": -1}, r"method: dkd: beta must be a non-negative number, got -1"),
    ({"temperature": 0}, r"method: dkd: temperature must be a positive number, got 0"),
    ({"warmup": 2.5}, r"method: dkd: warmup must be a whole number of epochs >= 0, got 2.5"),
    ({"gamma": 1}, r"method: dkd: unknown config keys \['gamma'\]; it takes alpha, beta, ce_weight, temperature, "
                   r"warmup"),
])
def test_dkd_config_errors(tmp_path, teacher, options, pattern):
    with pytest.raises(ConfigError, match=pattern):
        kdcore.Distiller(classification_config(tmp_path, method={"name": "dkd", **options}, teachers=[teacher]))


def test_dkd_warns_when_its_ramp_outlasts_the_run(tmp_path, teacher):
    config = classification_config(tmp_path, method={"name": "dkd", "warmup": 5}, teachers=[teacher])
    config["training"] = {**config.get("training", {}), "epochs": 2}
    with pytest.warns(UserWarning, match=r"dkd: warmup is 5 epochs but the run trains 2: the KD term never reaches "
                                         r"its full weight \(at most 2/5 of it\)"):
        kdcore.Distiller(config)
