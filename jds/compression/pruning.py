"""Sparse, row, head and channel pruning (DeepSpeed's ``sparse_pruning``, ``row_pruning``,
``head_pruning``, ``channel_pruning``) on any NNX model.

**What is pruned** (DeepSpeed 0.16's ``LinearLayer_Compress`` / ``Conv2dLayer_Compress``):

* sparse: single weights of Linear and Conv modules;
* row: a Linear module's output channels (PyTorch's weight rows), and their bias;
* head: a Linear module's *input* features split into ``num_heads`` runs (the attention
  output matrix's heads);
* channel: a Conv module's output channels, and their bias.

The modules are found as weight quantization finds them (``weight_quantization.targets``:
Hugging Face names for jds's stacked decoders, e.g. ``model.layers.3.mlp.up_proj``,
attribute paths for any other model). A pattern that selects some layers of a stacked
decoder prunes those layers only; each layer's matrix gets its own mask, as each of
DeepSpeed's per-layer modules does.

**Masks.** ``l1``: computed once, when training starts, from the weights' magnitudes (sparse:
each weight's ``|w|``; row / channel: each channel's L1 norm), keeping the top
``ceil(dense_ratio * n)`` (DeepSpeed's ``TopKBinarizer``). ``topk``: a learned score per weight
/ row / head / channel, initialised as DeepSpeed initialises it (Kaiming-uniform with
``a = sqrt(5)`` on its tensor, i.e. ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``); the mask keeps the
top ``ceil(dense_ratio * n)`` scores, and the scores train through a straight-through
estimator (``TopKBinarizer``'s backward passes the gradient unchanged). The forward pass of
optimizer step ``t`` multiplies the weights by their mask once ``t >= schedule_offset``
(DeepSpeed's compression scheduler turns a technique on at that step and never off), after
weight quantization, as DeepSpeed's layers do. A pruned weight gets no gradient through the
loss (its product with 0); like DeepSpeed, jds still lets the optimizer's weight decay act on
it, and ``redundancy_clean`` zeroes or removes it at the end.

**Where the masks and scores live.** On the engine's copy of the model, in a
``compression_state`` sub-module (``PruningMask`` variables for ``l1``, ``PruningScores``
parameters for ``topk``), carrying the pruned weight's logical axes so that tensor
parallelism and ZeRO shard them as the weight; the scores are trained (and checkpointed) like
any parameter. ``redundancy_clean`` reads them from ``engine.model``.

**redundancy_clean** (``clean``): without ``related_modules`` the pruned weights (and
biases) are zeroed in place; with them the pruned rows / heads / channels are removed
physically, together with the matching inputs of the related modules (row: the next
Linear's input rows; head: the q/k/v matrices' output heads; channel: the next Conv's input
channels or a BatchNorm's channels), so the exported model is smaller. For jds's Llama, row
pruning of ``mlp.up_proj`` or ``mlp.gate_proj`` with ``mlp.down_proj`` related removes the
intermediate channels from all three (the product ``silu(gate) * up`` is zero there, so
removing the partner's rows changes nothing), and head pruning of ``self_attn.o_proj`` with
q/k/v related removes whole heads (multi-head attention only); the model's config shrinks
to match. With activation quantization on a module that reads removed channels, the smaller model's
outputs can differ slightly from the masked model's, in DeepSpeed as in jds: an asymmetric
``[min, max]`` no longer counts the pruned zeros, and a head-pruned output matrix's input
held the pruned heads' (unmasked) outputs until they were removed.
DeepSpeed pairs the related modules of pattern ``i`` with the masks of pattern
0's modules (its ``stored_mask`` is not reset per pattern); jds pairs each pattern's modules
with its own related modules, in order.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jds.compression import quantizers
from jds.compression.weight_quantization import (
    _STEP,
    Target,
    _flatten,
    _search,
    _unflatten,
    matches,
    targets,
)
from jds.config.compression import PRUNING, CompressionConfig

PyTree = Any
STATE = "compression_state"  # the sub-module that holds masks and scores
_KIND = {"sparse_pruning": "sparse", "row_pruning": "row", "head_pruning": "head",
         "channel_pruning": "channel"}
_MODULES = {"sparse": ("linear", "conv"), "row": ("linear",), "head": ("linear",),
            "channel": ("conv",)}


class PruningMask(nnx.Variable):
    """A fixed ``l1`` pruning mask (computed from the weights when training starts)."""


class PruningScores(nnx.Param):
    """The learned scores of ``topk`` pruning (trained like the weights)."""


class CompressionState(nnx.Module):
    """The masks and scores of a model's pruning, one attribute per pruned weight
    (``<kind>__<weight path>``)."""


def topk_mask(scores: jax.Array, ratio: float) -> jax.Array:
    """DeepSpeed's ``TopKBinarizer`` (``quantizers.topk_mask``) with its backward: the
    gradient passes straight through to ``scores``."""
    binary = quantizers.topk_mask(scores, ratio)
    # exactly 0 / 1 in the forward pass (scores + (binary - scores) can miss 1 by a bit)
    return jax.lax.stop_gradient(binary) + (scores - jax.lax.stop_gradient(scores))


@dataclasses.dataclass(frozen=True)
class Pruned:
    """One pruned weight: a target, a technique, and where its mask comes from."""

    target: Target
    kind: str  # sparse | row | head | channel
    method: str  # l1 | topk
    ratio: float
    offset: int
    group: str
    layers: tuple[bool, ...] | None  # stacked: which layers the group prunes
    num_heads: int | None = None

    @property
    def key(self) -> str:
        return f"{self.kind}__" + "__".join(map(str, self.target.path))

    def mask_shape(self) -> tuple[int, ...]:
        """The mask of one matrix (one layer when stacked)."""
        t = self.target
        dims = t.shape[1:] if t.stacked else t.shape
        if self.kind == "sparse":
            return tuple(dims)
        if self.kind == "head":
            return (self.num_heads,)
        return tuple(dims[t.n_in:])  # row / channel: the output channels

    def fan_in(self) -> int:
        """The fan-in of DeepSpeed's score tensor (its Kaiming-uniform bound)."""
        t = self.target
        dims = t.shape[1:] if t.stacked else t.shape
        if self.kind == "sparse":
            return int(np.prod(dims[:t.n_in]))
        return self.num_heads if self.kind == "head" else 1

    def l1_scores(self, w: jax.Array) -> jax.Array:
        """What an ``l1`` mask ranks, for one matrix."""
        a = jnp.abs(w.astype(jnp.float32))
        if self.kind == "sparse":
            return a
        return jnp.sum(a, axis=tuple(range(self.target.n_in)))  # per output channel

    def masked(self, w: jax.Array, m: jax.Array) -> jax.Array:
        """One matrix ``w`` times its mask ``m``."""
        m = m.astype(w.dtype)
        if self.kind == "head":
            n_in = self.target.n_in
            shape = w.shape
            w = w.reshape((self.num_heads, -1) + shape[n_in:])
            return (w * m.reshape((self.num_heads,) + (1,) * (w.ndim - 1))).reshape(shape)
        return w * m  # sparse: same shape; row / channel: broadcast over the inputs


