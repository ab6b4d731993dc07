"""The Llama family (Llama 1/2/3, Mistral without sliding window, Qwen2) as a Flax NNX module.

Owns ``LlamaConfig``, the per-layer function ``llama_block`` and the ``Llama`` module.

Layout: the decoder layers' weights are stacked along a leading ``layers`` dimension and
run with ``lax.scan`` (compile time independent of depth), each layer optionally under
``jax.checkpoint`` (``model.remat``). ``llama_block`` is a plain function of one layer's
weights so that ZeRO-3 (gather per layer) and pipeline stages can call it directly.

Numerics follow Hugging Face ``LlamaForCausalLM``: the forward runs in the dtype of the
parameters; RMSNorm statistics, rotary embeddings and the attention softmax run in fp32 and
are cast back. Weight layouts differ from Hugging Face's ``[out, in]`` linears: projections
are stored ``[in, ...out]`` with heads split out (``wq: [L, D, N, H]``); ``hf.py`` converts.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jds.kernels.attention import check_implementation
from jds.models.adapters import prepare_layers
from jds.models.layer_drop import BRANCH_SCALE, with_layer_drop
from jds.models.layers import (
    causal_attention,
    check_inputs,
    check_remat,
    const_param,
    dense,
    embed_lookup,
    normal_param,
    positions_from_segments,
    run_keeping_states,
    scan_layers,
    stacked_axes,
    stacked_params,
)
from jds.partitioning.rules import constrain
from jds.partitioning.zero import ParamGather, gather_param

BTD = ("batch", "res_seq", "embed")  # the residual stream (split over seq under sequence parallel)
BTNH = ("batch", "seq", "heads", "head_dim")
BTKH = ("batch", "seq", "kv_heads", "head_dim")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Rotary frequency scaling, as Hugging Face's ``rope_scaling`` / ``rope_parameters``.

    Attributes:
      rope_type: ``"linear"`` (all frequencies divided by ``factor``) or ``"llama3"``
        (Llama 3.1's piecewise scaling of the low frequencies).
      factor: the context extension factor.
      low_freq_factor: llama3 only.
      high_freq_factor: llama3 only.
      original_max_position_embeddings: llama3 only: the pre-extension context length.
    """

    rope_type: str
    factor: float
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self) -> None:
        if self.rope_type not in ("linear", "llama3"):
            raise ValueError(
                f"rope_type {self.rope_type!r} is not supported; use 'linear' or 'llama3' "
                "(or no scaling)"
            )
        if self.factor <= 0:
            raise ValueError(f"rope scaling factor must be > 0; got {self.factor}")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shape and numerics of a Llama-family model (field names follow Hugging Face).

    Attributes:
      attention_bias: biases on the q/k/v projections (Qwen2).
      attention_out_bias: a bias on the output projection too (HF Llama's
        ``attention_bias=True`` puts biases on all four projections).
      mlp_bias: biases on the gate/up/down projections.
      head_dim: ``None`` means ``hidden_size // num_attention_heads``.
      rope_scaling: optional ``RopeScaling``.
      remat: the default ``model.remat`` (``"none" | "full" | "dots"``).
      attention_impl: ``jds.kernels.attention.dot_product_attention``'s implementation
        (None = the backend's default, XLA; ``"pallas"`` / ``"pallas_tpu"`` for the
        kernels, run per shard under data and tensor parallelism).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int | None = None
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    initializer_range: float = 0.02
    remat: str = "none"
    attention_out_bias: bool = False
    rope_scaling: RopeScaling | None = None
    attention_impl: str | None = None

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"LlamaConfig.{name} must be > 0; got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"LlamaConfig: num_attention_heads ({self.num_attention_heads}) must be a "
                f"multiple of num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.head_dim is None and self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"LlamaConfig: hidden_size ({self.hidden_size}) must divide by "
                f"num_attention_heads ({self.num_attention_heads}), or set head_dim"
            )
        if self.head_dim is not None and (self.head_dim <= 0 or self.head_dim % 2):
            raise ValueError(f"LlamaConfig.head_dim must be even and > 0; got {self.head_dim}")
        if self.head_dim is None and (self.hidden_size // self.num_attention_heads) % 2:
            raise ValueError("LlamaConfig: rotary embeddings need an even head_dim")
        check_remat(self.remat)
        check_implementation(self.attention_impl)

    @property
    def head_size(self) -> int:
        """The resolved head dimension ``H``."""
        return self.head_dim or self.hidden_size // self.num_attention_heads

    @property
    def max_positions(self) -> int:
        """Longest sequence the model accepts."""
        return self.max_position_embeddings


# ------------------------------------------------------------------------------ numerics
def rms_norm(x_BTD: jax.Array, scale_D: jax.Array, eps: float) -> jax.Array:
    """RMSNorm with fp32 statistics, scaled in the input dtype (as Hugging Face)."""
    x32 = x_BTD.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * inv).astype(x_BTD.dtype) * scale_D.astype(x_BTD.dtype)


