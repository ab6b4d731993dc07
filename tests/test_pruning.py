"""DeepSpeed Compression's pruning in jds: sparse, row, head and channel pruning.

The fixtures come from DeepSpeed 0.16.0's own compression code
(scripts/make_compression_fixtures.py, ``pruning``): an MLP and a CNN pruned as its engine
runs them (masks and scores after ``init_compression``, 12 AdamW steps, ``redundancy_clean``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jds
from jds.compression.pruning import STATE
from jds.config import ConfigError

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "ds_compression.json").read_text())
PRUNING = FIXTURE["pruning"]
ACTIVATION = FIXTURE["activation"]


def _np(x):
    return np.asarray(x, np.float32)


class Seq(nnx.Module):
    """DeepSpeed's ``torch.nn.Sequential`` as a user's NNX model: ``layers.0`` and
    ``layers.2`` are its modules ``0`` and ``2``."""

    def __init__(self, kind: str, rngs: nnx.Rngs):
        self.kind = kind
        if kind == "mlp":
            self.layers = nnx.List([nnx.Linear(12, 16, rngs=rngs), jax.nn.relu,
                                    nnx.Linear(16, 4, rngs=rngs)])
        else:
            self.layers = nnx.List([
                nnx.Conv(3, 8, (3, 3), padding="VALID", rngs=rngs), jax.nn.relu,
                nnx.Conv(8, 4, (3, 3), padding="VALID", rngs=rngs)])

    def __call__(self, x):
        if self.kind == "cnn":
            x = x.transpose(0, 2, 3, 1)  # the fixture's NCHW batches
        for f in self.layers:
            x = f(x)
        return x if self.kind == "mlp" else x.mean(axis=(1, 2))


def _mse(model, batch):
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


def _to_jds(name: str, v: np.ndarray) -> np.ndarray:
    """A DeepSpeed weight or score tensor in jds's layout."""
    if v.ndim == 4 and name.endswith(("weight", "sparse_mask_scores", "sparse_pruning_mask")):
        return v.transpose(2, 3, 1, 0)  # [out, in, kh, kw] -> [kh, kw, in, out]
    if name.endswith(("row_mask_scores", "head_pruning_scores", "channel_mask_scores",
                      "row_pruning_mask", "channel_pruning_mask")):
        return v.reshape(-1)
    return v.T if v.ndim == 2 else v


def _patterns(section: dict) -> dict:
    """DeepSpeed's module names ``0`` / ``^0$`` as jds's paths ``layers.0``."""
    text = json.dumps(section)
    text = re.sub(r'"\^?(\d)\$?"', r'"layers.\1$"', text)
    return json.loads(text)


def _engine_for(fx: dict):
    model = Seq(fx["model"], nnx.Rngs(0))
    for i in (0, 2):
        m = model.layers[i]
        m.kernel.set_value(jnp.asarray(_to_jds("weight", _np(fx["init"][f"{i}.weight"]))))
        m.bias.set_value(jnp.asarray(_np(fx["init"][f"{i}.bias"])))
    config = {"train_batch_size": len(fx["data"][0][0]), "gradient_clipping": 0.0,
              "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "betas": [0.9, 0.999],
                                                        "eps": 1e-8, "weight_decay": 0.01}},
              "compression_training": _patterns(fx["compression_training"])}
    jds.compression.init_compression(model, config)  # masks from these weights, scores
    state = getattr(model, STATE, None)
    for name, v in fx["compressed"].items():
        i, what = name.split(".", 1)
        kind = {"sparse_mask_scores": "sparse", "row_mask_scores": "row",
                "head_pruning_scores": "head", "channel_mask_scores": "channel",
                "sparse_pruning_mask": "sparse", "row_pruning_mask": "row",
                "channel_pruning_mask": "channel"}.get(what)
        if kind is None:
            continue
        var = getattr(state, f"{kind}__layers__{i}__kernel")
        ours = np.asarray(var.get_value())
        theirs = _to_jds(what, _np(v))
        if what.endswith("mask"):  # l1: computed from the same weights as DeepSpeed
            np.testing.assert_array_equal(ours.astype(np.float32), theirs, err_msg=name)
        else:  # topk: DeepSpeed's torch-initialised scores, so the runs can be compared
            assert ours.shape == theirs.shape
            var.set_value(jnp.asarray(theirs))
    return model, config


