"""What the compiled step's peak memory is made of, read from XLA's own buffer assignment.

``memory_analysis()`` gives four totals (arguments, temporaries, outputs, aliased); when a
run does not fit, a user needs to know *what* is live at the peak. XLA's buffer assignment
knows: compiled with ``xla_dump_to``, it writes a live-range report ending in "Stack trace
breakdown for peak usage", a tree of every buffer live at the peak instant, grouped by the
JAX name stack (``jit(train_step)/while/body/transpose(jvp())/...``) or the argument's path
(``state.opt_state[1].mu.layers.wq``). ``peak_breakdown`` compiles a lowered step once more
with that dump switched on (in a temporary folder: ``compiler_options``, not ``XLA_FLAGS``,
so nothing else is dumped), parses the tree, and sorts each live buffer into a category:

- ``params``, ``master``, ``optimizer``, ``other state``, ``batch``: arguments (the train
  state and the batch), by their path;
- ``loop carry``: values a ``while`` loop carries from one iteration to the next — the
  gradient accumulator of the micro-batch scan, the gradients a backward layer scan stacks;
- ``gathered params``: ZeRO-3 parameters gathered for compute (``zero_gathered``, or an
  all-gather);
- ``backward``: temporaries of the backward pass (``transpose(jvp(...))``);
- ``forward``: activations and temporaries of the forward pass (``jvp(...)``);
- ``dtype copies``: a fusion that only converts dtype (on CPU, XLA computes 16-bit dots in
  fp32 and keeps fp32 copies of 16-bit weights: a GPU does not);
- ``other``: everything else — the optimizer update, clipping, casts after the step.

The categories come from names XLA and JAX write, so they are a reading aid, not an
accounting identity; the per-buffer rows (``items``) say exactly what each one is. The
total is XLA's own peak of the heap it simulates, which can differ from ``memory_analysis``'s
argument + temp + output - alias (that sum counts every argument whole for the whole step,
even one that a donation lets XLA reuse early).
"""

from __future__ import annotations

import dataclasses
import glob
import os
import re
import tempfile
from typing import Any

import jax

CATEGORIES = ("params", "master", "optimizer", "other state", "batch", "loop carry",
              "gathered params", "backward", "forward", "dtype copies", "other")

_NODE = re.compile(r"^([\s│├└─]*)([^\s│├└─].*?) \([\d.]+%, total: ([\d ]+) bytes, "
                   r"current: ([\d ]+) bytes")
