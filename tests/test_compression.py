"""DeepSpeed Compression in jds: weight quantization-aware training (MoQ).

The fixtures come from DeepSpeed 0.16.0's own compression code
(scripts/make_compression_fixtures.py): its quantizer functions on fixed tensors, MoQ's bit
schedule as its engine drives it, and a small MLP trained with MoQ.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jds
from jds.compression import quantizers as q
from jds.compression.weight_quantization import (
    Assignment,
    MoQSchedule,
    QuantizationPlan,
    Target,
    targets,
)
from jds.config import ConfigError

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "ds_compression.json").read_text())


def _wq(groups=None, **shared):
    return {"compression_training": {"weight_quantization": {
        "shared_parameters": {"enabled": True, **shared},
        "different_groups": groups or {"wq1": {"params": {"start_bits": 8, "target_bits": 4,
                                                          "quantization_period": 2},
                                               "modules": ["*"]}}}}}


def _run_quantizer(x: np.ndarray, case: dict) -> jax.Array:
    fn, bits, groups = case["fn"], case.get("bits"), case.get("groups")
    rng = ({"min_value": jnp.float32(case["min"]), "max_value": jnp.float32(case["max"])}
           if "min" in case else {})
    if fn == "SymQuantizer":
        return q.symmetric(x, bits, groups, **rng)
    if fn == "AsymQuantizer":
        return q.asymmetric(x, bits, groups, **rng)
    if fn == "TernaryQuantizer":
        return q.ternary(x, groups)
    if fn == "BinaryQuantizer":
        return q.binary(x, groups)
    if fn == "TopKBinarizer":
        return q.topk_mask(jnp.abs(x), case["ratio"])
    return q.quantize(x, bits, groups, case["type"])  # MoQ's quantize_highbit


def test_quantizers_match_deepspeed():
    """Symmetric / asymmetric (per group, static range), ternary, binary, MoQ's high-bit
    quantizer and the top-k mask equal DeepSpeed's on the same tensors."""
    x = np.asarray(FIXTURE["input"], np.float32)
    for case in FIXTURE["quantizers"]:
        got = _run_quantizer(x, case)
        np.testing.assert_allclose(np.asarray(got), np.asarray(case["out"], np.float32),
                                   atol=1e-6, err_msg=str({k: case.get(k) for k in
                                                           ("fn", "bits", "groups", "type")}))
    assert len(FIXTURE["quantizers"]) == 55


def test_moq_schedule_steps_when_deepspeeds_does():
    """For seven schedules (offsets, periods including 0, 12 -> 8 bits down to binary,
    fp16_mixed_quantize), the weight each forward pass sees equals DeepSpeed's, step by step
    (jds's [in, out] layout grouped by output channels = DeepSpeed's row groups)."""
    x = np.asarray(FIXTURE["input"], np.float32)
    target = Target(("w",), (("w",),), "linear", 1, False)
    for name, s in FIXTURE["schedules"].items():
        mixed = s.get("fp16_mixed_quantize", {})
        schedule = MoQSchedule(s["start_bits"], s["target_bits"], s["quantization_period"],
                               s["schedule_offset"], False,
                               mixed["quantize_change_ratio"] if mixed.get("enabled") else None)
        plan = QuantizationPlan((Assignment(target, schedule, "g", None),),
                                s["quantize_groups"], s.get("quantization_type", "symmetric"),
                                False, 0)
        apply = jax.jit(lambda w, t, plan=plan: plan.apply({"w": w}, t)["w"])
        for r in s["records"]:
            quantized, bits, _ = schedule(r["step"])
            assert bool(quantized) == r["quantized"], (name, r["step"])
            if r["quantized"]:
                assert int(bits) == r["bits"], (name, r["step"])
            if r["ratio"] < 0:  # DeepSpeed's repeated subtraction went below 0 (jds clips)
                continue
            got = np.asarray(apply(jnp.asarray(x.T), jnp.int32(r["step"]))).T
            np.testing.assert_allclose(got, np.asarray(r["weight"], np.float32), atol=1e-6,
                                       err_msg=f"{name} step {r['step']}")