_SLOW = {"row_l1_in_place", "channel_topk_sparse_l1", "dynamic_asym_8_offset", "static_sym_4"}


def _cases(names):  # the others keep a sibling with the same technique in the default run
    return [pytest.param(n, marks=pytest.mark.slow) if n in _SLOW else n for n in sorted(names)]


@pytest.mark.parametrize("name", _cases(PRUNING))
def test_pruning_a_users_model_matches_deepspeed(name):
    """A user's NNX model pruned through ``jds.initialize`` gives DeepSpeed's losses step by
    step (masks switched on at each technique's schedule_offset; topk scores trained by the
    straight-through estimator), and ``redundancy_clean`` gives DeepSpeed's smaller model."""
    fx = PRUNING[name]
    model, config = _engine_for(fx)
    engine = jds.initialize(model, config, loss_fn=_mse, devices=jax.devices()[:1])
    losses = [engine.train_batch({"x": _np(x), "y": _np(y)})["loss"] for x, y in fx["data"]]
    np.testing.assert_allclose(losses, fx["losses"], rtol=2e-5, atol=2e-6)

    trained = engine.model
    clean = jds.compression.redundancy_clean(trained, config)
    assert not hasattr(clean, STATE) and hasattr(trained, STATE)
    for i in (0, 2):
        w = _to_jds("weight", _np(fx["clean"][f"{i}.weight"]))
        np.testing.assert_allclose(np.asarray(clean.layers[i].kernel.get_value()), w,
                                   rtol=1e-4, atol=2e-5, err_msg=f"{name} layer {i}")
        np.testing.assert_allclose(np.asarray(clean.layers[i].bias.get_value()),
                                   _np(fx["clean"][f"{i}.bias"]), rtol=1e-4, atol=2e-5)
    np.testing.assert_allclose(np.asarray(clean(_np(fx["data"][0][0]))),
                               _np(fx["clean_output"]), rtol=1e-4, atol=2e-5)
    n_params = sum(x.size for x in jax.tree.leaves(nnx.state(clean, nnx.Param)))
    n_ds = sum(_np(v).size for v in fx["clean"].values())
    assert n_params == n_ds


@pytest.mark.parametrize("name", _cases(ACTIVATION))
def test_activation_quantization_of_a_users_model_matches_deepspeed(name):
    """Inputs of a user's Linear / Conv modules fake-quantized as DeepSpeed's compressed
    layers do (per token / per sample dynamic ranges, or QuantAct's running static range),
    alone and beside pruning or weight quantization: DeepSpeed's losses, and the static
    range it ends with."""
    fx = ACTIVATION[name]
    model, config = _engine_for(fx)
    engine = jds.initialize(model, config, loss_fn=_mse, devices=jax.devices()[:1])
    losses = [engine.train_batch({"x": _np(x), "y": _np(y)})["loss"] for x, y in fx["data"]]
    # A running static range can differ from DeepSpeed's in its last bit (XLA contracts
    # the momentum update into a fused multiply-add), which may move one input across a
    # rounding boundary: 1e-4 on the loss then, exact otherwise.
    static = fx["compression_training"]["activation_quantization"]["shared_parameters"][
        "range_calibration"] == "static"
    np.testing.assert_allclose(losses, fx["losses"], rtol=2e-4 if static else 2e-5, atol=2e-6)
    trained = engine.model
    for key, value in fx["trained"].items():
        if key.endswith("x_min_max"):
            i = int(key.split(".")[0])
            np.testing.assert_allclose(np.asarray(trained.layers[i].act_range.get_value()),
                                       _np(value), rtol=1e-5, atol=1e-6)
    clean = jds.compression.redundancy_clean(trained, config)  # still quantizes its inputs
    np.testing.assert_allclose(np.asarray(clean(_np(fx["data"][0][0]))),
                               _np(fx["clean_output"]), rtol=1e-4, atol=2e-3 if static else 2e-5)


