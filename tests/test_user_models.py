"""Any model, any loss, any batch: the engine's contract (jds/models/base.py) on user modules.

The examples' tutorial CNN and BatchNorm ResNet, an unannotated Transformer built from
``nnx.MultiHeadAttention``, and an annotated MLP train under ZeRO 0-3 (and tensor
parallelism where annotated) on 8 simulated devices with the single-device run's losses;
frozen parameters get no optimizer bytes; model state (BatchNorm statistics, dropout RNG)
is carried, checkpointed and restored; bad input gets one clear error each.
"""

import importlib.util
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jds
from jds.config import ConfigError

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name):
    spec = importlib.util.spec_from_file_location(f"jds_example_{name}", EXAMPLES / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


cifar = _example("cifar_cnn")
resnet = _example("resnet_digits")


def cfg(stage=0, batch=16, accumulation=2, **kw):
    return {
        "train_batch_size": batch,
        "gradient_accumulation_steps": accumulation,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.01}},
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
        **kw,
    }


def image_batches(n, rows=16, seed=0):
    """CIFAR-shaped batches of the example's synthetic (learnable) data."""
    x, y, _, _ = cifar.load_data(None, seed=seed)
    return [{"image": cifar.normalise(x[i * rows:(i + 1) * rows]),
             "label": y[i * rows:(i + 1) * rows]} for i in range(n)]


def train(model_fn, config, batches, devices=None, loss_fn=cifar.loss_fn, **kw):
    engine = jds.initialize(model=model_fn(), config=config, loss_fn=loss_fn, devices=devices,
                            **kw)
    return engine, [engine.train_batch(b) for b in batches]


def flat(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def device_bytes(tree):
    return sum(x.addressable_shards[0].data.nbytes for x in jax.tree.leaves(tree))


# ----------------------------------------------------------------------------- the CNN
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_cnn_trains_under_every_zero_stage_like_one_device(stage):
    bs = image_batches(3)
    net = lambda: cifar.Net(nnx.Rngs(0))  # noqa: E731
    e8, o8 = train(net, cfg(stage), bs)
    e1, o1 = train(net, cfg(stage), bs, devices=jax.devices()[:1])
    np.testing.assert_allclose([o["loss"] for o in o8], [o["loss"] for o in o1], rtol=1e-5)
    np.testing.assert_allclose([o["accuracy"] for o in o8], [o["accuracy"] for o in o1])
    # Adam turns a near-zero gradient's float noise into an lr-sized step: 1e-3, not 1e-5
    np.testing.assert_allclose(flat(e8.state.params), flat(e1.state.params), atol=1e-3)
    assert o8[-1]["loss"] < o8[0]["loss"]
    fc1 = e8.state.params["fc1"]["kernel"]  # [400, 120]: 400 divides by 8
    split = fc1.addressable_shards[0].data.shape != fc1.shape
    assert split == (stage == 3)
    mu = [x for x in jax.tree.leaves(e8.state.opt_state) if x.shape == (400, 120)][0]
    assert (mu.addressable_shards[0].data.shape != mu.shape) == (stage >= 1)


def test_cnn_predict_and_eval_are_sharded_like_the_batch():
    e = jds.initialize(model=cifar.Net(nnx.Rngs(0)), config=cfg(3), loss_fn=cifar.loss_fn)
    b = image_batches(1)[0]
    logits = e.predict(b["image"])
    assert logits.shape == (16, 10)
    assert {s.data.shape for s in logits.addressable_shards} == {(2, 10)}
    ref = cifar.Net(nnx.Rngs(0))(jnp.asarray(b["image"]))
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), rtol=1e-5, atol=1e-5)
    ev = e.eval_batch(b)
    want = float(optax.softmax_cross_entropy_with_integer_labels(ref, b["label"]).mean())
    assert ev["loss"] == pytest.approx(want, rel=1e-5)
    assert set(ev) == {"loss", "accuracy"}


