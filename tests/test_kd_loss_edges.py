"""Edge behaviour every backend must share: NaN/+inf rows, all--inf rows, empty inputs, upstream
gradients other than 1, the no-grad path, and the TRL convention."""

from __future__ import annotations

import pytest
import torch

import kdcore
from cases import ALL_DIVERGENCES
from conftest import device_backends
from oracle import oracle_loss, trl_generalized_jsd

backends = pytest.mark.parametrize("backend", device_backends())
divergences = pytest.mark.parametrize("divergence", ALL_DIVERGENCES)


@backends
@divergences
@pytest.mark.parametrize("poison", [float("nan"), float("inf")], ids=["nan", "posinf"])
@pytest.mark.parametrize("where", ["student", "teacher"])
def test_nan_or_posinf_logit_poisons_only_its_row(backend, divergence, poison, where):
    s, t = torch.randn(4, 1500), torch.randn(4, 1500)
    (s if where == "student" else t)[2, 1234] = poison
    s.requires_grad_(True)
    rows = kdcore.kd_loss(s, t, divergence=divergence, reduction="none", backend=backend)
    assert torch.isnan(rows[2]) and torch.isfinite(rows[[0, 1, 3]]).all()
    rows.sum().backward()
    assert torch.isnan(s.grad[2]).all() and torch.isfinite(s.grad[[0, 1, 3]]).all()
    clean = kdcore.kd_loss(s.detach()[[0, 1, 3]], t[[0, 1, 3]], divergence=divergence, reduction="none",
                           backend=backend)
    torch.testing.assert_close(rows[[0, 1, 3]], clean)


@backends
@divergences
@pytest.mark.parametrize("where", ["student", "teacher"])
@pytest.mark.parametrize("vocab", [40, 1500])
def test_all_nan_row_is_a_nan_row(backend, divergence, where, vocab):
    """An entirely NaN row is NaN like any row with a NaN, not an entirely -inf row (a maximum that
    skips NaN finds no finite logit in it)."""
    s, t = torch.randn(3, vocab), torch.randn(3, vocab)
    (s if where == "student" else t)[1] = torch.nan
    s.requires_grad_(True)
    rows = kdcore.kd_loss(s, t, divergence=divergence, labels=torch.tensor([1, 2, 3]), ce_weight=0.5,
                          reduction="none", backend=backend)
    rows.sum().backward()
    assert torch.isnan(rows[1]) and torch.isfinite(rows[[0, 2]]).all()
    assert torch.isnan(s.grad[1]).all() and torch.isfinite(s.grad[[0, 2]]).all()


@backends
@divergences
@pytest.mark.parametrize("side", ["student", "teacher"])
def test_all_neg_inf_kept_row_raises(backend, divergence, side):
    s, t = torch.randn(3, 40), torch.randn(3, 40)
    (s if side == "student" else t)[1] = -torch.inf
    with pytest.raises(ValueError, match=r"row 1 .*entirely -inf"):
        kdcore.kd_loss(s, t, divergence=divergence, backend=backend)


@backends
@divergences
def test_all_neg_inf_row_is_fine_when_ignored(backend, divergence):
    s, t = torch.randn(3, 40, requires_grad=True), torch.randn(3, 40)
    s.data[1] = -torch.inf
    labels = torch.tensor([5, -100, 7])
    loss = kdcore.kd_loss(s, t, divergence=divergence, labels=labels, ce_weight=0.5, backend=backend)
    loss.backward()
    expected = oracle_loss(s.detach(), t, divergence=divergence, labels=labels, ce_weight=0.5)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-6)
    assert torch.all(s.grad[1] == 0) and torch.isfinite(s.grad).all()


@backends
@pytest.mark.parametrize("reduction", ["batchmean", "sum", "none"])
def test_no_rows(backend, reduction):
    s = torch.randn(0, 11, requires_grad=True)
    loss = kdcore.kd_loss(s, torch.randn(0, 11), reduction=reduction, backend=backend)
    assert loss.shape == ((0,) if reduction == "none" else ())
    if reduction != "none":
        assert loss.item() == 0.0
    loss.sum().backward()
    assert s.grad.shape == (0, 11)


@backends
def test_leading_shape_with_zero_rows(backend):
    s = torch.randn(2, 0, 5, requires_grad=True)
    rows = kdcore.kd_loss(s, torch.randn(2, 0, 5), reduction="none", backend=backend)
    assert rows.shape == (2, 0)


@backends
def test_label_out_of_range_raises(backend):
    s, t = torch.randn(3, 10), torch.randn(3, 10)
    with pytest.raises(ValueError, match=r"labels\[2\] = 10 is outside \[0, 10\)"):
        kdcore.kd_loss(s, t, labels=torch.tensor([1, 2, 10]), ce_weight=1.0, backend=backend)


