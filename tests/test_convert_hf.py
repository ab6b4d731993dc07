"""Exporting jds models as Hugging Face checkpoints (``jds.checkpoint.convert.hf``).

Random tiny jds models (every parameter perturbed, so biases and norm scales are not at their
trivial init) are saved with ``save_hf`` and loaded by ``transformers`` (torch, fp32, eager
attention: logits must match jds's) and by ``jds.models.from_pretrained`` (the params must
come back bit for bit). A tiny Llama 3 folder (token ids, ``use_cache``, a generation config,
a tokenizer) goes ``hf-to-orbax`` then ``orbax-to-hf`` and comes back as it went in.
"""

from __future__ import annotations

import dataclasses
import json

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")
st_numpy = pytest.importorskip("safetensors.numpy")

import jds.models as M  # noqa: E402
from jds.checkpoint.convert.hf import (  # noqa: E402
    hf_config,
    hf_tensor_plan,
    read_from_model,
    save_hf,
)

ATOL = 1e-4
V = 97  # deliberately not a power of two
SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
LLAMA3 = M.RopeScaling("llama3", 8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                       original_max_position_embeddings=16)
CASES = {
    # name: (jds config, architecture override, expected HF class)
    "llama-gqa-untied-llama3-rope": (
        M.LlamaConfig(**SMALL, rope_theta=5000.0, rope_scaling=LLAMA3, head_dim=16),
        None, "LlamaForCausalLM"),
    "llama-tied-linear-rope": (
        M.LlamaConfig(**SMALL, tie_word_embeddings=True,
                      rope_scaling=M.RopeScaling("linear", 2.0)),
        None, "LlamaForCausalLM"),
    "llama-all-biases-head-dim": (
        M.LlamaConfig(**SMALL, attention_bias=True, attention_out_bias=True, mlp_bias=True,
                      head_dim=8),
        None, "LlamaForCausalLM"),
    "qwen2-bias": (
        M.LlamaConfig(**SMALL, attention_bias=True, rms_norm_eps=1e-6, rope_theta=1e6),
        None, "Qwen2ForCausalLM"),
    "mistral": (M.LlamaConfig(**SMALL), "MistralForCausalLM", "MistralForCausalLM"),
    "gpt2": (
        M.GPT2Config(vocab_size=V, n_positions=32, n_embd=64, n_layer=2, n_head=4, n_inner=80),
        None, "GPT2LMHeadModel"),
}


