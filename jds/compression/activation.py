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
per layer as the ``modules`` patterns select. Their static ranges are a
``StackedActRange`` (``[L, 2]``, a ``jds.models.layers.LayerState``) on the layers module:
the scan hands each layer its row and the moved rows leave the scan as its stacked output
(a scan body cannot write outside itself), so ZeRO-3, remat, in-place gradient accumulation
and Progressive Layer Dropping (a skipped layer keeps its row) all carry them; each
micro-batch moves them, as each of DeepSpeed's forward passes does; under data parallelism
a batch's range is the whole (global) batch's, the single-device run's (DeepSpeed's ranks
would each keep their own). The step comes from ``jds.compression.quantization_step`` (the
engine's train and eval steps set it); outside the engine, e.g. ``engine.model(x)``, the
quantization is on.
The serving engine quantizes the same inputs of a decoder trained this way
(``serving_bind``: the selected layers, the trained static ranges, per-token dynamic ones;
a run folder's ranges are read from its checkpoint), so it serves what training evaluated
and ``redundancy_clean`` exports. In int8 serving, symmetric inputs of at most 8 bits are
multiplied as their integer codes by the int8 weights (W8A8: ``int8_codes``, exact int32
sums, ``jds.kernels.quant.w8a8_matmul``); other inputs are fake-quantized in the compute
dtype for the weight-only int8 matmul. A decoder's LM head is a matrix of the model itself,
not a Linear module: its input is not quantized (a ``"*"`` pattern takes the layers' matrices).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jds.compression import quantizers
from jds.compression.weight_quantization import _STEP, Target, matches, targets
from jds.config.compression import CompressionConfig
from jds.models.layers import ActQuantWeight, LayerState, set_layer_state

MOMENTUM = 0.95  # DeepSpeed's QuantAct act_range_momentum


class ActRange(nnx.Variable):
    """A static activation range ``[min, max]`` (DeepSpeed's ``QuantAct.x_min_max``)."""


class StackedActRange(LayerState):
    """A stacked matrix's static input ranges, one ``[min, max]`` per layer (``[L, 2]``)."""


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


def _running(rng: jax.Array, x: jax.Array, on: jax.Array) -> jax.Array:
    """QuantAct's running range after seeing ``x`` (set from the first input, then moved
    with momentum), where ``on``; else ``rng``."""
    cur = jnp.stack([jnp.min(x), jnp.max(x)]).astype(jnp.float32)
    start = jnp.where(rng[0] == rng[1], cur, rng)
    return jnp.where(on, start * MOMENTUM + cur * (1 - MOMENTUM), rng)


def quantize_input(module: nnx.Module, x: jax.Array, per_sample: bool) -> jax.Array:
    """``x`` as the module's ``act_quant`` spec quantizes it (updating a static range in
    training)."""
    spec: ActQuantSpec = module.act_quant
    on = _on(spec.offset)
    if spec.static:
        rng = module.act_range.get_value()
        if not module.use_running_average:  # training: QuantAct's running range
            rng = _running(rng, x, on)
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


def quantize_layer_input(x: jax.Array, w: ActQuantWeight) -> jax.Array:
    """A stacked decoder's ``ActQuantWeight`` input (``jds.models.layers.dense``) quantized
    where ``w.on``: per token (dynamic ranges; a token's features are its last ``n_in``
    dims), or with the layer's static range, moved first in training and left as the
    layer's new slice of its ``LayerState``."""
    spec = ActQuantSpec(w.bits, w.kind, w.range is not None, 0)
    if w.range is None:
        features = 1
        for d in x.shape[x.ndim - w.n_in:]:
            features *= d
        return jnp.where(w.on, _quantize(x, spec, x.size // features), x)
    rng = w.range
    if w.training:
        rng = _running(rng, x, w.on)
        set_layer_state(w.state, rng)
    return jnp.where(w.on, _quantize(x, spec, 1, rng), x)


def w8a8_applies(w: ActQuantWeight) -> bool:
    """Whether ``w``'s input may be multiplied as int8 codes (``ActQuantWeight.integer``):
    symmetric codes of at most 8 bits (``[-2^(b-1), 2^(b-1) - 1]``, no zero point), an int8
    base, not training."""
    from jds.models.layers import QuantizedWeight

    return (w.integer and not w.training and w.kind == "symmetric" and w.bits <= 8
            and isinstance(w.base, QuantizedWeight))


def int8_codes(x: jax.Array, w: ActQuantWeight) -> tuple[jax.Array, jax.Array]:
    """``(codes, scale)``: the symmetric quantizer's integer codes of ``x`` (int8, x's
    shape) and their scale (fp32, one per token ``[..., 1]``: dynamic ranges; or the static
    range's), so that ``codes * scale`` is what ``quantize_layer_input`` gives."""
    lead = x.shape[:x.ndim - w.n_in]
    tokens = int(np.prod(lead)) if lead else 1
    if w.range is None:  # one group per token
        codes, scale = quantizers.symmetric_codes(x, w.bits, tokens)
    else:  # one static range: every token's scale is the range's
        codes, scale = quantizers.symmetric_codes(x, w.bits, 1, min_value=w.range[0],
                                                  max_value=w.range[1])
        scale = jnp.broadcast_to(scale.reshape(1, 1), (tokens, 1))
    return codes.astype(jnp.int8).reshape(x.shape), scale.reshape(*lead, 1)


ACT_ON = "__act_on"  # a scanned per-layer flag beside a stacked matrix
ACT_RANGE = "__act_range"  # a stacked matrix's static input ranges: a LayerState [L, 2]


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
    training = not getattr(layers, "use_running_average", True)
    for name, spec in specs.items():
        state = name + ACT_RANGE if spec.static else ""
        p[name] = ActQuantWeight(p[name], p.pop(name + ACT_ON), spec.bits, spec.kind,
                                 n_in.get(name, 1), p.pop(state) if state else None, state,
                                 training)
    return p


def serving_bind(layers: nnx.Module, p: dict, layer: jax.Array, *,
                 integer: bool = False) -> dict:
    """One layer's weights for the serving engine's layer scan (``layer``: its index), its
    activation-quantized matrices as ``ActQuantWeight``: on in the layers the ``modules``
    patterns selected (no schedule: training is over), static ranges as trained;
    ``integer``: int8 inputs times int8 weights where the quantizer allows
    (``w8a8_applies``)."""
    specs = dict(getattr(layers, "act_quant", None) or ())
    if not specs:
        return p
    p = dict(p)
    for name, spec in specs.items():  # on in every layer: a constant (no branch)
        p[name + ACT_ON] = (np.bool_(True) if spec.layers is None or all(spec.layers)
                            else jnp.asarray(spec.layers)[layer])
    p = bind_layer(layers, p)
    if integer:
        p = {k: dataclasses.replace(v, integer=True) if isinstance(v, ActQuantWeight) else v
             for k, v in p.items()}
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
            for name, spec in specs.items():
                if spec.static and not hasattr(owner, name + ACT_RANGE):
                    n = int(getattr(owner, name).shape[0])
                    setattr(owner, name + ACT_RANGE, StackedActRange(
                        jnp.zeros((n, 2), jnp.float32)))
            if any(spec.static for spec in specs.values()):
                owner.use_running_average = False


def calibrating(model: nnx.Module) -> list[nnx.Module]:
    """The modules of ``model`` that keep static input ranges (a Linear / Conv, or a stacked
    decoder's layers): their ``use_running_average`` says whether the forward pass moves
    them."""
    out = []
    for _, m in nnx.iter_modules(model):
        spec = getattr(m, "act_quant", None)
        specs = [spec] if isinstance(spec, ActQuantSpec) else [s for _, s in spec or ()]
        if any(s.static for s in specs):
            out.append(m)
    return out


def _module_at(model: nnx.Module, path: tuple) -> object:
    node = model
    for k in path:
        node = node[k] if isinstance(k, int) else getattr(node, k)
    return node


def plan(model: nnx.Module, config: CompressionConfig) -> ActivationPlan | None:
    """The ``activation_quantization`` plan of ``config`` for ``model`` (None when off).

    Raises:
      ValueError: a ``modules`` pattern matching no Linear / Conv module, a module two groups
        claim.
    """
    aq = config.activation_quantization
    shared = aq.shared_parameters
    if not shared.enabled:
        return None
    key = "compression_training.activation_quantization.different_groups"
    # Linear / Conv modules and a decoder's stacked matrices; not a decoder's LM head, which
    # is a matrix of the model itself (its input is not quantized; DeepSpeed's GPT-2
    # lm_head is a Linear it would quantize)
    found = [t for t in targets(model) if t.module in ("linear", "conv") and (
        t.stacked or isinstance(_module_at(model, t.path[:-1]), (nnx.Linear, nnx.Conv)))]
    items: dict[tuple, tuple[Target, ActQuantSpec, str]] = {}
    for gname, group in aq.different_groups.items():
        for pattern in group.modules:
            for t, layers in matches(found, pattern, f"{key}.{gname}.modules",
                                     "Linear or Conv module"):
                old = items.get(t.path)
                if old is not None and old[2] != gname:
                    raise ValueError(f"{key}: {'.'.join(map(str, t.path[:-1]))} is in groups "
                                     f"{old[2]!r} and {gname!r}; a module may be in one")
                if old is not None and t.stacked:
                    layers = tuple(a or b for a, b in zip(old[1].layers, layers, strict=True))
                spec = ActQuantSpec(int(group.params.bits), shared.quantization_type,
                                    shared.range_calibration == "static",
                                    int(shared.schedule_offset),
                                    layers if t.stacked else None)
                items[t.path] = (t, spec, gname)
    return ActivationPlan(tuple(items.values()))


__all__ = ["ACT_ON", "ACT_RANGE", "ActQuantConv", "ActQuantLinear", "ActQuantSpec",
           "ActRange", "ActivationPlan", "StackedActRange", "bind_layer", "calibrating",
           "int8_codes", "layer_flags", "plan", "quantize_input", "quantize_layer_input",
           "serving_bind", "w8a8_applies"]
