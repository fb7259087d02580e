"""The vocabulary-parallel loss (kdcore.parallel.vocab_parallel_kd_loss) and kd_loss's route for
vocabulary-sharded DTensors, on gloo process groups of 2 and 3 CPU processes.

Starting processes is the slow part, so one group per world size runs every check (the value
cases, the DTensor route, the errors, the count of collectives) and each rank records, per check,
what failed; each check is then reported as its own test. Values and gradients are held to the
float64 oracle by the rule of tests/cases.py, as every kd_loss backend is: each rank's gradient
slice is summed into the full [N, V] gradient (a test-side all_reduce) and compared whole.
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import re
import socket
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from cases import ALL_DIVERGENCES, assert_within_rule, rounding_allowance, tvd_tie_allowance
from oracle import oracle_loss

WORLD_SIZES = (2, 3)


def even_widths(vocab: int, world: int) -> list[int]:
    """Slice widths of a vocabulary split as evenly as possible, the first ranks one wider."""
    return [vocab // world + (r < vocab % world) for r in range(world)]


def offsets(widths: list[int]) -> list[int]:
    return [sum(widths[:r]) for r in range(len(widths))]


# -- the value cases ------------------------------------------------------------------------------

def _randn(gen, *shape, scale=2.0):
    return torch.randn(*shape, generator=gen) * scale


def _pair(n, v, scale=2.0):
    return lambda gen, widths: (_randn(gen, n, v, scale=scale), _randn(gen, n, v, scale=scale), {})


def _labels_on_every_rank(n, widths, gen):
    """Row i's label lies in rank (i mod world)'s columns."""
    starts = offsets(widths)
    return torch.tensor([starts[i % len(widths)] + int(torch.randint(0, widths[i % len(widths)], (1,), generator=gen))
                         for i in range(n)])


def _labels_ce(gen, widths):
    v = sum(widths)
    s, t = _randn(gen, 8, v), _randn(gen, 8, v)
    labels = _labels_on_every_rank(8, widths, gen)
    labels[[1, 4]] = -100
    return s, t, {"labels": labels}


def _custom_ignore(gen, widths):
    v = sum(widths)
    s, t = _randn(gen, 6, v), _randn(gen, 6, v)
    labels = _labels_on_every_rank(6, widths, gen)
    labels[[0, 5]] = 7777
    return s, t, {"labels": labels}


def _three_d(gen, widths):
    v = sum(widths)
    s, t = _randn(gen, 2, 3, v), _randn(gen, 2, 3, v)
    labels = _labels_on_every_rank(6, widths, gen).reshape(2, 3)
    labels[1, 2] = -100
    return s, t, {"labels": labels}


def _mask(gen, widths):
    v = sum(widths)
    s, t = _randn(gen, 7, v), _randn(gen, 7, v)
    return s, t, {"mask": torch.tensor([True, False, True, True, False, True, True])}


def _all_ignored(gen, widths):
    v = sum(widths)
    s, t = _randn(gen, 5, v), _randn(gen, 5, v)
    return s, t, {"labels": torch.full((5,), -100)}


def _neg_inf_both(gen, widths):
    """-inf columns at the same places on both sides: scattered, and a whole rank's slice of some
    rows (the first rank's in row 0, the last rank's in row 3)."""
    v, starts = sum(widths), offsets(widths)
    s, t = _randn(gen, 6, v), _randn(gen, 6, v)
    holes = torch.rand(6, v, generator=gen) < 0.3
    holes[0, :widths[0]] = True
    holes[3, starts[-1]:] = True
    holes[1:, 0] = False  # a finite column in every row
    holes[0, starts[1]] = False
    s[holes] = -torch.inf
    t[holes] = -torch.inf
    return s, t, {}


def _neg_inf_one_side(gen, widths):
    """-inf on one side only: the student's first slice of row 1, the teacher's last slice of row 2,
    and scattered teacher columns (forward and reverse KL are then infinite, the others finite)."""
    v, starts = sum(widths), offsets(widths)
    s, t = _randn(gen, 5, v), _randn(gen, 5, v)
    s[1, :widths[0]] = -torch.inf
    t[2, starts[-1]:] = -torch.inf
    holes = torch.rand(5, v, generator=gen) < 0.3
    holes[:, 0] = False
    t[holes] = -torch.inf
    return s, t, {}


def _ignored_neg_inf_row(gen, widths):
    """A row that is -inf over the whole vocabulary, on every rank, but ignored."""
    v = sum(widths)
    s, t = _randn(gen, 5, v), _randn(gen, 5, v)
    s[2] = -torch.inf
    t[2] = -torch.inf
    labels = _labels_on_every_rank(5, widths, gen)
    labels[2] = -100
    return s, t, {"labels": labels}


def _large_logits(gen, widths):
    v = sum(widths)
    return _randn(gen, 4, v, scale=30.0) + 1.0e4, _randn(gen, 4, v, scale=30.0) - 2.0e4, {}


def _nan_or_inf_on_one_rank(gen, widths):
    """Row 1 holds NaN in the first rank's columns only, row 3 +inf in the last rank's (on both
    sides: the oracle's guards hide a bad value on one side only; tests/test_kd_loss_edges.py
    covers those): those rows are NaN on every rank, the other rows are unaffected."""
    v = sum(widths)
    s, t = _randn(gen, 5, v), _randn(gen, 5, v)
    s[1, 0] = torch.nan
    t[1, 0] = torch.nan
    s[3, -1] = torch.inf
    t[3, -1] = torch.inf
    return s, t, {"labels": _labels_on_every_rank(5, widths, gen)}


def _single_column_widths(world: int) -> list[int]:
    """V = 11 with single-column slices: [1, 9, 1] on 3 ranks, [10, 1] on 2."""
    return [1, 9, 1] if world == 3 else [10, 1]


def _labels_in_single_columns(gen, widths):
    s, t = _randn(gen, 6, 11), _randn(gen, 6, 11)
    return s, t, {"labels": torch.tensor([0, 10, 5, 0, 10, 3])}


@dataclass(frozen=True)
class Scenario:
    name: str
    build: Callable  # (generator, widths) -> (student, teacher, extra options), float32
    vocab: int
    teacher_grad: bool = False
    options: dict = field(default_factory=dict)
    widths: Callable[[int], list[int]] | None = None  # world size -> widths; default even_widths


SCENARIOS = [
    Scenario("basic", _pair(6, 37), 37, teacher_grad=True),
    Scenario("temperature_sum", _pair(5, 1001), 1001, options={"temperature": 2.5, "reduction": "sum"}),
    Scenario("three_d_none", _three_d, 11, options={"temperature": 2.5, "reduction": "none"}),
    Scenario("labels_ce", _labels_ce, 37, teacher_grad=True,
             options={"temperature": 2.5, "ce_weight": 0.5, "kd_weight": 0.8}),
    Scenario("labels_ce_t1_custom_ignore_none", _custom_ignore, 11,
             options={"ignore_index": 7777, "ce_weight": 1.0, "reduction": "none"}),
    Scenario("mask_no_t2", _mask, 37, options={"temperature": 2.5, "t2_scale": False, "beta": 0.3, "alpha": 0.25}),
    Scenario("all_ignored", _all_ignored, 37, teacher_grad=True, options={"temperature": 2.5, "ce_weight": 0.3}),
    Scenario("neg_inf_both", _neg_inf_both, 37, teacher_grad=True, options={"temperature": 2.5}),
    Scenario("neg_inf_one_side", _neg_inf_one_side, 37, teacher_grad=True, options={"alpha": 0.2}),
    Scenario("ignored_neg_inf_row", _ignored_neg_inf_row, 37, teacher_grad=True, options={"ce_weight": 0.5}),
    Scenario("large_logits", _large_logits, 37, options={"temperature": 2.5}),
    Scenario("nan_or_inf_on_one_rank", _nan_or_inf_on_one_rank, 37, teacher_grad=True,
             options={"reduction": "none", "ce_weight": 0.5}),
    Scenario("single_column_slices", _labels_in_single_columns, 11, teacher_grad=True,
             options={"temperature": 2.5, "ce_weight": 0.5}, widths=_single_column_widths),
    Scenario("normalizer", _pair(6, 37), 37, options={"normalizer": 11.0}),
]

# the scenarios run in bfloat16 and float64 too (every scenario runs in float32)
OTHER_DTYPES = {torch.bfloat16: ("basic", "labels_ce", "neg_inf_both", "large_logits"),
                torch.float64: ("basic", "labels_ce")}


@dataclass(frozen=True)
class ValueCase:
    scenario: Scenario
    divergence: str
    dtype: torch.dtype
    backend: str = "auto"  # forward KL without a teacher gradient runs the fused kernel; "reference" the element path

    @property
    def name(self) -> str:
        suffix = "" if self.backend == "auto" else f"-{self.backend}"
        return f"{self.scenario.name}-{self.divergence}-{str(self.dtype).removeprefix('torch.')}{suffix}"


VALUE_CASES = [ValueCase(sc, div, torch.float32) for sc in SCENARIOS for div in ALL_DIVERGENCES] + [
    ValueCase(sc, div, dtype) for dtype, names in OTHER_DTYPES.items() for sc in SCENARIOS if sc.name in names
    for div in ALL_DIVERGENCES] + [
    ValueCase(sc, "forward_kl", dtype, "reference") for dtype in (torch.float32, torch.bfloat16) for sc in SCENARIOS
    if not sc.teacher_grad and (dtype == torch.float32 or sc.name in OTHER_DTYPES[dtype])]


def _oracle(student, teacher, upstream, compute_dtype, **options):
    """(loss, d(sum(upstream * loss))/d student, ... / d teacher) of the oracle in compute_dtype.

    Dropped rows count 0 whatever their logits (docs/math.md), so the oracle sees them as zeros: its
    log_softmax of a row that is -inf throughout would otherwise leak NaN into their gradient."""
    kept = torch.ones(student.shape[:-1], dtype=torch.bool)
    if options.get("labels") is not None:
        kept &= options["labels"].reshape(kept.shape) != options.get("ignore_index", -100)
    if options.get("mask") is not None:
        kept &= options["mask"].reshape(kept.shape)
    s = torch.where(kept.unsqueeze(-1), student.detach(), 0).to(compute_dtype).requires_grad_(True)
    t = torch.where(kept.unsqueeze(-1), teacher.detach(), 0).to(compute_dtype).requires_grad_(True)
    loss = oracle_loss(s, t, compute_dtype=compute_dtype, **options)
    grad_s, grad_t = torch.autograd.grad((loss * upstream.to(compute_dtype)).sum(), (s, t), allow_unused=True)
    return loss.detach(), grad_s, grad_t


def _full_gradient(leaf: torch.Tensor) -> torch.Tensor:
    """The full gradient of a leaf whose slices the ranks differentiated (zero elsewhere): the sum over
    ranks, in float64 (exact: every entry has one nonzero term)."""
    grad = leaf.grad.double()
    dist.all_reduce(grad)
    return grad


def check_value_case(case: ValueCase, rank: int, world: int) -> None:
    """vocab_parallel_kd_loss on this rank's slices against the oracle on the whole vocabulary:
    the loss on every rank, and the gradients summed over the ranks (rank 0 checks them)."""
    from kdcore.parallel import vocab_parallel_kd_loss

    sc = case.scenario
    widths = sc.widths(world) if sc.widths else even_widths(sc.vocab, world)
    student32, teacher32, extra = sc.build(torch.Generator().manual_seed(0), widths)
    options = {**sc.options, **extra, "divergence": case.divergence}
    student = student32.to(case.dtype).requires_grad_(True)
    teacher = teacher32.to(case.dtype).requires_grad_(sc.teacher_grad)
    columns = slice(offsets(widths)[rank], offsets(widths)[rank] + widths[rank])
    loss = vocab_parallel_kd_loss(student[..., columns], teacher[..., columns], backend=case.backend, **options)
    upstream = (torch.linspace(0.5, 1.5, student.shape[:-1].numel()).reshape(student.shape[:-1])
                if options.get("reduction") == "none" else torch.ones(()))
    _same_on_every_rank(loss)
    exact = _oracle(student, teacher, upstream, torch.float64, **options)
    own = _oracle(student, teacher, upstream, case.dtype, **options)
    loss_dtype = torch.float64 if case.dtype == torch.float64 else torch.float32
    assert loss.dtype == loss_dtype and loss.shape == exact[0].shape
    assert_within_rule("loss", loss, exact[0], own[0], loss_dtype)
    if exact[0].isinf().any():
        return  # an infinite divergence has no meaningful gradient (NaN rows do: NaN)
    (loss * upstream).sum().backward()
    grads = {"student": _full_gradient(student)}
    if sc.teacher_grad:
        grads["teacher"] = _full_gradient(teacher)
    else:
        assert teacher.grad is None
    if rank != 0:
        return
    row_weight = upstream.abs().reshape(*upstream.shape, 1) if upstream.dim() else upstream
    for index, wrt in ((1, "student"), (2, "teacher")):
        if wrt not in grads:
            continue
        allowance = rounding_allowance(student, teacher, options, case.dtype, wrt) * row_weight
        if case.divergence == "tvd":
            allowance = allowance + tvd_tie_allowance(student, teacher, options, case.dtype, wrt)
        assert_within_rule(f"{wrt} gradient", grads[wrt], exact[index], own[index], case.dtype, allowance)
    if sc.name == "all_ignored":
        assert float(loss) == 0.0 and not grads["student"].any() and not grads["teacher"].any()


def _same_on_every_rank(loss: torch.Tensor) -> None:
    """Every rank returns the same loss, bit for bit (NaN where rank 0 has NaN)."""
    mine = loss.detach().double().reshape(-1)
    first = mine.clone()
    dist.broadcast(first, 0)
    assert torch.equal(mine.isnan(), first.isnan()) and torch.equal(mine.nan_to_num(), first.nan_to_num()), (
        f"the ranks' losses differ: {mine.tolist()} here, {first.tolist()} on rank 0")


def check_one_sided_bad_values(rank: int, world: int) -> None:
    """A NaN in the student's first slice of row 1 and a +inf in the teacher's last slice of row 3
    make exactly those rows NaN, in the loss and in both gradients, as the reference backend does
    on the whole vocabulary (the oracle cannot say: its guards hide a bad value on one side)."""
    import kdcore
    from kdcore.parallel import vocab_parallel_kd_loss

    widths = even_widths(37, world)
    columns = slice(offsets(widths)[rank], offsets(widths)[rank] + widths[rank])
    gen = torch.Generator().manual_seed(6)
    student, teacher = _randn(gen, 5, 37), _randn(gen, 5, 37)
    student[1, 0] = torch.nan
    teacher[3, -1] = torch.inf
    for divergence in ALL_DIVERGENCES:
        options = {"divergence": divergence, "reduction": "none"}
        ours_s, ours_t = student.clone().requires_grad_(True), teacher.clone().requires_grad_(True)
        loss = vocab_parallel_kd_loss(ours_s[:, columns], ours_t[:, columns], **options)
        loss.sum().backward()
        grads = _full_gradient(ours_s), _full_gradient(ours_t)
        ref_s, ref_t = student.clone().requires_grad_(True), teacher.clone().requires_grad_(True)
        expected = kdcore.kd_loss(ref_s, ref_t, backend="reference", **options)
        expected.sum().backward()
        assert torch.equal(loss.isnan(), expected.isnan()), (divergence, loss, expected)
        for ours, reference in zip(grads, (ref_s.grad, ref_t.grad)):
            assert torch.equal(ours.isnan(), reference.isnan()), divergence


# -- the DTensor route ----------------------------------------------------------------------------

def _mesh(world):
    from torch.distributed.device_mesh import init_device_mesh

    return init_device_mesh("cpu", (world,))


def check_dtensor_distributed(rank: int, world: int) -> None:
    """kd_loss on DTensors from distribute_tensor(..., [Shard(-1)]) (V = 37 in torch.chunk's uneven
    split), labels as a Replicate DTensor and a plain mask: the loss and the DTensors' gradients."""
    import kdcore
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = _mesh(world)
    gen = torch.Generator().manual_seed(1)
    student, teacher = _randn(gen, 6, 37), _randn(gen, 6, 37)
    labels = _labels_on_every_rank(6, [13, 13, 11] if world == 3 else [19, 18], gen)
    labels[2] = -100
    mask = torch.tensor([True, True, True, False, True, True])
    for divergence in ("forward_kl", "jsd"):
        options = {"divergence": divergence, "temperature": 2.5, "ce_weight": 0.5, "mask": mask}
        dt_student = distribute_tensor(student, mesh, [Shard(-1)]).requires_grad_(True)
        dt_teacher = distribute_tensor(teacher, mesh, [Shard(-1)]).requires_grad_(True)
        loss = kdcore.kd_loss(dt_student, dt_teacher, labels=distribute_tensor(labels, mesh, [Replicate()]),
                              **options)
        assert type(loss) is torch.Tensor and loss.shape == ()
        loss.backward()
        options["labels"] = labels
        exact = _oracle(student, teacher, torch.ones(()), torch.float64, **options)
        own = _oracle(student, teacher, torch.ones(()), torch.float32, **options)
        assert_within_rule("loss", loss, exact[0], own[0], torch.float32)
        for index, wrt, dt in ((1, "student", dt_student), (2, "teacher", dt_teacher)):
            assert dt.grad.placements == (Shard(1),) or dt.grad.placements == (Shard(-1),), dt.grad.placements
            allowance = rounding_allowance(student, teacher, options, torch.float32, wrt)
            assert_within_rule(f"{wrt} gradient", dt.grad.full_tensor(), exact[index], own[index], torch.float32,
                               allowance)


