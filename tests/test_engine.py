"""TrainEngine: data-parallel parity with one device, accumulation, precision, errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jds
from jds.config import ConfigError

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
SEQ = 16


def make_model(seed=0):
    return jds.models.build("llama-tiny", seed=seed, **TINY)


def cfg(**kw):
    base = {
        "train_batch_size": 16,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "weight_decay": 0.1}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0.0,
                                                     "warmup_max_lr": 1e-2,
                                                     "warmup_num_steps": 3,
                                                     "warmup_type": "linear"}},
        "gradient_clipping": 1.0,
    }
    base.update(kw)
    return base


def batches(n, rows=16, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, size=(rows, SEQ), dtype=np.int32) for _ in range(n)]


def run(config, devices=None, steps=5, model=None):
    engine = jds.initialize(model=model or make_model(), config=config, devices=devices)
    outs = [engine.train_batch({"input_ids": b}) for b in batches(steps)]
    return engine, outs


def flat(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def test_data_parallel_matches_single_device():
    e8, o8 = run(cfg())
    e1, o1 = run(cfg(), devices=jax.devices()[:1])
    assert e8.mesh.shape["data"] == 8 and e1.mesh.shape["data"] == 1
    np.testing.assert_allclose([o["loss"] for o in o8], [o["loss"] for o in o1], rtol=1e-5)
    np.testing.assert_allclose([o["grad_norm"] for o in o8], [o["grad_norm"] for o in o1],
                               rtol=1e-5)
    np.testing.assert_allclose(flat(e8.state.params), flat(e1.state.params), rtol=1e-5,
                               atol=1e-6)
    # the loss actually went down and the warmup schedule was applied step by step
    assert o8[-1]["loss"] < o8[0]["loss"]
    # DeepSpeed's WarmupLR sets min_lr at construction and again on its first step(), so the
    # first two optimizer steps both run at warmup_min_lr.
    np.testing.assert_allclose([o["lr"] for o in o8], [0.0, 0.0, 1e-2 / 3, 2e-2 / 3, 1e-2],
                               rtol=1e-6, atol=1e-12)


def test_params_are_sharded_per_rules_and_batch_split_over_devices():
    e, _ = run(cfg(), steps=1)
    leaf = jax.tree.leaves(e.state.params)[0]
    assert len(leaf.addressable_shards) == 8
    placed = e.shard_batch({"input_ids": batches(1)[0]})
    shard_rows = {s.data.shape[1] for s in placed["input_ids"].addressable_shards}
    assert shard_rows == {16 // 8}


def test_gradient_accumulation_equals_full_batch():
    _, full = run(cfg(gradient_accumulation_steps=1))
    e4, acc = run(cfg(gradient_accumulation_steps=2, train_micro_batch_size_per_gpu=1))
    assert e4.batch.gradient_accumulation_steps == 2
    np.testing.assert_allclose([o["loss"] for o in acc], [o["loss"] for o in full], rtol=1e-5)


def test_eval_batch_does_not_update():
    e, _ = run(cfg(), steps=1)
    before = flat(e.state.params)
    b = batches(1, seed=3)[0]
    l1 = e.eval_batch({"input_ids": b})["loss"]
    l2 = e.eval_batch({"input_ids": b})["loss"]
    assert l1 == l2
    np.testing.assert_array_equal(before, flat(e.state.params))


def test_hf_loss_definition():
    """The engine's loss equals mean next-token cross-entropy computed by hand."""
    model = make_model()
    b = batches(1)[0]
    logits = np.asarray(model(jnp.asarray(b)), np.float64)
    logp = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1,
                                                                              keepdims=True)) \
        - logits.max(-1, keepdims=True)
    want = -np.take_along_axis(logp[:, :-1], b[:, 1:, None], -1).mean()
    e = jds.initialize(model=model, config=cfg())
    assert abs(e.eval_batch({"input_ids": b})["loss"] - want) < 1e-5


def test_bf16_keeps_fp32_master_and_tracks_fp32():
    e, o = run(cfg(bf16={"enabled": True}))
    assert {x.dtype for x in jax.tree.leaves(e.state.params)} == {jnp.dtype(jnp.bfloat16)}
    assert {x.dtype for x in jax.tree.leaves(e.state.master)} == {jnp.dtype(jnp.float32)}
    assert {x.dtype for x in jax.tree.leaves(e.state.opt_state)
            if jnp.issubdtype(x.dtype, jnp.floating)} == {jnp.dtype(jnp.float32)}
    _, o32 = run(cfg())
    np.testing.assert_allclose([x["loss"] for x in o], [x["loss"] for x in o32], rtol=2e-2)


def test_fp16_overflow_skips_step_and_lowers_scale():
    # 2**40 overflows fp16 gradients at once; hysteresis 2 -> first overflow keeps the scale.
    config = cfg(fp16={"enabled": True, "initial_scale_power": 40, "hysteresis": 2,
                       "loss_scale_window": 1000})
    e = jds.initialize(model=make_model(), config=config)
    p0 = flat(e.state.master)
    # one batch repeated: memorisable, so the applied steps must lower its loss
    b = batches(1)[0]
    outs = [e.train_batch({"input_ids": b}) for _ in range(30)]
    assert outs[0]["skipped"] == 1.0 and outs[1]["skipped"] == 1.0
    assert outs[0]["loss_scale"] == 2.0**40 and outs[1]["loss_scale"] == 2.0**40
    assert outs[2]["loss_scale"] == 2.0**39
    # skipped steps change nothing and do not advance the schedule
    first_applied = next(i for i, o in enumerate(outs) if o["skipped"] == 0.0)
    assert outs[first_applied]["lr"] == 0.0
    assert int(e.state.skipped) == sum(o["skipped"] for o in outs) >= first_applied
    assert not np.array_equal(p0, flat(e.state.master))
    assert outs[-1]["loss"] < outs[first_applied]["loss"]
    assert {x.dtype for x in jax.tree.leaves(e.state.params)} == {jnp.dtype(jnp.float16)}


