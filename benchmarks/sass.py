"""Reads NVIDIA SASS listings: functions, instructions with their source locations, and loops.

The static performance report (benchmarks/sass_budget.py) needs three things from the machine
code of a kernel: how many instructions it issues per element in its steady-state loops, which
source loop each machine loop implements, and what the assembler reported about registers and
spills. This module parses the two listings the CUDA toolkit prints:

- ``nvdisasm -c -gi`` (with code compiled ``-lineinfo``): instructions annotated with
  ``//## File "...", line N inlined at "...", line M ...`` and branch targets as labels;
- ``cuobjdump -sass``: instructions with numeric branch targets and no source locations;

and the ``ptxas -v`` report (``Used N registers``, spill bytes, shared memory) per function.

A loop is a backward branch: a ``BRA`` at address ``e`` whose target ``s <= e``; its body is every
instruction in ``[s, e]``. Only innermost loops (no other loop strictly inside) are returned,
since those are where a kernel spends its per-element time.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

_INSTRUCTION = re.compile(r"^\s*/\*(?P<address>[0-9a-f]{4,})\*/\s+(?P<body>[^;]*);")
_LOCATION = re.compile(r'"(?P<file>[^"]+)", line (?P<line>\d+)')
_LABEL = re.compile(r"^\s*(?P<label>\.L_x_\d+):")
_NVDISASM_FUNCTION = re.compile(r"^\s*\.text\.(?P<name>\S+):\s*$")
_CUOBJDUMP_FUNCTION = re.compile(r"^\s*Function : (?P<name>\S+)\s*$")
_BRANCH_TARGET = re.compile(r"(?:`\((?P<label>\.L_x_\d+)\)|(?P<address>0x[0-9a-f]+))")

Location = tuple[str, int]  # (source file, line)


@dataclass(frozen=True)
class Instruction:
    address: int
    opcode: str          # without predicate and modifiers' operands, e.g. "FFMA", "LDS.128"
    text: str            # the whole instruction as listed, predicate included
    locations: tuple[Location, ...] = ()  # innermost first, then each "inlined at" site
    target: int | None = None             # branch target address, for BRA

    @property
    def is_nop(self) -> bool:
        return self.opcode == "NOP"


@dataclass(frozen=True)
class Loop:
    start: int  # address of the first instruction of the body (the branch target)
    end: int    # address of the backward branch
    instructions: tuple[Instruction, ...]

    @property
    def issued(self) -> int:
        """Instructions one iteration issues (padding NOPs excluded)."""
        return sum(not i.is_nop for i in self.instructions)


@dataclass
class Function:
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def loops(self) -> list[Loop]:
        """The innermost loops, in address order."""
        spans = sorted({(i.target, i.address) for i in self.instructions
                        if i.target is not None and i.target <= i.address})
        innermost = [(s, e) for s, e in spans
                     if not any((s2, e2) != (s, e) and s <= s2 and e2 <= e for s2, e2 in spans)]
        return [Loop(s, e, tuple(i for i in self.instructions if s <= i.address <= e)) for s, e in innermost]


def _opcode(body: str) -> str:
    tokens = body.split()
    if tokens and tokens[0].startswith("@"):
        tokens = tokens[1:]
    return tokens[0] if tokens else ""


def parse_sass(text: str) -> dict[str, Function]:
    """Functions of an ``nvdisasm -c [-gi]`` or ``cuobjdump -sass`` listing, by mangled name."""
    functions: dict[str, Function] = {}
    current: Function | None = None
    locations: tuple[Location, ...] = ()
    in_locations = False
    labels: dict[str, int] = {}
    pending_labels: list[str] = []
    pending_targets: list[tuple[Function, int, str]] = []
    for line in text.splitlines():
        header = _NVDISASM_FUNCTION.match(line) or _CUOBJDUMP_FUNCTION.match(line)
        if header:
            current = functions.setdefault(header["name"], Function(header["name"]))
            locations = ()
            continue
        if "//##" in line:  # one or more lines of locations precede an instruction
            found = tuple((m["file"], int(m["line"])) for m in _LOCATION.finditer(line))
            locations = locations + found if in_locations else found
            in_locations = True
            continue
        in_locations = False
        label = _LABEL.match(line)
        if label:
            pending_labels.append(label["label"])
            continue
        instruction = _INSTRUCTION.match(line)
        if instruction is None or current is None:
            continue
        address = int(instruction["address"], 16)
        body = instruction["body"].strip()
        opcode = _opcode(body)
        target = None
        if opcode.startswith("BRA"):
            found = _BRANCH_TARGET.search(body)
            if found and found["address"]:
                target = int(found["address"], 16)
            elif found:
                pending_targets.append((current, len(current.instructions), found["label"]))
        for name in pending_labels:
            labels[name] = address
        pending_labels.clear()
        current.instructions.append(Instruction(address, opcode, body, locations, target))
    for function, index, name in pending_targets:
        old = function.instructions[index]
        function.instructions[index] = Instruction(old.address, old.opcode, old.text, old.locations, labels.get(name))
    return functions


@dataclass(frozen=True)
class Resources:
    registers: int
    spill_store_bytes: int
    spill_load_bytes: int
    stack_bytes: int
    shared_bytes: int

    @property
    def spill_bytes(self) -> int:
        return self.spill_store_bytes + self.spill_load_bytes


_PTXAS_PROPERTIES = re.compile(
    r"Function properties for (?P<name>\S+)\s*\n\s*(?P<stack>\d+) bytes stack frame, (?P<stores>\d+) bytes spill "
    r"stores, (?P<loads>\d+) bytes spill loads")
_PTXAS_USAGE = re.compile(r"Compiling entry function '(?P<name>[^']+)'.*?Used (?P<registers>\d+) registers"
                          r"(?:.*?(?P<smem>\d+) bytes smem)?", re.S)


def parse_ptxas_report(text: str) -> dict[str, Resources]:
    """Registers, spills, stack and static shared memory per entry function from ``ptxas -v``."""
    properties = {m["name"]: m for m in _PTXAS_PROPERTIES.finditer(text)}
    resources = {}
    for chunk in text.split("ptxas info    : Compiling entry function")[1:]:
        usage = _PTXAS_USAGE.search("Compiling entry function" + chunk)
        if usage is None:
            continue
        name = usage["name"]
        props = properties.get(name)
        resources[name] = Resources(
            registers=int(usage["registers"]),
            spill_store_bytes=int(props["stores"]) if props else 0,
            spill_load_bytes=int(props["loads"]) if props else 0,
            stack_bytes=int(props["stack"]) if props else 0,
            shared_bytes=int(usage["smem"] or 0),
        )
    return resources