def check_dtensor_colwise_parallel(rank: int, world: int) -> None:
    """LM heads parallelized with ColwiseParallel(use_local_output=False) (V = 11): kd_loss of their
    outputs, and the student head's weight and bias gradients, against the oracle on the whole
    heads' logits (the gradients carried through the heads' matmul, allowances too)."""
    import kdcore
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    mesh = _mesh(world)
    torch.manual_seed(2)
    student_head, teacher_head = torch.nn.Linear(8, 11), torch.nn.Linear(8, 11)
    weights = [p.detach().clone() for p in (*student_head.parameters(), *teacher_head.parameters())]
    hidden = torch.randn(5, 8)
    labels = torch.tensor([0, 4, 8, 10, -100])
    options = {"divergence": "jsd", "temperature": 2.5, "ce_weight": 0.5, "labels": labels}
    for head in (student_head, teacher_head):
        parallelize_module(head, mesh, ColwiseParallel(use_local_output=False))
    with torch.no_grad():
        teacher_logits = teacher_head(hidden)
    loss = kdcore.kd_loss(student_head(hidden), teacher_logits, **options)
    loss.backward()
    student = hidden @ weights[0].T + weights[1]
    teacher = hidden @ weights[2].T + weights[3]
    exact = _oracle(student, teacher, torch.ones(()), torch.float64, **options)
    own = _oracle(student, teacher, torch.ones(()), torch.float32, **options)
    assert_within_rule("loss", loss, exact[0], own[0], torch.float32)
    allowance = rounding_allowance(student, teacher, options, torch.float32, "student")
    assert_within_rule("weight gradient", student_head.weight.grad.full_tensor(), exact[1].T @ hidden.double(),
                       own[1].T @ hidden, torch.float32, allowance.T @ hidden.abs().double())
    assert_within_rule("bias gradient", student_head.bias.grad.full_tensor(), exact[1].sum(0), own[1].sum(0),
                       torch.float32, allowance.sum(0))