def _llama(**kw):
    from jds.models.llama import Llama, LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                      max_position_embeddings=64, **kw)
    return Llama(cfg, rngs=nnx.Rngs(0))


def _prune_cfg(**sections):
    return {"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 3e-3}},
            "compression_training": sections}


_ROWS = {"row_pruning": {
    "shared_parameters": {"enabled": True, "method": "topk", "schedule_offset": 1},
    "different_groups": {"rp1": {"params": {"dense_ratio": 0.5}, "modules": ["mlp.up_proj"],
                                 "related_modules": [["mlp.down_proj"]]}}}}
_HEADS = {"head_pruning": {
    "shared_parameters": {"enabled": True, "method": "topk", "num_heads": 4,
                          "schedule_offset": 0},
    "different_groups": {"hp1": {"params": {"dense_ratio": 0.5},
                                 "modules": ["self_attn.o_proj"],
                                 "related_modules": [["q_proj", "k_proj", "v_proj"]]}}}}
_SPARSE = {"sparse_pruning": {
    "shared_parameters": {"enabled": True, "method": "l1", "schedule_offset": 0},
    "different_groups": {"sp1": {"params": {"dense_ratio": 0.25}, "modules": ["gate_proj"]}}}}


_ACT = {"activation_quantization": {
    # symmetric, and not on o_proj: a token's range must not change when the pruned
    # channels are removed (an asymmetric range counts the zeros; o_proj's input holds the
    # pruned heads' outputs until they are removed)
    "shared_parameters": {"enabled": True, "quantization_type": "symmetric",
                          "schedule_offset": 1},
    "different_groups": {"aq1": {"params": {"bits": 8},
                                 "modules": ["[qkv]_proj", "mlp"]}}}}


def _batch(n=8, t=16, seed=0):
    return {"input_ids": np.random.default_rng(seed).integers(0, 64, (n, t)).astype(np.int32)}


def test_llama_pruned_under_zero3_equals_one_device_and_cleans_to_a_smaller_model():
    """Row (MLP, topk), head (topk) and sparse (l1) pruning with 8-bit activations on jds's
    Llama: ZeRO-3 on 8 devices gives the 1-device losses; the pruned model evaluates like the
    masked one, and ``redundancy_clean`` removes half the MLP channels and heads (config and
    parameter count shrink) with the same logits."""
    config = _prune_cfg(**_ROWS, **_HEADS, **_SPARSE, **_ACT)

    def run(layout, devices):
        engine = jds.initialize(_llama(), {**config, **layout}, devices=devices)
        losses = [engine.train_batch(_batch(seed=i))["loss"] for i in range(2)]
        return engine, losses

    one, l1 = run({}, jax.devices()[:1])
    eight, l8 = run({"zero_optimization": {"stage": 3}, "mesh": {"fsdp": 8}}, jax.devices())
    np.testing.assert_allclose(l8, l1, rtol=2e-5)
    assert len(set(np.round(l1, 6))) == 2

    trained = one.model
    clean = jds.compression.redundancy_clean(trained, config)
    hash(nnx.graphdef(clean))  # nnx.jit (jds.models.generate) hashes the graph
    cfg = clean.config
    assert (cfg.intermediate_size, cfg.num_attention_heads, cfg.num_key_value_heads,
            cfg.head_dim) == (24, 2, 2, 8)
    assert clean.layers.w_gate.shape == (2, 32, 24) and clean.layers.wo.shape == (2, 2, 8, 32)
    count = lambda m: sum(x.size for x in jax.tree.leaves(nnx.state(m, nnx.Param)))  # noqa: E731
    assert count(clean) < count(trained) - 2 * (3 * 32 * 24 + 4 * 32 * 16)
    # the same config without related_modules zeroes the pruned weights in place instead
    in_place = json.loads(json.dumps(config))
    for sec in ("row_pruning", "head_pruning"):
        for g in in_place["compression_training"][sec]["different_groups"].values():
            g.pop("related_modules")
    zeroed = jds.compression.redundancy_clean(trained, in_place)
    assert zeroed.layers.w_gate.shape == trained.layers.w_gate.shape
    # the engine's forward (masks applied), the zeroed and the smaller model agree
    ids = _batch(2, 16, seed=9)["input_ids"]
    masked = np.asarray(one.predict(ids))
    np.testing.assert_allclose(np.asarray(zeroed(ids)), masked, rtol=2e-4, atol=2e-5)
    np.testing.assert_allclose(np.asarray(clean(ids)), masked, rtol=2e-4, atol=2e-5)
    assert not np.allclose(np.asarray(trained(ids)), masked, atol=1e-3)


