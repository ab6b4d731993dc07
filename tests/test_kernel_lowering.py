"""The GPU and TPU kernels lower for their platforms, checked on a CPU host.

CI has no GPU or TPU, and the interpret-mode parity tests run the kernels' logic through the
Pallas interpreter, not their Triton / Mosaic lowering. JAX can lower a program for another
platform than the host's (``Traced.lower(lowering_platforms=...)``): the Pallas kernels are
then translated to Triton IR (GPU) or Mosaic MLIR (TPU) and embedded in the StableHLO as
custom calls, so the lowering rules' limits (power-of-two Triton arrays, TPU tile shapes, the
Triton-vs-Mosaic-GPU choice) are exercised here. What stays for a real device is the backend
compile (Triton to PTX, register and shared-memory limits) and the run itself.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jds.kernels.attention import paged, pallas_gpu, pallas_tpu
from jds.kernels.quant import pallas as qp

S = jax.ShapeDtypeStruct
TRITON = "__gpu$xla.gpu.triton("


def lowered(f, *args, platform: str) -> str:
    return jax.jit(f).trace(*args).lower(lowering_platforms=(platform,)).as_text()


@pytest.mark.parametrize("head_dim", [64, 128, 256])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
@pytest.mark.parametrize("case", ["causal_segments_gqa3", "cross_noncausal_mqa"])
def test_flash_attention_forward_and_backward_lower_to_triton(head_dim, dtype, case):
    if case == "causal_segments_gqa3":  # odd length, 12 heads over 4 kv heads, packing
        (T, Sk, N, K), causal, seg = (333, 333, 12, 4), True, True
    else:  # a short query block over a long kv, one kv head
        (T, Sk, N, K), causal, seg = (100, 1000, 8, 1), False, False
    q, kv, ids = S((2, T, N, head_dim), dtype), S((2, Sk, K, head_dim), dtype), S((2, T), "i4")

    def loss(q, k, v, ids):
        out = pallas_gpu.flash_attention(q, k, v, causal=causal, segment_ids=ids if seg else None)
        return out.astype(jnp.float32).sum()

    fwd = lowered(lambda q, k, v, ids: pallas_gpu.flash_attention(
        q, k, v, causal=causal, segment_ids=ids if seg else None), q, kv, kv, ids,
        platform="cuda")
    assert fwd.count(TRITON) == 1 and 'name = "jds_flash_attention_fwd"' in fwd
    grad = lowered(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv, ids, platform="cuda")
    assert grad.count(TRITON) == 3
    for kernel in ("fwd", "dkdv", "dq"):
        assert f'name = "jds_flash_attention_{kernel}"' in grad


@pytest.mark.parametrize("platform", ["gpu", "tpu"])
@pytest.mark.parametrize("m", [1, 16, 4096])
def test_int8_matmuls_lower_for_gpu_and_tpu(platform, m):
    lowering = {"gpu": "cuda", "tpu": "tpu"}[platform]
    marker = TRITON if platform == "gpu" else "tpu_custom_call"
    k, n = 4096, 8192
    w, s = S((k, n), jnp.int8), S((1, n), jnp.float32)
    for dtype in (jnp.bfloat16, jnp.float16):
        hlo = lowered(lambda x, w, s: qp.int8_matmul_pallas(x, w, s, platform=platform),
                      S((m, k), dtype), w, s, platform=lowering)
        assert marker in hlo and "int8_w8a16_matmul" in hlo
    # Per-group scales (the group index is lax.div, not //: floor division lowers through
    # sign(), which Mosaic resolves per TPU generation and so not from this host).
    hlo = lowered(lambda x, w, s: qp.int8_matmul_pallas(x, w, s, group_size=128,
                                                        platform=platform),
                  S((m, k), jnp.bfloat16), w, S((k // 128, n), jnp.float32), platform=lowering)
    assert marker in hlo
    hlo = lowered(lambda x, xs, w, s: qp.w8a8_matmul_pallas(x, xs, w, s, platform=platform,
                                                            out_dtype=jnp.bfloat16),
                  S((m, k), jnp.int8), S((m, 1), jnp.float32), w, s, platform=lowering)
    assert marker in hlo and "int8_w8a8_matmul" in hlo


def test_int8_kernel_platform_errors_name_the_fix():
    x, w, s = jnp.zeros((4, 64)), jnp.zeros((64, 64), jnp.int8), jnp.ones((1, 64))
    with pytest.raises(ValueError, match="platform='gpu'/'tpu'"):
        qp.int8_matmul_pallas(x, w, s)  # CPU, no interpret
    with pytest.raises(ValueError, match="platform='metal'"):
        qp.int8_matmul_pallas(x, w, s, platform="metal")
    with pytest.raises(ValueError, match="power-of-two"):
        qp.int8_matmul_pallas(jnp.zeros((4, 96)), jnp.zeros((96, 64), jnp.int8), s,
                              block_k=96, platform="gpu")


@pytest.mark.parametrize("heads,kv_heads,head_dim,block", [(8, 2, 64, 16), (12, 4, 128, 16),
                                                           (32, 8, 128, 32), (4, 4, 64, 8)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_paged_attention_lowers_to_triton(heads, kv_heads, head_dim, block, dtype):
    n, blocks, table = 8, 37, 5
    pages = S((blocks, block, kv_heads, head_dim), dtype)
    hlo = lowered(paged.paged_attention, S((n, heads, head_dim), dtype), pages, pages,
                  S((n, table), jnp.int32), S((n,), jnp.int32), platform="cuda")
    # Triton, not the Mosaic GPU default (which rejects the kernel's small copies).
    assert hlo.count(TRITON) == 1 and "jds_paged_attention" in hlo


def test_paged_attention_pads_a_non_power_of_two_kv_group():
    """12 heads over 4 kv heads: groups of 3 query heads, padded to 4 inside the kernel."""
    from jds.inference.kv_cache import paged_attention_reference

    rng = np.random.default_rng(0)
    q = rng.standard_normal((6, 12, 16)).astype(np.float32)
    kp, vp = (rng.standard_normal((9, 4, 4, 16)).astype(np.float32) for _ in range(2))
    tables = rng.integers(0, 9, (6, 3)).astype(np.int32)
    pos = np.array([0, 3, 4, 7, 11, 5], np.int32)
    np.testing.assert_allclose(
        np.asarray(paged.paged_attention(q, kp, vp, tables, pos, interpret=True)),
        np.asarray(paged_attention_reference(q, kp, vp, tables, pos)), atol=1e-5)
    with pytest.raises(ValueError, match="kv_block_size"):
        paged.paged_attention(q, np.zeros((9, 6, 4, 16)), np.zeros((9, 6, 4, 16)), tables, pos)


@pytest.mark.parametrize("heads,kv_heads,head_dim,block,dtype", [
    (32, 8, 128, 16, jnp.bfloat16), (12, 4, 64, 16, jnp.bfloat16), (4, 4, 128, 32, jnp.float32)])
def test_tpu_paged_attention_lowers_for_tpu(heads, kv_heads, head_dim, block, dtype):
    from jds.kernels.attention.paged_tpu import paged_attention_tpu

    pages = S((4, 33, block, kv_heads, head_dim), dtype)  # the engine's stacked cache
    hlo = lowered(lambda q, k, v, t, p, layer: paged_attention_tpu(q, k, v, t, p, layer=layer),
                  S((16, heads, head_dim), dtype), pages, pages, S((16, 8), jnp.int32),
                  S((16,), jnp.int32), S((), jnp.int32), platform="tpu")
    assert hlo.count("tpu_custom_call") == 1 and "jds_paged_attention_tpu" in hlo


def test_splash_attention_lowers_for_tpu():
    q, kv = S((2, 512, 8, 128), jnp.bfloat16), S((2, 512, 2, 128), jnp.bfloat16)

    def loss(q, k, v):
        return pallas_tpu.flash_attention(q, k, v, causal=True).astype(jnp.float32).sum()

    hlo = lowered(jax.grad(loss, argnums=(0, 1, 2)), q, kv, kv, platform="tpu")
    assert hlo.count("tpu_custom_call") >= 2  # forward, and the backward kernel(s)


@pytest.mark.parametrize("impl,platform,marker", [("pallas", "cuda", TRITON),
                                                  ("pallas_tpu", "tpu", "tpu_custom_call")])
def test_train_step_with_pallas_attention_lowers_under_zero3_and_tensor(impl, platform, marker):
    """The model's attention goes through the dispatcher's per-shard map into the kernels."""
    import jds

    model = jds.models.build("llama-tiny", hidden_size=128, intermediate_size=64,
                             num_attention_heads=2, num_key_value_heads=2, num_hidden_layers=2,
                             vocab_size=64, attention_impl=impl)
    engine = jds.initialize(model, {"train_batch_size": 8, "mesh": {"tensor": 2},
                                    "zero_optimization": {"stage": 3}})
    hlo = engine.lower_train_step(128, platform=platform).as_text()
    # One scanned layer body: the forward kernel and the backward kernels, each per shard.
    assert hlo.count(marker) == 3
    assert "sdy.manual_computation" in hlo
    if impl == "pallas":
        for kernel in ("fwd", "dkdv", "dq"):
            assert f'name = "jds_flash_attention_{kernel}"' in hlo


def test_inference_refuses_the_gpu_and_tpu_paged_kernels_elsewhere():
    import jds
    from jds.config import ConfigError

    model = jds.models.build("llama-tiny", vocab_size=64, max_position_embeddings=32)
    with pytest.raises(ConfigError, match="needs a GPU.*attention='reference'"):
        jds.init_inference(model, {"attention": "pallas", "max_tokens": 32})
    with pytest.raises(ConfigError, match="needs a TPU.*attention='reference'"):
        jds.init_inference(model, {"attention": "pallas_tpu", "max_tokens": 32})


@pytest.mark.parametrize("platform,marker", [("cuda", TRITON), ("tpu", "tpu_custom_call")])
def test_int8_inference_under_tensor_parallelism_multiplies_each_shard(platform, marker):
    """Lowered for a GPU or TPU from this host, the int8 serving step runs the W8A16 kernel on
    each device's weight shard: no int8 weight is gathered whole before the kernel."""
    import re

    import jds

    model = jds.models.build("llama-tiny", vocab_size=64, max_position_embeddings=64)
    engine = jds.init_inference(model, {"dtype": "int8", "tensor_parallel": {"tp_size": 2},
                                        "max_tokens": 64, "max_seqs": 2})
    hlo = engine.lower_step(1, platform=platform).as_text()
    assert marker in hlo
    cfg = model.config
    D, F = cfg.hidden_size, cfg.intermediate_size
    # The kernels' weight operands (identical calls share one function in the text).
    weights = {(int(a), int(b)) for a, b in re.findall(
        r"func\.func private @_w8a16_call\w*\(%arg0: tensor<\d+x\d+xbf16>, "
        r"%arg1: tensor<(\d+)x(\d+)xi8>", hlo)}
    assert {(D, F // 2), (F // 2, D)} <= weights  # w_gate/w_up column-split, w_down row-split
    assert not {(D, F), (F, D)} & weights
    # Row-parallel o and down projections: one all-reduce each in the layer body.
    assert hlo.count('"stablehlo.all_reduce"') == 2
    # Compiled here (XLA reference inside the same per-shard map): no int8 weight gathered.
    compiled = engine.lower_step(1).compile().as_text()
    assert not re.search(r"s8\[[^\]]*\][^\n]*all-gather", compiled)