# -- the count of collectives ---------------------------------------------------------------------

def check_collectives(rank: int, world: int) -> None:
    """Per call: one all_gather of a few integers, three all_reduces of at most [N, 4] statistics
    (never [N, V]), whatever V is; without gradients the coupling sums are not sent. The forward-KL
    kernel path: the integers, one all_gather of 8 numbers a row per rank and one sum of [N, 1]."""
    from kdcore.parallel import vocab_parallel_kd_loss

    calls = []
    real_reduce, real_gather = dist.all_reduce, dist.all_gather

    def all_reduce(tensor, *args, **kwargs):
        calls.append(("all_reduce", tuple(tensor.shape), kwargs.get("op", args[0] if args else None)))
        return real_reduce(tensor, *args, **kwargs)

    def all_gather(out, tensor, *args, **kwargs):
        calls.append(("all_gather", tuple(tensor.shape), None))
        return real_gather(out, tensor, *args, **kwargs)

    n = 6
    for vocab in (37, 1001):
        widths = even_widths(vocab, world)
        columns = slice(offsets(widths)[rank], offsets(widths)[rank] + widths[rank])
        gen = torch.Generator().manual_seed(3)
        student = _randn(gen, n, vocab)[:, columns].requires_grad_(True)
        teacher = _randn(gen, n, vocab)[:, columns].requires_grad_(True)
        labels = _labels_on_every_rank(n, widths, gen)
        for grad in (True, False):
            calls.clear()
            dist.all_reduce, dist.all_gather = all_reduce, all_gather
            try:
                with torch.set_grad_enabled(grad):
                    vocab_parallel_kd_loss(student, teacher, divergence="jsd", labels=labels, ce_weight=0.5)
            finally:
                dist.all_reduce, dist.all_gather = real_reduce, real_gather
            gathers = [c for c in calls if c[0] == "all_gather"]
            reduces = [c for c in calls if c[0] == "all_reduce"]
            assert [shape for _, shape, _ in gathers] == [(7,)], calls
            assert [op for _, _, op in reduces] == [dist.ReduceOp.MAX, dist.ReduceOp.SUM, dist.ReduceOp.SUM], calls
            expected = [(n, 4), (n, 4), (n, 3 if grad else 1)]
            assert [shape for _, shape, _ in reduces] == expected, (vocab, grad, calls)
            # forward KL with only the student differentiated: the kernel path, one gather of each rank's
            # (max, log-sum) pairs (student and teacher at T, student at 1), label logit and flag, one sum
            calls.clear()
            dist.all_reduce, dist.all_gather = all_reduce, all_gather
            try:
                with torch.set_grad_enabled(grad):
                    vocab_parallel_kd_loss(student.detach().requires_grad_(grad), teacher.detach(), labels=labels,
                                           ce_weight=0.5)
            finally:
                dist.all_reduce, dist.all_gather = real_reduce, real_gather
            assert [(kind, shape) for kind, shape, _ in calls] == [
                ("all_gather", (7,)), ("all_gather", (n, 8)), ("all_reduce", (n, 1))], calls


