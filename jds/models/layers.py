"""Pieces shared by the model families: parameter creation, input checks, positions, and
running a stack of layers with ``lax.scan`` under a rematerialisation policy.

Per-family maths (RMSNorm and RoPE for Llama, LayerNorm and learned positions for GPT-2)
lives in the family's own module.

Rematerialisation policies (``model.remat``):

- ``"none"``: every activation of every layer is kept for the backward pass.
- ``"full"``: only each layer's input is kept; the whole layer is recomputed in backward.
- ``"dots"``: ``jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims``. It saves the
  outputs of matmuls without batch dimensions — the projection and MLP matmuls, all
  ``O(B*T*D)`` or ``O(B*T*F)`` — and recomputes everything else, notably the attention
  scores and probabilities, whose einsums carry batch dimensions and are ``O(B*N*T*T)``.
  ``dots_saveable`` would also save those ``T*T`` tensors, which is exactly the memory that
  remat is meant to free at long sequence lengths, so it is not used.
- ``"offload"``: ``jax.checkpoint_policies.offload_dot_with_no_batch_dims``. The same matmul
  outputs as ``"dots"`` are kept, but in the host's pinned memory instead of the
  accelerator's: device memory holds what ``"full"`` holds (each layer's input), and the
  backward pass copies the matmul outputs back instead of recomputing them. It needs an
  accelerator with a ``pinned_host`` memory space (GPU, TPU). On CPU the host-placement
  annotations are dropped when lowering, so the mode would silently be ``"dots"``;
  ``remat_wrap`` raises instead. DeepSpeed's ``cpu_checkpointing`` maps here (see
  ``jds.config.ActivationCheckpointingConfig``); unlike DeepSpeed, which moves the layer
  inputs to the CPU and recomputes every layer, jds keeps the layer inputs on device and
  moves the larger matmul outputs, so that the backward pass recomputes no matmul.

Every mode computes the same numbers; they trade memory for recomputation or transfers.
"""

from __future__ import annotations

import contextvars
import dataclasses
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jds.kernels.attention import dot_product_attention
from jds.kernels.quant.nf4 import NF4Weight, dequantize_nf4
from jds.models.layer_drop import PLD_KEEP
from jds.partitioning.accumulate import args_carry_no_gradient, scan_accumulating, sink_for
from jds.partitioning.rules import active_rules, logical_to_spec, traced_sharding
from jds.partitioning.zero import ParamGather, gather_param, save_costly_not_gathered

REMAT_MODES: tuple[str, ...] = ("none", "full", "dots", "offload")


def normal_param(
    rngs: nnx.Rngs, shape: tuple[int, ...], axes: tuple[str | None, ...], std: float, dtype: Any
) -> nnx.Param:
    """A ``normal(0, std)`` parameter carrying its logical ``axes``."""
    value = std * jax.random.normal(rngs.params(), shape, jnp.float32)
    return nnx.Param(value.astype(dtype), axes=axes)


def const_param(
    shape: tuple[int, ...], axes: tuple[str | None, ...], fill: float, dtype: Any
) -> nnx.Param:
    """A constant parameter (zeros for biases, ones for norm scales) with logical ``axes``."""
    return nnx.Param(jnp.full(shape, fill, dtype), axes=axes)


class QuantScale(nnx.Variable):
    """The scales of a frozen quantized layer matrix (QLoRA's base, ``jds.lora``): int8's
    per-channel fp32 scales, NF4's double-quantized block constants and their scales.

    Not an ``nnx.Param``: never trained, and not cast to the compute dtype with the frozen
    parameters (the engine keeps other variables as they are).
    """


STACKED_VARIABLES = (nnx.Param, QuantScale)


def stacked_params(module: nnx.Module) -> dict[str, jax.Array]:
    """The ``nnx.Param`` (and ``QuantScale``) arrays held directly by ``module``, by name.

    Used on the module that holds the layer-stacked weights: every value has a leading
    ``layers`` dimension, so the dict can be scanned over as it is.
    """
    return {k: v[...] for k, v in vars(module).items() if isinstance(v, STACKED_VARIABLES)}