def rope_inv_freq(cfg: LlamaConfig) -> np.ndarray:
    """Rotary inverse frequencies ``[H/2]`` (fp32, computed as Hugging Face does)."""
    H = cfg.head_size
    inv = (1.0 / (np.float32(cfg.rope_theta) ** (np.arange(0, H, 2, np.float32) / H))).astype(
        np.float32
    )
    s = cfg.rope_scaling
    if s is None:
        return inv
    if s.rope_type == "linear":
        return (inv / np.float32(s.factor)).astype(np.float32)
    # llama3: long wavelengths divided by factor, short ones kept, a smooth ramp in between.
    old = s.original_max_position_embeddings
    low_wavelen, high_wavelen = old / s.low_freq_factor, old / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
    smooth = (old / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor)
    smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_cos_sin(positions_BT: jax.Array, cfg: LlamaConfig) -> tuple[jax.Array, jax.Array]:
    """``cos, sin`` of shape ``[B, T, H]`` in fp32 (halves repeated, HF's layout)."""
    inv_H2 = jnp.asarray(rope_inv_freq(cfg))
    ang_BTH2 = positions_BT.astype(jnp.float32)[..., None] * inv_H2
    ang_BTH = jnp.concatenate([ang_BTH2, ang_BTH2], axis=-1)
    return jnp.cos(ang_BTH), jnp.sin(ang_BTH)


def apply_rope(x_BTNH: jax.Array, cos_BTH: jax.Array, sin_BTH: jax.Array) -> jax.Array:
    """Rotate pairs ``(i, i + H/2)`` (HF's ``rotate_half`` convention), in fp32."""
    x = x_BTNH.astype(jnp.float32)
    h = x.shape[-1] // 2
    rot = jnp.concatenate([-x[..., h:], x[..., :h]], axis=-1)
    out = x * cos_BTH[:, :, None, :] + rot * sin_BTH[:, :, None, :]
    return out.astype(x_BTNH.dtype)