class MLP(nnx.Module):
    """A user's own model: two ``nnx.Linear`` layers."""

    def __init__(self, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(12, 16, rngs=rngs)
        self.fc2 = nnx.Linear(16, 4, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(x)))


def _mse(model, batch):
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


@pytest.mark.parametrize("name", sorted(FIXTURE["training"]))
def test_moq_training_of_a_users_model_matches_deepspeed(name):
    """A user's NNX MLP trained with MoQ (AdamW, fp32) gives DeepSpeed's losses: the same
    quantized weights in every forward pass, their gradients applied to the fp32 weights."""
    fx = FIXTURE["training"][name]
    model = MLP(nnx.Rngs(0))
    init = {k: np.asarray(v, np.float32) for k, v in fx["init"].items()}
    model.fc1.kernel.set_value(jnp.asarray(init["0.weight"].T))
    model.fc1.bias.set_value(jnp.asarray(init["0.bias"]))
    model.fc2.kernel.set_value(jnp.asarray(init["2.weight"].T))
    model.fc2.bias.set_value(jnp.asarray(init["2.bias"]))
    shared = {k: v for k, v in fx.items() if k in (
        "schedule_offset", "quantize_groups", "quantization_type", "fp16_mixed_quantize")}
    config = {"train_batch_size": 8, "gradient_clipping": 0.0,
              "optimizer": {"type": "AdamW", "params": {"lr": 0.05, "betas": [0.9, 0.999],
                                                        "eps": 1e-8, "weight_decay": 0.01}},
              **_wq({"wq1": {"params": {"start_bits": fx["start_bits"],
                                        "target_bits": fx["target_bits"],
                                        "quantization_period": fx["quantization_period"]},
                             "modules": ["fc"]}}, **shared)}
    engine = jds.initialize(model, config, loss_fn=_mse, devices=jax.devices()[:1])
    assert {a.target.path for a in engine.compression.assignments} == {("fc1", "kernel"),
                                                                       ("fc2", "kernel")}
    losses = [engine.train_batch({"x": np.asarray(x, np.float32),
                                  "y": np.asarray(y, np.float32)})["loss"]
              for x, y in fx["data"]]
    np.testing.assert_allclose(losses, fx["losses"], rtol=2e-5, atol=2e-6)

    # redundancy_clean: the weights at the target bits (DeepSpeed's groups), model unchanged
    trained = engine.model
    before = np.asarray(trained.fc1.kernel.get_value())
    clean = jds.compression.redundancy_clean(trained, config)
    np.testing.assert_array_equal(np.asarray(trained.fc1.kernel.get_value()), before)
    groups = fx["quantize_groups"]
    for w in (clean.fc1.kernel.get_value(), clean.fc2.kernel.get_value()):
        w = np.asarray(w)
        for g in np.split(w, groups, axis=1):  # [in, out]: runs of output channels
            assert len(np.unique(g)) <= 2 ** fx["target_bits"]
    np.testing.assert_array_equal(np.asarray(clean.fc1.bias.get_value()),
                                  np.asarray(trained.fc1.bias.get_value()))
    assert jds.compression.init_compression(model, config) is model


@pytest.mark.parametrize("layout", [
    {"zero_optimization": {"stage": 3}, "mesh": {"fsdp": 8}},
    pytest.param({"zero_optimization": {"stage": 1}, "mesh": {"data": 4, "tensor": 2}},
                 marks=pytest.mark.slow)])