class LayerState(nnx.Variable):
    """State a stacked decoder's layers keep one slice each of and update in the forward
    pass (a leading ``layers`` dimension; e.g. activation quantization's static input
    ranges, ``jds.compression.activation``). It is model state, not a parameter: the engine
    threads it through the step and checkpoints it. ``scan_layers`` hands layer ``l`` its
    slice in the layer's weights under the variable's name; the layer replaces it with
    ``set_layer_state``, and the new slices leave the scan as its stacked output (a layer
    scan cannot write to anything outside itself)."""


_LAYER_STATE: contextvars.ContextVar[dict | None] = contextvars.ContextVar(
    "jds_layer_state", default=None)


def set_layer_state(name: str, value: jax.Array) -> None:
    """Replace this layer's slice of the ``LayerState`` ``name`` (inside ``scan_layers``).

    Raises:
      ValueError: called outside a layer scan that carries ``name``.
    """
    box = _LAYER_STATE.get()
    if box is None or name not in box:
        raise ValueError(f"set_layer_state({name!r}) outside a layer scan that carries it "
                         "(scan_layers(..., state_L=...))")
    old = box[name]
    box[name] = jnp.asarray(value, old.dtype).reshape(old.shape)


def layer_states(module: nnx.Module) -> dict[str, jax.Array]:
    """The ``LayerState`` arrays held directly by ``module`` (the stacked layers), by name."""
    return {k: v[...] for k, v in vars(module).items() if isinstance(v, LayerState)}


class LayerScan(NamedTuple):
    """What ``scan_layers`` returns when asked for more than the residual stream."""

    x: jax.Array  # the residual stream after the last layer
    state: dict[str, jax.Array]  # the layer states the layers left (``[L, ...]``)
    hidden: jax.Array | None  # every layer's output, ``[L, *x.shape]`` (``outputs=True``)


def run_keeping_states(module: nnx.Module, scan: Callable[..., Any], *,
                       outputs: bool = False) -> Any:
    """``scan(state_L=..., outputs=...)`` (a ``scan_layers`` call) with ``module``'s layer
    states, which are then set to the slices the layers left. Returns the residual stream,
    with ``outputs`` ``(x, every layer's output [L, ...])``."""
    states = layer_states(module)
    if not states and not outputs:
        return scan(state_L=None, outputs=False)
    r = scan(state_L=states, outputs=outputs)
    for k, v in r.state.items():
        getattr(module, k).set_value(v)
    return (r.x, r.hidden) if outputs else r.x


def stacked_axes(module: nnx.Module) -> dict[str, tuple[str | None, ...]]:
    """Logical axes of one layer's weights (the ``layers`` axis dropped), by attribute name."""
    return {
        k: tuple(v.get_metadata()["axes"])[1:]
        for k, v in vars(module).items()
        if isinstance(v, STACKED_VARIABLES)
    }


def gather_layer(p: dict[str, jax.Array], axes: dict[str, tuple[str | None, ...]],
                 gather: ParamGather | None) -> dict:
    """Constrain one layer's weights to their compute layout (the rules' tensor-parallel
    spec, nothing over the data-parallel axes) with the model's ``ParamGather``.

    Under ZeRO-3 the stacked weights are sharded over the data-parallel group; this is
    where XLA all-gathers them, one layer at a time inside the scan (and, transposed in
    the backward pass, reduce-scatters that layer's gradients). Without a ``gather`` it
    is the identity.
    """
    return {k: gather_param(v, axes[k], gather) if k in axes else v for k, v in p.items()}


