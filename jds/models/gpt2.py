"""GPT-2 as a Flax NNX module: ``GPT2Config``, the per-layer ``gpt2_block`` and ``GPT2``.

Same layout as ``llama.py``: layer weights stacked on a leading ``layers`` dimension and run
with ``lax.scan``, optionally rematerialised. Hugging Face's fused ``c_attn`` ``[D, 3D]`` is
stored split into ``wq``/``wk``/``wv`` ``[L, D, N, H]`` so the heads axis can be sharded;
the output embedding is always tied to ``wte`` (as ``GPT2LMHeadModel``).

Numerics follow Hugging Face ``GPT2LMHeadModel`` (``scale_attn_weights=True``, no
per-layer-index scaling): compute in the parameters' dtype, LayerNorm and softmax in fp32.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
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

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "gelu_new": partial(jax.nn.gelu, approximate=True),
    "gelu_pytorch_tanh": partial(jax.nn.gelu, approximate=True),
    "gelu_fast": partial(jax.nn.gelu, approximate=True),
    "gelu": partial(jax.nn.gelu, approximate=False),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
    "swish": jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class GPT2Config:
    """Shape and numerics of a GPT-2 model (field names follow Hugging Face).

    Attributes:
      n_inner: MLP width; ``None`` means ``4 * n_embd``.
      activation_function: one of ``ACTIVATIONS``.
      remat: the default ``model.remat`` (``"none" | "full" | "dots"``).
      attention_impl: ``jds.kernels.attention.dot_product_attention``'s implementation
        (None = the backend's default, XLA; ``"pallas"`` / ``"pallas_tpu"`` for the
        kernels, run per shard under data and tensor parallelism).
    """

    vocab_size: int
    n_positions: int
    n_embd: int
    n_layer: int
    n_head: int
    n_inner: int | None = None
    layer_norm_epsilon: float = 1e-5
    activation_function: str = "gelu_new"
    initializer_range: float = 0.02
    remat: str = "none"
    attention_impl: str | None = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "n_positions", "n_embd", "n_layer", "n_head"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"GPT2Config.{name} must be > 0; got {getattr(self, name)}")
        if self.n_embd % self.n_head:
            raise ValueError(
                f"GPT2Config: n_embd ({self.n_embd}) must divide by n_head ({self.n_head})"
            )
        if self.activation_function not in ACTIVATIONS:
            raise ValueError(
                f"GPT2Config.activation_function {self.activation_function!r} is not supported; "
                f"use one of {sorted(ACTIVATIONS)}"
            )
        check_remat(self.remat)
        check_implementation(self.attention_impl)

    @property
    def inner_size(self) -> int:
        """The resolved MLP width ``F``."""
        return self.n_inner or 4 * self.n_embd

    @property
    def max_positions(self) -> int:
        """Longest sequence the model accepts (the learned position table's size)."""
        return self.n_positions


def layer_norm(x_BTD: jax.Array, scale_D: jax.Array, bias_D: jax.Array, eps: float) -> jax.Array:
    """LayerNorm in fp32, returned in the input dtype."""
    x32 = x_BTD.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * scale_D.astype(jnp.float32) + bias_D.astype(jnp.float32)).astype(x_BTD.dtype)