def test_a_step_skipped_by_select_equals_one_skipped_by_cond(monkeypatch):
    # GPUs skip a non-finite step with a select fused into the update (in place there);
    # CPUs with a lax.cond: the same steps, skipped or applied, the same state after them
    config = cfg(fp16={"enabled": True, "initial_scale_power": 24, "hysteresis": 1,
                       "loss_scale_window": 1000})
    b = batches(1)[0]

    def run():
        e = jds.initialize(model=make_model(), config=config)
        return e, [e.train_batch({"input_ids": b}) for _ in range(6)]

    e_cond, cond = run()
    monkeypatch.setattr(jds.engine, "is_gpu", lambda platform: True)
    e_select, select = run()
    assert e_select._step_cfg.skip_by_select and not e_cond._step_cfg.skip_by_select
    assert [o["skipped"] for o in cond] == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    np.testing.assert_equal(cond, select)  # grad_norm is NaN in a skipped step
    for a, b_ in zip(jax.tree.leaves((e_cond.state.master, e_cond.state.opt_state)),
                     jax.tree.leaves((e_select.state.master, e_select.state.opt_state)),
                     strict=True):
        np.testing.assert_array_equal(a, b_)


def test_bad_batches_raise_clear_errors():
    e = jds.initialize(model=make_model(), config=cfg())
    with pytest.raises(ValueError, match="train_batch_size is 16"):
        e.train_batch({"input_ids": np.zeros((8, SEQ), np.int32)})
    with pytest.raises(ValueError, match="vocab_size is 256"):
        e.train_batch({"input_ids": np.full((16, SEQ), 300, np.int32)})
    with pytest.raises(ValueError, match="input_ids"):
        e.train_batch({"tokens": np.zeros((16, SEQ), np.int32)})


def test_batch_triad_that_does_not_fit_devices_is_a_config_error():
    with pytest.raises(ConfigError, match="train_batch_size"):
        jds.initialize(model=make_model(), config=cfg(train_batch_size=12))


def test_preset_name_materialises_sharded_and_matches_module():
    e = jds.initialize(model="llama-tiny", config=cfg())
    ref = jds.models.build("llama-tiny")
    from flax import nnx
    # same RNG stream; jit-compiled init may differ from eager by one float32 ulp
    np.testing.assert_allclose(flat(e.state.params), flat(nnx.to_pure_dict(nnx.state(ref))),
                               rtol=2e-7, atol=1e-8)


@pytest.mark.slow  # 16 s; tests/test_checkpoint.py resumes bit-exact with fp16 state by default
def test_checkpoint_roundtrip_resumes_bit_exact(tmp_path):
    bs = batches(6)
    e = jds.initialize(model=make_model(), config=cfg())
    for b in bs[:3]:
        e.train_batch({"input_ids": b})
    e.save_checkpoint(tmp_path, client_state={"data": {"index": 3}})
    e.wait_for_checkpoints()
    want = [e.train_batch({"input_ids": b})["loss"] for b in bs[3:]]
    e.close()

    e2 = jds.initialize(model=make_model(seed=1), config=cfg())
    client = e2.load_checkpoint(tmp_path)
    assert client == {"data": {"index": 3}} and int(e2.state.step) == 3
    got = [e2.train_batch({"input_ids": b})["loss"] for b in bs[3:]]
    assert got == want
    e2.close()


def test_checkpoint_of_other_model_names_mismatches(tmp_path):
    e = jds.initialize(model=make_model(), config=cfg())
    e.save_checkpoint(tmp_path)
    e.close()
    other = jds.models.build("llama-tiny", **{**TINY, "hidden_size": 48})
    e2 = jds.initialize(model=other, config=cfg())
    with pytest.raises(ValueError, match="does not match"):
        e2.load_checkpoint(tmp_path)


def _computations(hlo):
    """{computation header: body text} of an HLO module's text."""
    blocks = [b for b in hlo.split("\n\n") if "{" in b]
    return {b.strip().split("\n")[0]: b for b in blocks}


def test_data_parallel_gradients_are_reduced_once_per_step_not_per_micro_batch():
    e = jds.initialize(model=make_model(), config=cfg(gradient_accumulation_steps=2))
    hlo = e.lower_train_step(SEQ).compile().as_text()
    with_reduce = [h for h, body in _computations(hlo).items() if "all-reduce(" in body]
    # every all-reduce sits in the entry computation: none inside the micro-batch (or layer)
    # loop bodies, so communication does not grow with gradient_accumulation_steps
    assert with_reduce and all(h.startswith("ENTRY") for h in with_reduce), with_reduce
    assert "all-gather" not in hlo  # parameters are replicated under plain data parallelism
    for leaf in jax.tree.leaves(e.state.params):
        assert leaf.addressable_shards[0].data.shape == leaf.shape


@pytest.mark.parametrize("mesh", [{"data": 4, "tensor": 2}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_accumulation_under_tensor_parallel_mesh_matches_single_device(mesh):
    config = cfg(gradient_accumulation_steps=2, mesh=mesh)
    e, outs = run(config, steps=3)
    e1, outs1 = run(cfg(gradient_accumulation_steps=2), devices=jax.devices()[:1], steps=3)
    np.testing.assert_allclose([o["loss"] for o in outs], [o["loss"] for o in outs1], rtol=1e-5)
    np.testing.assert_allclose(flat(e.state.params), flat(e1.state.params), rtol=1e-5,
                               atol=1e-6)