def test_pruning_config_errors_name_the_key():
    def refused(sections, match, model=None):
        with pytest.raises(ConfigError, match=match):
            jds.initialize(model or _llama(), _prune_cfg(**sections),
                           devices=jax.devices()[:1])

    refused({"row_pruning": {"shared_parameters": {"enabled": True},
                             "different_groups": {"g": {"params": {"dense_ratio": 0},
                                                        "modules": ["up_proj"]}}}},
            r"dense_ratio 0(\.0)? is outside \(0, 1\]")
    refused({"row_pruning": {"shared_parameters": {"enabled": True},
                             "different_groups": {"g": {"params": {"dense_ratio": 0.5},
                                                        "modules": ["nothing_here"]}}}},
            r"row_pruning.different_groups.g.modules: 'nothing_here' matches no linear")
    refused({"channel_pruning": {"shared_parameters": {"enabled": True},
                                 "different_groups": {"g": {"params": {"dense_ratio": 0.5},
                                                            "modules": ["up_proj"]}}}},
            "matches no conv module")
    refused({"head_pruning": {"shared_parameters": {"enabled": True, "num_heads": 3},
                              "different_groups": {"g": {"params": {"dense_ratio": 0.5},
                                                         "modules": ["o_proj"]}}}},
            "num_heads=3 does not divide the 32 input features")
    refused({"head_pruning": {"shared_parameters": {"enabled": True, "method": "l1",
                                                    "num_heads": 4}}},
            "learns a score per head")
    refused({"sparse_pruning": {"shared_parameters": {"enabled": True,
                                                      "method": "snip_momentum"}}},
            "Intel Neural Compressor")
    refused({"row_pruning": {"shared_parameters": {"enabled": True},
                             "different_groups": {"g": {"params": {"dense_ratio": 0.5},
                                                        "modules": ["layers.0.w_up"],
                                                        "related_modules": [["down_proj"]]}}}},
            "prunes only some layers")
    refused({"activation_quantization": {
        "shared_parameters": {"enabled": True},
        "different_groups": {"g": {"params": {"bits": 6}, "modules": ["mlp"]}}}},
            "bits 6: DeepSpeed quantizes activations to 4 or 8")
    # a removal the model cannot express: heads of a grouped-query Llama
    from jds.models.llama import Llama, LlamaConfig

    gqa = Llama(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                            max_position_embeddings=64), rngs=nnx.Rngs(0))
    config = _prune_cfg(**_HEADS)
    engine = jds.initialize(gqa, config, devices=jax.devices()[:1])
    with pytest.raises(ConfigError, match="needs multi-head attention"):
        jds.compression.redundancy_clean(engine.model, config)


def test_a_pruned_run_serves_as_its_cleaned_model(tmp_path):
    """``init_inference(run_folder)`` (what ``jds serve RUN`` calls) loads a pruned run's
    masks and scores from its checkpoint and serves ``redundancy_clean``'s smaller model."""
    from jds.inference.loading import load_model

    config = _prune_cfg(**_ROWS)
    engine = jds.initialize(_llama(), config, devices=jax.devices()[:1])
    for i in range(2):
        engine.train_batch(_batch(seed=i))
    engine.save_checkpoint(tmp_path / "checkpoints")
    clean = jds.compression.redundancy_clean(engine.model, config)
    engine.close()

    served = load_model(str(tmp_path))
    assert served.config.intermediate_size == 24 and not hasattr(served, STATE)
    for a, b in zip(jax.tree.leaves(nnx.state(served, nnx.Param)),
                    jax.tree.leaves(nnx.state(clean, nnx.Param)), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)
    engine = jds.init_inference(str(tmp_path), {"dtype": "float32", "max_tokens": 32,
                                                "max_seqs": 1})
    assert len(engine.generate([[1, 2, 3]], 4)[0]) == 4