# ----------------------------------------------------------------------------- BatchNorm
def digits_batches(n, rows=16, seed=0):
    x, y, _, _ = resnet.load_digits()
    rng = np.random.default_rng(seed)
    return [{"image": x[i], "label": y[i]}
            for i in (rng.choice(len(x), rows, replace=False) for _ in range(n))]


@pytest.mark.parametrize("stage", [pytest.param(0, marks=pytest.mark.slow),  # suite time;
                                   pytest.param(1, marks=pytest.mark.slow),  # the CNN runs
                                   pytest.param(2, marks=pytest.mark.slow), 3])  # every stage
def test_batchnorm_resnet_like_one_device_with_running_statistics(stage):
    bs = digits_batches(3)
    net = lambda: resnet.ResNet(nnx.Rngs(0))  # noqa: E731
    e8, o8 = train(net, cfg(stage), bs, loss_fn=resnet.loss_fn)
    e1, o1 = train(net, cfg(stage), bs, loss_fn=resnet.loss_fn, devices=jax.devices()[:1])
    np.testing.assert_allclose([o["loss"] for o in o8], [o["loss"] for o in o1], rtol=1e-5)
    stats8, stats1 = e8.state.model_state, e1.state.model_state
    np.testing.assert_allclose(flat(stats8), flat(stats1), rtol=1e-5, atol=1e-6)
    mean = stats8["bn"]["mean"]
    assert np.abs(np.asarray(mean)).max() > 0  # updated by the 6 training forwards
    # evaluation normalises with the running statistics, not the batch's own
    ev = e8.eval_batch(bs[0])
    m = e8.model
    assert m.bn.use_running_average  # engine.model is in evaluation mode
    logits = m(jnp.asarray(bs[0]["image"]))
    want = optax.softmax_cross_entropy_with_integer_labels(logits, bs[0]["label"]).mean()
    assert ev["loss"] == pytest.approx(float(want), rel=1e-5)


@pytest.mark.slow  # 35 s of training to an accuracy; the ResNet trains under every stage by default
def test_resnet_example_reaches_90_percent_on_digits():
    res = resnet.train(steps=150, batch=64, log_every=0)
    assert res["eval"]["accuracy"] >= 0.90, res


# ----------------------------------------------------------------------------- Transformer
class TinyTransformer(nnx.Module):
    """Unannotated: nnx.Embed, nnx.MultiHeadAttention, nnx.LayerNorm, nnx.Dropout."""

    def __init__(self, rngs, vocab=64, d=32, heads=4, dropout=0.0):
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(num_heads=heads, in_features=d, decode=False,
                                           rngs=rngs)
        self.norm1 = nnx.LayerNorm(d, rngs=rngs)
        self.norm2 = nnx.LayerNorm(d, rngs=rngs)
        self.mlp = nnx.Linear(d, d, rngs=rngs)
        self.drop = nnx.Dropout(dropout, rngs=rngs)
        self.out = nnx.Linear(d, vocab, rngs=rngs)

    def __call__(self, ids_BT):
        x = self.embed(ids_BT)
        mask = nnx.make_causal_mask(ids_BT)
        x = x + self.drop(self.attn(self.norm1(x), mask=mask))
        x = x + self.drop(nnx.gelu(self.mlp(self.norm2(x))))
        return self.out(x)


def lm_loss(model, batch):
    logits = model(batch["ids"])[:, :-1]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["ids"][:, 1:]).mean()


def token_batches(n, rows=16, seq=12, seed=0):
    rng = np.random.default_rng(seed)
    return [{"ids": rng.integers(0, 64, (rows, seq)).astype(np.int32)} for _ in range(n)]


@pytest.mark.parametrize("stage", [pytest.param(0, marks=pytest.mark.slow),  # suite time
                                   pytest.param(1, marks=pytest.mark.slow), 2, 3])
