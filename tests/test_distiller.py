"""The Distiller on small CPU runs: stages, frozen and trained teachers, the method's context,
gradient accumulation, metrics and logs, lifecycle hooks and failure handling. Checkpoints and
resume are in test_resume.py, multi-process runs in test_ddp.py."""

from __future__ import annotations

import json
import math

import pytest
import torch

import kdcore
from engine_helpers import classification_config, lm_config
from kdcore import plugins
from kdcore.engine.config import ConfigError


def events(directory, kind=None):
    records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if kind is None or r["event"] == kind]


def weights(path):
    return torch.load(path, weights_only=True)


def assert_same_weights(a, b, **tolerance):
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], **tolerance)


def cloned(module):
    return {key: value.detach().clone() for key, value in module.state_dict().items()}


class AtStageEnd:
    """Keeps each stage's models and extra modules as they are when the stage ends."""

    def __init__(self):
        self.stages = {}

    @kdcore.hookimpl
    def kdcore_stage_end(self, run, stage):
        ctx = run.context
        self.stages[stage.name] = {name: cloned(ctx.raw(name)) for name in ctx.models} | {
            f"module:{name}": cloned(ctx.raw(f"module:{name}")) for name in ctx.modules}


def test_response_kd_run_reports_and_saves(tmp_path, teacher):
    config = classification_config(tmp_path, method={"name": "response_kd", "temperature": 2.0}, teachers=[teacher],
                                   scheduler={"name": "cosine", "warmup_steps": 2})
    run = kdcore.Distiller(config)
    metrics = run.fit()
    assert set(metrics) == {"accuracy", "nll", "ece", "teacher_agreement", "kl_to_teacher", "teacher_accuracy",
                            "teacher_nll", "teacher_ece"}
    assert 0 <= metrics["ece"] <= 1 and metrics["kl_to_teacher"] > 0 and 0 <= metrics["teacher_agreement"] <= 1
    assert [e["event"] for e in events(tmp_path) if e["event"] != "step"] == [
        "teacher_eval", "eval", "eval", "stage_end", "run_end"]
    steps = events(tmp_path, "step")
    assert [s["step"] for s in steps] == list(range(16))  # 256 // 32 = 8 steps per epoch, 2 epochs
    assert all({"kd", "ce", "total", "lr", "examples_per_s"} <= set(s) for s in steps)
    assert steps[0]["total"] == pytest.approx(0.9 * steps[0]["kd"] + 0.1 * steps[0]["ce"], rel=1e-5)
    assert steps[0]["lr"] == pytest.approx(0.1) and steps[-1]["lr"] < 0.01  # warm-up done, cosine decayed
    assert events(tmp_path, "run_end")[0]["metrics"] == metrics
    assert_same_weights(weights(tmp_path / "student.pt"), run.student.state_dict())
    assert_same_weights(weights(tmp_path / "stages" / "0-response_kd" / "student.pt"), run.student.state_dict())
    assert run.evaluate() == pytest.approx(metrics)


def test_teacher_is_frozen_and_the_method_context_works(tmp_path, teacher):
    config = classification_config(tmp_path, method={"name": "engine_helpers:Probe"}, teachers=[teacher])
    at_end = AtStageEnd()
    initial = {}

    class AtStart:
        @kdcore.hookimpl
        def kdcore_stage_start(self, run):
            initial.update({name: cloned(module) for name, module in run.context.modules.items()})

    run = kdcore.Distiller(config, callbacks=[at_end, AtStart()])
    run.fit()
    seen = run.method.seen
    assert len(seen) == 16
    assert not any(s["teacher_training"] or s["teacher_grad"] for s in seen)
    assert all(s["student_training"] and s["features"] == ["student.body.1", "teacher0.body.1"] for s in seen)
    assert all(s["normalizer"] == 32 for s in seen)
    final = at_end.stages["probe"]
    assert_same_weights(final["teacher0"], weights(teacher["checkpoint"]))  # frozen
    assert_same_weights(final["module:frozen"], initial["frozen"])
    assert not torch.equal(final["module:regressor"]["weight"], initial["regressor"]["weight"])  # trained
    assert {"hint", "ce"} <= set(events(tmp_path, "step")[0])


def test_mutual_learning_trains_the_teacher_and_saves_it(tmp_path, teacher):
    at_end = AtStageEnd()
    config = classification_config(tmp_path, method={"name": "engine_helpers:Mutual"}, teachers=[teacher],
                                   training={"epochs": 1})
    kdcore.Distiller(config, callbacks=[at_end]).fit()
    peer = at_end.stages["mutual"]["teacher0"]
    assert not torch.equal(peer["head.weight"], weights(teacher["checkpoint"])["head.weight"])
    assert_same_weights(weights(tmp_path / "stages" / "0-mutual" / "teacher0.pt"), peer)


