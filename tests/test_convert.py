"""``jds convert`` directions end to end: HF <-> Orbax, Orbax -> safetensors, DeepSpeed -> Orbax.

- HF -> Orbax writes a weights-only checkpoint whose arrays equal ``from_pretrained``'s, and
  ``engine.load_checkpoint`` trains from it;
- Orbax (a real training checkpoint, ZeRO-3 on 8 devices, mixed precision) -> HF loads in
  ``transformers`` with the same logits as jds;
- Orbax -> one safetensors file in jds and HF names, fp32 and bf16;
- DeepSpeed ZeRO-1/2/3 (real checkpoints saved after 6 steps) -> Orbax with the optimizer
  state: jds continues with DeepSpeed's own next 6 losses.
"""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

import jds
from jds.checkpoint import write_integrity
from jds.checkpoint.convert.api import (
    deepspeed_to_orbax,
    hf_to_orbax,
    orbax_to_hf,
    orbax_to_safetensors,
)
from jds.checkpoint.convert.orbax_reader import OrbaxCheckpoint

FIXTURES = Path(__file__).parent / "fixtures"
HF_MODEL = FIXTURES / "ds_reference" / "model"
DS_CKPTS = FIXTURES / "ds_checkpoints"
BATCHES = np.load(FIXTURES / "ds_reference" / "batches.npy")
# jds vs DeepSpeed per-step loss, as in test_deepspeed_equivalence.py
LOSS_ATOL = 1e-4


def pure(model):
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def assert_trees_equal(a, b):
    la, lb = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    for (p, x), (_, y) in zip(la, lb, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=str(p))


def test_hf_to_orbax_equals_from_pretrained_and_trains(tmp_path):
    step_dir = hf_to_orbax(HF_MODEL, tmp_path / "ck")
    assert step_dir == tmp_path / "ck" / "0"
    ck = OrbaxCheckpoint(tmp_path / "ck")
    assert ck.meta["kind"] == "weights" and ck.model_config().hidden_size == 64
    want = pure(jds.models.from_pretrained(HF_MODEL))
    flat = jax.tree_util.tree_flatten_with_path(want)[0]
    for path, value in flat:
        keys = tuple(k.key for k in path)
        np.testing.assert_array_equal(ck.read(("params", *keys)), np.asarray(value))
    # stacked layers are stored one slice per chunk: a layer is read alone (bounded memory)
    wq = ("params", "layers", "wq")
    assert ck._open_sliced(wq) is not None
    np.testing.assert_array_equal(ck.read_layer(wq, 1), np.asarray(want["layers"]["wq"])[1])

    cfg = json.loads((FIXTURES / "ds_reference" / "ds_config_zero3.json").read_text())
    cfg.update(gradient_accumulation_steps=1, train_micro_batch_size_per_gpu=1)
    engine = jds.initialize(model=jds.models.from_pretrained(HF_MODEL), config=cfg)
    direct = [engine.train_batch({"input_ids": b})["loss"] for b in BATCHES[:2]]
    engine.close()
    other = jds.models.build("llama-tiny", seed=7, **{
        k: getattr(ck.model_config(), k) for k in (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
            "head_dim", "rms_norm_eps", "rope_theta")})
    e2 = jds.initialize(model=other, config=cfg)
    assert e2.load_checkpoint(tmp_path / "ck") == {}
    assert int(e2.state.step) == 0
    got = [e2.train_batch({"input_ids": b})["loss"] for b in BATCHES[:2]]
    np.testing.assert_allclose(got, direct, rtol=1e-6)
    e2.close()


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory):
    """A bf16 ZeRO-3 run of the fixture model on 8 devices, saved after 2 steps."""
    path = tmp_path_factory.mktemp("trained")
    cfg = json.loads((FIXTURES / "ds_reference" / "ds_config_zero3.json").read_text())
    cfg["bf16"] = {"enabled": True}
    cfg.update(gradient_accumulation_steps=1, train_micro_batch_size_per_gpu=1)
    engine = jds.initialize(model=jds.models.from_pretrained(HF_MODEL), config=cfg)
    for b in BATCHES[:2]:
        engine.train_batch({"input_ids": b})
    engine.save_checkpoint(path)
    engine.wait_for_checkpoints()
    model = engine.model  # fp32 master weights
    engine.close()
    return path, model


