"""jds models vs Hugging Face ``transformers`` on the same weights, and checkpoint loading.

Tiny random HF models are built locally (never downloaded), every parameter perturbed so
biases and norm scales are not at their trivial init, saved as safetensors, loaded with
``jds.models.from_pretrained`` and compared on random token ids in fp32.
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
tf = pytest.importorskip("transformers")
st_numpy = pytest.importorskip("safetensors.numpy")

import jds.models as M  # noqa: E402

ATOL = 1e-4
V = 97  # deliberately not a power of two
SMALL = dict(vocab_size=V, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)


def _hf_model(cls, config, seed=0):
    torch.manual_seed(seed)
    model = cls(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _hf_logits(model, ids) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits.float().numpy()


def _ids(T=12, B=2, vocab=V, seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, (B, T))


def _assert_parity(hf_model, path, T=12, **load_kw):
    ids = _ids(T, vocab=hf_model.config.vocab_size)
    model = M.from_pretrained(path, **load_kw)
    got = np.asarray(model(jnp.asarray(ids, jnp.int32)))
    np.testing.assert_allclose(got, _hf_logits(hf_model, ids), atol=ATOL, rtol=0)
    return model


LLAMA_CASES = {
    "llama-gqa-untied-theta": (tf.LlamaConfig, tf.LlamaForCausalLM,
                               dict(rope_theta=5000.0, tie_word_embeddings=False)),
    "llama-tied": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(tie_word_embeddings=True)),
    "llama-all-biases-head-dim": (tf.LlamaConfig, tf.LlamaForCausalLM,
                                  dict(attention_bias=True, mlp_bias=True, head_dim=8)),
    "llama3-rope-scaling": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(
        head_dim=16,
        rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                             low_freq_factor=1.0, high_freq_factor=4.0,
                             original_max_position_embeddings=16))),
    "llama-linear-rope": (tf.LlamaConfig, tf.LlamaForCausalLM, dict(
        rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=2.0))),
    "qwen2-bias": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(tie_word_embeddings=False)),
    "qwen2-tied": (tf.Qwen2Config, tf.Qwen2ForCausalLM, dict(tie_word_embeddings=True)),
    "mistral": (tf.MistralConfig, tf.MistralForCausalLM, dict(sliding_window=None)),
}


@pytest.mark.parametrize("case", list(LLAMA_CASES))
def test_llama_family_matches_transformers(case, tmp_path):
    cfg_cls, model_cls, extra = LLAMA_CASES[case]
    hf = _hf_model(model_cls, cfg_cls(**{**SMALL, **extra}, attn_implementation="eager"))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = _assert_parity(hf, tmp_path)
    assert isinstance(model, M.Llama)
    assert (model.lm_head is None) == hf.config.tie_word_embeddings
    if case.startswith("qwen2"):
        assert model.config.attention_bias and not model.config.attention_out_bias
        assert float(jnp.abs(model.layers.bq[...]).max()) > 0  # biases were really loaded


def test_mistral_sliding_window_caps_positions(tmp_path):
    hf = _hf_model(tf.MistralForCausalLM, tf.MistralConfig(
        **SMALL, sliding_window=16, attn_implementation="eager"))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    with pytest.warns(UserWarning, match="sliding_window=16"):
        model = _assert_parity(hf, tmp_path, T=16)  # within the window: exact
    assert model.config.max_position_embeddings == 16
    with pytest.raises(ValueError, match="exceeds the model's max positions"):
        model(jnp.zeros((1, 17), jnp.int32))


@pytest.mark.parametrize("act", ["gelu_new", "gelu"])
def test_gpt2_matches_transformers(act, tmp_path):
    hf = _hf_model(tf.GPT2LMHeadModel, tf.GPT2Config(
        vocab_size=V, n_positions=32, n_embd=64, n_layer=2, n_head=4, n_inner=80,
        activation_function=act, bos_token_id=0, eos_token_id=0, attn_implementation="eager"))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    model = _assert_parity(hf, tmp_path)
    assert isinstance(model, M.GPT2)
    assert model.config.inner_size == 80 and model.config.activation_function == act


def test_gpt2_checkpoint_without_transformer_prefix(tmp_path):
    """The original GPT-2 checkpoints were saved from ``GPT2Model``: names lack the prefix."""
    hf = _hf_model(tf.GPT2LMHeadModel, tf.GPT2Config(
        vocab_size=V, n_positions=32, n_embd=32, n_layer=1, n_head=2, bos_token_id=0,
        eos_token_id=0, attn_implementation="eager"))
    hf.save_pretrained(tmp_path, safe_serialization=True)
    tensors = st_numpy.load_file(tmp_path / "model.safetensors")
    renamed = {k.removeprefix("transformer."): v for k, v in tensors.items()}
    assert renamed.keys() != tensors.keys()
    st_numpy.save_file(renamed, tmp_path / "model.safetensors")
    _assert_parity(hf, tmp_path)


def test_sharded_index_checkpoint(tmp_path):
    hf = _hf_model(tf.LlamaForCausalLM, tf.LlamaConfig(**SMALL, attn_implementation="eager"))
    hf.save_pretrained(tmp_path, safe_serialization=True, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (tmp_path / "model.safetensors").exists()
    _assert_parity(hf, tmp_path)


def test_bf16_safetensors(tmp_path):
    hf = _hf_model(tf.LlamaForCausalLM, tf.LlamaConfig(**SMALL, attn_implementation="eager"))
    with torch.no_grad():  # round the fp32 weights to bf16 values; buffers stay fp32
        for p in hf.parameters():
            p.copy_(p.bfloat16().float())
    bf16_state = {k: v.bfloat16() for k, v in hf.state_dict().items()}
    hf.save_pretrained(tmp_path, state_dict=bf16_state, safe_serialization=True)
    header_len = int.from_bytes((tmp_path / "model.safetensors").read_bytes()[:8], "little")
    header = json.loads((tmp_path / "model.safetensors").read_bytes()[8:8 + header_len])
    assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"BF16"}
    # bf16 weights widened exactly to fp32: same logits as HF's fp32 run of the same values.
    model = _assert_parity(hf, tmp_path)
    assert model.embed_tokens[...].dtype == jnp.float32
    # Loaded as bf16 (cast, bit-exact to the file): the model computes in bf16.
    ids = _ids()
    m16 = M.from_pretrained(tmp_path, param_dtype=jnp.bfloat16)
    w16 = np.asarray(m16.layers.wq[...][0].astype(jnp.float32))
    np.testing.assert_array_equal(w16, np.asarray(model.layers.wq[...][0]))
    out16 = m16(jnp.asarray(ids, jnp.int32))
    assert out16.dtype == jnp.bfloat16
    ref = _hf_logits(hf, ids)
    err = np.abs(np.asarray(out16.astype(jnp.float32)) - ref).max()
    assert err < 0.05 * np.abs(ref).max(), err


# --------------------------------------------------------------------- tensor-level errors
@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    hf = _hf_model(tf.LlamaForCausalLM, tf.LlamaConfig(**SMALL, attn_implementation="eager"))
    hf.save_pretrained(path, safe_serialization=True)
    return path


def _copy_with(src, dst, edit):
    (dst / "config.json").write_text((src / "config.json").read_text())
    tensors = st_numpy.load_file(src / "model.safetensors")
    edit(tensors)
    st_numpy.save_file(tensors, dst / "model.safetensors")


def test_missing_tensor_is_named(llama_dir, tmp_path):
    name = "model.layers.1.mlp.up_proj.weight"
    _copy_with(llama_dir, tmp_path, lambda t: t.pop(name))
    with pytest.raises(ValueError, match=r"missing tensors \['layers\.1\.mlp\.up_proj\.weight'"):
        M.from_pretrained(tmp_path)


def test_unexpected_tensor_is_named(llama_dir, tmp_path):
    _copy_with(llama_dir, tmp_path, lambda t: t.update(extra=np.zeros(3, np.float32)))
    with pytest.raises(ValueError, match=r"unexpected tensors .*'extra \(in model\.safetensors\)'"):
        M.from_pretrained(tmp_path)


def test_shape_mismatch_is_named(llama_dir, tmp_path):
    name = "model.layers.0.self_attn.k_proj.weight"
    _copy_with(llama_dir, tmp_path, lambda t: t.update({name: np.zeros((8, 64), np.float32)}))
    with pytest.raises(ValueError, match=r"k_proj\.weight has shape \(8, 64\) but config.json"):
        M.from_pretrained(tmp_path)


def test_ignored_rotary_buffer(llama_dir, tmp_path):
    """Old checkpoints carry ``rotary_emb.inv_freq``; it is recomputed, not an error."""
    _copy_with(llama_dir, tmp_path, lambda t: t.update(
        {"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8, np.float32)}))
    ref = M.from_pretrained(llama_dir)
    got = M.from_pretrained(tmp_path)
    ids = jnp.asarray(_ids(), jnp.int32)
    np.testing.assert_array_equal(np.asarray(got(ids)), np.asarray(ref(ids)))


def test_config_from_hf_rejects_unsupported_features():
    base = {"architectures": ["LlamaForCausalLM"], **SMALL}
    with pytest.raises(ValueError, match="hidden_act 'gelu'"):
        M.config_from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(ValueError, match="rope type 'yarn'"):
        M.config_from_hf({**base, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(ValueError, match="Qwen2 sliding-window"):
        M.config_from_hf({**base, "architectures": ["Qwen2ForCausalLM"],
                          "use_sliding_window": True})
    gpt2 = {"architectures": ["GPT2LMHeadModel"], "vocab_size": 10, "n_positions": 8,
            "n_embd": 8, "n_layer": 1, "n_head": 2}
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        M.config_from_hf({**gpt2, "scale_attn_by_inverse_layer_idx": True})
    cfg = M.config_from_hf({**base, "rope_theta": 1234.0, "num_key_value_heads": None})
    assert cfg.rope_theta == 1234.0 and cfg.num_key_value_heads == 4
