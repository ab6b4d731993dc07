"""Int8 quantization and the Pallas int8 matmuls (interpret mode) against the jnp reference."""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jds.kernels.quant as quant
from jds.kernels.quant import (
    dequantize,
    int8_matmul,
    int8_matmul_pallas,
    int8_matmul_reference,
    quantize,
    quantize_activations,
    w8a8_matmul,
    w8a8_matmul_reference,
)

on_gpu = pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a CUDA device")


def _data(m, k, n, seed=0, x_lead=()):
    kx, kw = jax.random.split(jax.random.key(seed))
    x = jax.random.normal(kx, (*x_lead, m, k), jnp.float32)
    w = jax.random.normal(kw, (k, n), jnp.float32) * 0.05
    return x, w


def _expand(scale, k):
    """[G, N] scale -> [K, N], each group row repeated K // G times."""
    s = np.asarray(scale, np.float64)
    return np.repeat(s, k // s.shape[0], axis=0)


# (M, K, N, group_size, blocks): skinny decode M, M not a multiple of block_m, several N tiles
# and several K steps (explicit small blocks), per channel and per group.
CASES = [
    (1, 128, 128, None, {}),
    (5, 256, 256, 32, {}),
    (16, 128, 128, 64, dict(block_n=32, block_k=32)),
    (33, 256, 128, None, dict(block_m=16, block_n=64, block_k=64)),
    (33, 256, 256, 128, dict(block_m=16, block_n=128, block_k=32)),
]


@pytest.mark.parametrize("m,k,n,group_size,blocks", CASES)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_int8_matmul_kernel_matches_reference(m, k, n, group_size, blocks, dtype):
    x, w = _data(m, k, n, seed=m + k)
    x = x.astype(dtype)
    q, s = quantize(w, group_size=group_size)
    got = int8_matmul(x, q, s, group_size=group_size, interpret=True, **blocks)
    want = int8_matmul_reference(x, q, s, group_size=group_size)
    assert got.shape == (m, n) and got.dtype == dtype
    got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
    assert np.all(np.isfinite(got))
    # Both accumulate in fp32 (different order); bf16 output may differ by one rounding step.
    rtol = 1e-5 if dtype == jnp.float32 else 2.0**-8
    np.testing.assert_allclose(got, want, rtol=rtol, atol=1e-5 * np.abs(want).max())


@pytest.mark.parametrize("group_size", [None, 32])
def test_int8_matmul_kernel_gradients_match_reference(group_size):
    """The kernel's custom VJP (x and scale; the int8 weight gets none) equals autodiff of the
    reference, inside jit, with leading dims."""
    x, w = _data(6, 128, 64, seed=3, x_lead=(2,))
    q, s = quantize(w, axis=0, group_size=group_size)
    r = jax.random.normal(jax.random.key(9), (2, 6, 64))

    def loss(f):
        return lambda x, s: jnp.sum(f(x, q, s, group_size=group_size) * r)

    kernel = functools.partial(int8_matmul_pallas, interpret=True, block_k=32)
    got = jax.jit(jax.grad(loss(kernel), argnums=(0, 1)))(x, s)
    want = jax.grad(loss(int8_matmul_reference), argnums=(0, 1))(x, s)
    for g, wnt in zip(got, want, strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(wnt), rtol=1e-5,
                                   atol=1e-5 * float(np.max(np.abs(wnt))))
    # The dispatcher under interpret takes the same path; bf16 x gets a bf16 cotangent.
    gx = jax.grad(lambda x: int8_matmul(x, q, s, group_size=group_size,
                                        interpret=True).astype(jnp.float32).sum())(
        x.astype(jnp.bfloat16))
    assert gx.dtype == jnp.bfloat16 and np.isfinite(np.asarray(gx, np.float32)).all()


@pytest.mark.parametrize("group_size", [None, 32])
@pytest.mark.parametrize("axis", [0, 1])
def test_quantize_error_bound_and_zero_groups(group_size, axis):
    _, w = _data(1, 128, 64, seed=3)
    w = w.at[:, 5].set(0.0).at[:32, 7].set(0.0)  # an all-zero channel and an all-zero group
    if axis == 1:
        w = w.T  # [N, K]: input axis last
    q, s = quantize(w, axis=axis, group_size=group_size)
    assert q.dtype == jnp.int8 and s.dtype == jnp.float32
    assert s.shape == quant.expected_scale_shape(w.shape, axis=axis, group_size=group_size)
    assert int(jnp.max(jnp.abs(q.astype(jnp.int32)))) == 127
    deq = np.asarray(dequantize(q, s, axis=axis, group_size=group_size), np.float64)
    s_full = _expand(np.moveaxis(np.asarray(s), axis, 0), w.shape[axis])
    s_full = np.moveaxis(s_full, 0, axis)
    err = np.abs(deq - np.asarray(w, np.float64))
    assert np.all(np.isfinite(deq))
    assert np.all(err <= s_full / 2 * (1 + 1e-6) + 1e-12)
    # Each nonzero channel/group hits +-127 exactly: the scale is max|w| / 127, not larger.
    qk = np.moveaxis(np.abs(np.asarray(q, np.int32)), axis, 0)
    sk = np.moveaxis(np.asarray(s), axis, 0)
    gmax = qk.reshape(sk.shape[0], -1, qk.shape[-1]).max(axis=1)
    np.testing.assert_array_equal(gmax, np.where(sk > 0, 127, 0))


def test_quantize_bf16_weight_matches_fp32():
    _, w = _data(1, 64, 32, seed=4)
    w16 = w.astype(jnp.bfloat16)
    q16, s16 = quantize(w16, group_size=16)
    q32, s32 = quantize(w16.astype(jnp.float32), group_size=16)
    np.testing.assert_array_equal(q16, q32)
    np.testing.assert_array_equal(s16, s32)


@pytest.mark.parametrize("group_size", [None, 32])
def test_int8_matmul_within_propagated_quantization_bound(group_size):
    m, k, n = 5, 256, 128
    x, w = _data(m, k, n, seed=7)
    q, s = quantize(w, group_size=group_size)
    got = np.asarray(int8_matmul(x, q, s, group_size=group_size, interpret=True), np.float64)
    exact = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    # |x @ (deq - w)| <= |x| @ (scale / 2), plus fp32 accumulation rounding.
    bound = np.abs(np.asarray(x, np.float64)) @ (_expand(s, k) / 2)
    err = np.abs(got - exact)
    assert np.all(err <= bound + 1e-5 * np.abs(exact).max())
    assert err.max() > 0  # the weights really were quantized


def test_leading_dims_flattened():
    x, w = _data(3, 128, 64, seed=8, x_lead=(2,))
    q, s = quantize(w)
    got = int8_matmul(x, q, s, interpret=True)
    assert got.shape == (2, 3, 64)
    np.testing.assert_allclose(
        got.reshape(6, 64), int8_matmul_reference(x.reshape(6, 128), q, s), rtol=1e-5, atol=1e-5
    )


@pytest.mark.parametrize("m,blocks", [(1, {}), (33, dict(block_m=16, block_n=32, block_k=64))])
@pytest.mark.parametrize("out_dtype", [jnp.float32, jnp.bfloat16])
def test_w8a8_exact_integer_product_then_scaled(m, blocks, out_dtype):
    k, n = 256, 128
    x, w = _data(m, k, n, seed=11 + m)
    xq, xs = quantize_activations(x)
    q, ws = quantize(w)
    acc = np.asarray(xq, np.int64) @ np.asarray(q, np.int64)  # exact integer product
    assert np.abs(acc).max() < 2**24  # so its fp32 conversion is exact too
    want = (acc.astype(np.float32) * np.asarray(xs)) * np.asarray(ws)
    want = np.asarray(jnp.asarray(want).astype(out_dtype))
    ref = w8a8_matmul_reference(xq, xs, q, ws, out_dtype=out_dtype)
    got = quant.w8a8_matmul_pallas(xq, xs, q, ws, out_dtype=out_dtype, interpret=True, **blocks)
    assert got.dtype == out_dtype and got.shape == (m, n)
    np.testing.assert_array_equal(np.asarray(ref), want)
    np.testing.assert_array_equal(np.asarray(got), want)
    np.testing.assert_array_equal(
        np.asarray(w8a8_matmul(xq, xs, q, ws, out_dtype=out_dtype, interpret=True)), want
    )
    # Per-token activation quantization obeys the same half-step bound.
    err = np.abs(np.asarray(xq, np.float64) * np.asarray(xs) - np.asarray(x, np.float64))
    assert np.all(err <= np.asarray(xs, np.float64) / 2 * (1 + 1e-6))


def test_cpu_dispatch_takes_reference(monkeypatch):
    assert not quant.use_pallas() and quant.use_pallas(interpret=True)

    def boom(*args, **kwargs):
        raise AssertionError("Pallas path taken on CPU")

    monkeypatch.setattr(quant, "int8_matmul_pallas", boom)
    monkeypatch.setattr(quant, "w8a8_matmul_pallas", boom)
    x, w = _data(4, 64, 32)
    q, s = quantize(w)
    np.testing.assert_array_equal(int8_matmul(x, q, s), int8_matmul_reference(x, q, s))
    xq, xs = quantize_activations(x)
    np.testing.assert_array_equal(w8a8_matmul(xq, xs, q, s), w8a8_matmul_reference(xq, xs, q, s))
    with pytest.raises(AssertionError, match="Pallas path"):
        int8_matmul(x, q, s, interpret=True)


def test_compiled_kernel_refused_on_cpu():
    x, w = _data(4, 64, 32)
    q, s = quantize(w)
    with pytest.raises(ValueError, match="interpret=True"):
        int8_matmul_pallas(x, q, s)


def test_argument_errors():
    x, w = _data(4, 128, 64)
    q, s = quantize(w)
    qg, sg = quantize(w, group_size=32)
    xq, xs = quantize_activations(x)
    cases = [
        (lambda: int8_matmul(x, w, s), "w_int8 must be int8"),
        (lambda: int8_matmul(x, q, s[:, :32]), r"scale must have shape \(1, 64\)"),
        (lambda: int8_matmul(x, qg, sg), r"scale must have shape \(1, 64\)"),
        (lambda: int8_matmul(x, qg, s, group_size=32), r"scale must have shape \(4, 64\)"),
        (lambda: int8_matmul(x[:, :64], q, s), r"must equal w_int8's K"),
        (lambda: int8_matmul(x, q, sg, group_size=48), "group_size=48 must divide K=128"),
        (lambda: int8_matmul(xq, q, s), "x must be a floating"),
        (lambda: int8_matmul(x, q, s, interpret=True, block_n=48), "N=64 must be a multiple"),
        (lambda: int8_matmul(x, q, s, interpret=True, block_k=96), "K=128 must be a multiple"),
        (
            lambda: int8_matmul(x, qg, sg, group_size=32, interpret=True, block_k=64),
            "block_k=64 must divide group_size=32",
        ),
        (lambda: int8_matmul(x, q, s, interpret=True, block_m=0), "block_m must be a positive"),
        (lambda: quantize(w, group_size=48), "group_size=48 must divide"),
        (lambda: quantize(q), "2-D floating weight"),
        (lambda: dequantize(q, sg), r"scale must have shape \(1, 64\)"),
        (lambda: w8a8_matmul(x, xs, q, s), "x_int8 must be int8"),
        (lambda: w8a8_matmul(xq, xs, w, s), "w_int8 must be int8"),
        (lambda: w8a8_matmul(xq, xs[:2], q, s), r"x_scale must have shape \(4, 1\)"),
        (lambda: w8a8_matmul(xq, xs, q, sg), r"w_scale must have shape \(1, 64\)"),
        (lambda: w8a8_matmul(xq, xs, q[:64], s), "must equal w_int8's K"),
    ]
    for fn, msg in cases:
        with pytest.raises(ValueError, match=msg):
            fn()


@pytest.mark.gpu
@on_gpu
@pytest.mark.parametrize("m", [1, 16, 33])
@pytest.mark.parametrize("group_size", [None, 128])
def test_gpu_compiled_kernels_match_reference(m, group_size):
    k, n = 512, 256
    x, w = _data(m, k, n, seed=m)
    x = x.astype(jnp.bfloat16)
    q, s = quantize(w, group_size=group_size)
    got = np.asarray(int8_matmul(x, q, s, group_size=group_size), np.float32)
    want = np.asarray(int8_matmul_reference(x, q, s, group_size=group_size), np.float32)
    np.testing.assert_allclose(got, want, rtol=2.0**-8, atol=1e-5 * np.abs(want).max())
    xq, xs = quantize_activations(x)
    qc, sc = quantize(w)
    np.testing.assert_array_equal(
        np.asarray(w8a8_matmul(xq, xs, qc, sc)), np.asarray(w8a8_matmul_reference(xq, xs, qc, sc))
    )


@pytest.mark.parametrize("static", [False, True])
def test_w8a8_layer_input_equals_its_fake_quantized_product(static):
    """A layer whose input a model was trained to quantize (symmetric, 8 bits), served with
    int8 weights: ``dense`` multiplies the input's int8 codes by the weight's in integers
    (``integer=True``), equal to the fake-quantized input times the dequantized weight in
    fp32; a layer not selected (``on`` false) takes the weight-only product; the compiled
    program holds the int8 x int8 dot."""
    from jds.compression.activation import quantize_layer_input
    from jds.models.layers import ActQuantWeight, QuantizedWeight, dense

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(2, 5, 4, 8)), jnp.float32)  # [B, T, N, H] -> D
    w = rng.normal(size=(4, 8, 16)).astype(np.float32)            # wo-like: 2 input dims
    q, s = quantize(jnp.asarray(w.reshape(32, 16)), axis=0)
    base = QuantizedWeight(q.reshape(4, 8, 16), s.reshape(16), n_in=2)
    rng_ = jnp.asarray([-2.5, 3.0]) if static else None
    aq = ActQuantWeight(base, jnp.bool_(True), 8, "symmetric", 2, rng_, "", False, True)
    got = jax.jit(lambda x: dense("BTNH,NHD->BTD", x, aq))(x)
    fq = quantize_layer_input(x, aq)
    deq = np.asarray(q, np.float32) * np.asarray(s)
    want = np.asarray(fq).reshape(10, 32) @ deq
    np.testing.assert_allclose(np.asarray(got).reshape(10, 16), want, rtol=1e-5, atol=1e-5)
    off = ActQuantWeight(base, jnp.bool_(False), 8, "symmetric", 2, rng_, "", False, True)
    np.testing.assert_allclose(np.asarray(dense("BTNH,NHD->BTD", x, off)).reshape(10, 16),
                               np.asarray(x).reshape(10, 32) @ deq, rtol=1e-5, atol=1e-5)
    hlo = jax.jit(lambda x: dense("BTNH,NHD->BTD", x, aq)).lower(x).compile().as_text()
    assert re.search(r"= s32\[[\d,]+\]\{[\d,]+\} dot\(", hlo), "no int32-valued dot"
    assert re.search(r"s8\[[\d,]+\]\) -> s32\[", hlo), "its operands are not int8"
