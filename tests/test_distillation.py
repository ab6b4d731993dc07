"""Layer reduction with knowledge distillation (DeepSpeed's ``layer_reduction``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jds
from jds.compression import Distillation, distillation_loss
from jds.config import ConfigError


def _llama(layers: int, seed: int = 0):
    from jds.models.llama import Llama, LlamaConfig

    cfg = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=64)
    return Llama(cfg, rngs=nnx.Rngs(seed))


def _reduction(teacher_layer, prefix="model.layers",
               other=("model.embed_tokens", "model.norm", "lm_head")):
    return {"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 3e-3}},
            "compression_training": {"layer_reduction": {
                "enabled": True, "keep_number_layer": len(teacher_layer),
                "module_name_prefix": prefix, "teacher_layer": list(teacher_layer),
                "other_module_name": list(other)}}}


def _batch(seed=0):
    return {"input_ids": np.random.default_rng(seed).integers(0, 64, (8, 16)).astype(np.int32)}


def test_student_takes_the_teachers_layers_and_modules():
    teacher, student = _llama(4, seed=0), _llama(2, seed=1)
    out = jds.compression.init_compression(student, _reduction([1, 3]), teacher_model=teacher)
    assert out is student
    for name in ("wq", "wo", "w_up", "attn_norm"):
        np.testing.assert_array_equal(np.asarray(getattr(student.layers, name).get_value()),
                                      np.asarray(getattr(teacher.layers, name).get_value())[[1, 3]])
    for name in ("embed_tokens", "norm", "lm_head"):
        np.testing.assert_array_equal(np.asarray(getattr(student, name).get_value()),
                                      np.asarray(getattr(teacher, name).get_value()))

    # a user's model: blocks in an nnx.List, copied module by module
    class Net(nnx.Module):
        def __init__(self, n, seed):
            rngs = nnx.Rngs(seed)
            self.embed = nnx.Linear(4, 8, rngs=rngs)
            self.blocks = nnx.List([nnx.Linear(8, 8, rngs=rngs) for _ in range(n)])

    t, s = Net(3, 0), Net(2, 1)
    jds.compression.init_compression(s, _reduction([0, 2], "blocks", ["embed"]), teacher_model=t)
    np.testing.assert_array_equal(np.asarray(s.blocks[1].kernel.get_value()),
                                  np.asarray(t.blocks[2].kernel.get_value()))
    np.testing.assert_array_equal(np.asarray(s.embed.kernel.get_value()),
                                  np.asarray(t.embed.kernel.get_value()))

    def refused(config, match, teacher_model=teacher, student_model=None):
        with pytest.raises(ConfigError, match=match):
            jds.compression.init_compression(student_model or _llama(2), config,
                                             teacher_model=teacher_model)

    refused(_reduction([1, 4]), r"teacher_layer \[1, 4\] names layers outside the teacher's 4")
    refused(_reduction([0, 1, 2]), "keep_number_layer is 3 but the student has 2 layers")
    refused(_reduction([0, 1], prefix="encoder.blocks"), "has no .encoder.blocks.")
    refused(_reduction([0, 1]), "pass init_compression", teacher_model=None)
    with pytest.raises(ConfigError, match="teacher_layer has 1 entries for keep_number_layer 2"):
        jds.Config.load({"compression_training": {"layer_reduction": {
            "enabled": True, "keep_number_layer": 2, "module_name_prefix": "model.layers",
            "teacher_layer": [0]}}})


def test_distillation_loss_is_hintons_soft_targets_plus_cross_entropy():
    rng = np.random.default_rng(0)
    s, t = rng.normal(size=(2, 5, 7)), rng.normal(size=(2, 5, 7))
    ids = rng.integers(0, 7, (2, 5))
    labels = ids.copy()
    labels[0, 3] = -100

    class Fixed(nnx.Module):
        def __init__(self, logits):
            self.logits = nnx.Param(jnp.asarray(logits, jnp.float32))

        def __call__(self, ids):
            return self.logits[...]

    loss = distillation_loss(temperature=2.0, alpha=0.7)
    total, aux = loss.fn(Distillation(Fixed(s), Fixed(t)),
                         {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(labels)})

    def log_softmax(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    valid = labels[:, 1:] != -100
    lt, ls = log_softmax(t[:, :-1] / 2), log_softmax(s[:, :-1] / 2)
    kd = 4 * (np.exp(lt) * (lt - ls)).sum(-1)[valid].sum()
    ce = -np.take_along_axis(log_softmax(s[:, :-1]), labels[:, 1:, None].clip(0), -1)[..., 0]
    ce = ce[valid].sum()
    np.testing.assert_allclose(float(aux["kd"]), kd, rtol=1e-5)
    np.testing.assert_allclose(float(aux["ce"]), ce, rtol=1e-5)
    np.testing.assert_allclose(float(total), 0.7 * kd + 0.3 * ce, rtol=1e-5)
    assert float(loss.weight({"input_ids": ids, "labels": labels})) == valid.sum()
    with pytest.raises(ValueError, match="alpha must be in"):
        distillation_loss(alpha=1.5)


def test_hidden_state_distillation_matches_each_layers_output():
    """``hidden=``: every student layer's output against its teacher layer's (mean squared
    error per token, summed over layers), the outputs being exactly what the layers give
    (the stack run to that layer); a wrong ``teacher_layer`` and plain models are refused."""
    from jds.compression.distillation import hidden_states
    from jds.models.layers import positions_from_segments, stacked_params

    teacher, student = _llama(4, seed=0), _llama(2, seed=1)
    ids = _batch(0)["input_ids"][:2]
    labels = ids.copy()
    labels[1, 5] = -100
    logits, hs = hidden_states(teacher, ids)
    np.testing.assert_allclose(np.asarray(logits), np.asarray(teacher(ids)), rtol=1e-5,
                               atol=1e-6)
    pos = positions_from_segments(None, *ids.shape)
    x = teacher.embed(ids, pos)
    for i in range(4):  # layer i's output: the first i + 1 layers run
        part = {k: v[:i + 1] for k, v in stacked_params(teacher.layers).items()}
        np.testing.assert_allclose(np.asarray(hs[i]),
                                   np.asarray(teacher.run_layers(part, x, pos, None)),
                                   rtol=1e-5, atol=1e-6)
    _, hs_s = hidden_states(student, ids)
    batch = {"input_ids": jnp.asarray(ids), "labels": jnp.asarray(labels)}
    model = Distillation(student, teacher)
    base_total, base_aux = distillation_loss(alpha=0.3).fn(model, batch)
    total, aux = distillation_loss(alpha=0.3, hidden=0.5).fn(model, batch)  # [1, 3]
    d = np.asarray(hs_s) - np.asarray(hs)[[1, 3]]
    want = ((d ** 2).mean(-1).sum(0)[:, :-1] * (labels[:, 1:] != -100)).sum()
    np.testing.assert_allclose(float(aux["hidden"]), want, rtol=1e-5)
    np.testing.assert_allclose(float(total), float(base_total) + 0.5 * want, rtol=1e-5)
    assert float(aux["kd"]) == pytest.approx(float(base_aux["kd"]), rel=1e-6)
    _, other = distillation_loss(hidden=1.0, teacher_layer=[0, 2]).fn(model, batch)
    assert float(other["hidden"]) != pytest.approx(want, rel=1e-3)
    with pytest.raises(ValueError, match="needs one teacher layer"):
        distillation_loss(hidden=1.0, teacher_layer=[1, 2, 3]).fn(model, batch)
    with pytest.raises(ValueError, match="hidden .* must be >= 0"):
        distillation_loss(hidden=-1.0)


def test_half_depth_student_distilled_under_zero3_equals_one_device():
    """The student (half the teacher's layers) trains against the frozen teacher in one
    compiled step: ZeRO-3 on 8 devices gives the 1-device losses, only the student has
    optimizer state, the teacher's weights do not move, and a student equal to its teacher
    starts at zero KL."""

    def run(layout, devices):
        teacher, student = _llama(4, seed=0), _llama(2, seed=1)
        config = {**_reduction([1, 3]), **layout}
        jds.compression.init_compression(student, config, teacher_model=teacher)
        engine = jds.initialize(Distillation(student, teacher), config, devices=devices,
                                loss_fn=distillation_loss(hidden=0.1, teacher_layer=[1, 3]))
        metrics = [engine.train_batch(_batch(0)) for _ in range(3)]  # one batch: loss falls
        return engine, teacher, metrics

    one, teacher, m1 = run({}, jax.devices()[:1])
    eight, _, m8 = run({"zero_optimization": {"stage": 3}, "mesh": {"fsdp": 8}}, jax.devices())
    np.testing.assert_allclose([m["loss"] for m in m8], [m["loss"] for m in m1], rtol=2e-5)
    assert {"kd", "ce", "hidden", "loss"} <= set(m1[0])
    assert m1[2]["loss"] < m1[0]["loss"]
    assert set(one.split.params) == {"student"} and "teacher" in one.split.frozen
    trained = one.model
    np.testing.assert_array_equal(np.asarray(trained.teacher.layers.wq.get_value()),
                                  np.asarray(teacher.layers.wq.get_value()))
    assert not np.allclose(np.asarray(trained.student.layers.wq.get_value()),
                           np.asarray(teacher.layers.wq.get_value())[[1, 3]])
    wq = eight.state.frozen["teacher"]["layers"]["wq"]  # ZeRO-3 splits the frozen teacher
    assert wq.addressable_shards[0].data.size * 8 == wq.size
    # ... and both decoders gather their weights a layer at a time inside their layer
    # scans: no stacked (all-layer) weight of either is ever all-gathered whole
    from test_zero import collectives

    hlo = eight.lower_train_step(16).compile().as_text()
    stacked = {x.shape for tree in (eight.state.params, eight.state.frozen)
               for x in jax.tree.leaves(tree) if x.ndim >= 3}
    gathered = {s for _, op, _, shapes in collectives(hlo) if op == "all-gather"
                for s in shapes}
    assert gathered and not stacked & gathered, (stacked, gathered)

    twin = _llama(2, seed=3)
    _, aux = distillation_loss().fn(Distillation(twin, twin), _batch(0))
    assert float(aux["kd"]) < 1e-6