def _random_model(config, seed=0):
    """A jds model with every parameter (biases, norms too) moved off its init.

    Built abstractly and filled from numpy (as ``from_pretrained`` does): no per-shape
    compilation of initialisers.
    """
    cls = M.model_class(config)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: cls(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)

    def fill(node):
        return {
            k: fill(v) if isinstance(v, dict) else jnp.asarray(
                float("norm" in k or "scale" in k) + 0.05 * rng.standard_normal(v.shape),
                jnp.float32)
            for k, v in node.items()
        }

    nnx.replace_by_pure_dict(state, fill(nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


def _params(model) -> dict:
    """``{path: array}`` of every parameter."""
    out = {}

    def walk(node, prefix):
        for k, v in node.items():
            if isinstance(v, dict):
                walk(v, (*prefix, k))
            else:
                out[(*prefix, k)] = np.asarray(v)

    walk(nnx.to_pure_dict(nnx.state(model, nnx.Param)), ())
    return out


def _same_but_head_dim(hf_dict, config):
    """``config_from_hf`` of transformers' re-serialised config: transformers 5 writes the
    resolved ``head_dim`` for Llama/Mistral, which is the same model as ``head_dim=None``."""
    back = M.config_from_hf(hf_dict)
    if isinstance(config, M.GPT2Config):
        return back == config
    return back.head_size == config.head_size and dataclasses.replace(
        back, head_dim=config.head_dim) == config


def _ids(vocab=V, T=12, B=2, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (B, T))


def _hf_load(path, **kw):
    model, info = tf.AutoModelForCausalLM.from_pretrained(
        path, attn_implementation="eager", output_loading_info=True, **kw)
    problems = {k: v for k, v in info.items() if v and k != "error_msgs"}
    assert not problems and not info.get("error_msgs"), problems
    return model.eval()


def _hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def _export(model, path, **kw):
    return save_hf(model.config, read_from_model(model), path, **kw)


@pytest.mark.parametrize("case", list(CASES))
def test_export_matches_transformers_and_round_trips(case, tmp_path):
    config, arch, expected_cls = CASES[case]
    model = _random_model(config)
    out = tmp_path / "hf"
    files = _export(model, out, architecture=arch)
    assert sorted(f.name for f in files) == ["config.json", "model.safetensors"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temp dir left behind

    hf = _hf_load(out, dtype=torch.float32)
    assert type(hf).__name__ == expected_cls
    # Exactly the tensors save_pretrained writes (tied lm_head omitted), in the same shapes.
    plan = hf_tensor_plan(config)
    with open(out / "model.safetensors", "rb") as fh:
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    assert header.pop("__metadata__") == {"format": "pt"}
    hf_state = hf.state_dict()
    if hf.config.tie_word_embeddings:
        hf_state.pop("lm_head.weight")
    assert {k: tuple(v.shape) for k, v in hf_state.items()} == {t.name: t.shape for t in plan}
    assert {k: tuple(v["shape"]) for k, v in header.items()} == {t.name: t.shape for t in plan}

    ids = _ids()
    got = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(_hf_logits(hf, ids), got, atol=ATOL, rtol=0)

    back = M.from_pretrained(out)
    assert back.config == config
    want, have = _params(model), _params(back)
    assert want.keys() == have.keys()
    for k in want:
        np.testing.assert_array_equal(have[k], want[k], err_msg=str(k))


def test_sharded_export_streams_one_shard_at_a_time(tmp_path):
    config = CASES["llama-gqa-untied-llama3-rope"][0]
    model = _random_model(config)
    base = read_from_model(model)
    out = tmp_path / "sharded"
    reads = []

    def read(path, layer):
        done = sorted(p.name for p in tmp_path.glob(".sharded.tmp-*/model-*.safetensors"))
        reads.append((path, layer, len(done)))
        return base(path, layer)

    max_bytes = 20_000
    files = save_hf(config, read, out, max_shard_bytes=max_bytes)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shard_files = sorted({*index["weight_map"].values()})
    n = len(shard_files)
    assert n > 2 and not (out / "model.safetensors").exists()
    assert shard_files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert sorted(f.name for f in files) == sorted(
        [*shard_files, "model.safetensors.index.json", "config.json"])
    plan = hf_tensor_plan(config)
    assert index["weight_map"].keys() == {t.name for t in plan}
    assert index["metadata"]["total_size"] == sum(4 * t.size for t in plan)
    for f in shard_files:
        tensors = st_numpy.load_file(out / f)
        assert {k for k, v in index["weight_map"].items() if v == f} == tensors.keys()
        size = sum(v.nbytes for v in tensors.values())
        assert size <= max_bytes or len(tensors) == 1, (f, size)

    # Streaming: a tensor of shard i is read after shards 0..i-1 are on disk, never before;
    # stacked parameters are read one layer at a time.
    shard_of = {t.name: shard_files.index(index["weight_map"][t.name]) for t in plan}
    per_source = {(s.path, s.layer): shard_of[t.name] for t in plan for s in t.sources}
    assert len(reads) == len(per_source)
    for path, layer, done in reads:
        assert done == per_source[(path, layer)], (path, layer)
        assert (layer is None) == (path[0] != "layers")

    hf = _hf_load(out, dtype=torch.float32)
    ids = _ids()
    np.testing.assert_allclose(
        _hf_logits(hf, ids), np.asarray(model(jnp.asarray(ids, jnp.int32))), atol=ATOL, rtol=0)
    back = M.from_pretrained(out)
    for k, v in _params(model).items():
        np.testing.assert_array_equal(_params(back)[k], v)


@pytest.mark.parametrize("dtype,torch_dtype,st_name", [
    ("bfloat16", "bfloat16", "BF16"), ("float16", "float16", "F16")])
def test_half_precision_export(dtype, torch_dtype, st_name, tmp_path):
    model = _random_model(CASES["qwen2-bias"][0])
    _export(model, tmp_path / "fp32")
    _export(model, tmp_path / "half", dtype=dtype)
    with open(tmp_path / "half" / "model.safetensors", "rb") as fh:
        header = json.loads(fh.read(int.from_bytes(fh.read(8), "little")))
    header.pop("__metadata__")
    assert {v["dtype"] for v in header.values()} == {st_name}
    assert json.loads((tmp_path / "half" / "config.json").read_text())["dtype"] == dtype

    tdt = getattr(torch, torch_dtype)
    half = _hf_load(tmp_path / "half", dtype=tdt)
    assert half.dtype == tdt
    ref = _hf_load(tmp_path / "fp32", dtype=torch.float32).state_dict()
    got = half.state_dict()
    assert got.keys() == ref.keys()
    for k in ref:  # exactly the round-to-nearest cast of the fp32 weights
        assert got[k].dtype == tdt, k
        assert torch.equal(got[k], ref[k].to(tdt)), k
    # jds reads the same bits back (bf16 through ml_dtypes, fp16 natively).
    back = M.from_pretrained(tmp_path / "half", param_dtype=getattr(jnp, dtype))
    np_dtype = {"bfloat16": ml_dtypes.bfloat16, "float16": np.float16}[dtype]
    wq = _params(model)[("layers", "wq")].astype(np_dtype)
    np.testing.assert_array_equal(_params(back)[("layers", "wq")], wq)


def test_refuses_non_empty_out_dir_and_cleans_up_on_failure(tmp_path):
    model = _random_model(CASES["gpt2"][0])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError, match="is not empty"):
        _export(model, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    empty = tmp_path / "empty"
    empty.mkdir()
    _export(model, empty)  # an existing empty directory is fine
    assert (empty / "model.safetensors").is_file()

    base, calls = read_from_model(model), []

    def failing(path, layer):
        calls.append(path)
        if len(calls) == 5:
            raise OSError("disk on fire")
        return base(path, layer)

    with pytest.raises(OSError, match="disk on fire"):
        save_hf(model.config, failing, tmp_path / "broken", max_shard_bytes=10_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty", "out"]


def test_wrong_parameter_shape_is_named(tmp_path):
    config = CASES["mistral"][0]
    base = read_from_model(_random_model(config))

    def read(path, layer):
        x = base(path, layer)
        return x[:, :1] if path == ("layers", "wk") else x

    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight: sources "
                                         r"layers/wk\[0\] \(64, 1, 16\)"):
        save_hf(config, read, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []

    def swapped(path, layer):  # right size, wrong layout: [D, H, N] instead of [D, N, H]
        x = base(path, layer)
        return np.swapaxes(x, -1, -2) if path == ("layers", "wq") else x

    with pytest.raises(ValueError, match=r"source layers/wq has shape \(64, 16, 4\), but the "
                                         r"config implies \(64, 4, 16\)"):
        save_hf(config, swapped, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", sorted(M.PRESETS))
def test_hf_config_round_trips_presets(name, tmp_path):
    config = M.PRESETS[name]
    d = hf_config(config)
    assert "transformers_version" not in d
    assert M.config_from_hf(d) == config
    (tmp_path / "config.json").write_text(json.dumps(d))
    hf = tf.AutoConfig.from_pretrained(tmp_path)
    assert hf.architectures == d["architectures"]
    assert hf.vocab_size == config.vocab_size
    # transformers' own re-serialisation still maps to the same jds config.
    assert _same_but_head_dim(hf.to_dict(), config)


@pytest.mark.parametrize("case", [c for c in CASES if c != "gpt2"])
def test_hf_config_round_trips_llama_family(case, tmp_path):
    config, arch, expected = CASES[case]
    d = hf_config(config, architecture=arch, dtype="bfloat16")
    assert d["architectures"] == [expected] and d["dtype"] == "bfloat16"
    assert M.config_from_hf(d) == config
    (tmp_path / "config.json").write_text(json.dumps(d))
    hf = tf.AutoConfig.from_pretrained(tmp_path)
    assert hf.dtype == torch.bfloat16
    assert hf.rope_parameters["rope_theta"] == config.rope_theta
    assert _same_but_head_dim(hf.to_dict(), config)


def test_hf_config_rejects_what_hf_cannot_express():
    base = M.LlamaConfig(**SMALL)
    with pytest.raises(ValueError, match="no class has an o_proj bias without q/k/v"):
        hf_config(dataclasses.replace(base, attention_out_bias=True))
    with pytest.raises(ValueError, match="Qwen2ForCausalLM has q/k/v biases but no MLP biases"):
        hf_config(dataclasses.replace(base, attention_bias=True, mlp_bias=True))
    qwen = dataclasses.replace(base, attention_bias=True)
    with pytest.raises(ValueError, match="Export as Qwen2ForCausalLM"):
        hf_config(qwen, architecture="LlamaForCausalLM")
    with pytest.raises(ValueError, match="MistralForCausalLM has no biases"):
        hf_config(qwen, architecture="MistralForCausalLM")
    with pytest.raises(ValueError, match="Qwen2ForCausalLM needs attention_bias=True"):
        hf_config(base, architecture="Qwen2ForCausalLM")
    with pytest.raises(ValueError, match="cannot hold a LlamaConfig"):
        hf_config(base, architecture="GPT2LMHeadModel")
    with pytest.raises(ValueError, match="cannot hold a GPT2Config"):
        hf_config(CASES["gpt2"][0], architecture="LlamaForCausalLM")
    with pytest.raises(ValueError, match="dtype 'fp8'"):
        hf_config(base, dtype="fp8")
    with pytest.raises(ValueError, match="max_shard_bytes must be a positive int"):
        save_hf(base, lambda p, i: None, "/nonexistent/never", max_shard_bytes=0)


# ------------------------------------------------- a Hugging Face folder, there and back
def _hub_style(d: dict) -> dict:
    """``config.json`` as the Llama 3 folders on the Hub have it (transformers 4):
    ``torch_dtype``, top-level ``rope_theta`` / ``rope_scaling``, one eos id."""
    d = dict(d)
    rope = dict(d.pop("rope_parameters"))
    d["rope_theta"] = rope.pop("rope_theta")
    d["rope_scaling"] = rope
    d["torch_dtype"] = d.pop("dtype")
    d.pop("head_dim")
    d.update(eos_token_id=6, transformers_version="4.43.0.dev0")
    return d


def _llama3_folder(path, style="transformers5"):
    """A tiny random Llama 3 folder as ``save_pretrained`` writes it, with token ids,
    ``use_cache``, a generation config and a tokenizer (a real one, plus a dummy
    SentencePiece file): everything but the weights that jds does not model."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    cfg = tf.LlamaConfig(
        **SMALL, rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
        bos_token_id=5, eos_token_id=[6, 7], pad_token_id=0, use_cache=False)
    torch.manual_seed(0)
    tf.LlamaForCausalLM(cfg).save_pretrained(path)
    if style == "hub":
        c = json.loads((path / "config.json").read_text())
        (path / "config.json").write_text(json.dumps(_hub_style(c), indent=2))
    tf.GenerationConfig(bos_token_id=5, eos_token_id=[6, 7], pad_token_id=0, do_sample=True,
                        temperature=0.6, top_p=0.9, max_length=64).save_pretrained(path)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(V)}, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tf.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="w5", eos_token="w6",
                               pad_token="w0", unk_token="w1").save_pretrained(path)
    (path / "tokenizer.model").write_bytes(b"\x00not really sentencepiece\xff")
    return path


def _json(path):
    return json.loads(path.read_text())


def _changed(a: dict, b: dict) -> set:
    return {k for k in a.keys() | b.keys() if a.get(k, "absent") != b.get(k, "absent")}


@pytest.mark.parametrize("style", ["transformers5", "hub"])
def test_hf_folder_round_trip_keeps_config_generation_config_and_tokenizer(style, tmp_path):
    from jds.checkpoint.convert.api import hf_to_orbax, orbax_to_hf

    src = _llama3_folder(tmp_path / "src", style)
    hf_to_orbax(src, tmp_path / "ck")
    orbax_to_hf(tmp_path / "ck", tmp_path / "out")
    out = tmp_path / "out"

    # The folder comes back as it went in: the same files, every config.json field equal,
    # the generation config and the tokenizer files byte for byte.
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in src.iterdir())
    assert _json(out / "config.json") == _json(src / "config.json")
    assert _json(out / "generation_config.json") == _json(src / "generation_config.json")
    for name in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"):
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    hf_out = tf.AutoConfig.from_pretrained(out)
    assert (hf_out.bos_token_id, hf_out.pad_token_id, hf_out.use_cache) == (5, 0, False)
    gen = tf.GenerationConfig.from_pretrained(out)
    assert (gen.do_sample, gen.temperature, gen.eos_token_id) == (True, 0.6, [6, 7])
    tok = tf.AutoTokenizer.from_pretrained(out)
    assert tok("w3 w9 w96")["input_ids"] == [3, 9, 96] and tok.pad_token_id == 0

    # Same weights, same logits: the exported model, the source and jds agree.
    ids = _ids()
    want = _hf_logits(_hf_load(src, dtype=torch.float32), ids)
    np.testing.assert_array_equal(_hf_logits(_hf_load(out, dtype=torch.float32), ids), want)
    got = np.asarray(M.from_pretrained(out)(jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(got, want, atol=ATOL, rtol=0)

    # Only the dtype changes with --dtype, under the key the source uses for it.
    orbax_to_hf(tmp_path / "ck", tmp_path / "bf16", dtype="bfloat16")
    dtype_key = "torch_dtype" if style == "hub" else "dtype"
    half = _json(tmp_path / "bf16" / "config.json")
    assert _changed(half, _json(src / "config.json")) == {dtype_key}
    assert half[dtype_key] == "bfloat16"


def test_training_run_from_an_hf_folder_exports_its_config_and_tokenizer(tmp_path):
    """``jds train --model <HF dir>`` checkpoints record the folder only as
    ``config.train.model``: orbax-to-hf reads it there while it exists; an explicit
    ``tokenizer=`` directory is used instead when given."""
    import jds
    from jds.checkpoint.convert.api import orbax_to_hf

    src = _llama3_folder(tmp_path / "src")
    engine = jds.initialize(model=M.from_pretrained(src), config={
        "train_micro_batch_size_per_gpu": 1, "train": {"model": str(src)}})
    engine.save_checkpoint(tmp_path / "ck")
    engine.wait_for_checkpoints()
    engine.close()
    orbax_to_hf(tmp_path / "ck", tmp_path / "out")
    assert _json(tmp_path / "out" / "config.json") == _json(src / "config.json")
    assert _json(tmp_path / "out" / "generation_config.json") == _json(
        src / "generation_config.json")
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (
        src / "tokenizer.json").read_bytes()

    other = tmp_path / "tok"
    other.mkdir()
    (other / "tokenizer.model").write_bytes(b"another")
    orbax_to_hf(tmp_path / "ck", tmp_path / "out2", tokenizer=other)
    assert (tmp_path / "out2" / "tokenizer.model").read_bytes() == b"another"
    assert not (tmp_path / "out2" / "tokenizer.json").exists()


def test_recorded_origin_survives_a_moved_source_folder(tmp_path):
    from jds.checkpoint.convert.api import hf_to_orbax, orbax_to_hf

    src = _llama3_folder(tmp_path / "src")
    want_cfg, want_gen = _json(src / "config.json"), _json(src / "generation_config.json")
    hf_to_orbax(src, tmp_path / "ck")
    src.rename(tmp_path / "moved")
    with pytest.warns(UserWarning, match="tokenizer files not copied.*no longer exists"):
        orbax_to_hf(tmp_path / "ck", tmp_path / "out")
    out = tmp_path / "out"
    assert _json(out / "config.json") == want_cfg  # recorded in the checkpoint's meta
    assert _json(out / "generation_config.json") == want_gen
    assert not (out / "tokenizer.json").exists()
    orbax_to_hf(tmp_path / "ck", tmp_path / "out2", tokenizer=tmp_path / "moved")
    assert (tmp_path / "out2" / "tokenizer.json").is_file()


def test_merged_config_keeps_source_fields_and_takes_what_jds_owns(tmp_path):
    """A source config that no longer describes the model (another architecture, a changed
    shape): jds's fields win, the tokenizer's and runtime fields of the source stay."""
    from jds.checkpoint.convert.hf_origin import merged_config

    config = M.LlamaConfig(**SMALL)
    source = {**hf_config(dataclasses.replace(config, num_hidden_layers=4, rope_theta=5.0)),
              "bos_token_id": 5, "eos_token_id": [6, 7], "pad_token_id": 0,
              "use_cache": False, "attention_dropout": 0.1, "transformers_version": "4.43.0",
              "torch_dtype": "bfloat16"}
    del source["dtype"]
    got = merged_config(hf_config(config, architecture="MistralForCausalLM"), source, config)
    assert M.config_from_hf(got) == config
    assert got["architectures"] == ["MistralForCausalLM"] and got["model_type"] == "mistral"
    assert not {"attention_bias", "mlp_bias", "pretraining_tp"} & got.keys()
    assert {k: got[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id", "use_cache",
                                "attention_dropout", "transformers_version", "torch_dtype")} \
        == {"bos_token_id": 5, "eos_token_id": [6, 7], "pad_token_id": 0, "use_cache": False,
            "attention_dropout": 0.1, "transformers_version": "4.43.0",
            "torch_dtype": "float32"}
    (tmp_path / "config.json").write_text(json.dumps(got))
    hf = tf.AutoConfig.from_pretrained(tmp_path)
    assert type(hf).__name__ == "MistralConfig" and hf.num_hidden_layers == 2
    assert hf.pad_token_id == 0 and hf.use_cache is False