@backends
@divergences
def test_upstream_gradient_scales(backend, divergence):
    s, t = torch.randn(5, 300), torch.randn(5, 300)
    grads = []
    for factor in (1.0, -2.5):
        x = s.clone().requires_grad_(True)
        (factor * kdcore.kd_loss(x, t, divergence=divergence, temperature=2.0, backend=backend)).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], -2.5 * grads[0])


@backends
@divergences
def test_rowwise_upstream_gradient(backend, divergence):
    s, t = torch.randn(2, 3, 77, requires_grad=True), torch.randn(2, 3, 77)
    weights = torch.randn(2, 3)
    (kdcore.kd_loss(s, t, divergence=divergence, reduction="none", backend=backend) * weights).sum().backward()
    expected = torch.stack([
        torch.autograd.grad(kdcore.kd_loss(s[i, j], t[i, j], divergence=divergence, reduction="sum",
                                           backend=backend), s)[0][i, j] * weights[i, j]
        for i in range(2) for j in range(3)
    ]).reshape(2, 3, 77)
    torch.testing.assert_close(s.grad, expected)


@backends
@divergences
def test_no_grad_loss_equals_training_loss(backend, divergence):
    s, t = torch.randn(6, 2100), torch.randn(6, 2100)
    with torch.no_grad():
        evaluated = kdcore.kd_loss(s, t, divergence=divergence, temperature=1.5, backend=backend)
    trained = kdcore.kd_loss(s.requires_grad_(True), t, divergence=divergence, temperature=1.5, backend=backend)
    torch.testing.assert_close(evaluated, trained.detach(), rtol=2e-6, atol=1e-7)


@backends
def test_teacher_only_gradient(backend):
    s, t = torch.randn(4, 50), torch.randn(4, 50, requires_grad=True)
    kdcore.kd_loss(s, t, divergence="jsd", backend=backend).backward()
    t64 = t.detach().double().requires_grad_(True)
    oracle_loss(s.double(), t64, divergence="jsd").backward()
    torch.testing.assert_close(t.grad.double(), t64.grad, rtol=1e-4, atol=1e-7)


@backends
@pytest.mark.parametrize("factors", [(1.0, 1.0), (2.0, -3.0)])
def test_backward_twice_through_the_same_graph(backend, factors):
    s = torch.randn(3, 20, requires_grad=True)
    loss = kdcore.kd_loss(s, torch.randn(3, 20), backend=backend)
    first = torch.autograd.grad(factors[0] * loss, s, retain_graph=True)[0]
    second = torch.autograd.grad(factors[1] * loss, s)[0]
    torch.testing.assert_close(second, first * (factors[1] / factors[0]))


@backends
@pytest.mark.parametrize("beta", [0.1, 0.5, 0.9])
def test_jsd_without_t2_scale_is_trl_generalized_jsd(backend, beta):
    s, t = torch.randn(2, 5, 300), torch.randn(2, 5, 300)
    ours = kdcore.kd_loss(s, t, divergence="jsd", beta=beta, temperature=2.0, t2_scale=False, backend=backend)
    trl = trl_generalized_jsd(s.double(), t.double(), beta=beta, temperature=2.0)
    torch.testing.assert_close(ours.double(), trl, rtol=1e-5, atol=1e-7)


@backends
def test_vocab_size_compares_the_shared_columns(backend):
    s, t = torch.randn(4, 100, requires_grad=True), torch.randn(4, 96)
    loss = kdcore.kd_loss(s, t, vocab_size=96, temperature=2.0, backend=backend)
    loss.backward()
    expected = oracle_loss(s.detach()[:, :96].double(), t.double(), temperature=2.0)
    torch.testing.assert_close(loss.double(), expected, rtol=1e-5, atol=1e-7)
    assert torch.all(s.grad[:, 96:] == 0)  # padding columns are -inf: no probability, no gradient


@backends
def test_kdloss_module_matches_functional(backend):
    module = kdcore.KDLoss("skew_kl", temperature=2.0, alpha=0.3, ce_weight=0.2, backend=backend)
    s, t, labels = torch.randn(4, 30), torch.randn(4, 30), torch.tensor([1, -100, 3, 4])
    expected = kdcore.kd_loss(s, t, divergence="skew_kl", temperature=2.0, alpha=0.3, ce_weight=0.2,
                              labels=labels, backend=backend)
    torch.testing.assert_close(module(s, t, labels=labels), expected)
    assert "skew_kl" in repr(module)


@backends
def test_cross_entropy_of_huge_logits(backend):
    """Student logits near 1e6 (a float32 ulp of 0.06 there): the CE row loss max - z_label + log sum
    keeps its few units only if the logits' magnitude cancels before the log-sum is added."""
    s = torch.randn(4, 300) + 1.0e6
    t = torch.randn(4, 300)
    options = dict(labels=torch.tensor([0, 7, 299, 42]), ce_weight=1.0, temperature=2.0, reduction="none")
    rows = kdcore.kd_loss(s, t, backend=backend, **options)
    expected = oracle_loss(s.double(), t.double(), **options)
    torch.testing.assert_close(rows.double(), expected, rtol=1e-5, atol=1e-5)
