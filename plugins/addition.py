"""The ``addition`` dataset: multi-digit addition written as text, with the rationale of the
written method (column by column, with carries), generated from a seed with no download; for
testing reasoning distillation (``reasoning_kd``) on a task whose rationales are known to be right.

Each problem is a line of bytes (one token per byte, as in the ``text`` dataset)::

    47+85=7+5+0=12;4+8+1=13;A:132
    |prompt|----- rationale -----|answer|

The prompt is the two operands and ``=``, written to the same width as columns are aligned in
written addition (the shorter operand with leading zeros: ``07+85=``). The rationale has one
step per column, from the units up: the column's two digits, the carry coming in and their
two-digit sum, whose units digit is the answer's digit in that column and whose tens digit is
the carry into the next; ``;`` ends each step. :data:`ANSWER_MARKER` (``"A:"``) starts the answer
(the sum in decimal: the last carry, when it is 1, then the columns' digits from the highest
down) and :data:`END` (a newline) ends the line. The same problems come in two
views: ``rationale: true`` (the targets are rationale, marker and answer) and ``rationale: false``
(marker and answer only: ``47+85=A:132``).

Items are ``{"input_ids", "labels"}`` in the language-modelling layout of the ``text`` dataset:
labels shifted by one, ``-100`` on the prompt (every position before the first predicted byte)
and on the padding after :data:`END` (padded with :data:`END` bytes to the split's longest line),
so generation-based methods continue exactly the prompt.

Splits: ``train`` and ``val`` (held out, as wide as the training problems) draw each problem's
number of columns (the digits of its longer operand) uniformly from ``columns``; ``long`` (held
out) from ``long_columns``, wider than any trained on: whether what was learned carries over to
longer problems. The longer operand has exactly that many digits, the other any number up to
it. The problems of each split are distinct and no held-out problem occurs in ``train``; they
depend only on ``seed``, the sizes and the column ranges, not on the view.
"""

from __future__ import annotations

import random

import torch
from torch.utils.data import Dataset

import kdcore

ANSWER_MARKER = "A:"
END = "\n"


def rationale_of(a: int, b: int) -> str:
    """The written steps of ``a + b`` (see the module docstring), e.g. ``"7+5+0=12;4+8+1=13;"`` for
    47 + 85."""
    steps, carry = [], 0
    for column in range(width_of(a, b)):
        x, y = a // 10 ** column % 10, b // 10 ** column % 10
        total = x + y + carry
        steps.append(f"{x}+{y}+{carry}={total:02d};")
        carry = total // 10
    return "".join(steps)


def width_of(a: int, b: int) -> int:
    """The problem's number of columns: the digits of its longer operand."""
    return max(len(str(a)), len(str(b)))


def prompt(a: int, b: int) -> str:
    """The operands written to the same width, the shorter one padded with zeros (as columns are
    aligned in written addition), and ``=``."""
    digits = width_of(a, b)
    return f"{a:0{digits}d}+{b:0{digits}d}="


def target(a: int, b: int, with_rationale: bool) -> str:
    """What follows the prompt: the rationale (if ``with_rationale``), the marker, the answer and
    the end of the line."""
    return (rationale_of(a, b) if with_rationale else "") + f"{ANSWER_MARKER}{a + b}{END}"


def parse_answer(text: str) -> int | None:
    """The answer a continuation gives: the decimal number after the first answer marker, up to the
    end of the line; None when there is no marker or no number there."""
    _, marker, rest = text.partition(ANSWER_MARKER)
    digits = rest.split(END, 1)[0]
    if not marker or not digits.isdigit() or not digits.isascii():
        return None
    return int(digits)


class Problems(Dataset):
    """Addition problems as padded byte rows (see the module docstring); ``problems`` keeps the
    operand pairs, in item order."""

    def __init__(self, problems: list[tuple[int, int]], with_rationale: bool) -> None:
        self.problems = problems
        lines = [(prompt(a, b), target(a, b, with_rationale)) for a, b in problems]
        width = max(len(p) + len(t) for p, t in lines) - 1
        self.input_ids = torch.full((len(lines), width), ord(END), dtype=torch.long)
        self.labels = torch.full((len(lines), width), -100, dtype=torch.long)
        for row, (before, after) in enumerate(lines):
            tokens = torch.tensor(list((before + after).encode()), dtype=torch.long)
            self.input_ids[row, :len(tokens) - 1] = tokens[:-1]
            self.labels[row, len(before) - 1:len(tokens) - 1] = tokens[len(before):]

    def __len__(self) -> int:
        return len(self.problems)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}


def _column_range(name: str, value) -> tuple[int, int]:
    if not (isinstance(value, (list, tuple)) and len(value) == 2
            and all(isinstance(d, int) and not isinstance(d, bool) for d in value) and 1 <= value[0] <= value[1]):
        raise ValueError(f"addition: {name} must be [fewest, most] columns with 1 <= fewest <= most, got {value!r}")
    return value[0], value[1]


def _draw(rng: random.Random, columns: tuple[int, int], count: int, taken: set[tuple[int, int]],
          name: str) -> list[tuple[int, int]]:
    """``count`` distinct problems not in ``taken`` (which they are added to), their number of
    columns uniform in ``columns``."""

    def draw() -> tuple[int, int]:
        digits = rng.randint(*columns)
        longer = rng.randint(10 ** (digits - 1) if digits > 1 else 0, 10 ** digits - 1)
        other = rng.randrange(10 ** digits)
        return (longer, other) if rng.random() < 0.5 else (other, longer)

    drawn: list[tuple[int, int]] = []
    for _ in range(50 * count):
        if len(drawn) == count:
            return drawn
        problem = draw()
        if problem not in taken:
            taken.add(problem)
            drawn.append(problem)
    if len(drawn) == count:
        return drawn
    raise ValueError(f"addition: {name} asks for more distinct problems than {columns[0]} to {columns[1]} "
                     "columns give; lower it or widen the column range")


def addition(train_size: int = 4096, val_size: int = 512, long_size: int = 512, columns=(2, 3), long_columns=(4, 4),
             rationale: bool = True, seed: int = 0) -> dict[str, Dataset]:
    """The ``train``, ``val`` and ``long`` splits (see the module docstring), with the rationales in
    the targets or (``rationale: false``) the answers alone."""
    columns, long_columns = _column_range("columns", columns), _column_range("long_columns", long_columns)
    if long_columns[0] <= columns[1]:
        raise ValueError(f"addition: long_columns must start above the trained widths (columns={list(columns)}), "
                         f"got {list(long_columns)}")
    for name, size in (("train_size", train_size), ("val_size", val_size), ("long_size", long_size)):
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"addition: {name} must be a positive int, got {size!r}")
    rng, taken = random.Random(seed), set()
    val = _draw(rng, columns, val_size, taken, "val_size")  # held out first, so train avoids them
    long = _draw(rng, long_columns, long_size, taken, "long_size")
    train = _draw(rng, columns, train_size, taken, "train_size")
    return {split: Problems(problems, rationale) for split, problems in
            (("train", train), ("val", val), ("long", long))}


@kdcore.hookimpl
def kdcore_register_datasets(register):
    register("addition", addition, description="multi-digit addition as text, with written carry steps as "
                                               "rationales; held-out wider problems (no download)")