def _stack_apply(p: Pruned, fn: Callable, *arrays: jax.Array) -> jax.Array:
    return jax.vmap(fn)(*arrays) if p.target.stacked else fn(*arrays)


@dataclasses.dataclass(frozen=True)
class PruningPlan:
    """The weights a config prunes, and how (see the module docstring)."""

    items: tuple[Pruned, ...]
    related: dict[str, tuple[tuple[Target, ...], ...]]  # key -> per-layer related targets
    seed: int

    # ------------------------------------------------------------------ model state
    def attach(self, model: nnx.Module) -> None:
        """Add the masks (``l1``, from the model's current weights) and scores (``topk``)
        to ``model`` in place, as ``model.compression_state``; masks and scores already
        there with the right shape and kind are kept."""
        holder = getattr(model, STATE, None) or CompressionState()
        flat = dict(_flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param))))
        variables = {path: v for path, v in _variables(model)}
        key = jax.random.key(self.seed)
        for i, p in enumerate(self.items):
            t = p.target
            axes = _mask_axes(p, variables[t.path])
            shape = ((t.shape[0],) if t.stacked else ()) + p.mask_shape()
            have = getattr(holder, p.key, None)
            if have is not None and tuple(have.get_value().shape) == shape and isinstance(
                    have, PruningMask if p.method == "l1" else PruningScores):
                continue  # attached before (init_compression), perhaps edited since
            if p.method == "l1":
                w = flat[t.path]
                value = _stack_apply(p, lambda w_m, p=p: topk_mask(p.l1_scores(w_m), p.ratio),
                                     w).astype(jnp.bool_)
                var = PruningMask(jax.lax.stop_gradient(value))
            else:
                bound = 1.0 / math.sqrt(p.fan_in())
                value = jax.random.uniform(jax.random.fold_in(key, i), shape, jnp.float32,
                                           -bound, bound)
                var = PruningScores(value)
            if axes is not None:
                var.set_metadata("axes", axes)
            setattr(holder, p.key, var)
        setattr(model, STATE, holder)

    def masks(self, params: PyTree, model_state: PyTree) -> dict[str, jax.Array]:
        """Each pruned weight's mask (stacked: ``[layers, ...]``; layers the group does not
        prune are all ones), from the model's ``compression_state``."""
        out = {}
        for p in self.items:
            if p.method == "l1":
                m = _lookup(model_state, (STATE, p.key))
                if m is None:
                    raise ValueError(f"the model has no l1 mask for {_dotted(p.target.path)} "
                                     f"({STATE}.{p.key}); prune a model the engine trained")
                m = m.astype(jnp.float32)
            else:
                s = _lookup(params, (STATE, p.key))
                if s is None:
                    raise ValueError(
                        f"the model has no topk scores for {_dotted(p.target.path)} "
                        f"({STATE}.{p.key}): topk pruning learns them in training; pass the "
                        "trained model (engine.model)")
                m = _stack_apply(p, lambda s_m, p=p: topk_mask(s_m, p.ratio), s)
            if p.target.stacked and p.layers is not None and not all(p.layers):
                on = jnp.asarray(p.layers).reshape((-1,) + (1,) * (m.ndim - 1))
                m = jnp.where(on, m, jnp.ones_like(m))
            out[p.key] = m
        return out

    def apply(self, tree: PyTree, model_state: PyTree, step: jax.Array, *,
              scores_from: PyTree | None = None) -> PyTree:
        """``tree`` (trainable or frozen parameters) with every pruned weight in it, and a
        row / channel's bias, masked for the forward pass of optimizer step ``step``; the
        ``topk`` scores are read from ``scores_from`` (default ``tree``)."""
        flat = dict(_flatten(tree))
        if not any(p.target.path in flat for p in self.items):
            return tree
        masks = self.masks(tree if scores_from is None else scores_from, model_state)
        on = {p.offset: jnp.asarray(step, jnp.int32) >= p.offset for p in self.items}
        for p in self.items:
            t = p.target
            if t.path not in flat:
                continue
            m, w = masks[p.key], flat[t.path]
            flat[t.path] = jnp.where(on[p.offset], _stack_apply(p, p.masked, w, m), w)
            if p.kind in ("row", "channel") and t.bias is not None and t.bias in flat:
                b = flat[t.bias]
                flat[t.bias] = jnp.where(on[p.offset], b * m.astype(b.dtype), b)
        return _unflatten(tree, flat)

    def wrap(self, objective: Callable) -> Callable:
        """``objective(params, frozen, model_state, batch)`` with the weights masked for the
        step ``jds.compression.quantization_step`` names (the engine sets it)."""

        def pruned(params, frozen, model_state, *args, **kwargs):
            step = _STEP.get()
            if step is None:
                raise RuntimeError("a pruning objective ran outside "
                                   "jds.compression.quantization_step(step)")
            return objective(self.apply(params, model_state, step),
                             self.apply(frozen, model_state, step, scores_from=params),
                             model_state, *args, **kwargs)

        return pruned

    def optimizer(self, tx: optax.GradientTransformation, params: PyTree
                  ) -> optax.GradientTransformation:
        """``tx`` with each ``topk`` score left alone until its technique starts.

        PyTorch's optimizers skip a parameter whose gradient is None: DeepSpeed's scores
        are unused before ``schedule_offset``, so they get no weight decay, no moments and
        no step count until then (Adam's bias correction starts at their first step). jds
        gives them the same: the scores of each start step get their own ``tx`` state,
        kept fresh while they wait (the learning-rate schedule's count runs on, as
        DeepSpeed's one schedule does), and their updates replace those of the main state
        (whose moments for the scores go unused). The scores' own states are not
        parameter-shaped to the engine, so they are replicated: small for row / head /
        channel scores, a weight's size for sparse ``topk`` scores. ``tx`` itself when no
        score waits (every ``topk`` technique starts at step 0)."""
        starts: dict[int, list[tuple]] = {}
        for p in self.items:
            if p.method == "topk" and p.offset > 0:
                starts.setdefault(p.offset, []).append((STATE, p.key))
        if not starts:
            return tx
        flat = dict(_flatten(params))
        shapes = {k: tuple(flat[k].shape) for paths in starts.values() for k in paths}

        def init(params):
            return _ScoresState(tx.init(params), {
                f"start_{s}": tx.init([jnp.zeros(shapes[k], jnp.float32) for k in paths])
                for s, paths in starts.items()}, jnp.zeros((), jnp.int32))

        def update(grads, state, params=None):
            updates, inner = tx.update(grads, state.inner, params)
            flat_u, flat_g = dict(_flatten(updates)), dict(_flatten(grads))
            flat_p = dict(_flatten(params)) if params is not None else None
            own = {}
            for s, paths in starts.items():
                name, waiting = f"start_{s}", state.count < s
                u, new = tx.update([flat_g[k] for k in paths], state.scores[name],
                                   None if flat_p is None else [flat_p[k] for k in paths])
                own[name] = jax.tree.map(
                    lambda old, n, waiting=waiting: n if isinstance(
                        old, optax.ScaleByScheduleState) else jnp.where(waiting, old, n),
                    state.scores[name], new,
                    is_leaf=lambda x: isinstance(x, optax.ScaleByScheduleState))
                for k, u_k in zip(paths, u, strict=True):
                    flat_u[k] = jnp.where(waiting, jnp.zeros_like(u_k), u_k)
            return _unflatten(updates, flat_u), _ScoresState(inner, own, state.count + 1)

        return optax.GradientTransformation(init, update)