def llama_block(
    p: dict[str, jax.Array],
    x_BTD: jax.Array,
    positions_BT: jax.Array,
    segment_ids_BT: jax.Array | None,
    cfg: LlamaConfig,
    attend: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """One decoder layer: pre-norm attention and pre-norm SwiGLU MLP, both residual.

    Args:
      p: one layer's weights (no ``layers`` dimension): ``attn_norm [D]``,
        ``wq [D, N, H]``, ``wk, wv [D, K, H]``, ``wo [N, H, D]``, ``mlp_norm [D]``,
        ``w_gate, w_up [D, F]``, ``w_down [F, D]``, and the biases the config enables
        (``bq [N, H]``, ``bk, bv [K, H]``, ``bo [D]``, ``b_gate, b_up [F]``, ``b_down [D]``).
      x_BTD: the residual stream.
      positions_BT: token positions for the rotary embedding.
      segment_ids_BT: packing ids or ``None``.
      cfg: the model config.
      attend: ``(q_BTNH, k_BTKH, v_BTKH) -> o_BTNH`` replacing causal attention over this
        call's tokens (the inference engine attends over its paged KV cache); None =
        ``dot_product_attention``.

    Returns:
      The updated residual stream ``x_BTD``.
    """
    # Named scopes (HF's module names) label the ops for jds.profiling's per-module table.
    with jax.named_scope("input_layernorm"):
        h_BTD = rms_norm(x_BTD, p["attn_norm"], cfg.rms_norm_eps)
    with jax.named_scope("self_attn"):
        q_BTNH = dense("BTD,DNH->BTNH", h_BTD, p["wq"])
        k_BTKH = dense("BTD,DKH->BTKH", h_BTD, p["wk"])
        v_BTKH = dense("BTD,DKH->BTKH", h_BTD, p["wv"])
        if cfg.attention_bias:
            q_BTNH, k_BTKH, v_BTKH = q_BTNH + p["bq"], k_BTKH + p["bk"], v_BTKH + p["bv"]
        cos_BTH, sin_BTH = rope_cos_sin(positions_BT, cfg)
        q_BTNH = constrain(apply_rope(q_BTNH, cos_BTH, sin_BTH), BTNH)
        k_BTKH = constrain(apply_rope(k_BTKH, cos_BTH, sin_BTH), BTKH)
        v_BTKH = constrain(v_BTKH, BTKH)
        o_BTNH = causal_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, cfg.attention_impl,
                                  attend)
        attn_BTD = dense("BTNH,NHD->BTD", o_BTNH, p["wo"])
        if cfg.attention_out_bias:
            attn_BTD = attn_BTD + p["bo"]
    scale = p.get(BRANCH_SCALE)  # Progressive Layer Dropping's 1 / keep probability
    if scale is not None:
        attn_BTD = attn_BTD * scale.astype(attn_BTD.dtype)
    x_BTD = constrain(x_BTD + attn_BTD, BTD)

    with jax.named_scope("post_attention_layernorm"):
        h_BTD = rms_norm(x_BTD, p["mlp_norm"], cfg.rms_norm_eps)
    with jax.named_scope("mlp"):
        gate_BTF = dense("BTD,DF->BTF", h_BTD, p["w_gate"])
        up_BTF = dense("BTD,DF->BTF", h_BTD, p["w_up"])
        if cfg.mlp_bias:
            gate_BTF, up_BTF = gate_BTF + p["b_gate"], up_BTF + p["b_up"]
        act_BTF = constrain(jax.nn.silu(gate_BTF) * up_BTF, ("batch", "seq", "mlp"))
        down_BTD = dense("BTF,FD->BTD", act_BTF, p["w_down"])
        if cfg.mlp_bias:
            down_BTD = down_BTD + p["b_down"]
    if scale is not None:
        down_BTD = down_BTD * scale.astype(down_BTD.dtype)
    return constrain(x_BTD + down_BTD, BTD)


