"""LoRA / QLoRA (``jds.lora``) and Progressive Layer Dropping (``jds.models.layer_drop``).

LoRA runs on 8 simulated devices under ZeRO-3 + tensor parallelism with the single-device
run's losses; the frozen base comes out bit-identical and holds no optimizer state; a user's
``nnx.Linear`` model trains its adapters too; an exported PEFT folder loads onto the
``transformers`` model with jds's logits; QLoRA's int8 forward equals the dequantized
reference. PLD's schedule equals DeepSpeed's step for step, theta = 1 equals the run
without PLD, and dropped layers are skipped by a conditional in the compiled step.
"""

from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import jds
import jds.models as M
from jds import lora
from jds.config import ConfigError
from jds.inference.engine import load_model
from jds.models.layer_drop import keep_probabilities, pld_theta

SMALL = M.LlamaConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
IDS = jnp.array([[1, 5, 9, 3, 7, 2, 8, 4]], jnp.int32)
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@functools.cache
def _base():
    return M.Llama(SMALL, rngs=nnx.Rngs(0))


def _llama():
    """A fresh copy of one tiny Llama (built once: eager initialisation is slow)."""
    return nnx.merge(*nnx.split(_base()))


@nnx.jit
def fwd(model):
    """The model's logits on ``IDS``, compiled once per model structure (eager forwards
    would compile every op)."""
    return model(IDS)


def _randomize_adapters(model, seed=0, std=0.1):
    rng = np.random.default_rng(seed)
    for _, v in nnx.iter_graph(model):
        if isinstance(v, nnx.LoRAParam):
            v[...] = jnp.asarray(std * rng.standard_normal(v[...].shape), v[...].dtype)


def _copy(model):
    return nnx.merge(*nnx.split(model))


def test_apply_starts_at_the_base_and_merge_folds_adapters():
    model = _llama()
    ref = fwd(model)
    lora.apply(model, r=4, alpha=8, target_modules=["q_proj", "o_proj", "down_proj"])
    assert lora.adapter_targets(model) == ["layers.wq", "layers.wo", "layers.w_down"]
    assert model.layers.wq_lora_a[...].shape == (2, 64, 4)
    assert model.layers.wo_lora_a[...].shape == (2, 4, 16, 4)  # input dims of wo: heads x dim
    np.testing.assert_array_equal(fwd(model), ref)  # B = 0: the base model at step 0
    _randomize_adapters(model)
    adapted = fwd(model)
    assert float(jnp.abs(adapted - ref).max()) > 1e-2
    merged = lora.merge(_copy(model))
    assert not lora.is_adapted(merged) and not hasattr(merged.layers, "wq_lora_a")
    np.testing.assert_allclose(fwd(merged), adapted, atol=2e-5)

    pissa = lora.apply(_llama(), r=4, alpha=8, init="pissa")
    assert float(jnp.abs(pissa.layers.wq_lora_b[...]).max()) > 0  # principal components
    np.testing.assert_allclose(fwd(pissa), ref, atol=2e-5)  # base = residual: same output
    np.testing.assert_array_equal(fwd(_base()), ref)  # the copy's source is not changed


def test_targets_regex_and_errors():
    model = _llama()
    lora.apply(model, r=2, target_modules=r"model\.layers\.\d+\.(self_attn\.q_proj|mlp\.up_proj)")
    assert lora.adapter_targets(model) == ["layers.wq", "layers.w_up"]
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        lora.apply(model, r=2)
    with pytest.raises(ValueError, match="in some layers only"):
        lora.apply(_llama(), target_modules=r"model\.layers\.0\..*")
    with pytest.raises(ValueError, match="selects no linear layer"):
        lora.apply(_llama(), target_modules=["c_fc"])
    with pytest.raises(ConfigError, match="lora: .*selects no linear layer"):
        jds.initialize(_llama(),
                       {"train_batch_size": 8, "lora": {"enabled": True,
                                                        "target_modules": ["nope"]}},
                       devices=jax.devices()[:1])
    with pytest.raises(ConfigError, match="lora.init"):
        jds.config.Config.load({"lora": {"init": "svd"}})


def _lm_cfg(mesh, stage, **extra):
    dp = mesh.get("data", 1) * mesh.get("fsdp", 1)
    return {"train_batch_size": 8, "train_micro_batch_size_per_gpu": 4 // dp or 1,
            "gradient_accumulation_steps": 2 if dp <= 4 else 1,
            "zero_optimization": {"stage": stage}, "mesh": mesh, "bf16": {"enabled": False},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}}, **extra}