class _ScoresState(NamedTuple):
    inner: Any  # the optimizer's state over every parameter
    scores: dict[str, Any]  # per start step: its own state over those topk scores
    count: jax.Array  # updates applied


def _dotted(path: tuple) -> str:
    return ".".join(map(str, path))


def _lookup(tree: PyTree, path: tuple) -> Any:
    for k in path:
        if not isinstance(tree, dict) or k not in tree:
            return None
        tree = tree[k]
    return tree


def _variables(model: nnx.Module):
    for path, v in nnx.iter_graph(model):
        if isinstance(v, nnx.Variable):
            yield tuple(path), v


def _mask_axes(p: Pruned, weight: nnx.Variable) -> tuple | None:
    axes = weight.get_metadata().get("axes")
    if axes is None:
        return None
    axes = tuple(axes)
    t = p.target
    lead, dims = (axes[:1], axes[1:]) if t.stacked else ((), axes)
    if p.kind == "sparse":
        return axes
    if p.kind == "head":
        first = t.shape[1 if t.stacked else 0]
        return lead + ((dims[0],) if first == p.num_heads else (None,))
    return lead + tuple(dims[t.n_in:])


def plan(model: nnx.Module, config: CompressionConfig, *, seed: int = 0
         ) -> PruningPlan | None:
    """The pruning plan of ``config`` for ``model`` (None when no pruning is on).

    Raises:
      ValueError: a ``modules`` or ``related_modules`` pattern that matches nothing (or
        matches modules the technique cannot prune), a module two groups of one technique
        claim, ``num_heads`` not dividing a matrix's inputs, related modules that cannot be
        paired with the pruned ones.
    """
    found = targets(model)
    items: list[Pruned] = []
    related: dict[str, tuple[tuple[Target, ...], ...]] = {}
    for section in PRUNING:
        tech = getattr(config, section)
        shared = tech.shared_parameters
        if not shared.enabled:
            continue
        kind = _KIND[section]
        key = f"compression_training.{section}.different_groups"
        allowed = [t for t in found if t.module in _MODULES[kind]]
        claimed: dict[tuple, str] = {}
        for gname, group in tech.different_groups.items():
            for j, pattern in enumerate(group.modules):
                hits = matches(allowed, pattern, f"{key}.{gname}.modules",
                               f"{' or '.join(_MODULES[kind])} module {section} can prune")
                for t, layers in hits:
                    for i, on in enumerate(layers):
                        if on and claimed.get((t.path, i), gname) != gname:
                            raise ValueError(f"{key}: {_dotted(t.path)} is in groups "
                                             f"{claimed[(t.path, i)]!r} and {gname!r}; a "
                                             "module may be in one")
                        if on:
                            claimed[(t.path, i)] = gname
                    heads = None
                    if kind == "head":
                        heads = int(shared.num_heads)
                        dims = t.shape[1:] if t.stacked else t.shape
                        n_in = int(np.prod(dims[:t.n_in]))
                        if n_in % heads:
                            raise ValueError(
                                f"compression_training.head_pruning.shared_parameters."
                                f"num_heads={heads} does not divide the {n_in} input features "
                                f"of {_dotted(t.path)}")
                    p = Pruned(t, kind, shared.method, float(group.params.dense_ratio),
                               int(shared.schedule_offset), gname,
                               layers if t.stacked else None, heads)
                    old = next((x for x in items if x.key == p.key), None)
                    if old is not None:  # a target two patterns of one group hit
                        if t.stacked:
                            items[items.index(old)] = dataclasses.replace(
                                old, layers=tuple(a or b for a, b in zip(
                                    old.layers, layers, strict=True)))
                        continue
                    items.append(p)
                if group.related_modules is not None:
                    rel = _related(found, model, group.related_modules[j], hits, kind,
                                   f"{key}.{gname}.related_modules[{j}]")
                    for (t, _), r in zip(hits, rel, strict=True):
                        related[f"{kind}__" + "__".join(map(str, t.path))] = r
    for p in items:
        if p.target.stacked and p.layers is not None and not all(p.layers) and p.key in related:
            raise ValueError(
                f"compression_training.{p.kind}_pruning.different_groups.{p.group}: "
                f"related_modules removes pruned channels physically, but the group prunes "
                f"only some layers of {_dotted(p.target.path)}, a matrix jds stacks over all "
                "layers (every layer must keep the same count); prune every layer, or drop "
                "related_modules to zero the pruned weights in place")
    if not items:
        return None
    return PruningPlan(tuple(items), related, seed)