def embed_lookup(
    table_VD: jax.Array, ids_BT: jax.Array, axes: tuple[str | None, ...] = ("vocab", "embed")
) -> jax.Array:
    """``table_VD[ids_BT]``: an embedding lookup whose gradient XLA can partition anywhere.

    Its gradient is a scatter-add into the table. Inside the pipeline's ``shard_map``
    (manual over ``stage``, automatic over the rest) XLA's SPMD partitioner crashes on that
    scatter when the gradient is wanted in a layout other than the table's (ZeRO-3 shards
    it over the data axes as well). There the scatter runs in the table's own layout (the
    rules' spec of ``axes``) and the result is resharded after; elsewhere this is
    ``jnp.take``.
    """
    active = active_rules()
    context = jax.sharding.get_abstract_mesh()
    if active is None or context.empty or not context.manual_axes:
        return jnp.take(table_VD, ids_BT, axis=0)
    mesh, rules = active
    sharding = traced_sharding(mesh, logical_to_spec(axes, rules))
    shape, dtype = table_VD.shape, table_VD.dtype

    @jax.custom_vjp
    def lookup(table, ids):
        return jnp.take(table, ids, axis=0)

    def fwd(table, ids):
        return jnp.take(table, ids, axis=0), ids

    def bwd(ids, ct):
        grad = jax.lax.with_sharding_constraint(jnp.zeros(shape, dtype), sharding)
        grad = jax.lax.with_sharding_constraint(grad.at[ids].add(ct.astype(dtype)), sharding)
        return grad, None

    lookup.defvjp(fwd, bwd)
    return lookup(table_VD, ids_BT)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedWeight:
    """A layer matrix stored as symmetric int8 with one fp32 scale per output channel.

    Attributes:
      q: int8 weight, the matrix's own shape (input dims first), e.g. ``[D, N, H]``.
      scale: fp32 ``[output dims]``, e.g. ``[N, H]``.
      n_in: how many leading dims are input (contracted) dims (static).
      axes: logical axes of one layer's matrix, e.g. ``("embed", "heads", "head_dim")``
        (static; ``()`` if unknown). Under sharding rules they say how the matrix is split
        over the mesh, so ``dense`` can run the kernel on each device's shard.
    """

    q: jax.Array
    scale: jax.Array
    n_in: int = dataclasses.field(metadata={"static": True}, default=1)
    axes: tuple = dataclasses.field(metadata={"static": True}, default=())


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoRAWeight:
    """A frozen layer matrix with a low-rank adapter: ``x @ W + (dropout(x) @ A) @ B * scale``.

    Built inside the layer scan from one layer's weights
    (``jds.models.adapters.prepare_layers``); the base is the gathered matrix (or a
    ``QuantizedWeight`` / ``NF4Weight``: QLoRA), used once.

    Attributes:
      base: the layer matrix ``[*in, *out]``, a ``QuantizedWeight`` or an ``NF4Weight``.
      a: ``[*in, r]``. b: ``[r, *out]``.
      key: a PRNG key for the adapter's dropout, or None (no dropout: evaluation).
      scale: ``alpha / r`` (``alpha / sqrt(r)`` with rsLoRA), static.
      rate: the dropout rate on the adapter's input, static.
    """

    base: Any
    a: jax.Array
    b: jax.Array
    key: jax.Array | None = None
    scale: float = dataclasses.field(metadata={"static": True}, default=1.0)
    rate: float = dataclasses.field(metadata={"static": True}, default=0.0)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ActQuantWeight:
    """A layer matrix whose input ``dense`` fake-quantizes where ``on`` (DeepSpeed's
    activation quantization; built in the layer scan by
    ``jds.compression.activation.bind_layer``): per token (dynamic ranges), or with this
    layer's static range ``[min, max]`` (``range``), which in training first moves towards
    the input's own and is left as the layer's new ``LayerState`` slice ``state``.

    Attributes:
      base: the layer matrix (or another weight ``dense`` takes).
      on: a bool (traced, or a constant when every layer is on): this layer is selected
        and the step has come.
      bits, kind: the quantizer (``jds.compression.quantizers``), static.
      n_in: the input dims the matrix contracts (one token's features span them all).
      range: this layer's static range (fp32 ``[2]``), or None (dynamic ranges).
      state: the ``LayerState`` the static range is a slice of (static).
      training: update the static range from the input (static).
      integer: with an int8 ``QuantizedWeight`` base (serving), multiply the input's int8
        codes by the weight's in integers (W8A8, ``jds.kernels.quant.w8a8_matmul``)
        instead of fake-quantizing the input for the weight-only matmul (static).
    """

    base: Any
    on: jax.Array
    bits: int = dataclasses.field(metadata={"static": True}, default=8)
    kind: str = dataclasses.field(metadata={"static": True}, default="symmetric")
    n_in: int = dataclasses.field(metadata={"static": True}, default=1)
    range: jax.Array | None = None
    state: str = dataclasses.field(metadata={"static": True}, default="")
    training: bool = dataclasses.field(metadata={"static": True}, default=False)
    integer: bool = dataclasses.field(metadata={"static": True}, default=False)