_INSTR = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = (\S+?) ([\w\-]+)\(")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


@dataclasses.dataclass(frozen=True)
class PeakItem:
    """One buffer live at the peak.

    Attributes:
      name: XLA's name for it: an argument's path, an op's name stack, or an instruction.
      bytes: its size.
      category: one of ``CATEGORIES``.
      where: the name-stack path that leads to it (the enclosing loops), ``/``-joined.
      shape: its HLO shape when the instruction is known, else "".
    """

    name: str
    bytes: int
    category: str
    where: str
    shape: str = ""


@dataclasses.dataclass(frozen=True)
class PeakBreakdown:
    """The buffers live at the compiled step's peak, per category.

    Attributes:
      total: XLA's peak heap bytes (per device).
      by_category: bytes per category (every category present, zeros included).
      items: every live buffer, largest first.
    """

    total: int
    by_category: dict[str, int]
    items: tuple[PeakItem, ...]

    def as_dict(self, top: int = 20) -> dict[str, Any]:
        """JSON-ready: totals, categories and the ``top`` largest buffers."""
        return {"total": self.total, "by_category": dict(self.by_category),
                "items": [dataclasses.asdict(i) for i in self.items[:top]]}


def _instructions(hlo_text: str) -> dict[str, tuple[str, str, str]]:
    """``{instruction name: (shape, opcode, op_name)}`` from HLO text."""
    out = {}
    for line in hlo_text.splitlines():
        m = _INSTR.match(line)
        if m:
            op_name = _OP_NAME.search(line)
            out[m.group(1)] = (m.group(2), m.group(3), op_name.group(1) if op_name else "")
    return out


def parse_peak_tree(report: str) -> tuple[int, list[tuple[tuple[str, ...], str, int]]]:
    """The peak tree of a live-range report: ``(total, [(ancestors, leaf name, bytes)])``.

    Raises:
      ValueError: the report has no "Stack trace breakdown for peak usage" section.
    """
    lines = report.splitlines()
    start = next((i for i, line in enumerate(lines)
                  if "Stack trace breakdown for peak usage" in line), None)
    if start is None:
        raise ValueError("XLA's live-range report has no peak breakdown (this XLA version "
                         "does not write one)")
    total = int(re.sub(r"\D", "", lines[start].split(":", 1)[1]))
    nodes: list[tuple[int, str, int]] = []
    for line in lines[start + 1:]:
        m = _NODE.match(line)
        if m is None:
            if nodes and not line.strip():
                break
            continue
        col = len(m.group(1))  # the root's name starts at column 4, depth k >= 1 at 6 + 4k
        depth = 0 if not nodes else max(1, (col - 6) // 4)
        nodes.append((depth, m.group(2), int(m.group(4).replace(" ", ""))))
    leaves = []
    stack: list[str] = []
    for k, (depth, name, current) in enumerate(nodes):
        del stack[depth:]
        is_leaf = k + 1 == len(nodes) or nodes[k + 1][0] <= depth
        if is_leaf and current:
            leaves.append((tuple(stack), name, current))
        stack.append(name)
    return total, leaves


def _category(path: tuple[str, ...], name: str, info: tuple[str, str, str] | None) -> str:
    top = path[1] if len(path) > 1 else name
    # an argument: a "state" node over its fields, or one dotted path ("state.params.w")
    if top == "state" or top.startswith("state."):
        kind = (path[2] if len(path) > 2 else name) if top == "state" else top.split(".")[1]
        return {"params": "params", "master": "master"}.get(
            kind, "optimizer" if kind.startswith("opt_state") else "other state")
    if top.startswith("batch"):
        return "batch"
    base = re.sub(r"\{[\d,]*\}$", "", name)
    shape, opcode, op_name = info or ("", "", "")
    text = name if "/" in name else op_name
    if re.match(r"^(wide\.)*param[\w.]*$", base) or re.search(r"/while\{\d+\}$", name):
        return "loop carry"
    if "zero_gathered" in text or opcode == "all-gather" or "all-gather" in base:
        return "gathered params"
    if "transpose(" in text:
        return "backward"
    if "jvp(" in text:
        return "forward"
    if "convert" in base and opcode == "fusion" and "convert_element_type" not in op_name:
        return "dtype copies"
    return "other"


def breakdown_from_dump(folder: str) -> PeakBreakdown:
    """Read the peak breakdown of the one module XLA dumped into ``folder``.

    Raises:
      FileNotFoundError: no live-range report there.
    """
    reports = sorted(glob.glob(os.path.join(folder, "*after_optimizations-live-range.txt")))
    if not reports:
        raise FileNotFoundError(f"XLA wrote no live-range report into {folder}")
    report = reports[-1]
    hlo_file = report.replace("-live-range.txt", ".txt")
    with open(report, encoding="utf-8") as f:
        total, leaves = parse_peak_tree(f.read())
    instrs: dict[str, tuple[str, str, str]] = {}
    if os.path.isfile(hlo_file):
        with open(hlo_file, encoding="utf-8") as f:
            instrs = _instructions(f.read())
    items = []
    for path, name, size in leaves:
        info = instrs.get(re.sub(r"\{[\d,]*\}$", "", name))
        cat = _category(path, name, info)
        where = "/".join(p for p in path[1:] if "/" in p or p.startswith("state"))
        items.append(PeakItem(name, size, cat, where, info[0] if info else ""))
    items.sort(key=lambda i: -i.bytes)
    by = {c: 0 for c in CATEGORIES}
    for i in items:
        by[i.category] += i.bytes
    return PeakBreakdown(total, by, tuple(items))


def compile_with_breakdown(lowered: jax.stages.Lowered
                           ) -> tuple[jax.stages.Compiled, PeakBreakdown | None]:
    """Compile ``lowered`` with XLA's buffer-assignment dump (into a temporary folder,
    removed afterwards) and read its peak breakdown.

    Returns:
      ``(compiled, breakdown)``; the breakdown is None when XLA wrote no peak report: a
      backend that does not, or a compile served from JAX's persistent compilation cache
      (which ignores dump options in its key and compiles nothing; ``jds estimate`` does
      not use that cache for this reason).
    """
    with tempfile.TemporaryDirectory(prefix="jds-peak-") as folder:
        compiled = lowered.compile(compiler_options={
            "xla_dump_to": folder, "xla_dump_hlo_as_text": True,
            "xla_dump_hlo_pass_re": "^$",
        })
        try:
            return compiled, breakdown_from_dump(folder)
        except (FileNotFoundError, ValueError):
            return compiled, None


def peak_breakdown(lowered: jax.stages.Lowered) -> PeakBreakdown:
    """``compile_with_breakdown(lowered)``'s breakdown.

    Raises:
      RuntimeError: this backend's XLA wrote no peak report.
    """
    breakdown = compile_with_breakdown(lowered)[1]
    if breakdown is None:
        raise RuntimeError(f"the {jax.default_backend()} compiler wrote no buffer-assignment "
                           "peak report; run the estimate on CPU (jds estimate does)")
    return breakdown


__all__ = ["CATEGORIES", "PeakBreakdown", "PeakItem", "breakdown_from_dump",
           "compile_with_breakdown", "parse_peak_tree", "peak_breakdown"]