def _related(found: list[Target], model: nnx.Module, patterns: list[str],
             hits: list[tuple[Target, tuple[bool, ...]]], kind: str, where: str
             ) -> list[tuple[Target, ...]]:
    """For each pruned target of ``hits``, the related targets (stacked: the same layers;
    otherwise the j-th module each related pattern matches, in model order)."""
    bns = [(tuple(p), m) for p, m in nnx.iter_modules(model) if isinstance(m, nnx.BatchNorm)]
    per_pattern = []
    for pat in patterns:
        ts = [t for t in found if t.module in ("linear", "conv") and any(
            _search(pat, n) for ns in t.names for n in ns)]
        ts += [Target(path + ("scale",), ((".".join(map(str, path)),),), "norm", 0, False,
                      tuple(m.scale.shape), "batchnorm",
                      path + ("bias",) if m.bias is not None else None)
               for path, m in bns if kind == "channel" and _search(pat, ".".join(map(str, path)))]
        if not ts:
            raise ValueError(f"{where}: {pat!r} matches no module")
        per_pattern.append(ts)
    out = []
    if hits and hits[0][0].stacked:
        for t, _ in hits:
            out.append(tuple(r for ts in per_pattern for r in ts if r.stacked
                             and r.path[:-1] == t.path[:-1]))
        return out
    for ts in per_pattern:
        if len(ts) != len(hits):
            raise ValueError(f"{where}: {len(ts)} modules match {ts[0].names[0][0]!r}'s "
                             f"pattern but {len(hits)} are pruned; DeepSpeed pairs them in "
                             "order, so the counts must be equal")
    for i in range(len(hits)):
        out.append(tuple(ts[i] for ts in per_pattern))
    return out