def gpt2_block(
    p: dict[str, jax.Array],
    x_BTD: jax.Array,
    segment_ids_BT: jax.Array | None,
    cfg: GPT2Config,
    attend: Callable[[jax.Array, jax.Array, jax.Array], jax.Array] | None = None,
) -> jax.Array:
    """One GPT-2 layer: pre-LayerNorm attention and MLP, both residual.

    Args:
      p: one layer's weights (no ``layers`` dimension): ``ln_1_scale, ln_1_bias [D]``,
        ``wq, wk, wv [D, N, H]``, ``bq, bk, bv [N, H]``, ``wo [N, H, D]``, ``bo [D]``,
        ``ln_2_scale, ln_2_bias [D]``, ``w_fc [D, F]``, ``b_fc [F]``, ``w_proj [F, D]``,
        ``b_proj [D]``.
      x_BTD: the residual stream.
      segment_ids_BT: packing ids or ``None``.
      cfg: the model config.
      attend: ``(q_BTNH, k_BTKH, v_BTKH) -> o_BTNH`` replacing causal attention over this
        call's tokens (the inference engine's paged KV cache); None = causal attention.

    Returns:
      The updated residual stream ``x_BTD``.
    """
    eps = cfg.layer_norm_epsilon
    # Named scopes (HF's module names) label the ops for jds.profiling's per-module table.
    with jax.named_scope("ln_1"):
        h_BTD = layer_norm(x_BTD, p["ln_1_scale"], p["ln_1_bias"], eps)
    with jax.named_scope("attn"):
        q_BTNH = dense("BTD,DNH->BTNH", h_BTD, p["wq"]) + p["bq"]
        k_BTKH = dense("BTD,DKH->BTKH", h_BTD, p["wk"]) + p["bk"]
        v_BTKH = dense("BTD,DKH->BTKH", h_BTD, p["wv"]) + p["bv"]
        q_BTNH = constrain(q_BTNH, ("batch", "seq", "heads", "head_dim"))
        k_BTKH = constrain(k_BTKH, ("batch", "seq", "kv_heads", "head_dim"))
        v_BTKH = constrain(v_BTKH, ("batch", "seq", "kv_heads", "head_dim"))
        o_BTNH = causal_attention(q_BTNH, k_BTKH, v_BTKH, segment_ids_BT, cfg.attention_impl,
                                  attend)
        attn_BTD = dense("BTNH,NHD->BTD", o_BTNH, p["wo"]) + p["bo"]
    scale = p.get(BRANCH_SCALE)  # Progressive Layer Dropping's 1 / keep probability
    if scale is not None:
        attn_BTD = attn_BTD * scale.astype(attn_BTD.dtype)
    x_BTD = constrain(x_BTD + attn_BTD, BTD)

    with jax.named_scope("ln_2"):
        h_BTD = layer_norm(x_BTD, p["ln_2_scale"], p["ln_2_bias"], eps)
    with jax.named_scope("mlp"):
        fc_BTF = dense("BTD,DF->BTF", h_BTD, p["w_fc"]) + p["b_fc"]
        act_BTF = constrain(ACTIVATIONS[cfg.activation_function](fc_BTF),
                            ("batch", "seq", "mlp"))
        out_BTD = dense("BTF,FD->BTD", act_BTF, p["w_proj"]) + p["b_proj"]
    if scale is not None:
        out_BTD = out_BTD * scale.astype(out_BTD.dtype)
    return constrain(x_BTD + out_BTD, BTD)


class GPT2Layers(nnx.Module):
    """The GPT-2 layers' weights, stacked: every parameter has a leading ``layers`` dim.

    ``LINEARS``, ``HF_NAMES``: as ``LlamaLayers`` (q, k and v are one ``c_attn`` in HF).
    """

    LINEARS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2, "w_fc": 1, "w_proj": 1}
    HF_NAMES = {"wq": "attn.c_attn", "wk": "attn.c_attn", "wv": "attn.c_attn",
                "wo": "attn.c_proj", "w_fc": "mlp.c_fc", "w_proj": "mlp.c_proj"}
    ROLES = {"wq": "q", "wk": "k", "wv": "v", "wo": "attn_out", "w_fc": "mlp_in",
             "w_proj": "mlp_out"}  # as LlamaLayers.ROLES
    LORA_DEFAULT_TARGETS = ("wq", "wk", "wv")  # PEFT's default for GPT-2: c_attn
    HF_PREFIX = "transformer.h"  # the Hugging Face module path of layer i: HF_PREFIX.i
    HF_FAN_IN_FAN_OUT = True  # HF stores these matrices [in, out] (Conv1D)
    # redundancy_clean's physical removal (jds.compression.pruning); no PRUNABLE_HEADS: the
    # head size is n_embd / n_head
    PRUNABLE_MLP = (("w_fc",), "w_proj", "n_inner")
    # Hugging Face matrices jds holds as several: quantized as one (jds.compression)
    HF_FUSED = {"attn.c_attn": ("wq", "wk", "wv")}

    def __init__(self, cfg: GPT2Config, *, rngs: nnx.Rngs, param_dtype: Any) -> None:
        L, D, F = cfg.n_layer, cfg.n_embd, cfg.inner_size
        N = cfg.n_head
        H = D // N
        std, dt = cfg.initializer_range, param_dtype
        # HF scales the residual output projections (both c_proj) by 1/sqrt(2 * n_layer).
        proj_std = std / math.sqrt(2 * L)
        self.ln_1_scale = const_param((L, D), ("layers", "embed"), 1.0, dt)
        self.ln_1_bias = const_param((L, D), ("layers", "embed"), 0.0, dt)
        self.wq = normal_param(
            rngs, (L, D, N, H), ("layers", "embed", "heads", "head_dim"), std, dt
        )
        self.wk = normal_param(
            rngs, (L, D, N, H), ("layers", "embed", "kv_heads", "head_dim"), std, dt
        )
        self.wv = normal_param(
            rngs, (L, D, N, H), ("layers", "embed", "kv_heads", "head_dim"), std, dt
        )
        self.bq = const_param((L, N, H), ("layers", "heads", "head_dim"), 0.0, dt)
        self.bk = const_param((L, N, H), ("layers", "kv_heads", "head_dim"), 0.0, dt)
        self.bv = const_param((L, N, H), ("layers", "kv_heads", "head_dim"), 0.0, dt)
        self.wo = normal_param(
            rngs, (L, N, H, D), ("layers", "heads", "head_dim", "embed"), proj_std, dt
        )
        self.bo = const_param((L, D), ("layers", "embed"), 0.0, dt)
        self.ln_2_scale = const_param((L, D), ("layers", "embed"), 1.0, dt)
        self.ln_2_bias = const_param((L, D), ("layers", "embed"), 0.0, dt)
        self.w_fc = normal_param(rngs, (L, D, F), ("layers", "embed", "mlp"), std, dt)
        self.b_fc = const_param((L, F), ("layers", "mlp"), 0.0, dt)
        self.w_proj = normal_param(rngs, (L, F, D), ("layers", "mlp", "embed"), proj_std, dt)
        self.b_proj = const_param((L, D), ("layers", "embed"), 0.0, dt)