def test_deepspeeds_gpt2_compression_config_runs_unchanged_and_matches():
    """The shape of DeepSpeedExamples' GPT-2 compression config (weights and activations at
    8 bits, MLP rows pruned with related_modules), unchanged, on the same Hugging Face GPT-2
    as jds's GPT-2: DeepSpeed 0.16's losses on its converted model, and after
    ``redundancy_clean`` the same smaller MLP and logits (fixture:
    scripts/make_compression_fixtures.py)."""
    folder = Path(__file__).parent / "fixtures" / "ds_gpt2_compression"
    run = json.loads((folder / "ds_run.json").read_text())
    model = jds.models.from_pretrained(folder)
    config = {"train_batch_size": 4, "gradient_clipping": 0.0,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.999],
                                                        "eps": 1e-8, "weight_decay": 0.01}},
              "compression_training": run["compression_training"]}
    engine = jds.initialize(model, config, devices=jax.devices()[:1])
    losses = [engine.train_batch({"input_ids": np.asarray(ids, np.int32)})["loss"]
              for ids in run["data"]]
    np.testing.assert_allclose(losses, run["losses"], rtol=2e-5)
    clean = jds.compression.redundancy_clean(engine.model, config)
    f, d = run["clean_shapes"]["transformer.h.0.mlp.c_fc.weight"]
    assert clean.config.n_inner == f and clean.layers.w_fc.shape == (2, d, f)
    # 8-bit inputs turn last-bit differences into whole codes: GPT-2's tanh GELU (jax vs
    # torch) feeds mlp.c_proj, and a code that flips moves logits by ~1e-4 per step
    np.testing.assert_allclose(np.asarray(clean(np.asarray(run["data"][0], np.int32))),
                               _np(run["clean_logits"]), rtol=1e-3, atol=2e-3)
    np.testing.assert_allclose(np.asarray(clean(np.asarray(run["data"][0], np.int32))),
                               np.asarray(engine.predict(np.asarray(run["data"][0], np.int32))),
                               rtol=1e-5, atol=1e-5)  # the engine's own forward: exactly


def test_static_activation_ranges_in_a_stacked_decoder_match_deepspeed():
    """Static input ranges (QuantAct's running ``[min, max]``, one per module per layer) in
    jds's stacked GPT-2: DeepSpeed 0.16's losses and its final range of every layer's
    ``c_attn`` / ``c_proj`` / ``c_fc`` / ``mlp.c_proj`` input (fixture:
    scripts/make_compression_fixtures.py); checkpointed with the run and read by evaluation."""
    folder = Path(__file__).parent / "fixtures" / "ds_gpt2_compression"
    run = json.loads((folder / "ds_run_static.json").read_text())
    config = {"train_batch_size": 4, "gradient_clipping": 0.0,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "betas": [0.9, 0.999],
                                                        "eps": 1e-8, "weight_decay": 0.01}},
              "compression_training": run["compression_training"]}
    engine = jds.initialize(jds.models.from_pretrained(folder), config,
                            devices=jax.devices()[:1])
    losses = [engine.train_batch({"input_ids": np.asarray(ids, np.int32)})["loss"]
              for ids in run["data"]]
    np.testing.assert_allclose(losses, run["losses"], rtol=2e-5)
    layers = engine.model.layers
    names = {"attn.c_attn": "wq", "attn.c_proj": "wo", "mlp.c_fc": "w_fc",
             "mlp.c_proj": "w_proj"}
    for key, want in run["ranges"].items():
        i, module = re.match(r"transformer\.h\.(\d+)\.(.+)\.activation_quantizer", key).groups()
        got = np.asarray(getattr(layers, names[module] + "__act_range").get_value())[int(i)]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=key)
    # evaluation reads the ranges and leaves them; the engine's forward is the model's
    before = np.asarray(layers.wq__act_range.get_value())
    ids = np.asarray(run["data"][0], np.int32)
    engine.eval_batch({"input_ids": ids})
    np.testing.assert_array_equal(np.asarray(engine.model.layers.wq__act_range.get_value()),
                                  before)
    clean = jds.compression.redundancy_clean(engine.model, config)  # keeps the ranges
    np.testing.assert_allclose(np.asarray(engine.predict(ids)), np.asarray(clean(ids)),
                               rtol=1e-5, atol=1e-5)


