"""The engine's parts on their own: the training order (the same global batches for any number of
processes and accumulation steps, resumable mid-epoch), evaluation shards, batches, and the
metrics against direct float64 computations."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from kdcore.engine.data import Batch, EvalShard, TrainOrder, call_model
from kdcore.engine.metrics import Meter


def global_batches(length, batch_size, accum, world, seed=3, epoch=1, start=0):
    """The example sets of each optimizer step, gathered over every process's order."""
    orders = [list(TrainOrder(length, batch_size=batch_size, grad_accum=accum, rank=r, world_size=world, seed=seed,
                              epoch=epoch, start_step=start)) for r in range(world)]
    micro = batch_size // (accum * world)
    steps = []
    for step in range(len(orders[0]) // (micro * accum)):
        chunk = slice(step * micro * accum, (step + 1) * micro * accum)
        steps.append(sorted(i for order in orders for i in order[chunk]))
    return steps


@pytest.mark.parametrize("accum, world", [(1, 2), (2, 1), (2, 2), (4, 2)])
def test_every_step_sees_the_same_global_batch(accum, world):
    assert global_batches(100, 16, accum, world) == global_batches(100, 16, 1, 1)


def test_train_order_epochs_resume_and_length():
    one = TrainOrder(100, batch_size=16, grad_accum=1, rank=0, world_size=1, seed=0, epoch=0)
    assert one.steps == 6 and len(one) == 96 and len(set(one)) == 96  # the partial last batch is dropped
    other_epoch = list(TrainOrder(100, batch_size=16, grad_accum=1, rank=0, world_size=1, seed=0, epoch=1))
    assert other_epoch != list(one) and list(one) == list(one)  # reshuffled per epoch, reproducible
    resumed = TrainOrder(100, batch_size=16, grad_accum=2, rank=1, world_size=2, seed=0, epoch=0, start_step=4)
    full = list(TrainOrder(100, batch_size=16, grad_accum=2, rank=1, world_size=2, seed=0, epoch=0))
    assert list(resumed) == full[4 * 8:] and len(resumed) == 16
    ordered = TrainOrder(10, batch_size=5, grad_accum=1, rank=0, world_size=1, seed=0, epoch=0, shuffle=False)
    assert list(ordered) == list(range(10))


def test_eval_shards_cover_each_example_once():
    shards = [list(EvalShard(11, r, 3)) for r in range(3)]
    assert sorted(i for shard in shards for i in shard) == list(range(11))


def test_batches_from_what_datasets_give():
    x, y = torch.randn(4, 3), torch.tensor([0, 1, -100, 2])
    assert Batch.from_collated([x, y]).kept_rows(-100) == 3
    mapping = Batch.from_collated({"input_ids": x, "labels": y})
    assert set(mapping.inputs) == {"input_ids"} and mapping.labels is y and mapping.num_examples() == 4
    assert Batch.from_collated(x).kept_rows(-100) == 4 and Batch.from_collated(x).labels is None
    with pytest.raises(ValueError, match=r"a dataset item given as a sequence must be \(inputs, labels\), got 3"):
        Batch.from_collated([x, y, y])


def test_call_model_accepts_the_usual_outputs():
    class Out:
        logits = torch.ones(2, 3)

    assert call_model(lambda x: x, torch.ones(2, 3)).shape == (2, 3)
    assert call_model(lambda input_ids: Out(), {"input_ids": torch.ones(2)}).shape == (2, 3)
    assert call_model(lambda x: (x, None), torch.ones(2, 3)).shape == (2, 3)
    with pytest.raises(TypeError, match=r"returned dict; a model must return logits"):
        call_model(lambda x: {"a": x}, torch.ones(2))


def reference_metrics(logits, labels, teacher, bins):
    log_probs = logits.double().log_softmax(-1)
    confidence, prediction = log_probs.exp().max(-1)
    correct = (prediction == labels).double()
    ece = 0.0
    for b in range(bins):
        low, high = b / bins, (b + 1) / bins
        members = (confidence >= low) & ((confidence < high) if b < bins - 1 else (confidence <= high))
        if members.any():
            ece += members.double().mean() * (confidence[members].mean() - correct[members].mean()).abs()
    p = teacher.double().softmax(-1)
    kl = (p * (p.log() - log_probs)).sum(-1).mean()
    return {"accuracy": correct.mean().item(), "nll": F.nll_loss(log_probs, labels).item(), "ece": float(ece),
            "teacher_agreement": (prediction == teacher.argmax(-1)).double().mean().item(), "kl_to_teacher": kl.item()}


def test_meter_matches_float64_and_merges_shards():
    torch.manual_seed(0)
    logits, teacher = torch.randn(300, 7) * 2, torch.randn(300, 7) * 2
    labels = torch.randint(7, (300,))
    whole = Meter(bins=10)
    whole.update(logits, labels, teacher)
    expected = reference_metrics(logits, labels, teacher, 10)
    assert whole.compute() == pytest.approx(expected, rel=1e-5, abs=1e-6)
    parts = [Meter(bins=10) for _ in range(3)]
    for k, part in enumerate(parts):
        part.update(logits[k::3], labels[k::3], teacher[k::3])
    merged = Meter(bins=10)
    merged.sums = sum(part.sums for part in parts)
    assert merged.compute() == pytest.approx(whole.compute(), rel=1e-6)  # float32 sums per batch


def test_meter_for_language_modeling_skips_ignored_tokens():
    torch.manual_seed(1)
    logits, teacher = torch.randn(2, 5, 9), torch.randn(2, 5, 9)
    labels = torch.randint(9, (2, 5))
    labels[0, 3:] = -100
    meter = Meter(task="language_modeling")
    meter.update(logits, labels, teacher)
    keep = labels != -100
    expected = reference_metrics(logits[keep], labels[keep], teacher[keep], 15)
    got = meter.compute()
    assert got["token_accuracy"] == pytest.approx(expected["accuracy"])
    assert got["perplexity"] == pytest.approx(math.exp(expected["nll"]), rel=1e-5)
    assert got["kl_to_teacher"] == pytest.approx(expected["kl_to_teacher"], rel=1e-5)
    assert "accuracy" not in got


def test_meter_against_a_top_k_teacher():
    """A SparseTeacher (a cache's top-k): agreement is with the teacher's top-1 entry, which is its
    argmax for any k; the KL is over the k entries and one tail bucket on each side, at the
    temperature of the log-probabilities, below the full KL and equal to it when k = V."""
    from kdcore import SparseTeacher

    torch.manual_seed(2)
    logits, teacher = torch.randn(2, 6, 11) * 2, torch.randn(2, 6, 11) * 2
    labels = torch.randint(11, (2, 6))
    labels[1, 4:] = -100
    keep = labels != -100
    dense = Meter(task="language_modeling")
    dense.update(logits, labels, teacher)
    full = dense.compute()
    for k, temperature in ((11, 1.0), (4, 1.0), (1, 1.0), (4, 2.0)):
        logprobs, indices = torch.log_softmax(teacher / temperature, -1).topk(k, dim=-1)
        order = torch.randperm(k)  # the top-1 entry need not come first
        meter = Meter(task="language_modeling")
        meter.update(logits, labels, SparseTeacher(indices[..., order], logprobs[..., order]),
                     teacher_temperature=temperature)
        got = meter.compute()
        assert got["teacher_agreement"] == full["teacher_agreement"]
        p = logprobs[keep].double().exp()
        q = torch.log_softmax(logits[keep].double() / temperature, -1).exp()
        q_top = q.gather(1, indices[keep])
        p_tail, q_tail = (1 - p.sum(1)).clamp_min(0), 1 - q_top.sum(1)
        tail = p_tail * (p_tail / q_tail).log() if k < 11 else 0  # with k = V there is no tail bucket
        expected = ((p * (p / q_top).log()).sum(1) + tail).mean().item()
        assert got["kl_to_teacher"] == pytest.approx(expected, rel=1e-4, abs=1e-6), (k, temperature)
        if temperature == 1.0:
            assert got["kl_to_teacher"] <= full["kl_to_teacher"] * (1 + 1e-5)
        if k == 11:
            assert got["kl_to_teacher"] == pytest.approx(full["kl_to_teacher"], rel=1e-4)
        assert {key: got[key] for key in ("token_accuracy", "perplexity", "ece")} == \
            {key: full[key] for key in ("token_accuracy", "perplexity", "ece")}


def test_meter_without_labels_or_teacher():
    meter = Meter()
    meter.update(torch.randn(4, 3), None, torch.randn(4, 3))
    assert set(meter.compute()) == {"teacher_agreement", "kl_to_teacher"}
    assert Meter().compute() == {}