__all__ = ["STATE", "CompressionState", "Pruned", "PruningMask", "PruningPlan",
           "PruningScores", "plan", "topk_mask"]


# ------------------------------------------------------------------------ redundancy_clean
def clean(model: nnx.Module, p_plan: PruningPlan) -> nnx.Module:
    """A copy of ``model`` with the pruning of ``p_plan`` made permanent (see the module
    docstring): pruned weights zeroed, or removed with their related modules' matching
    inputs where the plan has ``related_modules``; ``compression_state`` dropped.

    Raises:
      ValueError: a removal jds's model cannot express (named with the fix).
    """
    out = nnx.clone(model)
    params = nnx.to_pure_dict(nnx.state(out, nnx.Param))
    rest = nnx.to_pure_dict(nnx.state(out, nnx.Not(nnx.Param)))
    masks = {k: np.asarray(jax.device_get(v)) > 0.5
             for k, v in p_plan.masks(params, rest).items()}
    variables = dict(_variables(out))

    def get(path):
        return np.asarray(jax.device_get(variables[path].get_value()))

    def put(path, value):
        variables[path].set_value(jnp.asarray(value, variables[path].get_value().dtype))

    for p in p_plan.items:  # zero in place (also what removal then slices away)
        t, m = p.target, masks[p.key]
        put(t.path, np.asarray(_stack_apply(p, p.masked, jnp.asarray(get(t.path)),
                                            jnp.asarray(m, jnp.float32))))
        if p.kind in ("row", "channel") and t.bias is not None:
            put(t.bias, get(t.bias) * m.astype(get(t.bias).dtype))
    removals = [p for p in p_plan.items if p.kind != "sparse" and p.key in p_plan.related]
    for p in removals:
        if p.target.stacked:
            _remove_stacked(out, p, masks[p.key], p_plan.related[p.key], get, put, variables)
        else:
            _remove(out, p, masks[p.key], p_plan.related[p.key], get, put)
    if hasattr(out, STATE):
        delattr(out, STATE)
    return out