def _lm_run(model_fn, config, steps=3):
    n = int(np.prod(list(config["mesh"].values())))
    engine = jds.initialize(model_fn(), config, devices=jax.devices()[:n])
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(0, 96, (8, 16)).astype(np.int32)}
    return engine, [engine.train_batch(batch)["loss"] for _ in range(steps)]


def _nbytes_on(tree, device):
    return sum(s.data.nbytes for x in jax.tree.leaves(tree) for s in x.addressable_shards
               if s.device == device)


def test_lora_under_zero3_and_tensor_parallel_equals_one_device():
    section = {"lora": {"enabled": True, "r": 4, "alpha": 8, "dropout": 0.1,
                        "target_modules": ALL}}
    base = _llama()
    frozen0 = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(base, nnx.Param)))
    one, l1 = _lm_run(lambda: base, _lm_cfg({"data": 1}, 0, **section))
    eight, l8 = _lm_run(lambda: base, _lm_cfg({"fsdp": 4, "tensor": 2}, 3, **section))
    np.testing.assert_allclose(l8, l1, rtol=2e-5)
    assert l1[-1] < l1[0]

    # only the adapters train: optimizer state and masters for them alone ...
    s = eight.state
    adapter_elems = sum(x.size for x in jax.tree.leaves(s.params))
    assert set(s.params["layers"]) == {f"{w}_lora_{ab}" for w in
                                       ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
                                       for ab in "ab"}
    opt = [x for x in jax.tree.leaves(s.opt_state) if x.ndim]
    assert sum(x.size for x in opt) == 2 * adapter_elems  # Adam's m and v
    dev = jax.devices()[0]
    # ZeRO-3 splits them over fsdp (4); tensor (2) splits those the rules split
    assert _nbytes_on(s.opt_state, dev) <= 2 * 4 * adapter_elems / 4 + 1024
    # ... adapters split as the matrix they adapt (B of wq: heads over tensor) ...
    assert "tensor" in str(s.params["layers"]["wq_lora_b"].sharding.spec)
    # ... and the base comes out bit-identical (frozen)
    for engine in (one, eight):
        trained = nnx.to_pure_dict(nnx.state(engine.model, nnx.Param))
        for path, want in jax.tree_util.tree_leaves_with_path(frozen0):
            got = trained
            for k in path:
                got = got[k.key]
            np.testing.assert_array_equal(np.asarray(got), want)


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.fc1 = nnx.Linear(12, 32, rngs=rngs)
        self.fc2 = nnx.Linear(32, 4, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.relu(self.fc1(x)))


def _mse(model, batch):
    return jnp.mean((model(batch["x"]) - batch["y"]) ** 2)


def test_lora_on_a_users_linear_model():
    rng = np.random.default_rng(0)
    batch = {"x": rng.standard_normal((16, 12)).astype(np.float32),
             "y": rng.standard_normal((16, 4)).astype(np.float32)}
    cfg = {"train_batch_size": 16, "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
           "lora": {"enabled": True, "r": 2, "alpha": 4, "target_modules": ["fc1"]}}
    losses = {}
    for stage, n in ((0, 1), (2, 8)):
        engine = jds.initialize(MLP(nnx.Rngs(0)), {**cfg, "zero_optimization": {"stage": stage}},
                                loss_fn=_mse, devices=jax.devices()[:n])
        losses[n] = [engine.train_batch(batch)["loss"] for _ in range(4)]
        assert set(engine.state.params) == {"fc1"}
        assert set(engine.state.params["fc1"]) == {"lora_a", "lora_b"}
    np.testing.assert_allclose(losses[8], losses[1], rtol=1e-5)
    assert losses[1][-1] < losses[1][0]
    trained = engine.model
    assert isinstance(trained.fc1, lora.LoRALinear)
    np.testing.assert_array_equal(trained.fc1.base.kernel[...], MLP(nnx.Rngs(0)).fc1.kernel[...])
    merged = lora.merge(_copy(trained))
    assert type(merged.fc1) is nnx.Linear
    np.testing.assert_allclose(merged(batch["x"]), trained(batch["x"]), atol=1e-5)


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_qlora_forward_equals_dequantized_reference(kind):
    model = lora.apply(_llama(), r=4, alpha=8, quantize_base=kind)
    layers = model.layers
    if kind == "int8":
        assert layers.w_up[...].dtype == jnp.int8 and layers.w_up_qscale[...].dtype == jnp.float32
        assert layers.wq_qscale[...].shape == (2, 4, 16)  # per output channel of [D, N, H]
    else:
        assert layers.w_up[...].dtype == jnp.uint8 and layers.w_up[...].shape == (2, 32, 128)
        assert layers.w_up_nf4_absmax[...].dtype == jnp.int8  # double-quantized constants
    _randomize_adapters(model)
    reference = lora.merge(_copy(model))  # dequantized base + adapter, in fp32
    np.testing.assert_allclose(fwd(model), fwd(reference), atol=2e-5)


