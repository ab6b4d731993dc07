"""The flops profiler (jds.profiling.model_profile): counts against DeepSpeed's profiler, the
analytic formula, tied weights, every attention path, BatchNorm and dropout, and the
``flops_profiler`` section during training."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jds
from jds.models import registry
from jds.profiling.flops import train_flops_per_token
from jds.profiling.model_profile import (
    OUTSIDE,
    get_model_profile,
    macs_to_string,
    number_to_string,
    params_to_string,
    profile_function,
)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "examples"))
from cifar_cnn import Net, loss_fn  # noqa: E402

DS = json.loads((ROOT / "tests" / "fixtures" / "ds_profile_cnn.json").read_text())


def forward(model, *args, **kwargs):
    return profile_function(lambda m, *a, **k: m(*a, **k), model, *args, timed=False, **kwargs)


def test_cnn_matches_deepspeeds_profiler(tmp_path):
    """The tutorial CNN on one 32x32 image: DeepSpeed's MACs and parameters exactly, FLOPs
    within 3%, per module too; the printed table names every layer with a latency."""
    out = tmp_path / "profile.txt"
    n, c, h, w = DS["input_shape"]
    flops, macs, params = get_model_profile(Net(nnx.Rngs(0)), input_shape=(n, h, w, c),
                                            as_string=False, output_file=out)
    assert macs == DS["macs"] and params == DS["params"]
    assert abs(flops - DS["flops"]) / DS["flops"] < 0.03
    strings = get_model_profile(Net(nnx.Rngs(0)), input_shape=(n, h, w, c),
                                print_profile=False)
    assert strings == (number_to_string(DS["flops"]), macs_to_string(DS["macs"]),
                       params_to_string(DS["params"])) == ("1.32 M", "651.72 KMACs", "62.01 K")

    prof = forward(Net(nnx.Rngs(0)), jnp.zeros((n, h, w, c)))
    for name in ("conv1", "conv2", "fc1", "fc2", "fc3"):
        node, ref = prof.node(name), DS["modules"][name]
        assert (node.macs, node.params) == (ref["macs"], ref["params"]), name
        assert abs(node.flops - ref["flops"]) / ref["flops"] < 0.03, name
    assert prof.xla_flops is not None and abs(prof.xla_flops - prof.flops) / prof.flops < 0.05

    text = out.read_text()
    for name, kind in [("conv1", "Conv"), ("conv2", "Conv"), ("fc1", "Linear"),
                       ("fc2", "Linear"), ("fc3", "Linear")]:
        line = next(x for x in text.splitlines() if x.strip().startswith(f"({name}): {kind}("))
        assert re.search(r"[\d.]+ [mu]?s = [\d.]+% latency", line), line
    assert "Net(62.01 K = 100.0% Params, 651.72 KMACs" in text
    assert "Top 1 modules" in text and "depth 1:" in text


@pytest.mark.parametrize("name", ["llama-tiny", "gpt2-tiny"])
def test_lm_matmuls_equal_the_analytic_formula(name):
    """Forward matmul FLOPs (2 x MACs) of jds's LMs equal the PaLM formula's forward third;
    the tree follows HF's module names and every parameter counts once."""
    model = registry.build(name, **({"num_hidden_layers": 2} if "llama" in name else
                                    {"n_layer": 2}))
    B, T = 2, 32
    prof = forward(model, jnp.zeros((B, T), jnp.int32))
    assert 2 * prof.macs == pytest.approx(train_flops_per_token(model.config, T) / 3 * B * T,
                                          rel=1e-9)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert prof.params == n_params
    layers = prof.node("layers")
    assert layers.params == sum(x.size for x in jax.tree.leaves(nnx.state(model.layers)))
    attn, mlp = ("self_attn", "mlp") if "llama" in name else ("attn", "mlp")
    assert set(layers.children) >= {attn, mlp}
    assert layers.macs == pytest.approx(layers.children[attn].macs + layers.children[mlp].macs)
    assert prof.node(f"layers.{attn}.attention").params == 0  # scores and values only


def test_tied_embedding_counts_once():
    model = registry.build("llama-tiny", num_hidden_layers=1, tie_word_embeddings=True)
    prof = forward(model, jnp.zeros((1, 16), jnp.int32))
    V, D = model.config.vocab_size, model.config.hidden_size
    assert prof.node("embed_tokens").params == prof.node("lm_head").params == V * D
    assert prof.params == sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert prof.params == sum(n.params for n in prof.root.children.values()) - V * D


@pytest.mark.parametrize("impl", ["xla", "pallas_interpret", "pallas_tpu_interpret",
                                  "segments"])
def test_attention_counted_under_every_implementation(impl):
    """QK^T and PV: 2 x B x N x T x S x H MACs, whichever path computes them (the segment-id
    call takes the jnp reference formulation)."""
    B, T, N, H = 1, 128, 2, 64
    model = registry.build("llama-tiny", num_hidden_layers=1, num_attention_heads=N,
                           num_key_value_heads=N, head_dim=H,
                           attention_impl=None if impl == "segments" else impl)
    kwargs = {"segment_ids": jnp.ones((B, T), jnp.int32)} if impl == "segments" else {}
    prof = forward(model, jnp.zeros((B, T), jnp.int32), **kwargs)
    assert prof.node("layers.self_attn.attention").macs == 2 * B * N * T * T * H