def _module(model: nnx.Module, path: tuple) -> nnx.Module:
    m = model
    for k in path:
        m = getattr(m, k) if not isinstance(k, int) else m[k]
    return m


def _remove(model: nnx.Module, p: Pruned, mask: np.ndarray, related: tuple[Target, ...],
            get: Callable, put: Callable) -> None:
    """Physical removal on a user model's Linear / Conv modules (DeepSpeed's
    ``dim_reduction``)."""
    t = p.target
    keep = np.flatnonzero(mask.reshape(-1))
    owner = _module(model, t.path[:-1])
    w = get(t.path)
    if p.kind == "head":  # the inputs of O, by head
        h = p.num_heads
        w = w.reshape((h, -1) + w.shape[1:])[keep].reshape((-1,) + w.shape[1:])
        put(t.path, w)
        owner.in_features = int(w.shape[0])
    else:  # row / channel: the outputs
        put(t.path, w[..., keep])
        if t.bias is not None:
            put(t.bias, get(t.bias)[keep])
        owner.out_features = int(keep.size)
    for r in related:
        rm = _module(model, r.path[:-1])
        if r.module == "batchnorm":
            for name in ("scale", "bias", "mean", "var"):
                v = getattr(rm, name, None)
                if v is not None:
                    v.set_value(jnp.asarray(np.asarray(v.get_value())[keep], v.get_value().dtype))
            rm.num_features = int(keep.size)
            continue
        rw = get(r.path)
        if p.kind == "head":  # the outputs of q / k / v, by head
            h = p.num_heads
            put(r.path, rw.reshape(rw.shape[:-1] + (h, -1))[..., keep, :]
                 .reshape(rw.shape[:-1] + (-1,)))
            if r.bias is not None:
                put(r.bias, get(r.bias).reshape(h, -1)[keep].reshape(-1))
            rm.out_features = int(rw.shape[-1] // h * keep.size)
        else:  # the inputs of the next module: the axis before the outputs
            if rw.shape[-2] != mask.size:
                raise ValueError(f"related module {_dotted(r.path[:-1])} takes "
                                 f"{rw.shape[-2]} inputs, but {_dotted(t.path[:-1])} keeps "
                                 f"{keep.size} of {mask.size} outputs; related_modules must "
                                 "consume the pruned module's outputs")
            put(r.path, np.take(rw, keep, axis=-2))
            rm.in_features = int(keep.size)


def _remove_stacked(model: nnx.Module, p: Pruned, mask: np.ndarray,
                    related: tuple[Target, ...], get: Callable, put: Callable,
                    variables: dict) -> None:
    """Physical removal in jds's stacked decoders: the MLP's intermediate channels (row
    pruning) or whole attention heads (head pruning); the config shrinks to match."""
    t = p.target
    layers = _module(model, t.path[:-1])
    name = t.path[-1]
    where = (f"compression_training.{p.kind}_pruning.different_groups.{p.group}."
             "related_modules")
    names = {r.path[-1] for r in related}
    keep = np.stack([np.flatnonzero(m_l.reshape(-1)) for m_l in mask])  # [L, k]
    cfg = model.config
    if p.kind == "row":
        spec = getattr(type(layers), "PRUNABLE_MLP", None)
        if spec is None or name not in spec[0] or spec[1] not in names:
            raise ValueError(
                f"{where}: jds removes rows of {type(layers).__name__}'s MLP input matrices "
                f"{list(spec[0]) if spec else []} with the output matrix "
                f"{spec[1] if spec else None!r} related; {name} with {sorted(names)} cannot be "
                "removed physically (drop related_modules to zero the rows in place)")
        ins, down, field = spec
        for w_name in ins:  # the pruned matrix and its partner in the gated product
            path = t.path[:-1] + (w_name,)
            put(path, np.take_along_axis(get(path), keep[:, None, :], axis=2))
            b = t.path[:-1] + ("b" + w_name[1:],)
            if b in variables:
                put(b, np.take_along_axis(get(b), keep, axis=1))
        path = t.path[:-1] + (down,)
        put(path, np.take_along_axis(get(path), keep[:, :, None], axis=1))
        model.config = dataclasses.replace(cfg, **{field: int(keep.shape[1])})
        return
    spec = getattr(type(layers), "PRUNABLE_HEADS", None)
    if spec is None:
        raise ValueError(f"{where}: {type(model).__name__} derives its head size from the "
                         "number of heads, so heads cannot be removed physically; drop "
                         "related_modules to zero the pruned heads in place")
    qkv, o, count_fields, size_field = spec
    n = int(t.shape[1])
    if name != o or not set(qkv) <= names or p.num_heads != n:
        raise ValueError(f"{where}: jds removes heads of {o!r} (num_heads = its {n} heads) "
                         f"with {list(qkv)} related; got {name} with {sorted(names)} and "
                         f"num_heads {p.num_heads}")
    if len({int(getattr(cfg, f)) for f in count_fields}) != 1:
        raise ValueError(f"{where}: removing heads needs multi-head attention (as many key/"
                         f"value heads as query heads); {type(model).__name__} has "
                         + ", ".join(f"{f}={getattr(cfg, f)}" for f in count_fields)
                         + ". Drop related_modules to zero the pruned heads in place")
    put(t.path, np.take_along_axis(get(t.path), keep[:, :, None, None], axis=1))
    for w_name in qkv:
        path = t.path[:-1] + (w_name,)
        put(path, np.take_along_axis(get(path), keep[:, None, :, None], axis=2))
        b = t.path[:-1] + ("b" + w_name[1:],)
        if b in variables:
            put(b, np.take_along_axis(get(b), keep[:, :, None], axis=1))
    k = int(keep.shape[1])
    model.config = dataclasses.replace(cfg, **{f: k for f in count_fields},
                                       **{size_field: int(t.shape[2])})
