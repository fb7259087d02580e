"""kdcore marks functions for torch.compile without importing torch._dynamo: the mark must be the
one torch's own decorator sets, and a compiled kd_loss must keep the marked lookups out of its graph."""

from __future__ import annotations

import torch

import kdcore
from kdcore._compile import constant_result


def test_the_mark_is_the_one_torch_sets():
    def ours():
        return 1

    def theirs():
        return 1

    marked = constant_result(ours)
    reference = torch.compiler.assume_constant_result(theirs)
    added = {k: v for k, v in vars(reference).items()}
    assert added and {k: vars(marked)[k] for k in added} == added


def test_kd_loss_compiles_in_one_graph():
    student = torch.randn(4, 7, requires_grad=True)
    teacher = torch.randn(4, 7)
    compiled = torch.compile(lambda s, t: kdcore.kd_loss(s, t, divergence="jsd", temperature=2.0), fullgraph=True)
    torch.testing.assert_close(compiled(student, teacher), kdcore.kd_loss(student, teacher, divergence="jsd",
                                                                          temperature=2.0))