def test_static_ranges_in_llama_under_zero3_with_accumulation_equal_one_device(tmp_path):
    """A Llama's static ranges (some layers only) under ZeRO-3 on 8 devices with two
    micro-batches (each moves the ranges, as DeepSpeed's forward does) = one device; they
    are saved and restored with the run."""
    section = {"activation_quantization": {
        "shared_parameters": {"enabled": True, "range_calibration": "static",
                              "schedule_offset": 1},
        "different_groups": {"a": {"params": {"bits": 8},
                                   "modules": ["self_attn", "layers.1.mlp.down_proj"]}}}}

    def run(n, stage, steps=3):
        config = {**_prune_cfg(**section), "train_batch_size": 16,
                  "gradient_accumulation_steps": 2, "zero_optimization": {"stage": stage}}
        engine = jds.initialize(_llama(), config, devices=jax.devices()[:n])
        losses = [engine.train_batch(_batch(n=16, seed=i))["loss"] for i in range(steps)]
        return engine, losses, {k: np.asarray(v.get_value()) for k, v in
                                vars(engine.model.layers).items() if k.endswith("__act_range")}

    one, l1, r1 = run(1, 0)
    eight, l8, r8 = run(8, 3)
    np.testing.assert_allclose(l8, l1, rtol=2e-5)
    assert sorted(r1) == ["w_down__act_range", "wk__act_range", "wo__act_range",
                          "wq__act_range", "wv__act_range"]
    assert not r1["w_down__act_range"][0].any() and r1["w_down__act_range"][1].all()
    for k in r1:  # 8-bit inputs turn last-bit differences into whole codes downstream
        np.testing.assert_allclose(r8[k], r1[k], rtol=1e-3, atol=1e-5, err_msg=k)
    eight.save_checkpoint(tmp_path / "checkpoints")
    fresh, _, _ = run(8, 3, steps=0)
    fresh.load_checkpoint(tmp_path / "checkpoints")
    np.testing.assert_array_equal(np.asarray(fresh.model.layers.wo__act_range.get_value()),
                                  r8["wo__act_range"])

    # served from the run folder as trained: inputs quantized with the trained ranges
    clean = jds.compression.redundancy_clean(eight.model, _prune_cfg(**section))
    plain = _llama()
    nnx.update(plain, nnx.state(eight.model, nnx.Param))
    served = jds.init_inference(str(tmp_path), {"dtype": "float32", "max_tokens": 32,
                                                "max_seqs": 1})
    rid = served.submit([1, 2, 3, 4, 5], 6, logprobs=0)
    while served._requests[rid].finish_reason is None:
        served.step()
    req = served._requests[rid]
    seq = [1, 2, 3, 4, 5, *req.output]
    got = np.array([lp for lp, _ in req.token_logprobs])

    def logprobs(m):
        lp = jax.nn.log_softmax(m(np.asarray([seq], np.int32))[0, 4:-1].astype(jnp.float32))
        return np.asarray(lp)[np.arange(6), seq[5:]]

    np.testing.assert_allclose(got, logprobs(clean), rtol=1e-5, atol=1e-5)
    assert np.abs(got - logprobs(plain)).max() > 1e-4  # full-precision inputs differ


