"""Layer rematerialisation: what each mode keeps for the backward pass, read from the compiled
gradient's ``memory_analysis()`` and from the residuals of the forward layer scan; the
``"offload"`` mode's host placement and its refusal where there is no host memory space.

That every mode gives the no-remat logits and gradients is tests/test_models.py's
``test_remat_variants_give_identical_logits_and_grads`` (and, for "offload" on CPU, below).
"""

from __future__ import annotations

from collections import Counter
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jds.models as M
import jds.models.layers as layers
from jds.models.layers import offload_unsupported_reason

# Long enough a sequence, and enough layers, that activations dominate the gradient's
# temporaries: the saving then shows as a ratio, not a rounding error.
LLAMA = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=128)
B, T = 2, 128


def grad_and_params(remat: str, seq_len: int = T) -> tuple:
    """``jax.grad`` of a small Llama's loss on ``[B, seq_len]`` tokens with
    ``model.remat = remat``, and the model's params."""
    model = M.build("llama-tiny", **LLAMA)
    model.remat = remat
    graphdef, state = nnx.split(model)
    ids_BT = jnp.asarray(np.random.default_rng(0).integers(0, 256, (B, seq_len)), jnp.int32)

    def loss(p):
        logits_BTV = nnx.merge(graphdef, p)(ids_BT)
        return -jnp.mean(jax.nn.log_softmax(logits_BTV)[..., 0])

    return jax.grad(loss), nnx.to_pure_dict(state)


def temp_bytes(remat: str) -> int:
    grad, params = grad_and_params(remat)
    return jax.jit(grad).lower(params).compile().memory_analysis().temp_size_in_bytes


def scan_residuals(remat: str) -> dict[str, Counter]:
    """Shapes the forward layer scan stacks for the backward pass, by memory space."""
    grad, params = grad_and_params(remat, seq_len=16)
    jaxpr = jax.make_jaxpr(grad)(params).jaxpr
    scan = next(e for e in jaxpr.eqns if e.primitive.name == "scan")  # the forward pass
    out: dict[str, Counter] = {"Device": Counter(), "Host": Counter()}
    for v in scan.outvars[scan.params["num_carry"]:]:
        out[v.aval.memory_space.name][v.aval.shape] += 1
    return out


def test_remat_cuts_the_gradients_activation_memory():
    temps = {m: temp_bytes(m) for m in ("none", "full", "dots")}
    # measured on CPU: none 12.4 MB, full 3.3 MB (0.26), dots 4.7 MB (0.38)
    assert temps["full"] < 0.5 * temps["none"], temps
    assert temps["full"] < temps["dots"] < 0.7 * temps["none"], temps


def test_offload_keeps_fulls_residuals_on_device_and_moves_dots_to_host(monkeypatch):
    monkeypatch.setattr(layers, "offload_unsupported_reason", lambda device=None: None)
    full, dots, offload = (scan_residuals(m) for m in ("full", "dots", "offload"))
    L, D = LLAMA["num_hidden_layers"], LLAMA["hidden_size"]
    assert full == {"Device": Counter({(L, B, 16, D): 1}), "Host": Counter()}  # layer inputs
    assert offload["Device"] == full["Device"]
    assert offload["Host"] == dots["Device"] - full["Device"] and offload["Host"]
    assert sum(offload["Host"].values()) >= 5  # q, k, v, attention output, gate, up


def test_offload_gradients_equal_no_remat_where_it_compiles(monkeypatch):
    # On CPU the host placement is dropped when lowering; the gradient must not change.
    monkeypatch.setattr(layers, "offload_unsupported_reason", lambda device=None: None)
    grads = {}
    for remat in ("none", "offload"):
        grad, params = grad_and_params(remat, seq_len=16)
        grads[remat] = jax.jit(grad)(params)
    assert float(jnp.abs(jax.tree.leaves(grads["none"])[0]).max()) > 0
    for g, r in zip(jax.tree.leaves(grads["offload"]), jax.tree.leaves(grads["none"]),
                    strict=True):
        np.testing.assert_allclose(g, r, atol=1e-7, rtol=1e-5)


def test_offload_is_refused_without_a_host_memory_space():
    if offload_unsupported_reason() is None:
        pytest.skip("this backend has pinned host memory; offload runs here")
    model = M.build("llama-tiny", **LLAMA, remat="offload")  # a valid mode to build with
    with pytest.raises(ValueError, match=r"remat='offload' .* needs a GPU or TPU .*CPU.*"
                                         r"Use 'full' .* or 'dots'"):
        model(jnp.zeros((1, 8), jnp.int32))


def test_offload_unsupported_reason_reads_the_devices_memory_spaces():
    def device(platform, *kinds):
        return SimpleNamespace(platform=platform, id=0, addressable_memories=lambda: [
            SimpleNamespace(kind=k) for k in kinds])

    assert "on CPU" in offload_unsupported_reason(device("cpu", "device", "pinned_host"))
    assert "no 'pinned_host' memory space (it has ['device'])" in offload_unsupported_reason(
        device("gpu", "device"))
    assert offload_unsupported_reason(device("gpu", "device", "pinned_host")) is None
    assert offload_unsupported_reason(device("tpu", "device", "pinned_host",
                                             "unpinned_host")) is None


@pytest.mark.skipif(offload_unsupported_reason() is not None,
                    reason="needs a GPU/TPU default backend (tests/conftest.py selects CPU "
                           "unless JAX_PLATFORMS is set)")
def test_offload_on_an_accelerator_frees_device_memory_and_keeps_the_gradients():
    temps = {m: temp_bytes(m) for m in ("none", "dots", "offload")}
    assert temps["offload"] < temps["dots"] < temps["none"], temps
    grads = {}
    for remat in ("none", "offload"):
        grad, params = grad_and_params(remat)
        grads[remat] = jax.jit(grad)(params)
    for g, r in zip(jax.tree.leaves(grads["offload"]), jax.tree.leaves(grads["none"]),
                    strict=True):
        np.testing.assert_allclose(g, r, atol=1e-6, rtol=1e-4)