def _int8_local(x: jax.Array, q: jax.Array, scale: jax.Array, n_in: int) -> jax.Array:
    # differentiable in x (the kernels define their VJP): QLoRA trains through a frozen base
    from jds.kernels.quant import int8_matmul

    k = int(np.prod(q.shape[:n_in]))
    y = int8_matmul(x.reshape(-1, k), q.reshape(k, -1), scale.reshape(1, -1))
    return y.reshape(*x.shape[:x.ndim - n_in], *q.shape[n_in:])


def _int8_is_local(w: Any) -> bool:
    """Whether an int8 ``QuantizedWeight`` is multiplied whole here (no tensor-parallel
    split active, or already inside a ``shard_map``)."""
    from jds.partitioning.rules import active_rules

    active = active_rules()
    context = jax.sharding.get_abstract_mesh()
    return (active is None or active[0].size == 1 or not w.axes
            or (not context.empty and bool(context.manual_axes)))


def _w8a8_local(x: jax.Array, w: ActQuantWeight) -> jax.Array:
    """``x`` quantized to int8 codes as ``w`` says, times ``w.base``'s int8 codes in int32,
    scaled: the W8A8 matmul (``jds.kernels.quant.w8a8_matmul``), in x's dtype."""
    from jds.compression.activation import int8_codes
    from jds.kernels.quant import w8a8_matmul

    q, n_in = w.base.q, w.base.n_in
    codes, scale = int8_codes(x, w)
    k = int(np.prod(q.shape[:n_in]))
    lead = x.shape[:x.ndim - n_in]
    y = w8a8_matmul(codes.reshape(-1, k), scale.reshape(-1, 1), q.reshape(k, -1),
                    w.base.scale.reshape(1, -1), out_dtype=x.dtype)
    return y.reshape(*lead, *q.shape[n_in:])


def _lora_dense(subscripts: str, x: jax.Array, w: LoRAWeight) -> jax.Array:
    y = dense(subscripts, x, w.base)
    lhs, out = subscripts.replace(" ", "").split("->")
    xs, ws = lhs.split(",")
    n_in = w.a.ndim - 1
    r = next(c for c in "rzyxwvu" if c not in subscripts)
    batch = xs[:len(xs) - n_in]
    if w.key is not None and w.rate > 0.0:
        keep = jax.random.bernoulli(w.key, 1.0 - w.rate, x.shape)
        x = jnp.where(keep, x / (1.0 - w.rate), 0).astype(x.dtype)
    t = jnp.einsum(f"{xs},{ws[:n_in]}{r}->{batch}{r}", x, w.a.astype(x.dtype))
    delta = jnp.einsum(f"{batch}{r},{r}{ws[n_in:]}->{out}", t, w.b.astype(x.dtype))
    return y + (delta * w.scale).astype(y.dtype)


def _mesh_axes(entry: Any, mesh: jax.sharding.Mesh) -> tuple[str, ...]:
    names = (entry,) if isinstance(entry, str) else tuple(entry or ())
    return tuple(a for a in names if mesh.shape[a] > 1)