class Attn(nnx.Module):
    """A user's attention in three spellings: ``@``, einsum, ``jax.nn.dot_product_attention``."""

    def __init__(self, how: str, rngs: nnx.Rngs) -> None:
        self.how = how
        self.qkv = nnx.Linear(32, 96, rngs=rngs)

    def __call__(self, x):
        q, k, v = jnp.split(self.qkv(x), 3, axis=-1)
        q, k, v = (t.reshape(*t.shape[:2], 2, 16) for t in (q, k, v))  # B T N H
        if self.how == "sdpa":
            return jax.nn.dot_product_attention(q, k, v)
        if self.how == "einsum":
            p = jax.nn.softmax(jnp.einsum("btnh,bsnh->bnts", q, k), axis=-1)
            return jnp.einsum("bnts,bsnh->btnh", p, v)
        qt, kt, vt = (t.transpose(0, 2, 1, 3) for t in (q, k, v))
        return jax.nn.softmax(qt @ kt.swapaxes(-1, -2), axis=-1) @ vt


@pytest.mark.parametrize("how", ["matmul", "einsum", "sdpa"])
def test_users_attention_counted_in_any_spelling(how):
    B, T = 2, 8
    prof = forward(Attn(how, nnx.Rngs(0)), jnp.zeros((B, T, 32)))
    assert prof.macs == B * T * 32 * 96 + 2 * B * 2 * T * T * 16
    assert prof.node("qkv").macs == B * T * 32 * 96


class BNDrop(nnx.Module):
    def __init__(self, rngs: nnx.Rngs) -> None:
        self.fc = nnx.Linear(16, 32, rngs=rngs)
        self.bn = nnx.BatchNorm(32, rngs=rngs)
        self.drop = nnx.Dropout(0.5, rngs=rngs)
        self.blocks = nnx.List([nnx.Linear(32, 32, rngs=rngs) for _ in range(2)])

    def __call__(self, x):
        x = self.drop(nnx.relu(self.bn(self.fc(x))))
        for b in self.blocks:
            x = b(x)
        return x


def test_batchnorm_dropout_and_module_lists():
    model = BNDrop(nnx.Rngs(0))
    x = jnp.ones((4, 16))
    ev = forward(model, x)
    tr = profile_function(lambda m, a: m(a), model, x, train=True, timed=False)
    assert ev.params == tr.params == 16 * 32 + 32 + 2 * 32 + 2 * (32 * 32 + 32)
    assert ev.node("bn").params == 64 and ev.node("bn").macs == 0 and ev.node("bn").flops > 0
    assert ev.node("drop").flops == 0  # evaluation: dropout is the identity
    assert tr.node("drop").flops > 0 and tr.node("bn").flops > ev.node("bn").flops
    assert ev.node("blocks.1").macs == 4 * 32 * 32 and ev.node("blocks.1").params == 32 * 32 + 32
    assert tr.macs == ev.macs
    assert not model.drop.deterministic and not model.bn.use_running_average  # untouched


def test_ignore_modules_and_work_outside_the_model():
    model = Net(nnx.Rngs(0))
    x = jnp.zeros((2, 32, 32, 3))
    full = forward(model, x)
    ignored = forward(model, x, ignore_modules=[nnx.Linear])
    assert ignored.flops == full.flops and "fc1" not in ignored.root.children
    assert "conv1" in ignored.root.children
    lossy = profile_function(lambda m, b: loss_fn(m, b)[0], model,
                             {"image": x, "label": jnp.zeros(2, jnp.int32)}, timed=False)
    outside = lossy.node(OUTSIDE)
    assert outside.flops > 0 and outside.macs == 0
    assert lossy.flops == pytest.approx(full.flops + outside.flops)


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="input_shape"):
        get_model_profile(Net(nnx.Rngs(0)))


def test_flops_profiler_section_prints_at_profile_step(tmp_path):
    """Training a user's CNN under ZeRO-3 on 8 devices: the profile of step 1 (not 0 or 2),
    with the measured step time, achieved FLOP/s and MFU."""
    out = tmp_path / "prof" / "step.txt"
    cfg = {"train_batch_size": 16, "gradient_accumulation_steps": 2,
           "zero_optimization": {"stage": 3},
           "flops_profiler": {"enabled": True, "profile_step": 1, "output_file": str(out),
                              "module_depth": 1}}
    engine = jds.initialize(Net(nnx.Rngs(0)), cfg, loss_fn=loss_fn)
    rng = np.random.default_rng(0)
    batch = {"image": rng.normal(size=(16, 32, 32, 3)).astype(np.float32),
             "label": rng.integers(0, 10, 16).astype(np.int32)}
    engine.train_batch(batch)
    assert not out.exists()
    engine.train_batch(batch)
    text = out.read_text()
    out.unlink()
    engine.train_batch(batch)
    assert not out.exists()  # once
    assert "Profile Summary at step 1:" in text
    assert re.search(r"world size \(devices\): +8", text)
    assert re.search(r"iter latency \(the measured train step\): +[\d.]+ [mu]?s", text)
    assert re.search(r"MFU \(vs the device's peak FLOP/s\): +[\d.]+%", text)
    # 2 rows per device per micro-batch: the global micro-batch is 8 images
    assert re.search(r"fwd MACs per device \(one micro-batch\): +651.72 KMACs", text)
    assert "(conv1): Conv(" in text and "(fc3): Linear(" in text


def test_jds_profile_command(tmp_path, capsys):
    """``jds profile``: two steps of a preset on random tokens, the second one profiled, on
    the 8 simulated devices (data parallel)."""
    from jds.cli import main

    out = tmp_path / "p.txt"
    assert main(["profile", "--model", "gpt2-tiny", "--batch", "8", "--seq", "16",
                 "--module-depth", "2", "--output-file", str(out)]) == 0
    text = out.read_text()
    assert re.search(r"world size \(devices\): +8", text)
    assert "(layers): GPT2Layers(" in text and "(attn): named_scope(" in text
    assert "(attention): named_scope(" not in text  # depth 3: below --module-depth
    assert main(["profile", "--model", "no-such-model"]) == 2
    assert "no-such-model" in capsys.readouterr().err