# -- errors ---------------------------------------------------------------------------------------

def _raises(error: type, pattern: str, call: Callable) -> None:
    try:
        call()
    except error as raised:
        assert re.search(pattern, str(raised)), f"{error.__name__} with an unexpected message: {raised}"
        return
    raise AssertionError(f"no {error.__name__} matching {pattern!r}")


def _slices(rank, world, n=5, vocab=11, requires_grad=True):
    widths = even_widths(vocab, world)
    columns = slice(offsets(widths)[rank], offsets(widths)[rank] + widths[rank])
    gen = torch.Generator().manual_seed(4)
    student, teacher = _randn(gen, n, vocab), _randn(gen, n, vocab)
    return student[:, columns].requires_grad_(requires_grad), teacher[:, columns]


def check_errors(rank: int, world: int) -> None:
    """Every rank raises alike (none is left waiting in a collective): rows that differ between
    ranks, an argument one rank rejects, a row -inf over the whole vocabulary, a label outside it;
    and the unsupported arguments."""
    from kdcore.parallel import vocab_parallel_kd_loss
    from kdcore.sparse import SparseTeacher

    student, teacher = _slices(rank, world, n=4 if rank == 0 else 5)
    _raises(ValueError, r"different numbers of rows \(N = \[4, 5", lambda: vocab_parallel_kd_loss(student, teacher))
    student, teacher = _slices(rank, world)
    wider = torch.cat([teacher, teacher[:, :1]], 1) if rank == 1 else teacher
    if rank == 1:
        _raises(ValueError, "slices of student_logits .* differ", lambda: vocab_parallel_kd_loss(student, wider))
    else:
        _raises(ValueError, r"rank\(s\) \[1\] rejected their arguments", lambda: vocab_parallel_kd_loss(student, wider))
    empty = student.detach().clone()
    empty[3] = -torch.inf
    _raises(ValueError, "row 3 of the logits is entirely -inf", lambda: vocab_parallel_kd_loss(empty, teacher))
    labels = torch.tensor([0, 1, 11, 2, 3])
    _raises(ValueError, r"labels\[2\] = 11 is outside \[0, 11\)",
            lambda: vocab_parallel_kd_loss(student, teacher, labels=labels, ce_weight=1.0))
    sparse = SparseTeacher(torch.zeros(5, 2, dtype=torch.long), torch.zeros(5, 2))
    _raises(TypeError, "teacher_logits is a SparseTeacher", lambda: vocab_parallel_kd_loss(student, sparse))
    _raises(ValueError, "vocab_size=11 is not supported",
            lambda: vocab_parallel_kd_loss(student, teacher, vocab_size=11))
    _raises(ValueError, "reduction must be one of", lambda: vocab_parallel_kd_loss(student, teacher, reduction="mean"))
    # the process group still works after every error
    vocab_parallel_kd_loss(student, teacher).backward()