def test_nf4_quantizer():
    from jds.kernels.quant.nf4 import NF4_LEVELS, dequantize_nf4, quantize_nf4

    rng = np.random.default_rng(0)
    w = (0.02 * rng.standard_normal((256, 3, 8))).astype(np.float32)
    q = quantize_nf4(jnp.asarray(w), 1)
    assert q.codes.shape == (128, 3, 8) and q.absmax_q.shape == (4, 3, 8)
    codes = np.stack([np.asarray(q.codes) >> 4, np.asarray(q.codes) & 15], 1).reshape(256, 3, 8)
    absmax = np.abs(w.reshape(4, 64, 3, 8)).max(1)
    dq = np.asarray(q.absmax_q, np.float32) * np.asarray(q.absmax_scale) + np.asarray(
        q.absmax_mean)
    assert np.abs(dq - absmax).max() <= np.asarray(q.absmax_scale).max() / 2 + 1e-9
    x = (w.reshape(4, 64, 3, 8) / absmax[:, None]).reshape(256, 3, 8)
    nearest = np.abs(x[..., None] - NF4_LEVELS).argmin(-1)  # the paper's rounding
    assert (np.abs(x - NF4_LEVELS[codes]) <= np.abs(x - NF4_LEVELS[nearest]) + 1e-6).all()
    want = (NF4_LEVELS[codes].reshape(4, 64, 3, 8) * dq[:, None]).reshape(w.shape)
    np.testing.assert_allclose(dequantize_nf4(q), want, rtol=1e-6, atol=1e-9)
    bits = 8 * sum(np.asarray(a).nbytes for a in (q.codes, q.absmax_q, q.absmax_scale,
                                                   q.absmax_mean)) / w.size
    assert bits == 4 + 8 / 64 + 64 / 256  # codes, int8 constants, per-column (scale, mean)


@pytest.mark.slow
def test_qlora_int8_trains_under_zero3():
    section = {"lora": {"enabled": True, "r": 4, "alpha": 8, "quantize_base": "int8"}}
    one, l1 = _lm_run(lambda: _llama(), _lm_cfg({"data": 1}, 0,
                                                                        **section))
    eight, l8 = _lm_run(lambda: _llama(),
                        _lm_cfg({"fsdp": 8}, 3, **section))
    np.testing.assert_allclose(l8, l1, rtol=2e-5)
    assert l1[-1] < l1[0]
    frozen = eight.state.frozen["layers"]
    assert frozen["w_up"].dtype == jnp.int8
    per_device = _nbytes_on(frozen["w_up"], jax.devices()[0])
    assert per_device == frozen["w_up"].size // 8  # 1 byte per base parameter, ZeRO-3 split