def test_orbax_to_hf_loads_in_transformers_with_the_same_logits(trained_checkpoint, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path, model = trained_checkpoint
    ck = OrbaxCheckpoint(path)
    assert ck.weights_key == "master"
    orbax_to_hf(path, tmp_path / "hf", max_shard_bytes=100_000)
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        tmp_path / "hf", dtype=torch.float32, attn_implementation="eager")
    ids = BATCHES[0, :2]
    with torch.no_grad():
        want = hf(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    got = np.asarray(model(ids))
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    # and the round trip back into jds gives the checkpoint's weights exactly
    assert_trees_equal(pure(jds.models.from_pretrained(tmp_path / "hf")), pure(model))


@pytest.mark.parametrize("names,dtype", [("jds", "float32"), ("hf", "bfloat16")])
def test_orbax_to_one_safetensors_file(trained_checkpoint, tmp_path, names, dtype):
    from safetensors.numpy import load_file

    path, model = trained_checkpoint
    out = orbax_to_safetensors(path, tmp_path / "model.safetensors", names=names, dtype=dtype)
    tensors = load_file(out)
    params = pure(model)
    if names == "jds":
        flat = jax.tree_util.tree_flatten_with_path(params)[0]
        assert sorted(tensors) == sorted(".".join(k.key for k in p) for p, _ in flat)
        for p, value in flat:
            np.testing.assert_array_equal(tensors[".".join(k.key for k in p)], np.asarray(value))
    else:
        import ml_dtypes

        wq = np.asarray(params["layers"]["wq"][1])  # [D, N, H]
        q = tensors["model.layers.1.self_attn.q_proj.weight"]
        assert q.dtype == ml_dtypes.bfloat16 and q.shape == (64, 64)
        np.testing.assert_array_equal(q, wq.reshape(64, -1).T.astype(ml_dtypes.bfloat16))
        assert len(tensors) == 2 * 9 + 3
    with pytest.raises(FileExistsError):
        orbax_to_safetensors(path, out)


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_deepspeed_checkpoint_continues_with_deepspeeds_next_losses(stage, tmp_path):
    info = json.loads((DS_CKPTS / f"zero{stage}" / "info.json").read_text())
    cfg = json.loads((FIXTURES / "ds_reference" / f"ds_config_zero{stage}.json").read_text())
    cfg["mesh"] = {"data": 2}
    deepspeed_to_orbax(DS_CKPTS / f"zero{stage}", tmp_path / "ck", model=HF_MODEL,
                       optimizer=True, config=cfg)
    ck = OrbaxCheckpoint(tmp_path / "ck")
    assert ck.meta["source"]["zero_stage"] == stage and ck.meta["kind"] == "train_state"

    engine = jds.initialize(model=jds.models.from_pretrained(HF_MODEL), config=cfg,
                            devices=jax.devices()[:2])
    engine.load_checkpoint(tmp_path / "ck")
    assert int(engine.state.step) == info["step"] == 6
    losses = [float(engine.train_batch({"input_ids": b})["loss"]) for b in BATCHES[6:12]]
    np.testing.assert_allclose(losses, info["losses_after_save"]["values"], atol=LOSS_ATOL)
    engine.close()


def test_deepspeed_weights_only_equal_zero_to_fp32(tmp_path):
    from jds.checkpoint.convert.deepspeed import DeepSpeedCheckpoint

    deepspeed_to_orbax(DS_CKPTS / "zero3", tmp_path / "ck", model=HF_MODEL)
    ck = OrbaxCheckpoint(tmp_path / "ck")
    assert ck.meta["kind"] == "weights" and sorted({p[0] for p in ck.arrays}) == ["params"]
    ds = DeepSpeedCheckpoint(DS_CKPTS / "zero3")
    q1 = ds.fp32("model.layers.1.self_attn.q_proj.weight")  # [N*H, D]
    np.testing.assert_array_equal(ck.read(("params", "layers", "wq"))[1],
                                  q1.T.reshape(64, 4, 16))
    np.testing.assert_array_equal(ck.read(("params", "lm_head")),
                                  ds.fp32("lm_head.weight").T)


def test_conversion_errors_name_the_problem(tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("")
    with pytest.raises(FileExistsError, match="not empty"):
        hf_to_orbax(HF_MODEL, tmp_path / "taken")
    gpt2 = tmp_path / "gpt2-config"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({
        "architectures": ["GPT2LMHeadModel"], "vocab_size": 256, "n_positions": 64,
        "n_embd": 64, "n_layer": 2, "n_head": 4}))
    with pytest.raises(ValueError, match="does not hold this model's tensors") as err:
        deepspeed_to_orbax(DS_CKPTS / "zero1", tmp_path / "out", model=gpt2)
    assert "model.layers.0.self_attn.q_proj.weight" in str(err.value)
    with pytest.raises(ValueError, match="no model config"):
        ck = tmp_path / "old"
        e = jds.initialize(model=jds.models.from_pretrained(HF_MODEL),
                           config={"train_batch_size": 8})
        e.save_checkpoint(ck)
        e.close()
        meta = ck / "0" / "meta" / "metadata"
        m = json.loads(meta.read_text())
        del m["model"]
        meta.write_text(json.dumps(m))
        write_integrity(ck / "0")
        orbax_to_hf(ck, tmp_path / "hf-out")


def test_cli_convert_every_direction_documented_and_runs(tmp_path, capsys, caplog):
    import logging

    from jds.cli import build_parser, main

    helptext = build_parser()._subparsers._group_actions[0].choices["convert"].format_help()
    for direction in ("hf-to-orbax", "orbax-to-hf", "orbax-to-safetensors",
                      "deepspeed-to-orbax"):
        assert direction in helptext
    assert main(["convert", "deepspeed-to-orbax", str(DS_CKPTS / "zero1"), str(tmp_path / "a"),
                 "--model", str(HF_MODEL)]) == 0
    with caplog.at_level(logging.WARNING):
        assert main(["convert", "orbax-to-hf", str(tmp_path / "a"), str(tmp_path / "hf")]) == 0
    # a correct conversion is silent (Orbax used to warn of a missing _CHECKPOINT_METADATA)
    assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    out = capsys.readouterr().out
    assert "peak RSS" in out and "wrote" in out
    assert pure(jds.models.from_pretrained(tmp_path / "hf"))["layers"]["wq"].shape == (2, 64, 4, 16)
    assert main(["convert", "deepspeed-to-orbax", str(DS_CKPTS / "zero1"),
                 str(tmp_path / "b")]) == 2
    assert "needs --model" in capsys.readouterr().err


def test_jds_train_resumes_a_converted_deepspeed_run(tmp_path):
    from jds.cli import main

    cfg = json.loads((FIXTURES / "ds_reference" / "ds_config_zero2.json").read_text())
    del cfg["train_micro_batch_size_per_gpu"]
    cfg.update(gradient_accumulation_steps=1, steps_per_print=1,
               train={"seq_len": 32, "eval_batches": 1, "sample_tokens": 4})
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    run = tmp_path / "run"
    assert main(["convert", "deepspeed-to-orbax", str(DS_CKPTS / "zero2"),
                 str(run / "checkpoints"), "--model", str(HF_MODEL), "--optimizer",
                 "--config", str(tmp_path / "cfg.json")]) == 0
    assert main(["train", "--config", str(tmp_path / "cfg.json"), "--model", str(HF_MODEL),
                 "--out", str(run), "--resume", "--steps", "8", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [7, 8]  # continued from step 6
    assert sorted(int(p.name) for p in (run / "checkpoints").iterdir()) == [6, 8]
    # the run folder itself is a source for orbax-to-hf (its newest step, 8)
    assert main(["convert", "orbax-to-hf", str(run), str(tmp_path / "hf")]) == 0
    assert (tmp_path / "hf" / "config.json").is_file()
