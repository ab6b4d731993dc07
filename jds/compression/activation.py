"""Activation quantization (DeepSpeed's ``activation_quantization``) on any NNX model.

DeepSpeed's ``LinearLayer_Compress`` / ``Conv2dLayer_Compress`` fake-quantize their *input*
from ``schedule_offset`` on, at ``bits`` (4 or 8), symmetric or asymmetric, with a
straight-through gradient:

* ``range_calibration: "dynamic"``: each token's features (Linear: groups of the last
  dimension) or each sample (Conv) get their own range, computed on the fly;
* ``"static"``: one range for the whole tensor, ``QuantAct``'s running ``[min, max]``: set
  from the first batch, then moved with momentum 0.95 towards each training batch's min and
  max (before the batch is quantized with it); evaluation uses it as it is.

**How.** A targeted ``nnx.Linear`` / ``nnx.Conv`` of a user's model becomes an
``ActQuantLinear`` / ``ActQuantConv`` (the same module and parameter paths; the static range
is an ``ActRange`` variable on it, kept by the engine as model state, so it is
checkpointed and evaluation reads it). In jds's stacked decoders the layer scan binds each
targeted matrix as an ``ActQuantWeight`` (``jds.models.layers.dense`` quantizes its input),
per layer as the ``modules`` patterns select; decoders take dynamic ranges only (a running
range per layer would have to leave the layer scan as an output: not built, refused by
name). The step comes from ``jds.compression.quantization_step`` (the engine's train and
eval steps set it); outside the engine, e.g. ``engine.model(x)``, the quantization is on.
The serving engine does not quantize activations (its int8 path is weight-only).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from jds.compression import quantizers
from jds.compression.weight_quantization import _STEP, Target, matches, targets
from jds.config.compression import CompressionConfig
from jds.models.layers import ActQuantWeight

MOMENTUM = 0.95  # DeepSpeed's QuantAct act_range_momentum


class ActRange(nnx.Variable):
    """A static activation range ``[min, max]`` (DeepSpeed's ``QuantAct.x_min_max``)."""


@dataclasses.dataclass(frozen=True)
class ActQuantSpec:
    """How a module's input is quantized (hashable: it lives in the graph definition)."""

    bits: int
    kind: str  # symmetric | asymmetric
    static: bool
    offset: int
    layers: tuple[bool, ...] | None = None  # stacked: the layers quantized


def _on(offset: int) -> jax.Array:
    step = _STEP.get()
    return jnp.bool_(True) if step is None else jnp.asarray(step, jnp.int32) >= offset


def _quantize(x: jax.Array, spec: ActQuantSpec, groups: int,
              rng: jax.Array | None = None) -> jax.Array:
    fn = quantizers.symmetric if spec.kind == "symmetric" else quantizers.asymmetric
    kw = {} if rng is None else {"min_value": rng[0], "max_value": rng[1]}
    q = fn(x.astype(jnp.float32), spec.bits, groups, **kw).astype(x.dtype)
    return jax.lax.stop_gradient(q) + (x - jax.lax.stop_gradient(x))  # straight-through,
    # exactly q in the forward pass (x + (q - x) can be off by a rounding)


def quantize_input(module: nnx.Module, x: jax.Array, per_sample: bool) -> jax.Array:
    """``x`` as the module's ``act_quant`` spec quantizes it (updating a static range in
    training)."""
    spec: ActQuantSpec = module.act_quant
    on = _on(spec.offset)
    if spec.static:
        rng = module.act_range.get_value()
        if not module.use_running_average:  # training: QuantAct's running range
            cur = jnp.stack([jnp.min(x), jnp.max(x)]).astype(jnp.float32)
            start = jnp.where(rng[0] == rng[1], cur, rng)
            new = start * MOMENTUM + cur * (1 - MOMENTUM)
            rng = jnp.where(on, new, rng)
            module.act_range.set_value(rng)
        q = _quantize(x, spec, 1, rng)
    else:
        groups = x.shape[0] if per_sample else x.size // x.shape[-1]
        q = _quantize(x, spec, groups)
    return jnp.where(on, q, x)


class ActQuantLinear(nnx.Linear):
    """An ``nnx.Linear`` whose input is fake-quantized (``act_quant``)."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        return super().__call__(quantize_input(self, inputs, per_sample=False))


class ActQuantConv(nnx.Conv):
    """An ``nnx.Conv`` whose input is fake-quantized per sample (``act_quant``)."""

    def __call__(self, inputs: jax.Array) -> jax.Array:
        return super().__call__(quantize_input(self, inputs, per_sample=True))


def quantize_tokens(x: jax.Array, on: jax.Array, bits: int, kind: str, n_in: int = 1
                    ) -> jax.Array:
    """``x`` quantized per token (dynamic ranges; a token's features are its last ``n_in``
    dims) where ``on``: a stacked decoder's ``ActQuantWeight`` input
    (``jds.models.layers.dense``)."""
    spec = ActQuantSpec(bits, kind, False, 0)
    features = 1
    for d in x.shape[x.ndim - n_in:]:
        features *= d
    return jnp.where(on, _quantize(x, spec, x.size // features), x)


ACT_ON = "__act_on"  # a scanned per-layer flag beside a stacked matrix


def layer_flags(layers: nnx.Module, params_L: dict) -> dict:
    """``params_L`` with each activation-quantized matrix's per-layer flag (selected and
    past ``schedule_offset``), scanned beside it."""
    specs = dict(getattr(layers, "act_quant", None) or ())
    if not specs:
        return params_L
    out = dict(params_L)
    for name, spec in specs.items():
        n = int(params_L[name].shape[0])
        sel = jnp.asarray(spec.layers if spec.layers is not None else (True,) * n)
        out[name + ACT_ON] = sel & _on(spec.offset)
    return out


def bind_layer(layers: nnx.Module, p: dict) -> dict:
    """One layer's weights with its activation-quantized matrices as ``ActQuantWeight``."""
    specs = dict(getattr(layers, "act_quant", None) or ())
    if not specs:
        return p
    p = dict(p)
    n_in = dict(getattr(type(layers), "LINEARS", {}))
    for name, spec in specs.items():
        p[name] = ActQuantWeight(p[name], p.pop(name + ACT_ON), spec.bits, spec.kind,
                                 n_in.get(name, 1))
    return p


