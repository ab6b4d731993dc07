"""Counting a traced program per module, for the flops profiler (``model_profile``).

``module_scopes`` traces a model with every submodule's ``__call__`` under
``jax.named_scope("~<path>")``; ``count_jaxpr`` walks the resulting jaxpr (into ``jit``,
``scan``, ``cond``, ``while``, custom derivatives, ``checkpoint``, ``shard_map`` and Pallas
calls) and returns FLOPs and MACs per node path and the parameters each node reads. The
conventions are written down in ``jds.profiling.model_profile``'s docstring.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

OUTSIDE = "<outside the model>"
SCOPE_MARK = "~"  # "@" would break XLA's op names

# Primitives that cost no FLOPs: data movement, indexing, comparisons, RNG, collectives.
_FREE = frozenset("""
reshape broadcast_in_dim squeeze expand_dims transpose convert_element_type bitcast_convert_type
slice dynamic_slice dynamic_update_slice concatenate pad gather scatter select_n iota copy copy_p
sharding_constraint stop_gradient rev sort_key_val device_put reduce_precision optimization_barrier
random_bits random_seed random_wrap random_unwrap random_fold_in random_split threefry2x32
psum pmax pmin all_gather all_to_all ppermute psum_scatter reduce_scatter axis_index pvary
mesh_cast split
""".split())
# Ops through which a parameter stays "the same parameter" (casts, views, slices, gathers of
# ZeRO-3 shards): their output carries the input's parameter ids.
_ALIAS = frozenset("""
reshape broadcast_in_dim squeeze expand_dims transpose convert_element_type slice dynamic_slice
sharding_constraint copy copy_p device_put reduce_precision all_gather pvary mesh_cast
optimization_barrier
""".split())
_HLO_KIND = {"dot_general": "dot", "conv_general_dilated": "convolution"}
_REDUCE = re.compile(r"^(reduce_(sum|max|min|prod|and|or|xor)|argmax|argmin|cum\w+)$")


@contextlib.contextmanager
def module_scopes(model: nnx.Module, ignore: Sequence[type | str]) -> Iterator[dict]:
    """Run every module's ``__call__`` of ``model`` inside ``named_scope("~path")``.

    Yields ``{path: class name}`` of the modules found. The classes are patched only for
    the duration (calls of other instances pass through unchanged).
    """
    paths: dict[int, str] = {}
    kinds: dict[tuple[str, ...], str] = {}
    for path, module in nnx.iter_modules(model):
        cls = type(module)
        if any(cls is i or (isinstance(i, str) and cls.__name__ == i) for i in ignore) and path:
            continue
        key = tuple(str(p) for p in path)
        paths.setdefault(id(module), ".".join(key))
        kinds.setdefault(key, cls.__name__)
    classes = {type(m) for _, m in nnx.iter_modules(model) if id(m) in paths}
    originals = {cls: cls.__call__ for cls in classes if "__call__" in dir(cls)}
    own = {cls: "__call__" in cls.__dict__ for cls in originals}

    def wrap(call: Callable) -> Callable:
        def scoped(self, *args, **kwargs):
            path = paths.get(id(self))
            if path is None:
                return call(self, *args, **kwargs)
            with jax.named_scope(SCOPE_MARK + path):
                return call(self, *args, **kwargs)
        return scoped

    try:
        for cls, call in originals.items():
            cls.__call__ = wrap(call)
        yield kinds
    finally:
        for cls, call in originals.items():
            if own[cls]:
                cls.__call__ = call
            else:
                delattr(cls, "__call__")


def resolve(parts: Sequence[str], scopes: set[str] | None = None) -> tuple[str, ...]:
    """Node path of a name stack: ``~a.b`` parts are absolute module paths, other parts
    (named scopes; only those in ``scopes`` when given) nest under the current node; no
    ``@`` part at all means outside the model."""
    path: tuple[str, ...] | None = None
    for p in parts:
        if p.startswith(SCOPE_MARK):
            path = tuple(p[1:].split(".")) if len(p) > 1 else ()
        elif path is not None and (scopes is None or p in scopes):
            path = path + (p,)
    return (OUTSIDE,) if path is None else path


_SCOPE_NAME = re.compile(r"^[A-Za-z_][\w.\-]*$")


def _stack_parts(eqn: Any) -> list[str]:
    """The name stack's module marks and named scopes; transform entries (``vmap(...)``,
    ``jit(...)``) and the einsum specs ``jnp.einsum`` scopes itself under are dropped."""
    return [p for p in str(eqn.source_info.name_stack).split("/")
            if p.startswith(SCOPE_MARK) or _SCOPE_NAME.match(p)]


def _size(aval: Any) -> int:
    return int(math.prod(getattr(aval, "shape", ())))


def _is_float(aval: Any) -> bool:
    dt = getattr(aval, "dtype", None)
    return dt is not None and jnp.issubdtype(dt, jnp.inexact)


def eqn_cost(eqn: Any) -> tuple[float, float]:
    """``(flops, macs)`` of one equation that has no sub-program (see the module docstring)."""
    name = eqn.primitive.name
    if name == "dot_general":
        (lhs_contract, _), _ = eqn.params["dimension_numbers"]
        lhs = eqn.invars[0].aval
        macs = _size(eqn.outvars[0].aval) * math.prod(lhs.shape[d] for d in lhs_contract)
        return 2.0 * macs, float(macs)
    if name == "conv_general_dilated":
        rhs = eqn.invars[1].aval
        rhs_spec = eqn.params["dimension_numbers"].rhs_spec  # (out feat, in feat, *spatial)
        macs = _size(eqn.outvars[0].aval) * math.prod(rhs.shape[d] for d in rhs_spec[1:])
        return 2.0 * macs, float(macs)
    if name in _FREE:
        return 0.0, 0.0
    if _REDUCE.match(name) or name.startswith("reduce_window"):
        return float(sum(_size(v.aval) for v in eqn.invars[:1] if _is_float(v.aval))), 0.0
    return float(sum(_size(v.aval) for v in eqn.outvars if _is_float(v.aval))), 0.0


@dataclasses.dataclass
class Count:
    flops: dict[tuple[str, ...], float] = dataclasses.field(default_factory=dict)
    macs: dict[tuple[str, ...], float] = dataclasses.field(default_factory=dict)
    used: dict[tuple[str, ...], set[int]] = dataclasses.field(default_factory=dict)
    scopes: set[str] = dataclasses.field(default_factory=set)
    order: list[tuple[str, ...]] = dataclasses.field(default_factory=list)
    # ("dot" | "convolution", output shape) -> node paths of the matmuls and convolutions
    # that make it: names the HLO ops that XLA rewrites without metadata (see op_paths)
    shapes: dict[tuple[str, tuple[int, ...]], set[tuple[str, ...]]] = dataclasses.field(
        default_factory=dict)
    # variable -> ids of the parameters it is (through casts, reshapes, slices, gathers)
    env: dict[Any, frozenset[int]] = dataclasses.field(default_factory=dict)

    def add(self, path: tuple[str, ...], flops: float, macs: float) -> None:
        if path not in self.flops:
            self.flops[path] = self.macs[path] = 0.0
            self.order.append(path)
        self.flops[path] += flops
        self.macs[path] += macs

    def scale(self, other: Count, k: float) -> None:
        for path in other.order:
            self.add(path, other.flops[path] * k, other.macs[path] * k)
        for path, ids in other.used.items():
            self.used.setdefault(path, set()).update(ids)
        self.scopes |= other.scopes
        for key, paths in other.shapes.items():
            self.shapes.setdefault(key, set()).update(paths)

    def total(self) -> float:
        return sum(self.flops.values())


def _closed(j: Any) -> Any:
    return j.jaxpr if hasattr(j, "jaxpr") and hasattr(j, "consts") else j


def _sub_programs(eqn: Any) -> list[tuple[list[tuple[Any, list[Any]]], float, str]]:
    """``[([(jaxpr, outer operands), ...], multiplier, combine)]`` of an equation's bodies."""
    p, name, ins = eqn.params, eqn.primitive.name, list(eqn.invars)
    if name == "scan":
        return [([(_closed(p["jaxpr"]), ins)], float(p["length"]), "sum")]
    if name == "while":
        cn, bn = p["cond_nconsts"], p["body_nconsts"]
        return [([(_closed(p["body_jaxpr"]), ins[cn:]),
                  (_closed(p["cond_jaxpr"]), ins[:cn] + ins[cn + bn:])], 1.0, "sum")]
    if name == "cond":
        return [([(_closed(b), ins[1:]) for b in p["branches"]], 1.0, "max")]
    if name == "shard_map":
        mesh = p["mesh"]
        axes = p.get("manual_axes") or p.get("newly_manual_axes") or mesh.axis_names
        k = math.prod(dict(mesh.shape)[a] for a in axes)
        return [([(_closed(p["jaxpr"]), ins)], float(k), "sum")]
    if name in ("custom_jvp_call", "custom_vjp_call", "custom_vjp_call_jaxpr"):
        body = p.get("call_jaxpr") or p.get("fun_jaxpr")
        return [([(_closed(body), ins)], 1.0, "sum")] if body is not None else []
    skip = ("jvp_jaxpr_fun", "bwd", "fwd_jaxpr_thunk")  # derivatives: not the forward
    bodies = [(_closed(v), ins) for k, v in p.items()
              if hasattr(_closed(v), "eqns") and k not in skip]
    return [(bodies, 1.0, "sum")] if bodies else []


