"""Bad input gets an error that names the argument and what was expected."""

from __future__ import annotations

import pytest
import torch

import kdcore
from kdcore.backends import Backend

S, T = torch.randn(4, 10), torch.randn(4, 10)


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        ({"divergence": "fkl"}, ValueError, r"divergence must be one of .*'forward_kl'.*got 'fkl'"),
        ({"divergence": "reverse-kl"}, ValueError, r"did you mean 'reverse_kl'"),
        ({"reduction": "mean"}, ValueError, r"reduction must be one of .*got 'mean'"),
        ({"divergence": "jsd", "beta": 0.0}, ValueError, r"beta must lie in \(0, 1\), got 0.0"),
        ({"divergence": "jsd", "beta": 1.0}, ValueError, r"beta must lie in \(0, 1\)"),
        ({"divergence": "skew_kl", "alpha": 1.0}, ValueError, r"alpha must lie in \[0, 1\), got 1.0"),
        ({"divergence": "skew_rkl", "alpha": -0.1}, ValueError, r"alpha must lie in \[0, 1\)"),
        ({"temperature": 0.0}, ValueError, r"temperature must be > 0, got 0.0"),
        ({"temperature": -2}, ValueError, r"temperature must be > 0"),
        ({"temperature": float("nan")}, ValueError, r"temperature must be finite"),
        ({"temperature": "2"}, TypeError, r"temperature must be a real number, got str"),
        ({"t2_scale": 1}, TypeError, r"t2_scale must be True or False"),
        ({"kd_weight": -1.0}, ValueError, r"kd_weight must be >= 0"),
        ({"ce_weight": 0.5}, ValueError, r"ce_weight=0.5 adds a cross-entropy term, which needs labels"),
        ({"labels": torch.zeros(3, dtype=torch.long)}, ValueError, r"labels must have shape \(4,\).*got \(3,\)"),
        ({"labels": torch.zeros(4)}, TypeError, r"labels must be an integer tensor, got torch.float32"),
        ({"labels": [0, 1, 2, 3]}, TypeError, r"labels must be a torch.Tensor, got list"),
        ({"mask": torch.ones(4, dtype=torch.long)}, TypeError, r"mask must be a bool tensor, got torch.int64"),
        ({"mask": torch.ones(2, 2, dtype=torch.bool)}, ValueError, r"mask must have shape \(4,\)"),
        ({"ignore_index": 1.5}, TypeError, r"ignore_index must be an int"),
        ({"reduction": "sum", "normalizer": 3.0}, ValueError, r"normalizer .* no meaning for reduction='sum'"),
        ({"normalizer": 0.0}, ValueError, r"normalizer must be > 0"),
        ({"normalizer": torch.ones(2)}, ValueError, r"normalizer must be a number or a one-element tensor"),
        ({"vocab_size": 11}, ValueError, r"vocab_size must lie in \[1, 10\]"),
        ({"backend": "cuda-fast"}, ValueError, r"unknown backend 'cuda-fast'"),
        ({"backend": "refernce"}, ValueError, r"did you mean 'reference'"),
        ({"backend": None}, TypeError, r"backend must be a backend name"),
    ],
)
def test_bad_options(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        kdcore.kd_loss(S, T, **kwargs)


@pytest.mark.parametrize(
    "student, teacher, error, pattern",
    [
        ([1.0], T, TypeError, r"student_logits must be a torch.Tensor, got list"),
        (S.long(), T, TypeError, r"student_logits must be float32, bfloat16, float16 or float64, got torch.int64"),
        (S, T.to(torch.complex64), TypeError, r"teacher_logits must be float32"),
        (torch.tensor(1.0), T, ValueError, r"student_logits must have a vocabulary dimension"),
        (torch.randn(4, 0), torch.randn(4, 0), ValueError, r"empty vocabulary dimension"),
        (S, torch.randn(5, 10), ValueError, r"must have the same leading dimensions"),
        (S, torch.randn(4, 12), ValueError,
         r"teacher_logits has vocabulary size 12 but student_logits has 10; pass vocab_size=10"),
        (S.double(), T, TypeError, r"float64 logits must be paired with float64 logits"),
        (S, T.to("meta"), ValueError, r"teacher_logits is on meta, expected cpu \(the device of student_logits\)"),
    ],
)
def test_bad_logits(student, teacher, error, pattern):
    with pytest.raises(error, match=pattern):
        kdcore.kd_loss(student, teacher)


def test_labels_on_another_device():
    with pytest.raises(ValueError, match=r"labels is on meta, expected cpu \(the device of the logits\)"):
        kdcore.kd_loss(S, T, labels=torch.zeros(4, dtype=torch.long, device="meta"))


def test_backend_on_the_wrong_device():
    with pytest.raises(ValueError, match=r"backend 'cpp' runs on cpu tensors, not meta"):
        kdcore.kd_loss(S.to("meta"), T.to("meta"), backend="cpp")


class NeedsHardware:
    """A backend plugin whose hardware is missing."""

    @kdcore.hookimpl
    def kdcore_register_backends(self, register):
        register(Backend("needs-hardware", ("cpu",), 99, {"kd_loss": "kdcore::nonexistent"},
                         unavailable_reason=lambda: "the XYZ accelerator runtime is not installed"))


@pytest.fixture
def unavailable_backend():
    host = kdcore.plugins.host()
    host.register(NeedsHardware(), name="tests.needs-hardware")
    yield
    host.unregister("tests.needs-hardware")


def test_explicit_unavailable_backend_raises_with_reason(unavailable_backend):
    with pytest.raises(ValueError, match=r"backend 'needs-hardware' is not available: the XYZ accelerator"):
        kdcore.kd_loss(S, T, backend="needs-hardware")
    status = kdcore.backends()["needs-hardware"]
    assert not status.available and "XYZ" in status.reason and status.source == "tests.needs-hardware"


def test_auto_skips_unavailable_backend(unavailable_backend):
    kdcore.kd_loss(S, T)  # the unavailable higher-priority backend is passed over, not called


def test_kdloss_validates_at_construction():
    with pytest.raises(ValueError, match=r"KDLoss: divergence must be one of"):
        kdcore.KDLoss("kl")
    with pytest.raises(ValueError, match=r"KDLoss: temperature must be > 0"):
        kdcore.KDLoss(temperature=0)