def dense(subscripts: str, x: jax.Array,
          w: jax.Array | QuantizedWeight | NF4Weight | LoRAWeight) -> jax.Array:
    """``jnp.einsum(subscripts, x, w)`` for a layer matrix ``w`` contracted with x's trailing
    dims; for a ``QuantizedWeight`` the weight-only int8 matmul
    (``jds.kernels.quant.int8_matmul``: Pallas on GPU/TPU, XLA on CPU) in x's dtype; for a
    ``NF4Weight`` the matrix dequantized in x's dtype (``jds.kernels.quant.nf4``); for a
    ``LoRAWeight`` the base's product plus the adapter's ``(x @ A) @ B * scale``.

    A Pallas call is opaque to XLA's partitioner, which would gather a tensor-parallel weight
    whole onto every device before it. So under sharding rules a ``QuantizedWeight`` split
    over the mesh is multiplied per shard in a ``shard_map``: a column-parallel matrix
    (output dims split) gives each device its slice of the output; a row-parallel one (input
    dims split, with x split the same way) gives partial sums, added with one ``psum`` —
    the all-reduce XLA would place after the einsum. Batch dims of x stay whole.
    """
    if isinstance(w, ActQuantWeight):  # compression builds on models, not back
        from jds.compression.activation import quantize_layer_input, w8a8_applies

        if w8a8_applies(w) and _int8_is_local(w.base):
            if isinstance(w.on, (bool, np.bool_)):  # every layer: no branch
                return _w8a8_local(x, w) if w.on else dense(subscripts, x, w.base)
            return jax.lax.cond(w.on, lambda x: _w8a8_local(x, w),
                                lambda x: dense(subscripts, x, w.base), x)
        return dense(subscripts, quantize_layer_input(x, w), w.base)
    if isinstance(w, LoRAWeight):
        return _lora_dense(subscripts, x, w)
    if isinstance(w, NF4Weight):  # QLoRA's 4-bit base: expanded per layer, fused by XLA
        return jnp.einsum(subscripts, x, dequantize_nf4(w, x.dtype))
    if not isinstance(w, QuantizedWeight):
        return jnp.einsum(subscripts, x, w)
    from jds.partitioning.rules import active_rules, logical_to_spec

    if _int8_is_local(w):
        return _int8_local(x, w.q, w.scale, w.n_in)
    mesh, rules = active_rules()
    spec = [_mesh_axes(e, mesh) or None
            for e in logical_to_spec(w.axes, rules, mesh=mesh, shape=w.q.shape, what="int8")]
    if not any(spec):
        return _int8_local(x, w.q, w.scale, w.n_in)
    P = jax.sharding.PartitionSpec
    in_spec, out_spec = spec[:w.n_in], spec[w.n_in:]
    summed = tuple(a for e in in_spec if e for a in e)
    lead = [None] * (x.ndim - w.n_in)

    def local(x, q, scale):
        y = _int8_local(x, q, scale, w.n_in)
        return jax.lax.psum(y, summed) if summed else y

    return jax.shard_map(local, mesh=mesh, in_specs=(P(*lead, *in_spec), P(*spec),
                                                     P(*out_spec)),
                         out_specs=P(*lead, *out_spec), check_vma=False)(x, w.q, w.scale)