def count_jaxpr(jaxpr: Any, param_ids: Mapping[Any, frozenset[int]] | None = None,
                prefix: Sequence[str] = ()) -> Count:
    """FLOPs and MACs per node path, and the parameter ids each node reads, of a jaxpr."""
    env: dict[Any, frozenset[int]] = dict(param_ids or {})
    out = Count()

    def ids(atoms: Sequence[Any]) -> frozenset[int]:
        s: frozenset[int] = frozenset()
        for a in atoms:
            if not hasattr(a, "val"):  # Literals carry no parameters
                s = s | env.get(a, frozenset())
        return s

    for eqn in jaxpr.eqns:
        parts = [*prefix, *_stack_parts(eqn)]
        out.scopes.update(p for p in parts if not p.startswith(SCOPE_MARK))
        path = resolve(parts)
        name = eqn.primitive.name
        if name == "pallas_call":
            est = eqn.params.get("cost_estimate")
            if est is not None:
                out.add(path, float(est.flops), float(est.flops) / 2)
            else:
                grid = getattr(eqn.params.get("grid_mapping"), "grid", ()) or ()
                body = count_jaxpr(_closed(eqn.params["jaxpr"]), prefix=parts)
                out.scale(body, float(math.prod(g for g in grid if isinstance(g, int))))
            got = ids(eqn.invars)
            if got:
                out.used.setdefault(path, set()).update(got)
            continue
        subs = _sub_programs(eqn)
        if subs:
            for bodies, k, combine in subs:
                counts = []
                for body, operands in bodies:
                    inner = {v: ids([a]) for v, a in zip(body.invars, operands, strict=False)}
                    c = count_jaxpr(body, {v: s for v, s in inner.items() if s}, parts)
                    counts.append((c, body))
                if combine == "max":
                    counts = [max(counts, key=lambda cb: cb[0].total())]
                for c, body in counts:
                    out.scale(c, k)
                    # outputs that are parameters (a cast inside a jit) stay parameters
                    if len(body.outvars) == len(eqn.outvars):
                        for o, v in zip(eqn.outvars, body.outvars, strict=True):
                            s = frozenset() if hasattr(v, "val") else c.env.get(v, frozenset())
                            if s:
                                env[o] = env.get(o, frozenset()) | s
            continue
        got = ids(eqn.invars[:1] if name in ("dynamic_slice", "slice") else eqn.invars)
        if name in _ALIAS:
            for o in eqn.outvars:
                if got:
                    env[o] = got
            continue
        flops, macs = eqn_cost(eqn)
        out.add(path, flops, macs)
        if name in _HLO_KIND:
            key = (_HLO_KIND[name], tuple(eqn.outvars[0].aval.shape))
            out.shapes.setdefault(key, set()).add(path)
        if got:
            out.used.setdefault(path, set()).update(got)
    out.env = env
    return out


__all__ = ["OUTSIDE", "SCOPE_MARK", "Count", "count_jaxpr", "eqn_cost", "module_scopes",
           "resolve"]