def test_moq_on_llama_under_zero3_and_tensor_parallel_equals_one_device(layout):
    """Quantization-aware training of a Llama (MoQ 8 -> 4 bits on the attention and MLP
    matrices, stochastic rounding, per-group scales) gives the single-device losses when
    ZeRO-3 shards the weights (or tensor parallelism splits them)."""
    model = jds.models.build("llama-tiny", hidden_size=64, intermediate_size=128,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    config = {"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 3e-3}},
              **_wq({"wq1": {"params": {"start_bits": 8, "target_bits": 4,
                                        "quantization_period": 1},
                             "modules": ["self_attn", "mlp"]}}, quantize_groups=2,
                    rounding="stochastic")}
    rng = np.random.default_rng(0)
    batches = [{"input_ids": rng.integers(0, 256, (8, 32))} for _ in range(3)]

    def losses(cfg, devices):
        engine = jds.initialize(model, cfg, devices=devices)
        return engine, [engine.train_batch(b)["loss"] for b in batches] + [
            engine.eval_batch(batches[0])["loss"]]

    engine, one = losses(config, jax.devices()[:1])
    _, many = losses({**config, **layout}, jax.devices())
    np.testing.assert_allclose(many, one, rtol=2e-5)
    # the evaluation saw the quantized weights: not the full-precision model's loss
    ids = jnp.asarray(batches[0]["input_ids"])
    logits = engine.model(ids[:, :-1]).astype(jnp.float32)
    full = -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), ids[:, 1:, None], -1))
    assert 1e-5 < abs(float(full) - one[-1]) < 0.05, (float(full), one[-1])


def test_llama_targets_by_hugging_face_and_jds_names_and_bad_configs():
    """jds's Llama: DeepSpeed-style patterns over Hugging Face module names select matrices
    (some layers only, too); patterns matching nothing, overlapping groups, groups that do
    not divide the channels and out-of-range keys are errors naming the key."""
    model = jds.models.build("llama-tiny")
    names = {n for t in targets(model) for layer in t.names for n in layer}
    assert {"model.layers.0.self_attn.q_proj", "layers.3.w_down", "model.embed_tokens",
            "lm_head"} <= names
    groups = {"attn": {"params": {"start_bits": 8, "target_bits": 8}, "modules":
                       [r"layers\.[01]\.self_attn\.(q|k)_proj"]},
              "mlp": {"params": {"start_bits": 8, "target_bits": 4}, "modules": ["mlp"]}}
    engine = jds.initialize(model, {"train_micro_batch_size_per_gpu": 1, **_wq(groups)},
                            devices=jax.devices()[:1])
    got = {a.target.path: a.layers for a in engine.compression.assignments}
    assert got[("layers", "wq")] == (True, True, False, False)
    assert set(got) == {("layers", n) for n in ("wq", "wk", "w_gate", "w_up", "w_down")}

    def refused(config, match):
        with pytest.raises(ConfigError, match=match):
            jds.initialize(model, {"train_micro_batch_size_per_gpu": 1, **config},
                           devices=jax.devices()[:1])

    refused(_wq({"g": {"params": {"start_bits": 8, "target_bits": 4},
                       "modules": ["encoder.block"]}}), "matches no compressible module")
    refused(_wq({"a": {"params": {"start_bits": 8, "target_bits": 4}, "modules": ["q_proj"]},
                 "b": {"params": {"start_bits": 8, "target_bits": 4},
                       "modules": ["self_attn"]}}), "groups 'a' and 'b'")
    refused(_wq(quantize_groups=3), "quantize_groups=3 does not divide")
    refused(_wq({"g": {"params": {"start_bits": 4, "target_bits": 8}}}),
            "target_bits .8. is above start_bits")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # MoQ's own section is read, not ignored
        moq = jds.config.Config.load({"quantize_training": {
            "enabled": True, "quantize_bits": {"start_bits": 12, "target_bits": 8},
            "quantize_schedule": {"quantize_period": 50, "schedule_offset": 10},
            "quantize_groups": 8}})
    wq = moq.compression_training.weight_quantization
    assert wq.shared_parameters.schedule_offset == 10 and wq.shared_parameters.quantize_groups == 8
    assert wq.different_groups["moq"].params.quantization_period == 50


