"""The GPU backends' place in the registry: the cuda backend says why it is missing, and "auto"
on CUDA tensors follows the measured table of kdcore/ops/gpu_choice.py."""

from __future__ import annotations

import pytest
import torch

import kdcore
from kdcore.ops import gpu_choice


def test_cuda_backend_is_listed_with_its_reason():
    status = kdcore.backends()["cuda"]
    assert status.devices == ("cuda",) and set(status.families) == {"kd_loss", "kd_loss_inplace", "kd_loss_sparse"}
    if status.available:
        assert torch.cuda.is_available()
        return
    assert status.reason
    with pytest.raises(ValueError, match=r"backend 'cuda' is not available: .+"):
        kdcore.kd_loss(torch.randn(2, 5), torch.randn(2, 5), backend="cuda")


def test_cuda_outranks_triton():
    backends = kdcore.backends()
    assert backends["cuda"].priority > backends["triton"].priority


@pytest.mark.parametrize("vocab, expected", [(1, 32768), (32768, 32768), (32769, 131072), (262144, 262144),
                                             (262145, 1 << 62)])
def test_vocabulary_buckets(vocab, expected):
    assert gpu_choice.bucket(vocab) == expected


def test_measured_choice_is_used_when_available(monkeypatch):
    monkeypatch.setitem(gpu_choice.MEASURED, ("bfloat16", "jsd", 131072), "reference")
    monkeypatch.setitem(gpu_choice.MEASURED, ("bfloat16", "tvd", 131072), "cuda" if not torch.cuda.is_available()
                        else "no-such-backend")
    jsd, tvd = kdcore.DIVERGENCES["jsd"].code, kdcore.DIVERGENCES["tvd"].code
    assert gpu_choice.fastest(torch.bfloat16, jsd, 128256) == "reference"
    assert gpu_choice.fastest(torch.bfloat16, jsd, 32000) == "auto"  # not measured: priorities decide
    assert gpu_choice.fastest(torch.bfloat16, tvd, 128256) == "auto"  # measured winner missing here