def test_stages_run_in_order_and_previous_is_the_last_student(tmp_path, teacher):
    seen = {}

    class AtStart:
        @kdcore.hookimpl
        def kdcore_stage_start(self, run, stage):
            seen[stage.name] = {name: cloned(run.context.raw(name)) for name in run.context.models}

    config = classification_config(tmp_path, method={"name": "engine_helpers:TwoStage"}, teachers=[teacher],
                                   training={"epochs": 1})
    run = kdcore.Distiller(config, callbacks=[AtStart()])
    run.fit()
    assert [e["stage"] for e in events(tmp_path, "stage_end")] == ["first", "second"]
    assert_same_weights(seen["first"]["teacher0"], weights(teacher["checkpoint"]))
    assert_same_weights(seen["second"]["teacher0"], weights(tmp_path / "stages" / "0-first" / "student.pt"))
    assert_same_weights(weights(tmp_path / "student.pt"), weights(tmp_path / "stages" / "1-second" / "student.pt"))
    # each distinct teacher is scored once: the config's in stage one, the first student in stage two
    assert [(e["stage"], e["teacher"]) for e in events(tmp_path, "teacher_eval")] == [("first", 0), ("second", 0)]


def test_lifecycle_hooks_fire_in_order_for_registered_callbacks(tmp_path, teacher):
    calls = []

    class Recorder:
        def __init__(self, options):
            self.tag = options.get("tag", "")

        @kdcore.hookimpl
        def kdcore_run_start(self):
            calls.append(f"run_start {self.tag}")  # the config entry's options reach the factory

        @kdcore.hookimpl
        def kdcore_stage_start(self, stage):
            calls.append(f"stage_start {stage.name}")

        @kdcore.hookimpl
        def kdcore_epoch_start(self, epoch):
            calls.append(f"epoch_start {epoch}")

        @kdcore.hookimpl
        def kdcore_step_end(self, step, losses):
            assert set(losses) == {"kd", "ce", "total"} and all(isinstance(v, float) for v in losses.values())
            calls.append(f"step {step}")

        @kdcore.hookimpl
        def kdcore_evaluated(self, epoch, metrics):
            assert "accuracy" in metrics
            calls.append(f"evaluated {epoch}")

        @kdcore.hookimpl
        def kdcore_epoch_end(self, run, epoch):
            assert torch.load(run.checkpoint_path, weights_only=True)["stage_state"]["epoch"] == epoch + 1
            calls.append(f"epoch_end {epoch}")

        @kdcore.hookimpl
        def kdcore_stage_end(self, stage):
            calls.append(f"stage_end {stage.name}")

        @kdcore.hookimpl
        def kdcore_run_end(self, metrics):
            calls.append(f"run_end {sorted(metrics)[:1]}")

    class Provider:
        @kdcore.hookimpl
        def kdcore_register_callbacks(self, register):
            register("recorder", Recorder)

    host = plugins.host()
    host.register(Provider(), name="tests.recorder")
    try:
        config = classification_config(tmp_path, method={"name": "response_kd"}, teachers=[teacher],
                                       callbacks=[{"name": "recorder", "tag": "x"}],
                                       data={"dataset": "synthetic_classification", "batch_size": 128})
        kdcore.Distiller(config).fit()
    finally:
        host.unregister("tests.recorder")
    assert calls == ["run_start x", "stage_start response_kd",
                     "epoch_start 0", "step 0", "step 1", "evaluated 0", "epoch_end 0",
                     "epoch_start 1", "step 2", "step 3", "evaluated 1", "epoch_end 1",
                     "stage_end response_kd", "run_end ['accuracy']"]


@pytest.mark.parametrize("make", ["classification", "language_modeling"])
def test_gradient_accumulation_gives_the_full_batch_step(tmp_path, teacher, make):
    """The same global batch cut into 4 micro-batches trains to the same weights; for language
    modeling the micro-batches hold different numbers of kept tokens, so only a normalizer
    counted over the whole step gets this right."""

    def trained(accum):
        directory = tmp_path / str(accum)
        if make == "classification":
            config = classification_config(directory, method={"name": "response_kd"}, teachers=[teacher],
                                           training={"epochs": 1, "grad_accum": accum})
        else:
            config = lm_config(directory, method={"name": "supervised"}, training={"epochs": 1, "grad_accum": accum},
                               optimizer={"name": "sgd", "lr": 0.5})
        kdcore.Distiller(config).fit()
        return weights(directory / "student.pt"), events(directory, "step")

    (full, full_steps), (accumulated, accumulated_steps) = trained(1), trained(4)
    assert_same_weights(full, accumulated, rtol=1e-4, atol=1e-5)
    for a, b in zip(full_steps, accumulated_steps):
        assert a["total"] == pytest.approx(b["total"], rel=1e-4)