def check_dtensor_errors(rank: int, world: int) -> None:
    """DTensors that are not vocabulary-sharded, mixed with plain tensors, or with options the
    vocabulary-parallel loss does not take: clear errors naming the argument."""
    import kdcore
    from kdcore.parallel import vocab_parallel_kd_loss
    from kdcore.sparse import SparseTeacher
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = _mesh(world)
    gen = torch.Generator().manual_seed(5)
    full_student, full_teacher = _randn(gen, 6, 11), _randn(gen, 6, 11)
    student = distribute_tensor(full_student, mesh, [Shard(-1)])
    teacher = distribute_tensor(full_teacher, mesh, [Shard(-1)])
    replicated = distribute_tensor(full_student, mesh, [Replicate()])
    by_rows = distribute_tensor(full_teacher, mesh, [Shard(0)])
    _raises(ValueError, r"student_logits is a DTensor with placements \(Replicate\(\),\).*Shard\(-1\).*full_tensor",
            lambda: kdcore.kd_loss(replicated, teacher))
    _raises(ValueError, r"teacher_logits is a DTensor with placements \(Shard\(dim=0\),\).*redistribute",
            lambda: kdcore.kd_loss(student, by_rows))
    _raises(TypeError, "teacher_logits must be a DTensor", lambda: kdcore.kd_loss(student, full_teacher))
    _raises(TypeError, "student_logits must be a DTensor", lambda: kdcore.kd_loss(full_student, teacher))
    _raises(TypeError, "teacher_logits is a SparseTeacher",
            lambda: kdcore.kd_loss(student, SparseTeacher(torch.zeros(6, 2, dtype=torch.long), torch.zeros(6, 2))))
    _raises(ValueError, "vocab_size=11 is not supported", lambda: kdcore.kd_loss(student, teacher, vocab_size=11))
    _raises(ValueError, "inplace_grad=True is not supported",
            lambda: kdcore.kd_loss(student, teacher, inplace_grad=True))
    _raises(ValueError, "backend", lambda: kdcore.kd_loss(student, teacher, backend="no-such-backend"))
    _raises(ValueError, r"labels is a DTensor with placements \(Shard\(dim=0\),\)",
            lambda: kdcore.kd_loss(student, teacher, labels=distribute_tensor(torch.arange(6), mesh, [Shard(0)])))
    _raises(TypeError, r"student_logits is a DTensor; pass this rank's slice \(student_logits.to_local\(\)\)",
            lambda: vocab_parallel_kd_loss(student, teacher))


