"""``training.parallel: fsdp``: models sharded with FSDP2, checkpoints written by shards through
``torch.distributed.checkpoint``. These tests run one process (a process group of its own); the
multi-process ones (FSDP against DDP, SIGKILL and resume on another process count) are in
test_fsdp_processes.py."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import kdcore
from engine_helpers import Crash, CrashAfterStep, classification_config, gpt2_spec, text_config
from kdcore.engine.config import ConfigError
from kdcore.engine.rundir import RunDirectoryError

pytest.importorskip("torch.distributed.fsdp")


def sharded_config(directory, teacher, **sections):
    """A two-epoch run with extra trainable modules (FitNets regressors), checkpoints every 3 steps,
    dropout (so RNG states matter) and a scheduler, sharded per Linear block."""
    return classification_config(
        directory, method={"name": "fitnets", "hints": [["body.1", "body.3"]]}, teachers=[teacher],
        student={"model": "mlp", "options": {"in_features": 16, "num_classes": 4, "hidden": [16], "dropout": 0.2}},
        optimizer={"name": "adamw", "lr": 0.01}, scheduler={"name": "cosine"}, checkpoint={"every_steps": 3},
        training={"epochs": 2, "log_every": 1, "parallel": "fsdp", "fsdp": {"shard_modules": ["Linear"]}},
        seed=7, **sections)


def events(directory):
    records = [json.loads(line) for line in (directory / "metrics.jsonl").read_text().splitlines()]
    for record in records:  # what measures time differs from run to run
        record.pop("examples_per_s", None)
        record.pop("seconds", None)
    return records


def weights(path):
    return torch.load(path, weights_only=True)


@pytest.fixture(scope="module")
def sharded_reference(tmp_path_factory, teacher):
    directory = tmp_path_factory.mktemp("sharded")
    metrics = kdcore.Distiller(sharded_config(directory, teacher), console=False).fit()
    return directory, metrics


def assert_same_run(directory, metrics, reference):
    ref_dir, ref_metrics = reference
    assert metrics == ref_metrics
    assert events(directory) == events(ref_dir)
    ours, theirs = weights(directory / "student.pt"), weights(ref_dir / "student.pt")
    assert ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_a_sharded_run_trains_as_an_unsharded_one(tmp_path, teacher, sharded_reference):
    """One process holds every shard: the same updates as without FSDP, and plain output files."""
    config = sharded_config(tmp_path, teacher)
    config["training"] = {"epochs": 2, "log_every": 1}
    plain = kdcore.Distiller(config, console=False).fit()
    directory, sharded = sharded_reference
    assert sharded.keys() == plain.keys()
    for key in plain:
        assert sharded[key] == pytest.approx(plain[key], rel=1e-5, abs=1e-6), key
    ours, theirs = weights(directory / "student.pt"), weights(tmp_path / "student.pt")
    assert ours.keys() == theirs.keys()
    for key in ours:
        assert type(ours[key]) is torch.Tensor  # whole tensors, loadable without torch.distributed
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)


def test_sharded_checkpoints_name_their_shards_and_keep_two(sharded_reference):
    directory, _ = sharded_reference
    latest = torch.load(directory / "checkpoint.pt", weights_only=True)
    previous = torch.load(directory / "checkpoint.previous.pt", weights_only=True)
    assert latest["stage_state"] is None  # the stage's end
    assert set(previous["stage_state"]) == {"epoch", "step", "shards", "shard_files", "scheduler"}  # no model state
    assert sorted(p.name for p in (directory / "shards").iterdir()) == [previous["stage_state"]["shards"]]
    assert (directory / "shards" / previous["stage_state"]["shards"] / ".metadata").is_file()


@pytest.mark.parametrize("step", [4, 11])  # mid first epoch after a checkpoint; second epoch
def test_a_crashed_sharded_run_resumes_exactly(tmp_path, teacher, sharded_reference, step):
    config = sharded_config(tmp_path, teacher)
    with pytest.raises(Crash):
        kdcore.Distiller(config, callbacks=[CrashAfterStep(step)], console=False).fit()
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    named = {saved["stage_state"]["shards"]}
    previous = tmp_path / "checkpoint.previous.pt"
    if previous.exists():
        named.add(torch.load(previous, weights_only=True)["stage_state"]["shards"])
    assert {p.name for p in (tmp_path / "shards").iterdir()} == named  # older shards were removed
    metrics = kdcore.Distiller(config, console=False).fit(resume=True)
    assert_same_run(tmp_path, metrics, sharded_reference)


def _cut(path):
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path):
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle: middle + 64] = bytes(b ^ 0xFF for b in data[middle: middle + 64])
    path.write_bytes(bytes(data))


DAMAGE = {  # what can happen to a shard directory after it was written, and what the warning says
    "metadata lost": (lambda d: (d / ".metadata").unlink(), "its metadata file is missing"),
    "shard lost": (lambda d: (d / "__0_0.distcp").unlink(), "__0_0.distcp is missing"),
    "shard cut": (lambda d: _cut(d / "__0_0.distcp"), r"__0_0.distcp has \d+ bytes, not the \d+ written"),
    "bytes changed": (lambda d: _flip(d / "__0_0.distcp"), "__0_0.distcp does not hold the bytes written"),
    "metadata changed": (lambda d: _flip(d / ".metadata"), ".metadata does not hold the bytes written"),
}


@pytest.mark.parametrize("damage", DAMAGE)
def test_damaged_shards_fall_back_to_the_previous_checkpoint(tmp_path, teacher, sharded_reference, damage):
    config = sharded_config(tmp_path, teacher)
    with pytest.raises(Crash):
        kdcore.Distiller(config, callbacks=[CrashAfterStep(8)], console=False).fit()
    latest = torch.load(tmp_path / "checkpoint.pt", weights_only=True)["stage_state"]["shards"]
    harm, said = DAMAGE[damage]
    harm(tmp_path / "shards" / latest)
    with pytest.warns(RuntimeWarning, match=f"missing or incomplete: {said}.*resuming from the checkpoint before it"):
        metrics = kdcore.Distiller(config, console=False).fit(resume=True)
    assert_same_run(tmp_path, metrics, sharded_reference)


def test_both_checkpoints_damaged_is_one_error(tmp_path, teacher):
    config = sharded_config(tmp_path, teacher)
    with pytest.raises(Crash):
        kdcore.Distiller(config, callbacks=[CrashAfterStep(8)], console=False).fit()
    for shards in (tmp_path / "shards").iterdir():
        _cut(shards / "__0_0.distcp")
    with pytest.raises(RunDirectoryError, match=r"cannot resume .*__0_0.distcp has \d+ bytes.*; .*__0_0.distcp has"):
        kdcore.Distiller(config, console=False).fit(resume=True)


def test_resume_with_every_shard_gone_says_so(tmp_path, teacher):
    config = sharded_config(tmp_path, teacher)
    with pytest.raises(Crash):
        kdcore.Distiller(config, callbacks=[CrashAfterStep(8)], console=False).fit()
    shutil.rmtree(tmp_path / "shards")
    with pytest.raises(RunDirectoryError, match=r"cannot resume .*shards/0-\d-\d, which are missing or incomplete"):
        kdcore.Distiller(config, console=False).fit(resume=True)


def test_sharding_options_are_checked(tmp_path, teacher):
    config = sharded_config(tmp_path / "a", teacher)
    config["training"]["fsdp"] = {"shard_modules": ["TransformerBlok"]}
    with pytest.raises(ConfigError, match="training.fsdp.shard_modules: TransformerBlok is no module class "
                                          r"\(misspelled\?\); this stage's models have .*Linear"):
        kdcore.Distiller(config, console=False).fit()
    # a module class this stage's models lack (another stage's, say) is no error
    config["training"]["fsdp"] = {"shard_modules": ["Linear", "BatchNorm1d"]}
    config["training"]["epochs"] = 1
    config["output_dir"] = str(tmp_path / "b")
    kdcore.Distiller(config, console=False).fit()
    config["training"] = {"epochs": 1, "fsdp": {"mixed_precision": "bf16"}}
    with pytest.raises(ConfigError, match="training.fsdp sets FSDP options, but training.parallel is 'ddp'"):
        kdcore.Distiller(config, console=False)


def test_a_sharded_run_resumes_only_sharded(tmp_path, teacher):
    config = sharded_config(tmp_path, teacher)
    with pytest.raises(Crash):
        kdcore.Distiller(config, callbacks=[CrashAfterStep(4)], console=False).fit()
    config["training"] = {"epochs": 2, "log_every": 1}
    with pytest.raises(ConfigError, match="the config differs .* at training.fsdp, training.parallel"):
        kdcore.Distiller(config, console=False).fit(resume=True)


@pytest.mark.parametrize("mixed_precision", ["fp32", "bf16"])
def test_fused_lm_head_loss_under_fsdp_equals_the_unfused_one(tmp_path, mixed_precision):
    """llm_kd's fused loss reads the LM heads of sharded models (gathered with their roots)."""
    pytest.importorskip("transformers")
    first_losses = {}
    for fused in (True, False):
        config = text_config(tmp_path / str(fused), teachers=[{**gpt2_spec(layers=2), "pretrained": True}],
                             method={"name": "llm_kd", "fused": fused, "divergence": "jsd", "ce_weight": 0.5},
                             max_bytes=600, training={"epochs": 1, "log_every": 1, "parallel": "fsdp",
                                                      "fsdp": {"mixed_precision": mixed_precision}})
        kdcore.Distiller(config, console=False).fit()
        first_losses[fused] = [e for e in events(tmp_path / str(fused)) if e["event"] == "step"][0]
    tolerance = 1e-5 if mixed_precision == "fp32" else 2e-2
    terms = set(first_losses[False]) - {"event", "stage", "epoch", "step", "lr", "examples_per_s"}
    assert terms and set(first_losses[True]) - {"examples_per_s"} == terms | {"event", "stage", "epoch", "step", "lr"}
    for term in terms:
        assert first_losses[True][term] == pytest.approx(first_losses[False][term], rel=tolerance), term