def test_language_modeling_metrics(tmp_path):
    config = lm_config(tmp_path, method={"name": "supervised"})
    metrics = kdcore.Distiller(config).fit()
    assert set(metrics) == {"token_accuracy", "perplexity", "nll", "ece"}
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["nll"]))
    assert metrics["token_accuracy"] > 0.2  # a 64-token chain with 3 likely successors; chance is 1/64


def test_bf16_autocast_trains(tmp_path, teacher):
    config = classification_config(tmp_path, method={"name": "response_kd"}, teachers=[teacher],
                                   training={"precision": "bf16", "epochs": 1})
    metrics = kdcore.Distiller(config).fit()
    assert all(math.isfinite(v) for v in metrics.values())
    steps = events(tmp_path, "step")
    assert steps[-1]["kd"] < steps[0]["kd"]


def test_loss_weights_override_the_method(tmp_path, teacher):
    config = classification_config(tmp_path, method={"name": "response_kd"}, teachers=[teacher],
                                   training={"epochs": 1, "loss_weights": {"ce": 0.0, "kd": 2.0}})
    kdcore.Distiller(config).fit()
    step = events(tmp_path, "step")[0]
    assert step["total"] == pytest.approx(2.0 * step["kd"], rel=1e-5)
    bad = classification_config(tmp_path / "bad", method={"name": "response_kd"}, teachers=[teacher],
                                training={"loss_weights": {"kdd": 1.0}})
    with pytest.raises(ConfigError, match=r"training.loss_weights: \['kdd'\] are not loss terms of method "
                                          r"'response_kd' \(its terms: ce, kd\)"):
        kdcore.Distiller(bad).fit()


class NanAtStep3(kdcore.Method):
    def losses(self, batch, outputs, ctx):
        loss = outputs.student.float().logsumexp(-1).sum() / ctx.normalizer
        return {"bad": loss * (float("nan") if ctx.step == 3 else 1.0)}


class NoTerms(kdcore.Method):
    def losses(self, batch, outputs, ctx):
        return outputs.student.sum()


class Detached(kdcore.Method):
    def losses(self, batch, outputs, ctx):
        return {"x": outputs.student.detach().sum()}


@pytest.mark.parametrize("method, error, match", [
    ("test_distiller:NanAtStep3", FloatingPointError,
     r"stage 'method' step 3: loss terms \['bad', 'total'\] are not finite .* no checkpoint was written yet"),
    ("test_distiller:NoTerms", TypeError, r"NoTerms.losses must return a non-empty dict of named loss terms, got Tensor"),
    ("test_distiller:Detached", RuntimeError, r"its loss terms \['x'\] do not depend on any trained parameter"),
])
def test_bad_losses_stop_the_run(tmp_path, method, error, match):
    config = classification_config(tmp_path, method={"name": method})
    with pytest.raises(error, match=match):
        kdcore.Distiller(config).fit()


def test_batching_errors(tmp_path):
    config = classification_config(tmp_path, method={"name": "supervised"}, training={"grad_accum": 3})
    with pytest.raises(ConfigError, match=r"data.batch_size: 32 examples per step must split evenly into "
                                          r"training.grad_accum \(3\) micro-batches on each of 1 processes"):
        kdcore.Distiller(config).fit()
    config = classification_config(tmp_path, method={"name": "supervised"},
                                   data={"dataset": "synthetic_classification", "batch_size": 512})
    with pytest.raises(ConfigError, match=r"data.batch_size: 512 is larger than the training split \(256 examples\)"):
        kdcore.Distiller(config).fit()


def test_a_non_finite_step_leaves_the_weights_alone(tmp_path):
    before = {}

    class AtStep2:
        @kdcore.hookimpl
        def kdcore_step_end(self, run, step):
            if step == 2:
                before.update(cloned(run.student))

    config = classification_config(tmp_path, method={"name": "test_distiller:NanAtStep3"})
    run = kdcore.Distiller(config, callbacks=[AtStep2()])
    with pytest.raises(FloatingPointError):
        run.fit()
    assert_same_weights(cloned(run.student), before)