CHECKS: dict[str, Callable[[int, int], None]] = {
    **{case.name: (lambda rank, world, case=case: check_value_case(case, rank, world)) for case in VALUE_CASES},
    "one_sided_bad_values": check_one_sided_bad_values,
    "dtensor_distributed": check_dtensor_distributed,
    "dtensor_colwise_parallel": check_dtensor_colwise_parallel,
    "collectives": check_collectives,
    "errors": check_errors,
    "dtensor_errors": check_dtensor_errors,
}


# -- the process groups ---------------------------------------------------------------------------

def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    """Runs every check on one rank of a gloo group; writes {check: failure or null} as JSON."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=60))
    failures = {}
    try:
        for name, check in CHECKS.items():
            try:
                check(rank, world)
                failures[name] = None
            except Exception:  # noqa: BLE001 - recorded and reported by the test of that check
                failures[name] = traceback.format_exc(limit=4)
    finally:
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(failures))
        # no rank tears its connections down while another still uses them, and no mesh outlives the group
        dist.barrier()
        gc.collect()
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Groups:
    """Runs every check once per world size, on first demand; {check: failure or None} merged over ranks."""

    def __init__(self, root: Path):
        self.root = root
        self.results: dict[int, dict[str, str | None]] = {}

    def failures(self, world: int) -> dict[str, str | None]:
        if world not in self.results:
            out_dir = self.root / f"world{world}"
            out_dir.mkdir()
            mp.spawn(_worker, args=(world, _free_port(), str(out_dir)), nprocs=world, join=True)
            merged = {name: None for name in CHECKS}
            for rank in range(world):
                for name, failure in json.loads((out_dir / f"rank{rank}.json").read_text()).items():
                    if failure is not None and merged[name] is None:
                        merged[name] = f"rank {rank}:\n{failure}"
            self.results[world] = merged
        return self.results[world]


@pytest.fixture(scope="module")
def groups(tmp_path_factory):
    return Groups(tmp_path_factory.mktemp("vocab_parallel"))


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("world", WORLD_SIZES)
def test_vocab_parallel(groups, world, check):
    failure = groups.failures(world)[check]
    if failure is not None:
        pytest.fail(f"{check} on {world} ranks failed on {failure}", pytrace=False)


def test_needs_a_process_group():
    from kdcore.parallel import vocab_parallel_kd_loss

    if dist.is_initialized():
        pytest.skip("a process group is already initialized in this process")
    with pytest.raises(RuntimeError, match="init_process_group"):
        vocab_parallel_kd_loss(torch.zeros(2, 3), torch.zeros(2, 3))


def test_import_kdcore_stays_light():
    """kd_loss on plain tensors does not import torch.distributed.tensor or kdcore.parallel."""
    import subprocess
    import sys

    code = ("import sys, torch, kdcore; kdcore.kd_loss(torch.zeros(2, 3), torch.zeros(2, 3)); "
            "print('torch.distributed.tensor' in sys.modules, 'kdcore.parallel' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]
