"""The flops profiler: FLOPs, MACs, parameters and latency per module of any NNX model.

``get_model_profile(model, input_shape=...)`` is DeepSpeed's function of that name for Flax
NNX: same arguments, same return value ``(flops, macs, params)``, the same printed report
(summary, aggregated profile per depth, detailed tree). ``profile_function`` profiles any
``fn(model, *args)`` (a loss, a generate step); the engine's ``flops_profiler`` section uses it
during training.

The counting lives in ``jaxpr_count.py`` (module scopes, the jaxpr walk, per-op costs) and
the per-op timing in ``op_time.py``; this module builds the tree and prints the reports.

How it counts (DeepSpeed patches torch functions and counts their arguments; a jitted JAX
program has no hooks, so jds counts the program itself):

1. **Module paths on every equation.** While the function is traced, each submodule's
   ``__call__`` runs inside ``jax.named_scope("~<path>")`` (its attribute path in the model,
   e.g. ``~blocks.0.attn``), so every equation of the jaxpr carries the module that made it in
   its name stack; ``jax.named_scope`` blocks inside a model's own code (jds's Llama and
   GPT-2 name ``layers``, ``self_attn``, ``mlp``, ...) become child nodes of the module they
   run in. Equations outside any module (a loss computed outside ``model(...)``) form the
   node ``<outside the model>``.
2. **Exact counts per equation**, walking into ``jit``, ``scan`` (times its length), ``cond``
   (its most expensive branch), ``while`` (once: the trip count is not in the program),
   ``custom_jvp``/``custom_vjp`` (the primal), ``checkpoint`` and ``shard_map`` (times the
   devices of its manual axes). MACs: ``dot_general`` (output elements x contracted size)
   and ``conv_general_dilated`` (output elements x kernel window x input features per
   group), whatever the dtype; FLOPs = 2 x MACs for them, as DeepSpeed counts matmuls and
   convolutions. Every other floating-point op costs one FLOP per output element
   (elementwise arithmetic, activations, exp/log/tanh, the bias add), reductions and
   pooling windows one per *input* element (DeepSpeed's pooling convention); data
   movement, indexing, comparisons, RNG and collectives cost none. A Pallas kernel costs
   its ``pl.CostEstimate`` (jds's kernels give their dense matmul count; MACs = FLOPs / 2),
   or its body times its grid when it has none.

   Where this differs from DeepSpeed: DeepSpeed charges softmax, GELU/SiLU and the norms a
   fixed 1-5 FLOPs per element by convention and misses what it has not patched (``@`` on
   tensors, einsum in places, attention in older versions); jds charges what the program
   executes (softmax is max, subtract, exp, sum and divide: about 5 per element). MACs and
   parameters are the same by construction, FLOPs agree to a few percent on convolutional
   and MLP models (the CIFAR CNN of DeepSpeed's tutorial: MACs and parameters equal
   DeepSpeed's, FLOPs within 0.02%).
3. **Parameters** of a node are those it owns (its attribute subtree) plus those its
   equations read (followed through casts, reshapes, slices, sharding constraints and the
   layer scan), so a named scope inside a module (a Llama layer's ``self_attn``) reports the
   weights it uses, a tied embedding appears under both the embedding and the LM head, and
   every parameter counts once in the total.
4. **Latency** is measured on the compiled program, not by re-running modules: the forward is
   compiled once, run ``warm_up`` times, timed (median wall time, the root's latency), and
   run once more under ``jax.profiler``; each executed HLO op's own time (its event minus
   the events nested in it) is charged to the node its metadata ``op_name`` names. A fused
   op that mixes two modules is charged to the module of its root instruction, and ops run
   concurrently can sum to more than the wall time; per-node latency is the op time XLA
   spent there. Where the profiler records no per-op events, only the root has a latency.
5. ``compiled.cost_analysis()`` FLOPs are reported beside the count: XLA's own estimate of
   the optimised program (it fuses, drops dead code, counts transcendental ops apart, and
   counts a ``while`` body once: for a scanned layer stack it reports about one layer, which
   is why the count above walks the jaxpr instead). Without loops the two agree to a few
   percent (the CIFAR CNN: 0.1%).
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jds.profiling.jaxpr_count import OUTSIDE, count_jaxpr, eqn_cost, module_scopes
from jds.profiling.op_time import op_paths, op_times


# ---------------------------------------------------------------------------- numbers
def number_to_string(num: float, units: str | None = None, precision: int = 2) -> str:
    """``1322556 -> '1.32 M'`` (DeepSpeed's formatting: T, G, M, K, '', m, u)."""
    scales = [(1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K"), (1, ""), (1e-3, "m"),
              (1e-6, "u")]
    if units is None:
        magnitude, units = next(((m, u) for m, u in scales if num >= m), (1e-6, "u"))
        if num == 0:
            magnitude, units = 1, ""
    else:
        magnitude = dict((u, m) for m, u in scales).get(units, 1)
    return f"{round(num / magnitude, precision):g} {units}"


def macs_to_string(macs: float, units: str | None = None, precision: int = 2) -> str:
    return f"{number_to_string(macs, units, precision)}MACs"


def flops_to_string(flops: float, units: str | None = None, precision: int = 2) -> str:
    return f"{number_to_string(flops, units, precision)}FLOPS"


def params_to_string(params: float, units: str | None = None, precision: int = 2) -> str:
    units = units.replace("B", "G") if units else units
    return number_to_string(params, units, precision).replace("G", "B").strip()


def duration_to_string(seconds: float, units: str | None = None, precision: int = 2) -> str:
    return f"{number_to_string(seconds, units, precision)}s"


# ---------------------------------------------------------------------------- the tree
@dataclasses.dataclass
class Node:
    """One module (or named scope) of the profile; counts include its children.

    Attributes:
      path: attribute path from the model (``()`` for the model itself).
      kind: the module's class name, or ``"scope"`` for a ``jax.named_scope`` node.
      flops, macs: forward FLOPs and multiply-accumulates (per call of the profiled function).
      params: parameters owned or read (each counted once).
      latency: seconds of XLA op time charged here (the root: the forward's wall time), or
        None where nothing was measured.
      children: child nodes by name, in the order they first appear.
    """

    path: tuple[str, ...]
    kind: str
    flops: float = 0.0
    macs: float = 0.0
    params: int = 0
    latency: float | None = None
    children: dict[str, Node] = dataclasses.field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.path[-1] if self.path else ""

    def walk(self, depth: int = 0) -> Iterator[tuple[int, Node]]:
        yield depth, self
        for child in self.children.values():
            yield from child.walk(depth + 1)


@dataclasses.dataclass
class ModelProfile:
    """What ``profile_function`` measured.

    Attributes:
      root: the model's node (the whole tree under it).
      flops, macs, params: totals (``root``'s).
      latency: median wall seconds of one compiled call (None if not timed).
      xla_flops: ``compiled.cost_analysis()["flops"]`` of the same program, or None.
      op_time: seconds of XLA op time in the profiled call (all nodes), or None without
        profiler events (then only the root has a latency).
    """

    root: Node
    flops: float
    macs: float
    params: int
    latency: float | None
    xla_flops: float | None
    op_time: float | None

    def node(self, path: str | Sequence[str]) -> Node:
        """The node at ``"a.b"`` / ``("a", "b")`` (``KeyError`` naming the children)."""
        parts = tuple(path.split(".")) if isinstance(path, str) else tuple(path)
        n = self.root
        for p in parts:
            if p not in n.children:
                raise KeyError(f"no node {'.'.join(parts)!r}: {'.'.join(n.path) or 'the model'}"
                               f" has children {list(n.children)}")
            n = n.children[p]
        return n

    # ------------------------------------------------------------------ printing
    def summary_lines(self) -> list[str]:
        fmt = "{:<60}  {:<12}"
        lines = [fmt.format("params: ", params_to_string(self.params)),
                 fmt.format("fwd MACs: ", macs_to_string(self.macs)),
                 fmt.format("fwd flops: ", number_to_string(self.flops))]
        if self.xla_flops is not None:
            lines.append(fmt.format("fwd flops (XLA cost analysis; loop bodies once): ",
                                    number_to_string(self.xla_flops)))
        if self.latency:
            lines.append(fmt.format("fwd latency: ", duration_to_string(self.latency)))
            lines.append(fmt.format("fwd FLOPS = fwd flops / fwd latency: ",
                                    flops_to_string(self.flops / self.latency)))
        return lines

    def aggregated(self, module_depth: int = -1, top_modules: int = 1) -> str:
        """DeepSpeed's "top modules per depth": params, MACs, latency by class at each depth."""
        info: dict[int, dict[str, list[float]]] = {}
        for depth, n in self.root.walk():
            row = info.setdefault(depth, {}).setdefault(n.kind if n.kind != "scope" else n.name,
                                                       [0.0, 0.0, 0.0])
            row[0] += n.macs
            row[1] += n.params
            row[2] += n.latency or 0.0
        depth = len(info) - 1 if module_depth == -1 else min(module_depth, len(info) - 1)
        out = [f"Top {top_modules} modules in terms of params, MACs or fwd latency at different "
               "model depths:"]

        def top(d: int, i: int, f: Callable[[float], str]) -> dict[str, str]:
            ranked = sorted(info[d].items(), key=lambda kv: kv[1][i], reverse=True)
            return {k: f(v[i]) for k, v in ranked[:top_modules]}

        for d in range(depth + 1):
            out += [f"depth {d}:", f"    params      - {top(d, 1, params_to_string)}",
                    f"    MACs        - {top(d, 0, macs_to_string)}",
                    f"    fwd latency - {top(d, 2, duration_to_string)}"]
        return "\n".join(out)

    def tree(self, module_depth: int = -1) -> str:
        """The detailed profile: one line per node, indented, to ``module_depth``."""
        total_lat = self.root.latency or 0.0
        op_total = self.op_time or 0.0
        lines = []
        for depth, n in self.root.walk():
            if module_depth != -1 and depth > module_depth:
                continue
            lat_share = (n.latency or 0.0) / (total_lat if depth == 0 else op_total or 1.0)
            items = [f"{params_to_string(n.params)} = {_pct(n.params, self.params)}% Params",
                     f"{macs_to_string(n.macs)} = {_pct(n.macs, self.macs)}% MACs",
                     f"{number_to_string(n.flops)}FLOPs = {_pct(n.flops, self.flops)}% FLOPs"]
            if n.latency is not None:
                items += [f"{duration_to_string(n.latency)} = {round(100 * lat_share, 2):g}% "
                          "latency",
                          flops_to_string(n.flops / n.latency if n.latency else 0.0)]
            if depth == 0 or n.path == (OUTSIDE,):
                label = n.kind if depth == 0 else n.name
            else:
                label = f"({n.name}): " + ("named_scope" if n.kind == "scope" else n.kind)
            lines.append("  " * depth + f"{label}({', '.join(items)})")
        return "\n".join(lines)

    def text(self, *, module_depth: int = -1, top_modules: int = 1, detailed: bool = True,
             header: Sequence[str] | None = None, title: str = "Profile Summary:") -> str:
        """The whole report, in DeepSpeed's layout (``header``: summary lines replacing
        ``summary_lines()``)."""
        rule = "-" * 26
        parts = [f"\n{rule} jds Flops Profiler {rule}", title,
                 *(self.summary_lines() if header is None else header),
                 f"\n{rule} Aggregated Profile {rule}", self.aggregated(module_depth, top_modules)]
        if detailed:
            parts += [f"\n{rule} Detailed Profile {rule}",
                      "Each module profile is listed after its name in the following order:\n"
                      "params, percentage of total params, MACs, percentage of total MACs, "
                      "FLOPs, percentage of total FLOPs, fwd latency, percentage of total fwd "
                      "latency, fwd FLOPS",
                      "\nNote: the model's latency is the compiled forward's wall time; a "
                      "module's is the XLA op time charged to it (ops of one module can run "
                      "concurrently), its percentage that of all op time.\n",
                      self.tree(module_depth)]
        parts.append("-" * 78)
        return "\n".join(parts)


def _pct(x: float, total: float) -> float:
    return round(100 * x / total, 2) if total else 0.0


# ---------------------------------------------------------------------------- profiling
def profile_function(
    fn: Callable[..., Any],
    model: nnx.Module,
    *args: Any,
    train: bool = False,
    warm_up: int = 1,
    timed: bool = True,
    ignore_modules: Sequence[type | str] | None = None,
    **kwargs: Any,
) -> ModelProfile:
    """Profile ``fn(model, *args, **kwargs)``: FLOPs, MACs, parameters and latency per node.

    Args:
      fn: any function of the model and inputs (``lambda m, x: m(x)``, a loss).
      model: an ``nnx.Module``; not modified (a copy is switched to train or eval mode).
      train: profile in training mode (dropout on, batch statistics from the batch);
        default evaluation mode, as DeepSpeed's ``get_model_profile`` does.
      warm_up: compiled runs before timing.
      timed: measure latency (wall time and per-op time); False counts only.
      ignore_modules: module classes (or class names) not profiled on their own: their
        work counts in the module that calls them, as in DeepSpeed.

    Returns:
      A ``ModelProfile``.
    """
    ignore = tuple(ignore_modules or ())
    graphdef, state = nnx.split(model)
    copy = nnx.merge(graphdef, state)
    copy.train() if train else copy.eval()
    graphdef, state = nnx.split(copy)
    variables = jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, nnx.Variable))
    kinds_box: dict[tuple[str, ...], str] = {}

    def jds_profiled(state, args, kwargs):
        m = nnx.merge(graphdef, state)
        with module_scopes(m, ignore) as kinds:
            kinds_box.update(kinds)
            return fn(m, *args, **kwargs)

    jitted = jax.jit(jds_profiled)
    traced = jitted.trace(state, args, kwargs)
    closed = traced.jaxpr
    flat_state = jax.tree.leaves(state)
    n_state = len(flat_state)
    is_param = [isinstance(v, nnx.Param) for v in variables]
    param_ids = {v: frozenset({i}) for i, v in enumerate(closed.jaxpr.invars[:n_state])
                 if is_param[i]}
    count = count_jaxpr(closed.jaxpr, param_ids)

    # parameters: owned (attribute subtree) or read (usage), sized once each
    paths = [tuple(str(getattr(k, "key", getattr(k, "name", k))) for k in kp)
             for kp, _ in jax.tree_util.tree_flatten_with_path(
                 state, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]]
    sizes = {i: int(np.prod(flat_state[i].shape)) for i in range(n_state) if is_param[i]}

    root = Node((), type(model).__name__)
    nodes: dict[tuple[str, ...], Node] = {(): root}

    def node(path: tuple[str, ...]) -> Node:
        if path not in nodes:
            parent = node(path[:-1])
            kind = kinds_box.get(path, "scope")
            nodes[path] = parent.children.setdefault(path[-1], Node(path, kind))
        return nodes[path]

    for path in count.order:  # program order first, then modules that did no work
        node(path)
    for path in sorted(kinds_box, key=len):
        node(path)
    for path in count.used:
        node(path)
    self_flops = {p: count.flops.get(p, 0.0) for p in nodes}
    self_macs = {p: count.macs.get(p, 0.0) for p in nodes}
    used: dict[tuple[str, ...], set[int]] = {p: set(count.used.get(p, ())) for p in nodes}
    for _, n in sorted(((len(p), n) for p, n in nodes.items()), key=lambda t: -t[0]):
        n.flops = self_flops[n.path] + sum(c.flops for c in n.children.values())
        n.macs = self_macs[n.path] + sum(c.macs for c in n.children.values())
        for c in n.children.values():
            used[n.path] |= used[c.path]
        if n.path and n.path[0] != OUTSIDE:
            used[n.path] |= {i for i in sizes if paths[i][:len(n.path)] == n.path}
        n.params = sum(sizes[i] for i in used[n.path] if i in sizes)
    root.params = sum(sizes.values())

    latency = xla_flops = op_time = None
    lowered = traced.lower()
    compiled = lowered.compile()
    try:
        cost = compiled.cost_analysis()
        cost = cost[0] if isinstance(cost, (list, tuple)) else cost
        xla_flops = float(cost["flops"]) if cost and "flops" in cost else None
    except Exception:  # not every backend implements it
        xla_flops = None
    if timed:
        run = lambda: jax.block_until_ready(compiled(state, args, kwargs))  # noqa: E731
        for _ in range(max(warm_up, 1)):
            run()
        walls = []
        for _ in range(3):
            t0 = time.perf_counter()
            run()
            walls.append(time.perf_counter() - t0)
        latency = float(np.median(walls))
        text = compiled.as_text()
        module = re.search(r"HloModule (\S+?),", text)
        times = op_times(run, module.group(1)) if module else None
        if times:
            op_time = sum(times.values())
            ops = op_paths(text, count)
            charged: dict[tuple[str, ...], float] = {}
            for op, s in times.items():
                p = ops.get(op, ())
                while p not in nodes:
                    p = p[:-1]
                charged[p] = charged.get(p, 0.0) + s
            for _, n in sorted(((len(p), n) for p, n in nodes.items()), key=lambda t: -t[0]):
                n.latency = charged.get(n.path, 0.0) + sum(
                    c.latency or 0.0 for c in n.children.values())
        root.latency = latency
    return ModelProfile(root=root, flops=root.flops, macs=root.macs, params=root.params,
                        latency=latency, xla_flops=xla_flops, op_time=op_time)