@dataclasses.dataclass(frozen=True)
class ActivationPlan:
    """The modules a config's ``activation_quantization`` quantizes the inputs of."""

    items: tuple[tuple[Target, ActQuantSpec, str], ...]

    def attach(self, model: nnx.Module) -> None:
        """Make ``model`` quantize those inputs (in place; see the module docstring)."""
        stacked: dict[tuple, dict[str, ActQuantSpec]] = {}
        for t, spec, _ in self.items:
            owner = model
            for k in t.path[:-1]:
                owner = owner[k] if isinstance(k, int) else getattr(owner, k)
            if t.stacked:
                stacked.setdefault(t.path[:-1], {})[t.path[-1]] = spec
                continue
            if isinstance(owner, (ActQuantLinear, ActQuantConv)):
                continue
            owner.__class__ = ActQuantConv if isinstance(owner, nnx.Conv) else ActQuantLinear
            owner.act_quant = spec
            owner.use_running_average = False
            if spec.static:
                owner.act_range = ActRange(jnp.zeros((2,), jnp.float32))
        for path, specs in stacked.items():
            owner = model
            for k in path:
                owner = getattr(owner, k)
            owner.act_quant = tuple(sorted(specs.items()))  # static, hashable: (name, spec)


def plan(model: nnx.Module, config: CompressionConfig) -> ActivationPlan | None:
    """The ``activation_quantization`` plan of ``config`` for ``model`` (None when off).

    Raises:
      ValueError: a ``modules`` pattern matching no Linear / Conv module, a module two groups
        claim, static ranges in a stacked decoder.
    """
    aq = config.activation_quantization
    shared = aq.shared_parameters
    if not shared.enabled:
        return None
    key = "compression_training.activation_quantization.different_groups"
    found = [t for t in targets(model) if t.module in ("linear", "conv")]
    items: dict[tuple, tuple[Target, ActQuantSpec, str]] = {}
    for gname, group in aq.different_groups.items():
        for pattern in group.modules:
            for t, layers in matches(found, pattern, f"{key}.{gname}.modules",
                                     "Linear or Conv module"):
                old = items.get(t.path)
                if old is not None and old[2] != gname:
                    raise ValueError(f"{key}: {'.'.join(map(str, t.path[:-1]))} is in groups "
                                     f"{old[2]!r} and {gname!r}; a module may be in one")
                if t.stacked and shared.range_calibration == "static":
                    raise ValueError(
                        "compression_training.activation_quantization.shared_parameters."
                        "range_calibration 'static' keeps a running range per module, which "
                        "jds builds for Linear / Conv modules but not inside its stacked "
                        f"decoders' layer scan ({'.'.join(map(str, t.path))}); use 'dynamic'")
                if old is not None and t.stacked:
                    layers = tuple(a or b for a, b in zip(old[1].layers, layers, strict=True))
                spec = ActQuantSpec(int(group.params.bits), shared.quantization_type,
                                    shared.range_calibration == "static",
                                    int(shared.schedule_offset),
                                    layers if t.stacked else None)
                items[t.path] = (t, spec, gname)
    return ActivationPlan(tuple(items.values()))


__all__ = ["ACT_ON", "ActQuantConv", "ActQuantLinear", "ActQuantSpec", "ActRange",
           "ActivationPlan", "bind_layer", "layer_flags", "plan", "quantize_input",
           "quantize_tokens"]