def _bert_w1a8(**sections):
    """The shape of DeepSpeedExamples' compression/bert/config/ds_config_W1A8_Qgroup64_fp16
    .json (the tutorial's binary-weight, 8-bit-activation BERT config), BERT module names."""
    prune = {"method": "topk"}
    cc = {
        "layer_reduction": {"enabled": False, "keep_number_layer": 5,
                            "module_name_prefix": "bert.encoder.layer",
                            "teacher_layer": [2, 4, 6, 8, 10],
                            "other_module_name": ["bert.pooler", "bert.embeddings",
                                                  "classifier"]},
        "weight_quantization": {
            "shared_parameters": {"enabled": True, "quantizer_kernel": False,
                                  "schedule_offset": 0, "quantize_groups": 64,
                                  "quantize_verbose": False, "quantization_type": "symmetric",
                                  "quantize_weight_in_forward": False, "rounding": "nearest",
                                  "fp16_mixed_quantize": {"enabled": False,
                                                          "quantize_change_ratio": 0.1}},
            "different_groups": {"wq1": {
                "params": {"start_bits": 1, "target_bits": 1, "quantization_period": 0},
                "modules": ["attention.self", "intermediate", "word_embeddings",
                            "output.dense"]}}},
        "activation_quantization": {
            "shared_parameters": {"enabled": True, "quantization_type": "symmetric",
                                  "range_calibration": "dynamic", "schedule_offset": 0},
            "different_groups": {"aq1": {"params": {"bits": 8}, "modules": [
                "attention.self", "intermediate", "output.dense"]}}},
        "sparse_pruning": {"shared_parameters": {"enabled": False, "schedule_offset": 2000,
                                                 "method": "l1"},
                           "different_groups": {"sp1": {"params": {"dense_ratio": 0.5},
                                                        "modules": ["attention.self"]}}},
        "row_pruning": {"shared_parameters": {"enabled": False, "schedule_offset": 2000,
                                              **prune},
                        "different_groups": {"rp1": {
                            "params": {"dense_ratio": 0.5}, "modules": ["intermediate.dense"],
                            "related_modules": [["layer.\\w+.output.dense"]]}}},
        "head_pruning": {"shared_parameters": {"enabled": False, "schedule_offset": 2000,
                                               "num_heads": 12, **prune},
                         "different_groups": {"rp1": {
                             "params": {"dense_ratio": 0.5},
                             "modules": ["attention.output.dense"],
                             "related_modules": [["self.query", "self.key", "self.value"]]}}},
    }
    for name, patch in sections.items():
        cc[name] = {**cc[name], **patch}
    return {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 8, "steps_per_print": 200,
            "zero_optimization": {"stage": 0}, "fp16": {"enabled": True},
            "gradient_clipping": 1.0, "prescale_gradients": True,
            "wall_clock_breakdown": False, "compression_training": cc}