def test_unannotated_transformer_under_zero_like_one_device(stage):
    bs = token_batches(3)
    model = lambda: TinyTransformer(nnx.Rngs(0))  # noqa: E731
    e8, o8 = train(model, cfg(stage), bs, loss_fn=lm_loss)
    e1, o1 = train(model, cfg(stage), bs, loss_fn=lm_loss, devices=jax.devices()[:1])
    np.testing.assert_allclose([o["loss"] for o in o8], [o["loss"] for o in o1], rtol=1e-5)
    assert o8[-1]["loss"] < o8[0]["loss"]


def test_dropout_draws_fresh_masks_reproducibly():
    bs = token_batches(3)
    model = lambda: TinyTransformer(nnx.Rngs(0), dropout=0.3)  # noqa: E731
    e, a = train(model, cfg(0), bs, loss_fn=lm_loss)
    _, b = train(model, cfg(0), bs, loss_fn=lm_loss)
    assert [o["loss"] for o in a] == [o["loss"] for o in b]  # reproducible from the seed
    # one fresh key per micro-batch: 3 steps x 2 micro-batches x 2 dropout calls
    assert int(e.state.model_state["drop"]["rngs"]["count"]) == 12
    # evaluation is deterministic (dropout off) and differs from the training loss
    ev1, ev2 = e.eval_batch(bs[0]), e.eval_batch(bs[0])
    assert ev1 == ev2
    _, one = train(model, cfg(0), bs[:1], loss_fn=lm_loss, devices=jax.devices()[:1])
    assert one[0]["loss"] == pytest.approx(a[0]["loss"], rel=1e-5)  # same masks on 1 device


# ----------------------------------------------------------------------------- TP
class AnnotatedMLP(nnx.Module):
    """Megatron's column- then row-parallel pair, annotated with jds's logical axes."""

    def __init__(self, rngs, d=16, f=64, classes=8):
        self.up = nnx.Linear(d, f, kernel_metadata={"axes": ("embed", "mlp")},
                             bias_metadata={"axes": ("mlp",)}, rngs=rngs)
        self.down = nnx.Linear(f, classes, kernel_metadata={"axes": ("mlp", "embed")},
                               rngs=rngs)

    def __call__(self, x):
        return self.down(nnx.relu(self.up(x)))