# ------------------------------------------------------------------------------ modules
class LlamaLayers(nnx.Module):
    """The decoder layers' weights, stacked: every parameter has a leading ``layers`` dim.

    ``LINEARS`` names the layer matrices (with their number of input dims) that LoRA can
    adapt and QLoRA quantize (``jds.lora``); ``HF_NAMES`` their Hugging Face module names.
    """

    LINEARS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_gate": 1, "w_up": 1, "w_down": 1}
    HF_NAMES = {"wq": "self_attn.q_proj", "wk": "self_attn.k_proj", "wv": "self_attn.v_proj",
                "wo": "self_attn.o_proj", "w_gate": "mlp.gate_proj", "w_up": "mlp.up_proj",
                "w_down": "mlp.down_proj"}
    # each matrix's part in a Transformer layer: DeepSpeed configs written for BERT or GPT-2
    # module names select the same matrices here (jds.compression.weight_quantization)
    ROLES = {"wq": "q", "wk": "k", "wv": "v", "wo": "attn_out", "w_gate": "mlp_gate",
             "w_up": "mlp_in", "w_down": "mlp_out"}
    LORA_DEFAULT_TARGETS = ("wq", "wv")  # PEFT's default for Llama: q_proj, v_proj
    HF_PREFIX = "model.layers"  # the Hugging Face module path of layer i: HF_PREFIX.i
    HF_FAN_IN_FAN_OUT = False  # HF stores these matrices [out, in] (nn.Linear)
    # redundancy_clean's physical removal (jds.compression.pruning): the MLP's input
    # matrices, its output matrix and the config field of their size; the attention's q/k/v,
    # its output, the head-count fields and the head-size field
    PRUNABLE_MLP = (("w_gate", "w_up"), "w_down", "intermediate_size")
    PRUNABLE_HEADS = (("wq", "wk", "wv"), "wo", ("num_attention_heads", "num_key_value_heads"),
                      "head_dim")

    def __init__(self, cfg: LlamaConfig, *, rngs: nnx.Rngs, param_dtype: Any) -> None:
        L, D, F = cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size
        N, K, H = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_size
        std, dt = cfg.initializer_range, param_dtype
        self.attn_norm = const_param((L, D), ("layers", "embed"), 1.0, dt)
        self.wq = normal_param(
            rngs, (L, D, N, H), ("layers", "embed", "heads", "head_dim"), std, dt
        )
        self.wk = normal_param(
            rngs, (L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), std, dt
        )
        self.wv = normal_param(
            rngs, (L, D, K, H), ("layers", "embed", "kv_heads", "head_dim"), std, dt
        )
        self.wo = normal_param(
            rngs, (L, N, H, D), ("layers", "heads", "head_dim", "embed"), std, dt
        )
        if cfg.attention_bias:
            self.bq = const_param((L, N, H), ("layers", "heads", "head_dim"), 0.0, dt)
            self.bk = const_param((L, K, H), ("layers", "kv_heads", "head_dim"), 0.0, dt)
            self.bv = const_param((L, K, H), ("layers", "kv_heads", "head_dim"), 0.0, dt)
        if cfg.attention_out_bias:
            self.bo = const_param((L, D), ("layers", "embed"), 0.0, dt)
        self.mlp_norm = const_param((L, D), ("layers", "embed"), 1.0, dt)
        self.w_gate = normal_param(rngs, (L, D, F), ("layers", "embed", "mlp"), std, dt)
        self.w_up = normal_param(rngs, (L, D, F), ("layers", "embed", "mlp"), std, dt)
        self.w_down = normal_param(rngs, (L, F, D), ("layers", "mlp", "embed"), std, dt)
        if cfg.mlp_bias:
            self.b_gate = const_param((L, F), ("layers", "mlp"), 0.0, dt)
            self.b_up = const_param((L, F), ("layers", "mlp"), 0.0, dt)
            self.b_down = const_param((L, D), ("layers", "embed"), 0.0, dt)


