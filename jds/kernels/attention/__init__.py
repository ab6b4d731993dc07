"""Attention dispatch: the one function every model calls.

``dot_product_attention`` picks an implementation by backend. Today that is XLA's
``jax.nn.dot_product_attention`` everywhere (it handles grouped-query attention natively and
lets XLA fuse); jds's Pallas flash attention (``pallas_gpu.py``, forward and backward) is
selected with ``implementation="pallas"`` until a GPU measurement makes it the default there,
JAX's splash attention for TPU (``pallas_tpu.py``) with ``"pallas_tpu"``, and cuDNN's fused
attention (``jax.nn.dot_product_attention(implementation="cudnn")``) with ``"cudnn"``.
``attention_reference`` is the spec each entry is tested against.

A Pallas call is opaque to XLA's partitioner. Under sharding rules (``use_rules``) with a
mesh of more than one device, the Pallas entries therefore run inside a ``shard_map`` over
the batch and head axes the rules give (attention is independent per sequence and head),
each device on its own shard; inside the pipeline's ``shard_map`` (manual over ``stage``)
the inner map covers the remaining axes.

On the CPU backend, float16 attention is computed in float32 and cast back: XLA:CPU cannot
lower the fp16 x fp16 -> fp32 dots of its backward pass ("precision F16_F16_F32 is not
supported"), and CPUs have no fast fp16 arithmetic to lose anyway.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from jds.kernels.attention.reference import attention_reference
from jds.kernels.platform import is_gpu, target_platform

IMPLEMENTATIONS: tuple[str, ...] = ("xla", "cudnn", "pallas", "pallas_interpret", "pallas_tpu",
                                    "pallas_tpu_interpret")
_CUDNN_DTYPES = (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))


def check_implementation(name: str | None) -> None:
    """Raise ``ValueError`` unless ``name`` is None or one of ``IMPLEMENTATIONS``."""
    if name is not None and name not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be None or one of "
                         f"{list(IMPLEMENTATIONS)}; got {name!r}")


def _per_shard(kernel, q_BTNH, k_BSKH, v_BSKH, segment_ids):
    """``kernel(q, k, v, segment_ids=...)`` on each device's batch and head shard.

    Without active rules, or on one device, the kernel runs as it is.
    """
    from jds.partitioning.rules import active_rules, logical_to_spec

    active = active_rules()
    if active is None or active[0].size == 1:
        return kernel(q_BTNH, k_BSKH, v_BSKH, segment_ids=segment_ids)
    mesh, rules = active
    context = jax.sharding.get_abstract_mesh()
    manual = set(context.manual_axes) if not context.empty else set()

    def spec(axes, shape):
        full = logical_to_spec(axes, rules, mesh=mesh, shape=shape, what=f"attention {axes}")
        keep = lambda e: tuple(a for a in ((e,) if isinstance(e, str) else e or ())  # noqa: E731
                               if a not in manual)
        return PartitionSpec(*[(keep(e) or None) for e in full])

    q_spec = spec(("batch", "seq", "heads", "head_dim"), q_BTNH.shape)
    kv_spec = spec(("batch", "seq", "kv_heads", "head_dim"), k_BSKH.shape)
    if segment_ids is None:
        fn = lambda q, k, v: kernel(q, k, v, segment_ids=None)  # noqa: E731
        args, specs = (q_BTNH, k_BSKH, v_BSKH), (q_spec, kv_spec, kv_spec)
    else:
        fn = lambda q, k, v, s: kernel(q, k, v, segment_ids=s)  # noqa: E731
        args = (q_BTNH, k_BSKH, v_BSKH, segment_ids)
        specs = (q_spec, kv_spec, kv_spec, spec(("batch", "seq"), segment_ids.shape))
    auto = set(mesh.axis_names) - manual
    # Inside a partly manual shard_map (the pipeline), the inner map takes the context's
    # abstract mesh, which marks the outer map's axes manual.
    target = context if manual else mesh
    return jax.shard_map(fn, mesh=target, in_specs=specs, out_specs=q_spec, axis_names=auto,
                         check_vma=False)(*args)


def dot_product_attention(
    q_BTNH: jax.Array,
    k_BSKH: jax.Array,
    v_BSKH: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Attention with ``[batch, seq, heads, head_dim]`` layout and GQA support.

    Args:
      q_BTNH: queries; ``heads`` must be a multiple of ``kv_heads``.
      k_BSKH: keys ``[batch, seq_kv, kv_heads, head_dim]``.
      v_BSKH: values, same shape as keys.
      causal: causal mask (aligned at the end when ``seq_q < seq_kv``).
      segment_ids: optional ``[batch, seq]`` packing ids (needs ``seq_q == seq_kv``).
      sm_scale: softmax scale; default ``head_dim ** -0.5``.
      implementation: ``None``/``"xla"`` (XLA, today's default everywhere), ``"cudnn"``
        (cuDNN's fused flash attention; NVIDIA GPUs; bf16/fp16 self-attention without
        segment ids, the cases cuDNN takes: other calls run the XLA path), ``"pallas"``
        (jds's Pallas flash attention, ``pallas_gpu.flash_attention``; GPU),
        ``"pallas_tpu"`` (splash attention behind ``pallas_tpu.flash_attention``; TPU), or
        ``"pallas_interpret"`` / ``"pallas_tpu_interpret"`` (the same kernels interpreted:
        any backend, for testing). The kernels become their backend's default once they
        have run there: a Pallas call is opaque to XLA's partitioner, so under data or
        tensor parallelism each needs a ``shard_map`` over the batch and head axes first.

    Returns:
      ``[batch, seq_q, heads, head_dim]`` in q's dtype.

    Raises:
      ValueError: on mismatched shapes, or ``"cudnn"`` when not building for a GPU.
    """
    if q_BTNH.ndim != 4 or k_BSKH.ndim != 4 or v_BSKH.shape != k_BSKH.shape:
        raise ValueError(
            f"attention expects q [B,T,N,H] and k, v [B,S,K,H]; got {q_BTNH.shape}, "
            f"{k_BSKH.shape}, {v_BSKH.shape}"
        )
    if q_BTNH.shape[2] % k_BSKH.shape[2]:
        raise ValueError(
            f"heads ({q_BTNH.shape[2]}) must be a multiple of kv_heads ({k_BSKH.shape[2]})"
        )
    if implementation in ("pallas", "pallas_interpret"):
        from jds.kernels.attention.pallas_gpu import flash_attention

        kernel = functools.partial(flash_attention, causal=causal, sm_scale=sm_scale,
                                   interpret=implementation == "pallas_interpret")
        return _per_shard(kernel, q_BTNH, k_BSKH, v_BSKH, segment_ids)
    if implementation in ("pallas_tpu", "pallas_tpu_interpret"):
        from jds.kernels.attention.pallas_tpu import flash_attention as splash_attention

        kernel = functools.partial(splash_attention, causal=causal, sm_scale=sm_scale,
                                   interpret=implementation == "pallas_tpu_interpret")
        return _per_shard(kernel, q_BTNH, k_BSKH, v_BSKH, segment_ids)
    if implementation == "cudnn":
        if not is_gpu(target_platform()):
            raise ValueError(f"attention implementation 'cudnn' needs an NVIDIA GPU; building "
                             f"for {target_platform()!r}. Use None/'xla' (attention_impl in "
                             "the model config)")
        T, S = q_BTNH.shape[1], k_BSKH.shape[1]
        if (segment_ids is None and not (causal and T != S)
                and jnp.dtype(q_BTNH.dtype) in _CUDNN_DTYPES):
            def kernel(q, k, v, segment_ids=None):
                return jax.nn.dot_product_attention(q, k, v, scale=sm_scale, is_causal=causal,
                                                    implementation="cudnn")
            # Per shard like the Pallas kernels: no reliance on the custom call's own
            # partitioning rules under every layout.
            return _per_shard(kernel, q_BTNH, k_BSKH, v_BSKH, None)
        implementation = "xla"
    if implementation not in (None, "xla"):
        raise ValueError(f"implementation must be None or one of {list(IMPLEMENTATIONS)}; "
                         f"got {implementation!r}")
    if q_BTNH.dtype == jnp.float16 and target_platform() == "cpu":
        f32 = [x.astype(jnp.float32) for x in (q_BTNH, k_BSKH, v_BSKH)]
        out = dot_product_attention(
            *f32, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale
        )
        return out.astype(jnp.float16)
    T, S = q_BTNH.shape[1], k_BSKH.shape[1]
    if segment_ids is not None or (causal and T != S):
        # XLA's entry has no end-aligned causal mask nor segment ids: use the reference
        # formulation (also plain XLA ops, fused by the compiler).
        return attention_reference(
            q_BTNH, k_BSKH, v_BSKH, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale
        )
    return jax.nn.dot_product_attention(
        q_BTNH, k_BSKH, v_BSKH, scale=sm_scale, is_causal=causal, implementation="xla"
    )


__all__ = ["IMPLEMENTATIONS", "attention_reference", "check_implementation",
           "dot_product_attention"]