def test_a_shard_write_cut_short_leaves_the_last_checkpoint(tmp_path, teacher, sharded_reference, monkeypatch):
    """Every process wrote its shards but the run died before the directory was renamed: the
    checkpoint still names the previous shards, the resumed run is exact and the debris goes."""
    from kdcore.parallel import sharded_checkpoint

    config = sharded_config(tmp_path, teacher)
    real_save, calls = sharded_checkpoint.dcp.save, []

    def save_then_die(state, checkpoint_id):
        real_save(state, checkpoint_id=checkpoint_id)
        calls.append(checkpoint_id)
        if len(calls) == 2:
            raise Crash

    monkeypatch.setattr(sharded_checkpoint.dcp, "save", save_then_die)
    with pytest.raises(RunDirectoryError, match=r"cannot write the model shards into .*shards \(Crash\); the last "
                                                r"checkpoint is intact"):
        kdcore.Distiller(config, console=False).fit()
    monkeypatch.undo()
    assert calls[1].name.startswith(".") and calls[1].exists()  # the temporary directory, complete but unnamed
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["stage_state"]["shards"] == "0-0-3"
    metrics = kdcore.Distiller(config, console=False).fit(resume=True)
    assert_same_run(tmp_path, metrics, sharded_reference)
    assert not calls[1].exists()