def emit(text: str, output_file: str | os.PathLike | None) -> None:
    if output_file:
        path = os.path.abspath(os.fspath(output_file))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text + "\n")
    else:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()


def train_profile_text(
    prof: ModelProfile, *, step: int | None, seconds: float, mesh_shape: Mapping[str, int],
    dp: int, micro_per_device: int, accumulation: int, samples: int,
    recompute_fwd_factor: float = 0.0, module_depth: int = -1, top_modules: int = 1,
    detailed: bool = True,
) -> str:
    """The ``flops_profiler`` report of a train step, in DeepSpeed's layout.

    ``prof`` profiles the loss on one global micro-batch; the step runs ``accumulation`` of
    them, forward and backward: ``(3 + recompute_fwd_factor) x`` forward FLOPs (backward
    costs twice the forward, as DeepSpeed counts), shared by every device.
    """
    from jds.profiling.flops import device_peak_flops

    devices = math.prod(mesh_shape.values())
    factor = 3.0 + recompute_fwd_factor
    fwd_dev = prof.flops / devices
    step_flops_dev = factor * fwd_dev * accumulation
    achieved = step_flops_dev / seconds
    fmt = "{:<60}  {:<12}"
    header = [
        fmt.format("world size (devices): ", devices),
        fmt.format("data parallel size: ", dp),
        fmt.format("tensor parallel size: ", mesh_shape.get("tensor", 1)),
        fmt.format("pipeline stages: ", mesh_shape.get("stage", 1)),
        fmt.format("batch size per device (micro-batch): ", micro_per_device),
        fmt.format("gradient accumulation steps: ", accumulation),
        fmt.format("params of model: ", params_to_string(prof.params)),
        fmt.format("fwd MACs per device (one micro-batch): ", macs_to_string(prof.macs / devices)),
        fmt.format("fwd flops per device (one micro-batch): ", number_to_string(fwd_dev)),
        fmt.format("fwd flops of model (one micro-batch): ", number_to_string(prof.flops)),
    ]
    if prof.xla_flops is not None:
        header.append(fmt.format("fwd flops of model (XLA cost analysis; loop bodies once): ",
                                 number_to_string(prof.xla_flops)))
    if prof.latency:
        header.append(fmt.format("fwd latency (one micro-batch, compiled alone): ",
                                 duration_to_string(prof.latency)))
    peak = device_peak_flops()
    header += [
        fmt.format("iter latency (the measured train step): ", duration_to_string(seconds)),
        fmt.format(f"FLOPS per device = {factor:g} * fwd flops per device * {accumulation} "
                   "/ iter latency: ", flops_to_string(achieved)),
        fmt.format("MFU (vs the device's peak FLOP/s): ",
                   f"{100 * achieved / peak:.2f}% of {flops_to_string(peak)}"
                   if peak == peak else "n/a (unknown device peak)"),
        fmt.format("samples/second: ", round(samples / seconds, 2)),
    ]
    return "\n".join([
        prof.text(module_depth=module_depth, top_modules=top_modules, detailed=detailed,
                  header=header, title=f"Profile Summary at step {step}:"),
    ])