class GPT2(nnx.Module):
    """GPT-2 causal language model with tied input/output embeddings.

    Attributes:
      config: the ``GPT2Config``.
      remat: ``"none" | "full" | "dots"``; may be set before ``nnx.split``.
      wte: ``[V, D]`` token embedding (also the output projection).
      wpe: ``[P, D]`` learned positions (first axis unnamed: replicated under any rules).
      layers: ``GPT2Layers``. ln_f_scale, ln_f_bias: ``[D]``.
    """

    def __init__(
        self, config: GPT2Config, *, rngs: nnx.Rngs, param_dtype: Any = jnp.float32
    ) -> None:
        cfg = config
        self.config = cfg
        self.remat = cfg.remat
        # ZeRO-3 gathering; the engine sets it on its copy (jds.partitioning.zero)
        self.param_gather: ParamGather | None = None
        std, D = cfg.initializer_range, cfg.n_embd
        self.wte = normal_param(rngs, (cfg.vocab_size, D), ("vocab", "embed"), std, param_dtype)
        self.wpe = normal_param(rngs, (cfg.n_positions, D), (None, "embed"), std, param_dtype)
        self.layers = GPT2Layers(cfg, rngs=rngs, param_dtype=param_dtype)
        self.ln_f_scale = const_param((D,), ("embed",), 1.0, param_dtype)
        self.ln_f_bias = const_param((D,), ("embed",), 0.0, param_dtype)

    def __call__(
        self,
        input_ids_BT: jax.Array,
        *,
        segment_ids: jax.Array | None = None,
        positions: jax.Array | None = None,
    ) -> jax.Array:
        """Logits for every position.

        Args:
          input_ids_BT: int ``[B, T]`` token ids in ``[0, vocab_size)``, ``T <= n_positions``.
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
        """Token plus learned position embeddings ``x_BTD``."""
        with jax.named_scope("wte"):
            wte_VD = self._use(self.wte, ("vocab", "embed"), input_ids_BT)  # gathered: ZeRO-3
            tok_BTD = embed_lookup(wte_VD, input_ids_BT)
        with jax.named_scope("wpe"):
            wpe_PD = self._use(self.wpe, (None, "embed"), positions_BT)
            x_BTD = tok_BTD + embed_lookup(wpe_PD, positions_BT, (None, "embed"))
        return constrain(x_BTD, BTD)

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
        """Run the layers stacked in ``params_L`` (all of them, or a stage's slice).

        Positions are unused (they entered with the embeddings). ``checkpoint_every=k``
        rematerialises in groups of ``k`` layers (see ``scan_layers``); ``outputs`` returns
        ``(x, every layer's output [L, B, T, D])``.
        """
        del positions_BT
        block = partial(gpt2_block, cfg=self.config)
        params_L, bind = prepare_layers(self.layers, with_layer_drop(params_L, self))
        with jax.named_scope("layers"):
            return run_keeping_states(self.layers, partial(
                scan_layers, block, params_L, x_BTD, segment_ids_BT, remat=self.remat,
                axes=stacked_axes(self.layers), group=checkpoint_every,
                gather=self.param_gather, bind=bind,
            ), outputs=outputs)

    def layer_fn(self) -> Callable[..., jax.Array]:
        """``(p, x_BTD, positions_BT, attend) -> x_BTD``: one layer, for the inference engine
        (positions entered with the embeddings)."""
        cfg = self.config
        return lambda p, x, positions, attend: gpt2_block(p, x, None, cfg, attend=attend)

    def head(self, x_BTD: jax.Array) -> jax.Array:
        """Final LayerNorm and the tied output projection: ``logits_BTV``."""
        cfg = self.config
        with jax.named_scope("ln_f"):
            h_BTD = layer_norm(x_BTD, self._use(self.ln_f_scale, ("embed",)),
                               self._use(self.ln_f_bias, ("embed",)), cfg.layer_norm_epsilon)
        with jax.named_scope("lm_head"):
            wte_VD = self._use(self.wte, ("vocab", "embed"), h_BTD)
            logits_BTV = jnp.einsum("BTD,VD->BTV", h_BTD, wte_VD)
            return constrain(logits_BTV, ("batch", "seq", "vocab"))


__all__ = ["ACTIVATIONS", "GPT2", "GPT2Config", "GPT2Layers", "gpt2_block", "layer_norm"]