def test_post_training_quantization_calibrates_static_ranges_and_serves_int8():
    """PTQ: per-channel 8-bit weights and a static 8-bit input range calibrated on a few
    batches (QuantAct's running range) for a user's MLP, the model unchanged; a decoder's
    per-group 4-bit weights are the codes and scales ``init_inference`` serves in int8."""
    from jds.compression import quantizers

    model = Seq("mlp", nnx.Rngs(0))
    config = {"compression_training": {
        "weight_quantization": {"shared_parameters": {"enabled": True, "quantize_groups": 4},
                                "different_groups": {"w": {"params": {"start_bits": 8,
                                                                      "target_bits": 8},
                                                           "modules": ["layers.2"]}}},
        "activation_quantization": {
            "shared_parameters": {"enabled": True, "range_calibration": "static",
                                  "quantization_type": "asymmetric"},
            "different_groups": {"a": {"params": {"bits": 8}, "modules": ["layers.0"]}}}}}
    rng = np.random.default_rng(0)
    batches = [rng.normal(size=(8, 12)).astype(np.float32) * (i + 1) for i in range(3)]
    with pytest.raises(ConfigError, match="needs calibration batches"):
        jds.compression.post_training_quantize(model, config)
    ptq = jds.compression.post_training_quantize(model, config, batches)
    lo_hi = np.array([batches[0].min(), batches[0].max()])
    for b in batches[1:]:
        lo_hi = lo_hi * 0.95 + np.array([b.min(), b.max()]) * 0.05
    np.testing.assert_allclose(np.asarray(ptq.layers[0].act_range.get_value()), lo_hi,
                               rtol=1e-6)
    assert not hasattr(model.layers[0], "act_range")  # the model is unchanged
    w = np.asarray(ptq.layers[2].kernel.get_value())  # [16, 4]: one group per channel
    assert all(len(np.unique(w[:, j])) <= 256 for j in range(4))
    x = batches[0]
    xq = quantizers.asymmetric(x, 8, 1, min_value=jnp.float32(lo_hi[0]),
                               max_value=jnp.float32(lo_hi[1]))
    h = jax.nn.relu(np.asarray(xq) @ np.asarray(model.layers[0].kernel.get_value())
                    + np.asarray(model.layers[0].bias.get_value()))
    want = h @ w + np.asarray(model.layers[2].bias.get_value())
    np.testing.assert_allclose(np.asarray(ptq(x)), want, rtol=1e-5, atol=1e-5)

    llama = _llama()
    section = {"weight_quantization": {
        "shared_parameters": {"enabled": True, "quantize_groups": 4},
        "different_groups": {"w": {"params": {"start_bits": 4, "target_bits": 4},
                                   "modules": ["self_attn", "mlp"]}}}}
    ptq = jds.compression.post_training_quantize(llama, {"compression_training": section})
    served = jds.init_inference(llama, {"dtype": "int8", "max_tokens": 32, "max_seqs": 1,
                                        "compression_training": section})
    qw = served.params["layers"]["w_up"]
    deq = np.asarray(qw.q, np.float32) * np.asarray(qw.scale)[:, None]
    np.testing.assert_array_equal(deq, np.asarray(ptq.layers.w_up.get_value()))

    # a decoder's static input ranges, one per layer, calibrated the same way
    from jds.models.llama import rms_norm

    section = {"activation_quantization": {
        "shared_parameters": {"enabled": True, "range_calibration": "static"},
        "different_groups": {"a": {"params": {"bits": 8}, "modules": ["q_proj"]}}}}
    ids = [_batch(4, 8, seed=i)["input_ids"] for i in range(3)]
    ptq = jds.compression.post_training_quantize(llama, {"compression_training": section}, ids)
    lo_hi = None
    for b in ids:  # layer 0's q_proj input: the normed embeddings
        x = np.asarray(rms_norm(llama.embed_tokens.get_value()[b],
                                llama.layers.attn_norm.get_value()[0], llama.config.rms_norm_eps))
        cur = np.array([x.min(), x.max()])
        lo_hi = cur if lo_hi is None else lo_hi * 0.95 + cur * 0.05
    ranges = np.asarray(ptq.layers.wq__act_range.get_value())
    np.testing.assert_allclose(ranges[0], lo_hi, rtol=1e-5)
    assert ranges[1].all() and not hasattr(llama.layers, "wq__act_range")