def test_deepspeeds_bert_tutorial_config_runs_unchanged_on_llama_tiny():
    """DeepSpeed's tutorial configs name BERT's modules; on a jds decoder each name selects
    the matrices with the same part in the layer (``attention.self``: q/k/v;
    ``intermediate``: the MLP's input, Llama's gate and up; ``output.dense``: both output
    projections, as in BERT; ``word_embeddings``: the token embeddings), so the config
    trains llama-tiny unchanged and ``redundancy_clean`` leaves 1-bit weights. GPT-2 names
    select the same matrices; ``bert.encoder.layer`` / ``bert.embeddings`` /
    ``bert.pooler`` / ``classifier`` initialise a layer-reduced student."""
    from jds.compression import activation, plan
    from jds.config.compression import CompressionConfig

    model = jds.models.build("llama-tiny")
    config = _bert_w1a8()
    cc = CompressionConfig.model_validate(config["compression_training"])
    wq = {a.target.path: a.layers for a in plan(model, cc).assignments}
    assert set(wq) == {("layers", n) for n in ("wq", "wk", "wv", "wo", "w_gate", "w_up",
                                               "w_down")} | {("embed_tokens",)}
    assert all(v is None or all(v) for v in wq.values())  # every layer
    aq = {t.path for t, _, _ in activation.plan(model, cc).items}
    assert aq == {("layers", n) for n in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")}
    gpt2 = CompressionConfig.model_validate(_wq({"g": {
        "params": {"start_bits": 8, "target_bits": 8},
        "modules": ["attn.c_attn", "mlp.c_fc"]}})["compression_training"])
    assert {a.target.path[-1] for a in plan(model, gpt2).assignments} == {
        "wq", "wk", "wv", "w_gate", "w_up"}

    engine = jds.initialize(model, config, devices=jax.devices()[:1])
    rng = np.random.default_rng(0)
    losses = [engine.train_batch({"input_ids": rng.integers(0, 256, (8, 16), np.int32)})["loss"]
              for _ in range(2)]
    assert np.all(np.isfinite(losses))
    clean = jds.compression.redundancy_clean(engine.model, config)
    w = np.asarray(clean.layers.w_up.get_value()[1])  # [D, F]: 64 groups of 8 outputs
    assert all(len(np.unique(w[:, g * 8:(g + 1) * 8])) <= 2 for g in range(64))

    # layer reduction with the config's BERT names on a 4-layer teacher
    teacher = jds.models.build("llama-tiny")
    student = jds.models.build("llama-tiny", num_hidden_layers=2)
    reduce = _bert_w1a8(layer_reduction={"enabled": True, "keep_number_layer": 2,
                                         "teacher_layer": [1, 3]})
    jds.compression.init_compression(student, reduce, teacher_model=teacher)
    np.testing.assert_array_equal(np.asarray(student.layers.wq.get_value()),
                                  np.asarray(teacher.layers.wq.get_value())[[1, 3]])
    for name in ("embed_tokens", "norm", "lm_head"):
        np.testing.assert_array_equal(np.asarray(getattr(student, name).get_value()),
                                      np.asarray(getattr(teacher, name).get_value()))


def test_a_quantization_aware_checkpoint_serves_in_int8_with_its_own_scales(tmp_path):
    """The bridge to serving: ``init_inference(run_folder, {"dtype": "int8"})`` (what ``jds
    serve RUN --dtype int8`` calls) stores the trained matrices as the codes and scales of
    the quantizer they were trained with: dequantized, they equal ``redundancy_clean``'s
    weights exactly (no second quantization); matrices the run did not quantize are int8
    per channel as before. A quantization the int8 kernels cannot hold is refused."""
    model = jds.models.build("llama-tiny", num_hidden_layers=2, max_position_embeddings=64)
    config = {"train_batch_size": 4, **_wq({"g": {"params": {"start_bits": 8, "target_bits": 6},
                                                  "modules": ["self_attn", r"layers\.0\.mlp"]}},
                                            quantize_groups=2, quantize_weight_in_forward=True)}
    engine = jds.initialize(model, config, devices=jax.devices()[:1])
    rng = np.random.default_rng(0)
    for _ in range(2):
        engine.train_batch({"input_ids": rng.integers(0, 256, (4, 32))})
    engine.save_checkpoint(tmp_path / "checkpoints")
    clean = jds.compression.redundancy_clean(engine.model, config)
    engine.close()

    served = jds.init_inference(str(tmp_path), {"dtype": "int8", "max_tokens": 64,
                                                "max_seqs": 2})
    assert served.qat is not None
    for name in ("wq", "wo", "w_up"):
        qw = served.params["layers"][name]
        deq = np.asarray(qw.q, np.float32) * np.asarray(qw.scale)[
            (slice(None),) + (None,) * qw.n_in]
        want = np.asarray(getattr(clean.layers, name).get_value())
        trained = (0, 1) if name != "w_up" else (0,)  # the group took layer 0's MLP only
        for layer in trained:
            np.testing.assert_array_equal(deq[layer], want[layer], err_msg=name)
            assert len(np.unique(np.asarray(qw.q[layer]))) <= 2 ** 6  # 6-bit codes
    assert len(served.generate([[1, 2, 3]], 4)[0]) == 4
    with pytest.raises(ConfigError, match="asymmetric 8-bit"):
        jds.init_inference(model, {"dtype": "int8", **_wq(quantization_type="asymmetric",
                                                          groups={"g": {"params": {
                                                              "start_bits": 8,
                                                              "target_bits": 8}}})})
