"""Pallas flash attention (interpret mode on CPU) vs ``attention_reference``: values and grads."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jds.kernels.attention.pallas_gpu import BlockSizes, flash_attention
from jds.kernels.attention.reference import attention_reference

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA device")

SMALL = BlockSizes(16, 16, 16, 16, 16, 16)
# Different blocks per kernel: T and S pad to 64 (the largest block), and each kernel has to
# skip or mask blocks made of padding on its own.
MIXED = BlockSizes(
    block_q=32, block_k=16, block_q_dkv=16, block_k_dkv=32, block_q_dq=32, block_k_dq=16
)
# Relative L2 error bounds (METHOD.md scale): fp32 kernels agree with the fp32 reference to
# rounding; bf16 / fp16 tiles (P and dS rounded to the input dtype before the dots) are compared
# with the fp32 reference on the same rounded inputs.
RTOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2, jnp.float16: 4e-3}


def _inputs(B, T, S, N, K, H, dtype, seg, seed):
    ks = jax.random.split(jax.random.key(seed), 5)
    q = jax.random.normal(ks[0], (B, T, N, H), jnp.float32).astype(dtype)
    k = jax.random.normal(ks[1], (B, S, K, H), jnp.float32).astype(dtype)
    v = jax.random.normal(ks[2], (B, S, K, H), jnp.float32).astype(dtype)
    segment_ids = None
    if seg:  # packed rows: sorted ids, so segments are contiguous runs of random length
        segment_ids = jnp.sort(jax.random.randint(ks[3], (B, T), 0, 3), axis=1)
    do = jax.random.normal(ks[4], (B, T, N, H), jnp.float32)
    return q, k, v, segment_ids, do


def _out_and_grads(fn, q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(do.astype(out.dtype)))


def _rel_err(got, want):
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    return np.linalg.norm(got - want) / np.linalg.norm(want)


@pytest.mark.parametrize(
    "B,T,S,N,K,H,causal,seg,dtype,blocks",
    [
        (1, 37, 37, 2, 2, 64, True, False, jnp.float32, SMALL),  # odd length, MHA
        (1, 37, 37, 4, 1, 64, False, False, jnp.float32, SMALL),  # GQA 4, non-causal
        (1, 21, 21, 8, 1, 64, True, True, jnp.float32, SMALL),  # GQA 8 + segments
        (2, 37, 37, 4, 2, 64, True, True, jnp.float32, MIXED),  # segments, mixed blocks
        (1, 37, 37, 2, 2, 64, False, True, jnp.float32, SMALL),  # segments, non-causal
        (1, 20, 37, 2, 1, 64, True, False, jnp.float32, SMALL),  # T < S: end-aligned causal
        (1, 20, 37, 2, 2, 64, False, False, jnp.float32, MIXED),  # T < S, non-causal
        (1, 33, 33, 2, 1, 128, True, False, jnp.float32, SMALL),  # head_dim 128
        (1, 37, 37, 4, 1, 64, True, True, jnp.bfloat16, SMALL),
        (1, 37, 37, 2, 1, 64, True, False, jnp.float16, SMALL),
        (1, 37, 37, 2, 2, 64, True, False, jnp.float32, None),  # default (GPU) blocks, clamped
    ],
)
def test_forward_and_grads_match_reference(B, T, S, N, K, H, causal, seg, dtype, blocks):
    q, k, v, segment_ids, do = _inputs(B, T, S, N, K, H, dtype, seg, seed=T + N + H)
    scale = 0.3 if blocks is None else None  # also exercise a non-default sm_scale

    def flash(q, k, v):
        return flash_attention(
            q,
            k,
            v,
            causal=causal,
            segment_ids=segment_ids,
            sm_scale=scale,
            block_sizes=blocks,
            interpret=True,
        )

    def ref(q, k, v):
        f32 = (x.astype(jnp.float32) for x in (q, k, v))
        return attention_reference(*f32, causal=causal, segment_ids=segment_ids, sm_scale=scale)

    got = jax.jit(lambda *a: _out_and_grads(flash, *a))(q, k, v, do)
    want = jax.jit(lambda *a: _out_and_grads(ref, *a))(q, k, v, do)
    assert got[0].dtype == dtype and got[0].shape == (B, T, N, H)
    assert [g.shape for g in got[1:]] == [q.shape, k.shape, v.shape]
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        err = _rel_err(g, w)
        assert err < RTOL[dtype], f"{name}: relative error {err:.2e}"


def test_masks_change_the_result():
    """The parity above is not vacuous: causal and segment masks do alter out and grads."""
    q, k, v, seg, do = _inputs(1, 19, 19, 2, 2, 64, jnp.float32, True, seed=3)
    run = jax.jit(
        lambda causal, seg: _out_and_grads(
            lambda q, k, v: flash_attention(
                q, k, v, causal=causal, segment_ids=seg, block_sizes=SMALL, interpret=True
            ),
            q,
            k,
            v,
            do,
        ),
        static_argnums=0,
    )
    plain, causal, packed = run(False, None), run(True, None), run(False, seg)
    for a, b in zip(plain, causal, strict=True):
        assert _rel_err(a, b) > 1e-2
    for a, b in zip(plain, packed, strict=True):
        assert _rel_err(a, b) > 1e-2


def test_bad_arguments_raise():
    x = jnp.zeros((1, 16, 4, 64), jnp.float32)
    kv = jnp.zeros((1, 16, 2, 64), jnp.float32)
    cases = [
        (lambda: flash_attention(x[0], kv, kv), "q must have rank 4"),
        (lambda: flash_attention(x, kv[0], kv), "k must have rank 4"),
        (
            lambda: flash_attention(x, jnp.zeros((1, 16, 3, 64)), jnp.zeros((1, 16, 3, 64))),
            r"q heads \(4\) must be a multiple of k/v kv_heads \(3\)",
        ),
        (
            lambda: flash_attention(x, kv[..., :32], kv[..., :32]),
            r"head_dim of q \(64\) and k/v \(32\) differ",
        ),
        (
            lambda: flash_attention(x[..., :32], kv[..., :32], kv[..., :32]),
            "head_dim 32 unsupported",
        ),
        (lambda: flash_attention(x, kv, kv[:, :8]), "must have one shape"),
        (lambda: flash_attention(x.astype(jnp.int32), kv, kv), "q dtype int32 unsupported"),
        (
            lambda: flash_attention(x, kv.astype(jnp.bfloat16), kv.astype(jnp.bfloat16)),
            "dtypes differ",
        ),
        (lambda: flash_attention(x, kv[:, :8], kv[:, :8]), r"causal needs seq_q \(16\) <="),
        (
            lambda: flash_attention(
                x, kv[:, :8], kv[:, :8], causal=False, segment_ids=jnp.zeros((1, 16), jnp.int32)
            ),
            "segment_ids need seq_q == seq_kv",
        ),
        (
            lambda: flash_attention(x, kv, kv, segment_ids=jnp.zeros((1, 8), jnp.int32)),
            "segment_ids must be integers of shape",
        ),
        (
            lambda: flash_attention(x, kv, kv, block_sizes=BlockSizes(block_q=24)),
            "block_sizes.block_q=24 must be a power of two",
        ),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("H,K,seg", [(64, 2, False), (128, 1, True), (256, 4, False)])
def test_gpu_compiled_kernel_matches_reference(H, K, seg):
    B, T, N = 2, 300, 8  # T not a multiple of any block
    q, k, v, segment_ids, do = _inputs(B, T, T, N, K, H, jnp.bfloat16, seg, seed=H)

    def flash(q, k, v):
        return flash_attention(q, k, v, causal=True, segment_ids=segment_ids)

    def ref(q, k, v):
        f32 = (x.astype(jnp.float32) for x in (q, k, v))
        return attention_reference(*f32, causal=True, segment_ids=segment_ids)

    got = jax.jit(lambda *a: _out_and_grads(flash, *a))(q, k, v, do)
    want = jax.jit(lambda *a: _out_and_grads(ref, *a))(q, k, v, do)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        err = _rel_err(g, w)
        assert err < RTOL[jnp.bfloat16], f"{name}: relative error {err:.2e}"


def test_dispatcher_routes_to_the_pallas_kernel():
    from jds.kernels.attention import dot_product_attention

    rng = np.random.default_rng(3)
    q = jnp.asarray(rng.standard_normal((1, 20, 4, 64)), jnp.float32)
    k = jnp.asarray(rng.standard_normal((1, 20, 2, 64)), jnp.float32)
    v = jnp.asarray(rng.standard_normal((1, 20, 2, 64)), jnp.float32)
    want = dot_product_attention(q, k, v)
    got = dot_product_attention(q, k, v, implementation="pallas_interpret")
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5, rtol=2e-5)
    with pytest.raises(ValueError, match="implementation must be"):
        dot_product_attention(q, k, v, implementation="cudnn-ish")


def test_cudnn_entry_is_refused_off_gpu_with_the_fix():
    from jds.kernels.attention import dot_product_attention

    q = jnp.zeros((1, 16, 2, 64), jnp.bfloat16)
    with pytest.raises(ValueError, match="needs an NVIDIA GPU.*'xla'"):
        dot_product_attention(q, q, q, implementation="cudnn")


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("H,K", [(64, 2), (128, 1)])
def test_gpu_cudnn_entry_matches_reference(H, K):
    from jds.kernels.attention import dot_product_attention

    q, k, v, _, do = _inputs(2, 256, 256, 8, K, H, jnp.bfloat16, False, seed=H)

    def cudnn(q, k, v):
        return dot_product_attention(q, k, v, causal=True, implementation="cudnn")

    def ref(q, k, v):
        f32 = (x.astype(jnp.float32) for x in (q, k, v))
        return attention_reference(*f32, causal=True)

    got = jax.jit(lambda *a: _out_and_grads(cudnn, *a))(q, k, v, do)
    want = jax.jit(lambda *a: _out_and_grads(ref, *a))(q, k, v, do)
    for name, g, w in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        err = _rel_err(g, w)
        assert err < RTOL[jnp.bfloat16], f"{name}: relative error {err:.2e}"