def test_gpt2_c_attn_is_quantized_as_one_matrix_and_served_with_its_codes():
    """GPT-2's q, k and v are one Hugging Face matrix (``c_attn``): a group taking them all
    quantizes them side by side, as DeepSpeed does (one scale here), and int8 serving stores
    exactly those codes and scales."""
    model = jds.models.from_pretrained(Path(__file__).parent / "fixtures" / "ds_gpt2_compression")
    section = {"weight_quantization": {
        "shared_parameters": {"enabled": True, "quantize_weight_in_forward": True},
        "different_groups": {"w": {"params": {"start_bits": 8, "target_bits": 8},
                                   "modules": ["attn.c_attn"]}}}}
    clean = jds.compression.redundancy_clean(model, {"compression_training": section})
    q, k, v = (np.asarray(getattr(clean.layers, n).get_value()) for n in ("wq", "wk", "wv"))
    whole = np.concatenate([x.reshape(2, 32, -1) for x in (q, k, v)], axis=-1)
    assert len(np.unique(whole[0])) <= 256  # one 8-bit grid over the fused matrix
    assert len(np.unique(np.concatenate([q[0].ravel(), k[0].ravel()]))) <= 256
    served = jds.init_inference(model, {"dtype": "int8", "max_tokens": 32, "max_seqs": 1,
                                        "compression_training": section})
    for name, want in (("wq", q), ("wk", k), ("wv", v)):
        qw = served.params["layers"][name]
        deq = np.asarray(qw.q, np.float32) * np.asarray(qw.scale)[:, None]
        np.testing.assert_array_equal(deq, want, err_msg=name)


def test_an_activation_quantized_model_serves_int8_with_integer_matmuls():
    """Served in int8, a model whose layer inputs are quantized (8-bit symmetric, dynamic per
    token, ``"*"``: every layer matrix, not the LM head, which is no Linear module here; the
    section given with a plain model) multiplies the inputs' int8 codes by the
    int8 weights in integers (W8A8: int32-valued dots of int8 operands in the compiled step)
    and agrees with the fake-quantized weight-only path (``w8a8: false``) and with fp32
    serving; static ranges on a plain model are refused (training sets them)."""
    llama = _llama()
    section = {"activation_quantization": {
        "shared_parameters": {"enabled": True, "schedule_offset": 0},
        "different_groups": {"a": {"params": {"bits": 8}, "modules": ["*"]}}}}
    cfg = {"dtype": "int8", "max_tokens": 32, "max_seqs": 1, "compression_training": section}

    def top(engine):
        rid = engine.submit([1, 2, 3, 4, 5, 6], 1, logprobs=5)
        while engine._requests[rid].finish_reason is None:
            engine.step()
        return np.sort([lp for _, lp in engine._requests[rid].token_logprobs[0][1]])

    w8a8 = jds.init_inference(llama, cfg)
    hlo = w8a8.lower_step(8).compile().as_text()
    assert re.search(r"= s32\[[\d,]+\]\{[\d,]+\} dot\(", hlo)
    assert re.search(r"s8\[[\d,]+\]\) -> s32\[", hlo)
    got = top(w8a8)
    np.testing.assert_allclose(got, top(jds.init_inference(llama, {**cfg, "w8a8": False})),
                               atol=5e-3)
    np.testing.assert_allclose(got, top(jds.init_inference(llama, {**cfg, "dtype": "float32"})),
                               atol=5e-3)
    static = {"activation_quantization": {
        **section["activation_quantization"],
        "shared_parameters": {"enabled": True, "range_calibration": "static"}}}
    with pytest.raises(ConfigError, match="static ranges, which training"):
        jds.init_inference(llama, {**cfg, "compression_training": static})