def causal_attention(
    q_BTNH: jax.Array, k_BTKH: jax.Array, v_BTKH: jax.Array, segment_ids_BT: jax.Array | None,
    implementation: str | None,
    attend: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """A decoder layer's attention under the named scope ``attention`` (the profiler's row):
    ``attend(q, k, v)`` when given (the inference engine's paged KV cache), else causal
    ``dot_product_attention`` over this call's tokens with the model's ``implementation``."""
    with jax.named_scope("attention"):
        if attend is not None:
            return attend(q_BTNH, k_BTKH, v_BTKH)
        return dot_product_attention(q_BTNH, k_BTKH, v_BTKH, causal=True,
                                     segment_ids=segment_ids_BT, implementation=implementation)


def check_remat(remat: str) -> None:
    """Raise ``ValueError`` unless ``remat`` is one of ``REMAT_MODES``."""
    if remat not in REMAT_MODES:
        raise ValueError(f"remat must be one of {list(REMAT_MODES)}; got {remat!r}")


def offload_unsupported_reason(device: jax.Device | None = None) -> str | None:
    """Why ``remat="offload"`` cannot run on ``device``, or ``None`` when it can.

    Args:
      device: the device to check; default the first device of the default backend, the
        one ``jax.jit`` compiles for.

    Returns:
      ``None`` on a GPU or TPU that exposes ``pinned_host`` memory; otherwise the reason.
    """
    device = jax.devices()[0] if device is None else device
    if device.platform == "cpu":
        return ("on CPU the activations already live in host memory and XLA drops the "
                "offload annotations, so 'offload' would silently act as 'dots'")
    try:
        kinds = sorted({m.kind for m in device.addressable_memories()})
    except (AttributeError, NotImplementedError, RuntimeError) as e:
        return f"{device.platform} device {device.id} does not list its memory spaces ({e})"
    if "pinned_host" not in kinds:
        return (f"{device.platform} device {device.id} has no 'pinned_host' memory space "
                f"(it has {kinds})")
    return None


def remat_policy(remat: str) -> Callable | None:
    """The ``jax.checkpoint`` policy of a mode of ``REMAT_MODES`` (``None`` for ``"none"``).

    Only maps names to policies: ``remat_wrap`` also checks that ``"offload"`` can run.
    """
    check_remat(remat)
    policies = jax.checkpoint_policies
    return {
        "none": None,
        "full": policies.nothing_saveable,
        "dots": policies.checkpoint_dots_with_no_batch_dims,
        "offload": policies.offload_dot_with_no_batch_dims("device", "pinned_host"),
    }[remat]


def remat_wrap(fn: Callable, remat: str) -> Callable:
    """Wrap a layer function in ``jax.checkpoint`` according to ``remat``.

    ``prevent_cse=False`` because the function always runs inside ``lax.scan``, which
    already stops XLA from merging the recomputation back into the forward pass.

    Raises:
      ValueError: ``remat`` is not in ``REMAT_MODES``, or it is ``"offload"`` and the
        default backend has no separate host memory (``offload_unsupported_reason``).
    """
    policy = remat_policy(remat)
    if policy is None:
        return fn
    if remat == "offload" and (why := offload_unsupported_reason()) is not None:
        raise ValueError(
            f"remat='offload' (activation_checkpointing.cpu_checkpointing or .policy) needs a "
            f"GPU or TPU with pinned host memory: {why}. Use 'full' (least device memory) or "
            "'dots' (activation_checkpointing.policy, or train.remat) on this backend"
        )
    return jax.checkpoint(fn, policy=policy, prevent_cse=False)


def scan_layers(
    block_fn: Callable[..., jax.Array],
    params_L: dict[str, jax.Array],
    x: jax.Array,
    *args: Any,
    remat: str = "none",
    axes: dict[str, tuple[str | None, ...]] | None = None,
    group: int = 0,
    gather: ParamGather | None = None,
    bind: Callable[[dict], dict] | None = None,
    state_L: dict[str, jax.Array] | None = None,
    outputs: bool = False,
) -> Any:
    """Run ``x = block_fn(params_l, x, *args)`` for every layer ``l`` with ``lax.scan``.

    Compile time stays constant in depth: the block is traced once.

    Args:
      block_fn: ``(params_layer, x, *args) -> x``, a plain function of one layer's weights.
      params_L: weights with a leading ``layers`` dimension.
      x: the residual stream, e.g. ``x_BTD``.
      *args: per-call inputs shared by every layer (positions, segment ids).
      remat: a mode of ``REMAT_MODES`` (see the module docstring).
      axes: logical axes of one layer's weights (``stacked_axes``); with ``gather``, each
        layer's weights are gathered to their compute layout inside the scan
        (``gather_layer``), which is how ZeRO-3 never holds the whole model at once.
      group: ``k > 0`` checkpoints every ``k`` layers instead (DeepSpeed's pipeline
        ``activation_checkpoint_interval``): only each group's input is kept, and the
        backward pass recomputes the group's ``k`` layers; ``remat`` is then unused.
      gather: the model's ``ParamGather`` (ZeRO-3 / tensor-parallel layouts), or None.
      bind: ``p -> p`` applied to one layer's gathered weights before ``block_fn``
        (``jds.models.adapters.prepare_layers``: adapters and quantized bases become
        ``LoRAWeight`` / ``QuantizedWeight`` / ``NF4Weight``). Entries of ``params_L`` that
        ``axes`` does not name (per-layer PRNG keys, layer-drop draws) are scanned but not
        gathered; a ``PLD_KEEP`` entry
        (``jds.models.layer_drop``) runs each layer only where its draw is true.
      state_L: the layers' ``LayerState`` arrays (``[L, ...]``): layer ``l`` finds its slice
        in its weights under the same name and may replace it (``set_layer_state``); a
        layer that Progressive Layer Dropping skips keeps its slice.
      outputs: also return every layer's output (hidden-state distillation); the
        gradients then flow through the plain scan (no in-place accumulation).

    Returns:
      The residual stream after the last layer; with ``state_L`` or ``outputs``, a
      ``LayerScan``.

    Raises:
      ValueError: ``group`` does not divide the number of layers.
    """
    def run(p: dict[str, jax.Array], carry: jax.Array, *a: Any) -> jax.Array:
        if axes is not None:  # gathered inside the checkpoint: re-gathered in backward
            p = gather_layer(p, axes, gather)
        if bind is not None:
            p = bind(p)
        return block_fn(p, carry, *a)

    names = tuple(sorted(state_L or ()))

    def collecting(p: dict[str, jax.Array], carry: jax.Array, *a: Any
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
        box = {k: p[k] for k in names}
        token = _LAYER_STATE.set(box)
        try:
            out = run(p, carry, *a)
        finally:
            _LAYER_STATE.reset(token)
        return out, (box, out if outputs else None)

    def layer(p: dict[str, jax.Array], carry: jax.Array, *a: Any
              ) -> tuple[jax.Array, tuple[dict[str, jax.Array], jax.Array | None]]:
        """One layer: ``(x, (its layer-state slices, its output or None))``."""
        if PLD_KEEP not in p:
            return collecting(p, carry, *a)
        # Progressive Layer Dropping: a dropped layer is skipped whole (no gather, no FLOPs)
        keep = p[PLD_KEEP]
        p = {k: v for k, v in p.items() if k != PLD_KEEP}
        return jax.lax.cond(
            keep, lambda c: collecting(p, c, *a),
            lambda c: (c, ({k: p[k] for k in names}, c if outputs else None)), carry)

    def result(out: jax.Array, ys: tuple) -> Any:
        return LayerScan(out, *ys) if state_L or outputs else out

    if state_L:
        params_L = {**params_L, **state_L}

    if remat == "none" and axes is not None and gather is not None:
        # Without remat: keep every activation, but not the weights as constrained to
        # their compute layout. Under ZeRO-3 that is the gathered weights (an unsharded
        # copy of the whole model; the backward scan gathers each layer again, as
        # DeepSpeed's ZeRO-3 does); otherwise the constraint's output is a copy of the
        # layer's weights that the backward pass can read from the stack itself (saving it
        # stacked a second copy of every layer's weights: 4.4 bytes/param in fp32).
        fn = jax.checkpoint(
            layer, policy=save_costly_not_gathered,
            prevent_cse=False,
        )
    else:
        fn = remat_wrap(layer, remat)

    if group > 0:
        n = int(jax.tree.leaves(params_L)[0].shape[0])
        if n % group:
            raise ValueError(f"checkpointing every {group} layers needs a layer count that "
                             f"divides by {group}; this stack has {n} layers (pipeline."
                             "activation_checkpoint_interval)")

        def run_group(p_k: dict[str, jax.Array], carry: jax.Array
                      ) -> tuple[jax.Array, dict[str, jax.Array]]:
            return jax.lax.scan(lambda c, p: layer(p, c, *args), carry, p_k)

        ckpt = jax.checkpoint(run_group, policy=jax.checkpoint_policies.nothing_saveable,
                              prevent_cse=False)
        grouped = jax.tree.map(lambda a: a.reshape(n // group, group, *a.shape[1:]), params_L)
        out, ys = jax.lax.scan(lambda c, p_k: ckpt(p_k, c), x, grouped)
        return result(out, jax.tree.map(lambda a: a.reshape(n, *a.shape[2:]), ys))

    # Inside a train step that accumulates gradients in place (``gradient_sink``), the
    # backward pass adds the stacked weights' gradients into the step's accumulator.
    # (Not when the layers' outputs leave the scan: their gradients flow through it.)
    acc_L = (sink_for(params_L) if args_carry_no_gradient(args) and not outputs
             else None)
    if acc_L is not None:
        out, ys = scan_accumulating(fn, params_L, acc_L, x, *args)
    else:
        out, ys = jax.lax.scan(lambda c, p: fn(p, c, *args), x, params_L)
    return result(out, ys)


def check_inputs(
    input_ids_BT: Any, segment_ids_BT: Any, *, vocab_size: int, max_positions: int
) -> None:
    """Validate token ids before a forward pass.

    Shapes and dtypes are checked always (they are static); the id range only when the ids
    are concrete — under ``jit`` the engine validates on the host instead.

    Raises:
      ValueError: not ``[B, T]`` integers, ``T`` above ``max_positions``, ``segment_ids``
        of another shape, or (concrete ids only) an id outside ``[0, vocab_size)``.
    """
    shape = getattr(input_ids_BT, "shape", None)
    if shape is None or len(shape) != 2:
        raise ValueError(f"input_ids must be [batch, seq]; got shape {shape}")
    if not jnp.issubdtype(input_ids_BT.dtype, jnp.integer):
        raise ValueError(f"input_ids must be integers; got dtype {input_ids_BT.dtype}")
    if shape[1] > max_positions:
        raise ValueError(
            f"sequence length {shape[1]} exceeds the model's max positions ({max_positions}); "
            "use shorter sequences or a config with more positions"
        )
    if segment_ids_BT is not None and tuple(segment_ids_BT.shape) != tuple(shape):
        raise ValueError(
            f"segment_ids shape {tuple(segment_ids_BT.shape)} must equal input_ids shape "
            f"{tuple(shape)}"
        )
    if isinstance(input_ids_BT, jax.core.Tracer) or shape[0] * shape[1] == 0:
        return
    if isinstance(input_ids_BT, jax.Array) and not input_ids_BT.is_fully_addressable:
        return
    ids = np.asarray(input_ids_BT)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or hi >= vocab_size:
        raise ValueError(
            f"input_ids hold ids in [{lo}, {hi}] (min id {lo}, max id {hi}) but vocab_size is "
            f"{vocab_size}; ids must lie in [0, {vocab_size}). Check the tokenizer or the model"
        )


def positions_from_segments(segment_ids_BT: jax.Array | None, B: int, T: int) -> jax.Array:
    """Token positions ``[B, T]``: ``0..T-1``, restarting at every segment boundary.

    With packed sequences (``segment_ids``) each document starts again at position 0, as it
    would have unpacked.
    """
    t_BT = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    if segment_ids_BT is None:
        return t_BT
    starts_BT = jnp.concatenate(
        [jnp.ones((B, 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], axis=1
    )
    first_BT = jax.lax.cummax(jnp.where(starts_BT, t_BT, 0), axis=1)
    return t_BT - first_BT


__all__ = [
    "REMAT_MODES",
    "causal_attention",
    "check_inputs",
    "check_remat",
    "LayerScan",
    "LayerState",
    "LoRAWeight",
    "QuantScale",
    "QuantizedWeight",
    "STACKED_VARIABLES",
    "const_param",
    "dense",
    "embed_lookup",
    "normal_param",
    "offload_unsupported_reason",
    "positions_from_segments",
    "remat_policy",
    "remat_wrap",
    "scan_layers",
    "stacked_axes",
    "stacked_params",
    "gather_layer",
    "layer_states",
    "run_keeping_states",
    "set_layer_state",
]