def mlp_loss(model, batch):
    logits = model(batch["x"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


@pytest.mark.parametrize("stage", [0, 3])
def test_annotated_model_takes_tensor_parallelism(stage):
    rng = np.random.default_rng(0)
    bs = [{"x": rng.normal(size=(16, 16)).astype(np.float32),
           "y": rng.integers(0, 8, 16).astype(np.int32)} for _ in range(3)]
    model = lambda: AnnotatedMLP(nnx.Rngs(0))  # noqa: E731
    c = cfg(stage, mesh={"data": 4, "tensor": 2})
    e, o = train(model, c, bs, loss_fn=mlp_loss)
    _, o1 = train(model, cfg(stage), bs, loss_fn=mlp_loss, devices=jax.devices()[:1])
    np.testing.assert_allclose([x["loss"] for x in o], [x["loss"] for x in o1], rtol=1e-5)
    up = e.state.params["up"]["kernel"]  # [16, 64]: mlp over tensor (2), ZeRO-3 adds data
    want = (16 // 4, 32) if stage == 3 else (16, 32)
    assert up.addressable_shards[0].data.shape == want


# ----------------------------------------------------------------------------- frozen
def test_frozen_parameters_get_no_optimizer_state_and_do_not_move():
    only_head = nnx.All(nnx.Param, nnx.PathContains("fc3"))
    bs = image_batches(2)
    e, _ = train(lambda: cifar.Net(nnx.Rngs(0)), cfg(1), bs, trainable=only_head)
    assert set(e.state.params) == {"fc3"}
    opt_paths = {str(p[-2].key) for p, x in jax.tree_util.tree_flatten_with_path(
        e.state.opt_state)[0] if x.ndim}
    assert opt_paths == {"fc3"}
    assert "fc1" in e.state.frozen and "fc3" not in e.state.frozen
    ref = nnx.to_pure_dict(nnx.state(cifar.Net(nnx.Rngs(0)), nnx.Param))
    np.testing.assert_array_equal(np.asarray(e.state.frozen["fc1"]["kernel"]),
                                  np.asarray(ref["fc1"]["kernel"]))
    assert not np.array_equal(np.asarray(e.state.params["fc3"]["kernel"]),
                              np.asarray(ref["fc3"]["kernel"]))
    # optimizer bytes: only the head's 84 x 10 + 10 parameters, twice (Adam m, v)
    opt = sum(x.nbytes for x in jax.tree.leaves(e.state.opt_state) if x.ndim)
    assert opt == 2 * 4 * (84 * 10 + 10)
    grads, _ = e.gradients(bs[0])
    assert set(grads) == {"fc3"}
    # jds explain's table: frozen rows hold their parameter bytes and nothing else
    from jds.profiling import memory_report as mr

    rep = mr.explain_report(e, "Net")
    rows = {r["path"]: r for r in rep["params"]}
    assert not rows["fc1/kernel"]["trainable"] and rows["fc3/kernel"]["trainable"]
    assert rows["fc1/kernel"]["bytes_per_device"] == {"params": 400 * 120 * 4, "grads": 0,
                                                      "optimizer": 0}
    assert rows["fc3/kernel"]["bytes_per_device"]["optimizer"] > 0
    assert "(frozen)" in mr.explain_text(rep)


def test_frozen_parameters_in_bf16_have_no_master_copy():
    e = jds.initialize(model=cifar.Net(nnx.Rngs(0)), config=cfg(0, bf16={"enabled": True}),
                       loss_fn=cifar.loss_fn, trainable=nnx.PathContains("fc3"))
    assert set(e.state.master) == {"fc3"}
    assert {x.dtype for x in jax.tree.leaves(e.state.frozen)} == {jnp.dtype(jnp.bfloat16)}
    e.train_batch(image_batches(1)[0])


# ----------------------------------------------------------------------------- checkpoints
@pytest.mark.parametrize("which", ["cnn", pytest.param("resnet", marks=pytest.mark.slow)])
def test_checkpoint_restores_bit_exact_onto_another_device_count(which, tmp_path):
    if which == "cnn":
        model, loss, bs = lambda: cifar.Net(nnx.Rngs(0)), cifar.loss_fn, image_batches(4)
    else:
        model, loss, bs = lambda: resnet.ResNet(nnx.Rngs(0)), resnet.loss_fn, digits_batches(4)
    e = jds.initialize(model=model(), config=cfg(3), loss_fn=loss)
    for b in bs[:2]:
        e.train_batch(b)
    e.save_checkpoint(tmp_path)
    e.wait_for_checkpoints()
    saved = jax.device_get((e.state.params, e.state.opt_state, e.state.model_state))
    want = [e.train_batch(b)["loss"] for b in bs[2:]]
    e.close()
    for devices in (jax.devices(), jax.devices()[:2]):
        e2 = jds.initialize(model=model(), config=cfg(3), loss_fn=loss, devices=devices)
        e2.load_checkpoint(tmp_path)
        restored = jax.device_get((e2.state.params, e2.state.opt_state, e2.state.model_state))
        for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(saved), strict=True):
            np.testing.assert_array_equal(a, b)  # bit-exact, on either device count
        if which == "resnet":
            assert float(np.abs(np.asarray(e2.state.model_state["bn"]["var"]) - 1).max()) > 0
        got = [e2.train_batch(b)["loss"] for b in bs[2:]]
        if len(devices) == 8:
            assert got == want
        else:
            np.testing.assert_allclose(got, want, rtol=1e-5)
        e2.close()


def test_checkpoint_records_a_user_model_by_class(tmp_path):
    e = jds.initialize(model=cifar.Net(nnx.Rngs(0)), config=cfg(0), loss_fn=cifar.loss_fn)
    e.save_checkpoint(tmp_path)
    e.close()
    from jds.checkpoint.convert.orbax_reader import OrbaxCheckpoint

    meta = OrbaxCheckpoint(tmp_path / "0").meta["model"]
    assert meta == {"type": "custom", "class": f"{cifar.Net.__module__}.Net", "config": None}
    with pytest.raises(ValueError, match="user model"):
        OrbaxCheckpoint(tmp_path / "0").model_config()


# ----------------------------------------------------------------------------- bad input
def test_bad_user_input_gets_clear_errors():
    net = cifar.Net(nnx.Rngs(0))
    b = image_batches(1)[0]
    with pytest.raises(TypeError, match="no default loss; pass loss_fn"):
        jds.initialize(model=net, config=cfg(0))
    e = jds.initialize(model=net, config=cfg(0), loss_fn=lambda m, b: m(b["image"]))
    with pytest.raises(ValueError, match=r"loss_fn returned shape \(8, 10\)"):
        e.train_batch(b)
    e = jds.initialize(model=net, config=cfg(0), loss_fn=cifar.loss_fn)
    with pytest.raises(ValueError, match=r"batch\['label'\] has 8 rows.*other leaves have 16"):
        e.train_batch({**b, "label": b["label"][:8]})
    with pytest.raises(ValueError, match=r"train_batch_size is 16"):
        e.train_batch({k: v[:8] for k, v in b.items()})
    with pytest.raises(ValueError, match=r"batch\['image'\].*12 rows do not split.*8"):
        e.eval_batch({k: v[:12] for k, v in b.items()})
    with pytest.raises(ValueError, match="selects none"):
        jds.initialize(model=net, config=cfg(0), loss_fn=cifar.loss_fn,
                       trainable=nnx.PathContains("nothing"))

    class Empty(nnx.Module):
        def __call__(self, x):
            return x

    with pytest.raises(ValueError, match="has no nnx.Param"):
        jds.initialize(model=Empty(), config=cfg(0), loss_fn=cifar.loss_fn)
    with pytest.raises(ConfigError, match="mesh.stage=2 needs a stacked decoder"):
        jds.initialize(model=net, config=cfg(0, mesh={"stage": 2}), loss_fn=cifar.loss_fn)
    with pytest.raises(ConfigError, match="nnx.remat"):
        jds.initialize(model=net, config=cfg(0, train={"remat": "full"}), loss_fn=cifar.loss_fn)


# ----------------------------------------------------------------------------- the contract
def test_language_models_implement_the_stacked_decoder_protocol():
    from jds.models.base import StackedDecoder, is_stacked_decoder

    for name in ("llama-tiny", "gpt2-tiny"):
        m = jds.models.build(name, num_hidden_layers=2) if name.startswith("llama") else \
            jds.models.build(name, n_layer=2)
        assert isinstance(m, StackedDecoder) and is_stacked_decoder(m)
    assert not is_stacked_decoder(cifar.Net(nnx.Rngs(0)))
    with pytest.raises(TypeError, match="not a jds model config"):
        jds.models.model_class(object())


def test_zero3_gathering_is_bound_to_the_model_not_ambient():
    """The engine's ZeRO-3 Llama gathers layer by layer when jitted outside the engine."""
    model = jds.models.build("llama-tiny", num_hidden_layers=2, hidden_size=64,
                             intermediate_size=128)
    e = jds.initialize(model=model, config={"train_batch_size": 8,
                                            "zero_optimization": {"stage": 3}})
    assert model.param_gather is None  # the caller's module is untouched
    bound = e.split.merge(e.state.params, {}, {})
    assert bound.param_gather is not None and bound.param_gather.sharded
    ids = jnp.zeros((8, 16), jnp.int32)

    def logits(params):
        return e.split.merge(params, {}, {})(ids)

    hlo = jax.jit(logits).lower(e.state.params).compile().as_text()
    assert "all-gather" in hlo
    np.testing.assert_allclose(np.asarray(jax.jit(logits)(e.state.params)),
                               np.asarray(model(ids)), rtol=1e-5, atol=1e-5)
