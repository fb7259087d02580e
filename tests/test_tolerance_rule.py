"""The error rule of tests/cases.py is tight enough to catch real faults and loose enough for any
correct float32 evaluation: a gradient with its Jacobian row sum dropped, with the temperature
scale applied twice, or off by 0.1 % is rejected; the oracle evaluated in float32 (the rule's own
yardstick, with none of its 4x slack) is accepted on every case and divergence."""

from __future__ import annotations

import pytest
import torch

from cases import ALL_DIVERGENCES, CASES, assert_within_rule, rounding_allowance
from oracle import free_derivatives, oracle_with_grads

CASE = next(c for c in CASES if c.name == "temperature_sum")  # T = 2.5, reduction 'sum', V = 1000


def _student_gradient(divergence):
    student, teacher, options = CASE.make()
    options = {**options, "divergence": divergence}
    exact = oracle_with_grads(student, teacher, **options)[1]
    own = oracle_with_grads(student, teacher, compute_dtype=torch.float32, **options)[1]
    return student, teacher, options, exact, own


@pytest.mark.parametrize("divergence", ALL_DIVERGENCES)
@pytest.mark.parametrize("fault", ["row_sum_dropped", "temperature_twice", "off_by_0.1_percent"])
def test_faults_are_rejected(divergence, fault):
    student, teacher, options, exact, own = _student_gradient(divergence)
    t = options["temperature"]
    if fault == "row_sum_dropped":  # q_j g_j instead of q_j (g_j - sum_k q_k g_k)
        q = torch.softmax(student.double() / t, -1)
        gq, _ = free_derivatives(divergence, q, torch.softmax(teacher.double() / t, -1), 0.5, 0.1)
        wrong = exact + t * q * (q * gq).sum(-1, keepdim=True)
    elif fault == "temperature_twice":
        wrong = exact * t
    else:
        wrong = exact * 1.001
    allowance = rounding_allowance(student, teacher, options, torch.float32, "student")
    with pytest.raises(AssertionError, match="exceeds"):
        assert_within_rule("student gradient", wrong.float(), exact, own, torch.float32, allowance)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
@pytest.mark.parametrize("divergence", ALL_DIVERGENCES)
def test_a_float32_evaluation_is_accepted_without_slack(case, divergence):
    student, teacher, options = case.make()
    options = {**options, "divergence": divergence}
    exact = oracle_with_grads(student, teacher, **options)
    own = oracle_with_grads(student, teacher, compute_dtype=torch.float32, **options)
    if not torch.isfinite(exact[0]).all():
        return
    for index, wrt in ((1, "student"), (2, "teacher")):
        if exact[index] is None or own[index] is None:
            continue
        allowance = rounding_allowance(student, teacher, options, torch.float32, wrt)
        assert_within_rule(f"{wrt} gradient", own[index], exact[index], exact[index], torch.float32, allowance)