def test_a_frozen_copy_of_a_sharded_student_trains_as_unsharded(tmp_path):
    """PS-KD keeps a frozen snapshot of the student (``ctx.frozen_copy``): sharded like a teacher,
    refreshed every epoch, checkpointed with the shards."""
    results = {}
    for parallel in ("fsdp", "ddp"):
        config = classification_config(tmp_path / parallel, method={"name": "pskd"},
                                       training={"epochs": 3, "log_every": 1, "parallel": parallel})
        results[parallel] = kdcore.Distiller(config, console=False).fit()
    for key in results["ddp"]:
        assert results["fsdp"][key] == pytest.approx(results["ddp"][key], rel=1e-5, abs=1e-6), key
    ours, theirs = weights(tmp_path / "fsdp" / "student.pt"), weights(tmp_path / "ddp" / "student.pt")
    for key in theirs:
        torch.testing.assert_close(ours[key], theirs[key], rtol=1e-5, atol=1e-6)


def test_buffer_broadcast_skips_expanded_constants(monkeypatch):
    """Buffers follow the first process, except expanded views (position ids over a batch), which are
    constants that a collective refuses (they are not contiguous) and cannot be written into."""
    from kdcore.engine import distributed

    sent = []

    def broadcast(tensor, src):
        if not tensor.is_contiguous():
            raise RuntimeError("Tensors must be contiguous")
        sent.append(tensor)

    monkeypatch.setattr(distributed.dist, "broadcast", broadcast)
    module = torch.nn.Module()
    module.register_buffer("position_ids", torch.arange(8).expand((4, -1)))
    module.register_buffer("running_mean", torch.ones(3))
    distributed.Processes(0, 2, torch.device("cpu"), owns_group=False).broadcast_buffers([module])
    assert [t.data_ptr() for t in sent] == [module.running_mean.data_ptr()]