def get_model_profile(
    model: nnx.Module,
    input_shape: tuple[int, ...] | None = None,
    args: Sequence[Any] = (),
    kwargs: Mapping[str, Any] | None = None,
    print_profile: bool = True,
    detailed: bool = True,
    module_depth: int = -1,
    top_modules: int = 1,
    warm_up: int = 1,
    as_string: bool = True,
    output_file: str | os.PathLike | None = None,
    ignore_modules: Sequence[type | str] | None = None,
) -> tuple[Any, Any, Any]:
    """FLOPs, MACs and parameters of ``model``'s forward (DeepSpeed's ``get_model_profile``).

    Args:
      model: any ``nnx.Module``; profiled in evaluation mode on a copy.
      input_shape: build one zero input of this shape (the first parameter's float dtype,
        else float32) as the only positional argument.
      args, kwargs: the real inputs otherwise (int token ids for language models).
      print_profile: print the report (DeepSpeed's layout) to stdout or ``output_file``.
      detailed: include the per-module tree.
      module_depth: deepest level printed (-1: all).
      top_modules: modules per depth in the aggregated profile.
      warm_up: compiled runs before the latency is measured.
      as_string: return strings like ``"1.32 M"``, ``"651.72 KMACs"``, ``"62.01 K"``.
      output_file: write the report here instead of stdout.
      ignore_modules: module classes (or names) whose work is charged to their caller.

    Returns:
      ``(flops, macs, params)`` of one forward call.

    Raises:
      ValueError: neither ``input_shape`` nor ``args``/``kwargs`` given.
    """
    kwargs = dict(kwargs or {})
    if input_shape is not None:
        if not isinstance(input_shape, tuple) or not input_shape:
            raise ValueError(f"input_shape must be a non-empty tuple; got {input_shape!r}")
        dtypes = [x.dtype for x in jax.tree.leaves(nnx.state(model, nnx.Param))
                  if jnp.issubdtype(x.dtype, jnp.floating)]
        args = (jnp.zeros(input_shape, dtypes[0] if dtypes else jnp.float32),)
    if not args and not kwargs:
        raise ValueError("get_model_profile needs input_shape=(...) or the model's inputs "
                         "as args=(...)/kwargs={...}")
    prof = profile_function(lambda m, *a, **k: m(*a, **k), model, *args,
                            warm_up=warm_up, ignore_modules=ignore_modules, **kwargs)
    if print_profile:
        emit(prof.text(module_depth=module_depth, top_modules=top_modules, detailed=detailed,
                        title=f"Profile Summary at step {warm_up}:"), output_file)
    if as_string:
        return (number_to_string(prof.flops), macs_to_string(prof.macs),
                params_to_string(prof.params))
    return prof.flops, prof.macs, prof.params


__all__ = ["OUTSIDE", "ModelProfile", "Node", "duration_to_string", "emit", "eqn_cost",
           "flops_to_string", "get_model_profile", "macs_to_string", "number_to_string",
           "params_to_string", "profile_function", "train_profile_text"]