class Llama(nnx.Module):
    """Llama-family causal language model.

    Attributes:
      config: the ``LlamaConfig``.
      remat: ``"none" | "full" | "dots"``; may be set before ``nnx.split``.
      embed_tokens: ``[V, D]``. layers: ``LlamaLayers``. norm: ``[D]``.
      lm_head: ``[D, V]``, or ``None`` with tied embeddings.
    """

    def __init__(
        self, config: LlamaConfig, *, rngs: nnx.Rngs, param_dtype: Any = jnp.float32
    ) -> None:
        cfg = config
        self.config = cfg
        self.remat = cfg.remat
        # ZeRO-3 gathering; the engine sets it on its copy (jds.partitioning.zero)
        self.param_gather: ParamGather | None = None
        std = cfg.initializer_range
        V, D = cfg.vocab_size, cfg.hidden_size
        self.embed_tokens = normal_param(rngs, (V, D), ("vocab", "embed"), std, param_dtype)
        self.layers = LlamaLayers(cfg, rngs=rngs, param_dtype=param_dtype)
        self.norm = const_param((D,), ("embed",), 1.0, param_dtype)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else normal_param(rngs, (D, V), ("embed", "vocab"), std, param_dtype)
        )

    def __call__(
        self,
        input_ids_BT: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Logits for every position.

        Args:
          input_ids_BT: int ``[B, T]`` token ids in ``[0, vocab_size)``.
          segment_ids: optional ``[B, T]`` packing ids: tokens attend within their segment,
            and positions restart at each segment start.
          positions: optional ``[B, T]`` explicit positions (overrides the above).

        Returns:
          ``logits_BTV`` in the parameters' dtype.

        Raises:
          ValueError: bad shapes, too long a sequence, or (concrete ids) ids out of range.
        """
        cfg = self.config
        check_remat(self.remat)
        check_inputs(
            input_ids_BT, segment_ids, vocab_size=cfg.vocab_size, max_positions=cfg.max_positions
        )
        B, T = input_ids_BT.shape
        if positions is None:
            positions = positions_from_segments(segment_ids, B, T)
        x_BTD = self.embed(input_ids_BT, positions)
        x_BTD = self.run_layers(stacked_params(self.layers), x_BTD, positions, segment_ids)
        return self.head(x_BTD)

    def _use(self, param: nnx.Param, axes: tuple[str | None, ...], after: Any = None
             ) -> jax.Array:
        """A non-layer parameter at its point of use (gathered under ZeRO-3, once ``after``
        is computed: see ``ParamGather``)."""
        return gather_param(param[...], axes, self.param_gather, after)

    # The three parts of ``__call__``, also run separately by pipeline stages.
    def embed(self, input_ids_BT: jax.Array, positions_BT: jax.Array) -> jax.Array:
        """Token embeddings ``x_BTD`` (the positions enter through RoPE in the layers)."""
        del positions_BT
        with jax.named_scope("embed_tokens"):
            embed_VD = self._use(self.embed_tokens, ("vocab", "embed"), input_ids_BT)
            return constrain(embed_lookup(embed_VD, input_ids_BT), BTD)

    def run_layers(
        self,
        params_L: dict[str, jax.Array],
        x_BTD: jax.Array,
        positions_BT: jax.Array,
        segment_ids_BT: jax.Array | None,
        *,
        checkpoint_every: int = 0,
        outputs: bool = False,
    ) -> Any:
        """Run the decoder layers stacked in ``params_L`` (all of them, or a stage's slice).

        ``checkpoint_every=k`` rematerialises in groups of ``k`` layers (see ``scan_layers``);
        ``outputs`` returns ``(x, every layer's output [L, B, T, D])``.
        """
        block = partial(llama_block, cfg=self.config)
        params_L, bind = prepare_layers(self.layers, with_layer_drop(params_L, self))
        with jax.named_scope("layers"):
            return run_keeping_states(self.layers, partial(
                scan_layers, block, params_L, x_BTD, positions_BT, segment_ids_BT, remat=self.remat,
                axes=stacked_axes(self.layers), group=checkpoint_every,
                gather=self.param_gather, bind=bind,
            ), outputs=outputs)

    def layer_fn(self) -> Callable[..., jax.Array]:
        """``(p, x_BTD, positions_BT, attend) -> x_BTD``: one layer, for the inference engine."""
        cfg = self.config
        return lambda p, x, positions, attend: llama_block(p, x, positions, None, cfg,
                                                           attend=attend)

    def head(self, x_BTD: jax.Array) -> jax.Array:
        """Final norm and the LM head: ``logits_BTV``."""
        cfg = self.config
        with jax.named_scope("norm"):
            h_BTD = rms_norm(x_BTD, self._use(self.norm, ("embed",)), cfg.rms_norm_eps)
        with jax.named_scope("lm_head"):
            if self.lm_head is None:
                embed_VD = self._use(self.embed_tokens, ("vocab", "embed"), h_BTD)
                logits_BTV = jnp.einsum("BTD,VD->BTV", h_BTD, embed_VD)
            else:
                head_DV = self._use(self.lm_head, ("embed", "vocab"), h_BTD)
                logits_BTV = jnp.einsum("BTD,DV->BTV", h_BTD, head_DV)
            return constrain(logits_BTV, ("batch", "seq", "vocab"))


__all__ = ["Llama", "LlamaConfig", "LlamaLayers", "RopeScaling", "llama_block", "rms_norm"]