def test_peft_adapter_round_trip(tmp_path):
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from jds.checkpoint.convert.hf import read_from_model, save_hf

    model = _llama()
    save_hf(SMALL, read_from_model(model), tmp_path / "base")
    lora.apply(model, r=4, alpha=16, target_modules=ALL)
    _randomize_adapters(model)
    lora.save_peft(model, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "base"))
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32,
                                                 attn_implementation="eager")
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter")
    with torch.no_grad():
        want = peft_model(torch.tensor(np.asarray(IDS))).logits.numpy()
    np.testing.assert_allclose(np.asarray(fwd(model)), want, atol=1e-4)

    back = lora.load_peft(M.from_pretrained(tmp_path / "base"), tmp_path / "adapter")
    np.testing.assert_allclose(fwd(back), fwd(model), atol=1e-6)
    served = load_model(str(tmp_path / "base"), adapter=tmp_path / "adapter")  # jds serve --lora
    assert not lora.is_adapted(served)  # merged at load
    np.testing.assert_allclose(fwd(served), fwd(model), atol=2e-5)
    with pytest.raises(ValueError, match="no place for, e.g. base_model.model.model.layers"):
        _mismatched(tmp_path)

    # GPT-2: Hugging Face fuses q, k, v into one Conv1D c_attn; jds adapts them apart
    g2 = M.GPT2Config(vocab_size=96, n_positions=32, n_embd=64, n_layer=2, n_head=4,
                      n_inner=128)
    gpt2 = M.GPT2(g2, rngs=nnx.Rngs(0))
    save_hf(g2, read_from_model(gpt2), tmp_path / "g2")
    ours = lora.apply(_copy(gpt2), r=4, alpha=8, target_modules=["wq", "wv", "c_fc"])
    _randomize_adapters(ours)
    lora.save_peft(ours, tmp_path / "g2-ours")  # one c_attn of rank 3r, B block-diagonal
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "g2", dtype=torch.float32,
                                                 attn_implementation="eager")
    with torch.no_grad():
        want = peft.PeftModel.from_pretrained(hf, tmp_path / "g2-ours")(
            torch.tensor(np.asarray(IDS))).logits.numpy()
    np.testing.assert_allclose(np.asarray(fwd(ours)), want, atol=1e-4)
    theirs = peft.get_peft_model(
        tf.AutoModelForCausalLM.from_pretrained(tmp_path / "g2", dtype=torch.float32,
                                                attn_implementation="eager"),
        peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn"], init_lora_weights=False))
    theirs.save_pretrained(tmp_path / "g2-theirs")  # one A shared by q, k and v
    with torch.no_grad():
        want = theirs(torch.tensor(np.asarray(IDS))).logits.numpy()
    back = lora.load_peft(M.from_pretrained(tmp_path / "g2"), tmp_path / "g2-theirs")
    np.testing.assert_allclose(np.asarray(fwd(back)), want, atol=1e-4)


def _mismatched(tmp_path):
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "v_proj", "gate_proj"]  # not what the file holds
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "adapter_config.json").write_text(json.dumps(cfg))
    (tmp_path / "bad" / "adapter_model.safetensors").write_bytes(
        (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes())
    lora.load_peft(M.from_pretrained(tmp_path / "base"), tmp_path / "bad")


@pytest.mark.parametrize("kind", ["int8", pytest.param("nf4", marks=pytest.mark.slow)])
def test_lora_checkpoint_converts_merged_and_serves(tmp_path, kind):
    from jds.checkpoint.convert.api import orbax_to_hf

    section = {"lora": {"enabled": True, "r": 4, "alpha": 8, "quantize_base": kind,
                        "target_modules": ["q_proj", "o_proj", "up_proj"]}}
    engine, losses = _lm_run(lambda: _llama(), _lm_cfg({"fsdp": 8}, 3, **section), steps=2)
    assert losses[1] < losses[0]
    if kind == "int8":  # the frozen base: 1 byte per parameter, split by ZeRO-3
        w_up = engine.state.frozen["layers"]["w_up"]
        assert w_up.dtype == jnp.int8 and _nbytes_on(w_up, jax.devices()[0]) == w_up.size // 8
    engine.save_checkpoint(tmp_path / "ckpt")
    engine.wait_for_checkpoints()
    want = fwd(lora.merge(_copy(engine.model)))
    with pytest.raises(ValueError, match="--merge-lora"):
        orbax_to_hf(tmp_path / "ckpt", tmp_path / "plain")
    orbax_to_hf(tmp_path / "ckpt", tmp_path / "hf", merge_lora=True)
    np.testing.assert_allclose(fwd(M.from_pretrained(tmp_path / "hf")), want, atol=1e-4)
    np.testing.assert_allclose(fwd(load_model(str(tmp_path / "ckpt"))), want, atol=1e-4)


def test_cli_lora_finetune_of_an_hf_folder_under_zero3_exports_a_peft_adapter(tmp_path):
    """Issue 22's "done when": jds train --lora on an HF Llama folder, 8 devices, ZeRO-3;
    peft loads the adapter it wrote with the logits of the trained run, which jds serves."""
    torch = pytest.importorskip("torch")
    tf = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    from jds.checkpoint.convert.hf import read_from_model, save_hf
    from jds.cli import main

    base = M.build("llama-tiny")  # byte vocabulary: jds train's embedded corpus fits it
    save_hf(base.config, read_from_model(base), tmp_path / "hf")
    cfg = {"train_batch_size": 8, "zero_optimization": {"stage": 3}, "bf16": {"enabled": False},
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-2}},
           "train": {"steps": 2, "seq_len": 32, "eval_interval": 0, "eval_batches": 1,
                     "sample_tokens": 4}}
    (tmp_path / "ds.json").write_text(json.dumps(cfg))
    out = tmp_path / "run"
    assert main(["train", "--config", str(tmp_path / "ds.json"), "--model", str(tmp_path / "hf"),
                 "--lora", "r=4,alpha=8,target=q_proj|v_proj|down_proj", "--out", str(out),
                 "--no-progress"]) == 0
    adapter = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter["target_modules"] == ["down_proj", "q_proj", "v_proj"] and adapter["r"] == 4
    hf = tf.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32,
                                                 attn_implementation="eager")
    ids = np.asarray(IDS)
    with torch.no_grad():
        want = peft.PeftModel.from_pretrained(hf, out / "adapter")(torch.tensor(ids)).logits
    served = load_model(str(out))  # the run folder, adapters merged (jds serve RUN)
    np.testing.assert_allclose(np.asarray(fwd(served)), want.numpy(), atol=1e-4)
    assert float(np.abs(np.asarray(fwd(served)) - np.asarray(fwd(base))).max()) > 1e-3


def test_lora_flag():
    assert lora.parse_lora_flag("r=16,alpha=32,target=q_proj|v_proj,quantize=int8") == {
        "enabled": True, "r": 16, "alpha": 32.0, "target_modules": ["q_proj", "v_proj"],
        "quantize_base": "int8"}
    assert lora.parse_lora_flag(r"target=re:.*\.q_proj,rslora=true")["target_modules"] == (
        r".*\.q_proj")
    with pytest.raises(ValueError, match="--lora 'rank=4'"):
        lora.parse_lora_flag("rank=4")


FIXTURES = Path(__file__).parent / "fixtures"


def test_pld_schedule_equals_deepspeed_step_for_step():
    """Against DeepSpeed's own ProgressiveLayerDrop (0.16.0; gone from 0.19), driven as its
    engine drives it (scripts/make_pld_table.py writes the fixture)."""
    table = json.loads((FIXTURES / "ds_pld_schedule.json").read_text())
    assert len(table["cases"]) >= 4
    for case in table["cases"]:
        got = [float(pld_theta(t, case["theta"], case["gamma"]))
               for t in range(len(case["pld_theta"]))]
        np.testing.assert_allclose(got, case["pld_theta"], rtol=1e-6)
    p = np.asarray(keep_probabilities(jnp.float32(0.5), 4))
    np.testing.assert_allclose(p, [1 - 1 / 4 * 0.5, 1 - 2 / 4 * 0.5, 1 - 3 / 4 * 0.5, 0.5])


@pytest.mark.slow
def test_pld_under_zero3_and_tensor_parallel_equals_one_device():
    on = {"progressive_layer_drop": {"enabled": True, "theta": 0.2, "gamma": 1.0}}
    _, l1 = _lm_run(lambda: _llama(), {**_lm_cfg({"data": 1}, 0), **on}, steps=3)
    _, l8 = _lm_run(lambda: _llama(), _lm_cfg({"fsdp": 4, "tensor": 2}, 3, **on), steps=3)
    np.testing.assert_allclose(l8, l1, rtol=2e-5)


def test_pld_theta_one_is_the_plain_run():
    plain = _lm_cfg({"data": 1}, 0)
    _, base = _lm_run(lambda: _llama(), plain, steps=3)
    off = {"progressive_layer_drop": {"enabled": True, "theta": 1.0, "gamma": 0.5}}
    _, same = _lm_run(lambda: _llama(), {**plain, **off}, steps=3)
    np.testing.assert_allclose(same, base, rtol=1e-6)

    on = {"progressive_layer_drop": {"enabled": True, "theta": 0.2, "gamma": 1.0}}
    one, l1 = _lm_run(lambda: _llama(), {**plain, **on}, steps=3)
    np.testing.assert_allclose(l1[:2], base[:2], rtol=1e-6)  # theta_t = 1 for steps 0 and 1
    assert not np.allclose(l1[2:], base[2:])
    hlo = one.lower_train_step(16).compile().as_text()
    assert "conditional" in hlo  # a dropped layer is skipped, not computed and discarded

    # evaluation runs every layer, unscaled: the model without PLD gives the same loss
    ids = np.random.default_rng(1).integers(0, 96, (8, 16)).astype(np.int32)
    plain_model = _copy(one.model)
    del plain_model.layer_drop

    @nnx.jit
    def loss(model):
        logits = model(jnp.asarray(ids))[:, :-1].astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits, ids[:, 1:]).mean()

    assert one.eval_batch({"input_ids": ids})["loss"] == pytest.approx(
        float(loss(plain_model)), rel=1e-5)
    with pytest.raises(ConfigError, match="progressive_layer_drop"):
        jds.initialize(MLP(nnx.Rngs(0)), {"train_batch_size": 8, **on}, loss_fn=_mse,
                       devices=jax.devices()[:1])
    assert math.isclose(float(pld_theta(1, 0.2, 1.0)), 1.0)
