"""The inference engine: ``jds.init_inference(model, config)``.

One jitted forward pass serves everything — prompt prefill, decoding, and any mix of the
two. It takes a flat, ragged batch of tokens from up to ``max_seqs`` sequences (each token
with its sequence's block table and its position), writes their K/V into the paged cache
(``kv_cache.py``), attends over each sequence's cached tokens, and samples the next token
of every sequence whose newest token is in the batch. ``Scheduler`` (``scheduler.py``)
packs those batches with Dynamic SplitFuse; ``generate`` is submit-all then step until done.

Shapes are bucketed (token count rounded up to a power of two, at most ``max_batch_tokens``;
``max_seqs`` rows of logits; block tables of ``max_tokens / kv_block_size`` entries), so the
step compiles once per bucket, never per prompt length; the cache arrays are donated.

Tensor parallelism uses the training rules (heads, kv-heads, MLP and vocabulary over
``tensor``; the cache's kv-heads too), so a trained jds model or a Hugging Face checkpoint
is served as it is. ``dtype="int8"`` quantizes every layer matrix once, per output channel
(``jds.kernels.quant.quantize``), and stores int8 weights plus fp32 scales: half the bytes
of bf16. The layers multiply by them with the weight-only int8 matmul
(``jds.kernels.quant.int8_matmul``: the Pallas kernel on GPU/TPU, XLA on CPU), activations
in bf16 with fp32 accumulation. A model trained with DeepSpeed Compression's activation
quantization has the same layer inputs quantized as in training (its static ranges too);
in int8 mode symmetric 8-bit inputs are multiplied as int8 codes by the int8 weights (W8A8,
``InferenceConfig.w8a8``).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec
from jax.sharding import PartitionSpec as P
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from jds.config import ConfigError
from jds.inference import sampling
from jds.inference.kv_cache import (
    SCRATCH_BLOCK,
    BlockAllocator,
    paged_attention_reference,
    storage_dtype,
    write_pages,
)
from jds.inference.loading import (  # noqa: F401 - re-exported: engine's public API
    _DTYPES,
    _trained_compression,
    load_model,
    source_dtype,
    with_input_quantization,
)
from jds.inference.sampling import TOP_LOGPROBS
from jds.inference.scheduler import Request, Scheduler, Work
from jds.kernels.platform import lowering_for
from jds.kernels.quant import quantize
from jds.models.base import is_stacked_decoder, split_model
from jds.models.layers import QuantizedWeight, layer_states
from jds.partitioning.mesh import make_mesh
from jds.partitioning.rules import DEFAULT_RULES, logical_to_spec, use_rules

PyTree = Any



class InferenceConfig(BaseModel):
    """``init_inference``'s config: DeepSpeed's inference keys where they mean something here,
    and jds's own.

    DeepSpeed keys: ``dtype`` (jds adds ``"auto"``: the checkpoint's own dtype,
    ``source_dtype``; ``jds serve``'s default), ``tensor_parallel.tp_size`` (or the old
    ``mp_size``),
    ``max_tokens`` (``max_out_tokens``): the longest sequence, prompt included. jds keys:
    ``kv_block_size``, ``max_batch_tokens`` (tokens per forward pass), ``max_seqs``
    (sequences batched at once), ``num_kv_blocks`` (default: room for ``max_seqs`` full
    sequences), ``attention``: ``"reference"`` (plain XLA, the default everywhere until the
    kernel is measured on the hardware), ``"pallas"`` (``jds.kernels.attention.paged``, GPU
    only), ``"pallas_tpu"`` (``jds.kernels.attention.paged_tpu``, TPU only), or
    ``"pallas_interpret"`` / ``"pallas_tpu_interpret"`` (the same kernels interpreted; any
    backend, for tests),
    ``decode_steps``: when a pass would hold only decodes (every running sequence past its
    prompt), run up to this many decode steps in one compiled call, the sampled tokens fed
    back on the device. It divides the host's share of each step (planning, building the
    batch, dispatch, reading the tokens back) by that many; a new request waits at most that
    many steps longer to start, and streamed tokens arrive in groups of up to that many.
    ``prefix_caching``: a prompt that starts with blocks of tokens an earlier request already
    computed (a shared system prompt, a multi-turn chat) reuses their cached K/V and computes
    only the rest (``jds.inference.kv_cache``).
    ``compression_training``: the training config's DeepSpeed Compression section; with
    ``dtype: "int8"`` the matrices its weight quantization trained are stored as its codes
    and scales (``quantize_layers``). A jds run folder's own section is used by default.
    ``w8a8``: for a model trained with activation quantization (symmetric, at most 8
    bits), ``dtype: "int8"`` multiplies those layers' int8 input codes by the int8 weights
    in integers (``jds.kernels.quant.w8a8_matmul``, exact int32 sums); false: the inputs
    are fake-quantized in the compute dtype for the weight-only int8 matmul.
    """

    model_config = ConfigDict(extra="forbid")

    dtype: Literal["float32", "bfloat16", "float16", "int8", "auto"] = "bfloat16"
    tp_size: int = Field(1, ge=1)
    max_tokens: int = Field(1024, ge=2)
    kv_block_size: int = Field(16, ge=1)
    max_batch_tokens: int = Field(256, ge=1)
    max_seqs: int = Field(16, ge=1)
    num_kv_blocks: int | None = Field(None, ge=2)
    attention: Literal["reference", "pallas", "pallas_interpret", "pallas_tpu",
                       "pallas_tpu_interpret"] = "reference"
    decode_steps: int = Field(4, ge=1)
    prefix_caching: bool = True
    compression_training: dict[str, Any] | None = None
    w8a8: bool = True

    @field_validator("dtype", mode="before")
    @classmethod
    def _dtype(cls, v: Any) -> Any:
        name = str(v).removeprefix("torch.").lower()
        if name not in _DTYPES:
            raise ValueError(f"dtype {v!r}: use one of float32, bfloat16, float16, int8, auto")
        return _DTYPES[name]

    @classmethod
    def load(cls, config: Mapping[str, Any] | InferenceConfig | None) -> InferenceConfig:
        """Validate a dict (DeepSpeed's nested ``tensor_parallel`` accepted).

        Raises:
          ConfigError: naming the key and the fix.
        """
        if isinstance(config, InferenceConfig):
            return config
        data = dict(config or {})
        tp = data.pop("tensor_parallel", None)
        if tp is not None:
            if not isinstance(tp, Mapping) or set(tp) - {"tp_size", "enabled"}:
                raise ConfigError('tensor_parallel: expected {"tp_size": N}; got ' + repr(tp))
            data.setdefault("tp_size", tp.get("tp_size", 1))
        if "mp_size" in data:
            data.setdefault("tp_size", data.pop("mp_size"))
        if "max_out_tokens" in data:
            data.setdefault("max_tokens", data.pop("max_out_tokens"))
        for key in ("replace_with_kernel_inject", "enable_cuda_graph"):
            if data.pop(key, None):
                warnings.warn(f"init_inference: {key} has no meaning in jds (the step is "
                              "one compiled XLA program); ignored", stacklevel=3)
        try:
            return cls.model_validate(data)
        except ValidationError as e:
            lines = [f"{'.'.join(map(str, err['loc'])) or '(config)'}: {err['msg']}"
                     for err in e.errors()]
            raise ConfigError("invalid inference config: " + "; ".join(lines)) from None


def _compute_dtype(name: str) -> Any:
    return {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16,
            "int8": jnp.bfloat16}[name]


def _contraction_dims(axes: tuple[str | None, ...]) -> int:
    """Leading input dims of a layer matrix: 2 for ``[heads, head_dim, embed]`` (the output
    projection), else 1."""
    return 2 if axes[:2] == ("heads", "head_dim") else 1


def quantize_layers(layers: dict[str, jax.Array], axes: dict[str, tuple],
                    qat: Any = None) -> dict[str, Any]:
    """Per-output-channel int8 of every stacked layer matrix (vectors stay as they are).

    ``qat``: a ``jds.compression.QuantizationPlan`` the model was trained with; the layers it
    quantized are stored as its quantizer's codes and scales (``int8_codes``: exactly the
    weights the model was trained on, not quantized a second time), the others per channel.

    Returns:
      The layer dict with each matrix replaced by a ``QuantizedWeight`` (int8 ``[L, ...]``,
      fp32 scales ``[L, out...]``), which the layer function multiplies with
      ``jds.kernels.quant.int8_matmul`` (``jds.models.layers.dense``).
    """
    out: dict[str, Any] = {}
    for name, w in layers.items():
        ax = axes[name]
        if w.ndim - 1 < 2:
            out[name] = w
            continue
        c = _contraction_dims(ax[1:])
        k = math.prod(w.shape[1:1 + c])

        def one(w_l, k=k, c=c):
            q, s = quantize(w_l.reshape(k, -1), axis=0)
            return q.reshape(w_l.shape), s.reshape(w_l.shape[c:])

        q, s = jax.vmap(one)(w)
        trained = None if qat is None else qat.int8_codes(("layers", name), w, c, layers)
        if trained is not None:
            codes, scales, mask = trained
            q = jnp.where(mask.reshape((-1,) + (1,) * (q.ndim - 1)), codes, q)
            s = jnp.where(mask.reshape((-1,) + (1,) * (s.ndim - 1)), scales, s)
        out[name] = QuantizedWeight(q=q, scale=s, n_in=c, axes=tuple(ax[1:]))
    return out


class InferenceEngine:
    """Tensor-parallel generation with a paged KV cache and continuous batching.

    Attributes:
      config: the ``InferenceConfig``.
      mesh: ``tensor = tp_size`` devices.
      params: the weights (sharded; int8 layer matrices in int8 mode).
      max_len: longest sequence (``min(max_tokens, model positions)``).
    """

    def __init__(self, model: nnx.Module | str | os.PathLike,
                 config: Mapping[str, Any] | InferenceConfig | None = None, *,
                 devices: Sequence[jax.Device] | None = None) -> None:
        self.config = cfg = InferenceConfig.load(config)
        self.dtype_name = source_dtype(model) if cfg.dtype == "auto" else cfg.dtype
        compression = cfg.compression_training or (
            _trained_compression(model) if cfg.dtype == "int8" else None)
        model = with_input_quantization(load_model(model), cfg.compression_training)
        if not is_stacked_decoder(model):
            raise TypeError(f"init_inference serves stacked decoders (jds.models.base."
                            f"StackedDecoder: jds's Llama and GPT-2); {type(model).__name__} "
                            "is not one")
        self.model_config = model.config
        devices = list(devices if devices is not None else jax.devices())
        if cfg.tp_size > len(devices):
            raise ConfigError(f"tensor_parallel.tp_size={cfg.tp_size} but only {len(devices)} "
                              f"devices are visible; use at most {len(devices)}")
        platform = devices[0].platform
        if cfg.attention == "pallas" and platform not in ("gpu", "cuda", "rocm"):
            raise ConfigError(
                f"attention='pallas' runs the Triton paged-attention kernel, which needs a GPU; "
                f"these devices are {platform!r}. Use attention='reference' (or "
                "'pallas_tpu' on TPU, 'pallas_interpret' to run the kernel interpreted)")
        if cfg.attention == "pallas_tpu" and platform != "tpu":
            raise ConfigError(
                f"attention='pallas_tpu' runs the Mosaic paged-attention kernel, which needs a "
                f"TPU; these devices are {platform!r}. Use attention='reference' (or 'pallas' "
                "on GPU, 'pallas_tpu_interpret' to run the kernel interpreted)")
        self.mesh = make_mesh({"data": 1, "fsdp": 1, "tensor": cfg.tp_size, "stage": 1},
                              devices[:cfg.tp_size])
        self.rules = DEFAULT_RULES
        self.dtype = _compute_dtype(self.dtype_name)
        self.max_len = min(cfg.max_tokens, int(self.model_config.max_positions))
        self.vocab_size = int(self.model_config.vocab_size)

        # The model's own graph on a copy without a ZeRO gather: a model taken from a
        # training engine (engine.model) would otherwise constrain to that engine's mesh.
        split = split_model(model)
        self._graphdef = split.eval_graphdef
        pure, axes = split.params, split.params_axes
        # a model trained with activation quantization quantizes its layers' inputs here too
        # (jds.compression.activation.serving_bind), with its static ranges as trained (fp32)
        self._quantizes_inputs = bool(getattr(model.layers, "act_quant", None))
        act_ranges = {k: jnp.asarray(v, jnp.float32) for k, v in
                      layer_states(model.layers).items()}
        self._layer_axes = {k: tuple(a)[1:] for k, a in axes["layers"].items()}
        specs = jax.tree.map(
            lambda a, x: logical_to_spec(tuple(a), self.rules, mesh=self.mesh,
                                         shape=tuple(x.shape), what="param"),
            axes, pure, is_leaf=lambda x: isinstance(x, tuple))
        # int8 mode quantizes the layer matrices from the fp32 weights, not from bf16 copies
        # (a quantization-aware model's codes are those of its fp32 weights)
        cast = {k: jax.tree.map(lambda x, k=k: jnp.asarray(x, jnp.float32 if (
            cfg.dtype == "int8" and k == "layers") else self.dtype), v) for k, v in pure.items()}
        params = jax.device_put(cast, jax.tree.map(lambda s: NamedSharding(self.mesh, s), specs,
                                                   is_leaf=lambda x: isinstance(x, PartitionSpec)))
        self._abstract_layers = {**jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, self.dtype), params["layers"]),
            **jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), act_ranges)}
        self.qat = None  # the quantization-aware training plan whose codes int8 mode serves
        if cfg.dtype == "int8" and compression:
            from jds.compression import plan as quantization_plan
            from jds.config.compression import CompressionConfig

            try:
                self.qat = quantization_plan(model, CompressionConfig.model_validate(
                    compression))
                if self.qat is not None:  # refuse what int8 cannot hold, before the jit
                    self.qat.check_int8()
            except ValueError as e:
                raise ConfigError(f"compression_training: {e}") from None
        if cfg.dtype == "int8":
            with use_rules(self.mesh, self.rules):
                params["layers"] = jax.jit(lambda ly: {
                    k: v if isinstance(v, QuantizedWeight) else v.astype(self.dtype)
                    for k, v in quantize_layers(ly, {k: ("layers", *a) for k, a in
                                                     self._layer_axes.items()}, self.qat).items()
                })(params["layers"])
        params["layers"] = {**params["layers"], **jax.device_put(
            act_ranges, NamedSharding(self.mesh, PartitionSpec()))}
        self.params = params
        del cast, pure

        # KV cache: [layers, blocks, block_size, kv_heads, head_dim], kv_heads over tensor.
        L = self._abstract_layers[next(iter(self._abstract_layers))].shape[0]
        K, H = _kv_shape(self.model_config)
        bs = cfg.kv_block_size
        self.max_blocks = math.ceil(self.max_len / bs)
        n_blocks = cfg.num_kv_blocks or cfg.max_seqs * self.max_blocks + 1
        self.allocator = BlockAllocator(n_blocks, bs)
        self.scheduler = Scheduler(self.allocator, max_seqs=cfg.max_seqs,
                                   max_batch_tokens=cfg.max_batch_tokens,
                                   prefix_caching=cfg.prefix_caching)
        page_spec = logical_to_spec((None, None, None, "kv_heads", "head_dim"), self.rules,
                                    mesh=self.mesh, shape=(L, n_blocks, bs, K, H), what="cache")
        self._page_sharding = NamedSharding(self.mesh, page_spec)
        cache_dtype = storage_dtype(self.dtype, platform)
        zeros = jax.jit(lambda: jnp.zeros((L, n_blocks, bs, K, H), cache_dtype),
                        out_shardings=self._page_sharding)
        self.k_pages, self.v_pages = zeros(), zeros()
        # sampling state per slot (sampling.py): generated-token counts, logit bias
        rows = NamedSharding(self.mesh, PartitionSpec())
        self.counts = jax.device_put(np.zeros((cfg.max_seqs, self.vocab_size), np.int32), rows)
        self.bias = jax.device_put(np.zeros((cfg.max_seqs, self.vocab_size), np.float32), rows)
        # The cache comes back with exactly the sharding it went in with: another spelling
        # of the same layout (P() on one device) would make the next call compile again.
        pages, rep = self._page_sharding, NamedSharding(self.mesh, PartitionSpec())
        self._step = jax.jit(self._forward, donate_argnums=(1, 2, 3),
                             out_shardings=(pages, pages, rep, rep, rep))
        self._decode = jax.jit(self._decode_steps, donate_argnums=(1, 2, 3),
                               static_argnames=("steps",),
                               out_shardings=(pages, pages, rep, rep, rep))
        self._requests: dict[int, Request] = {}

    # ------------------------------------------------------------------ the compiled pass
    def _model(self, params: PyTree) -> nnx.Module:
        shared = {k: v for k, v in params.items() if k != "layers"}
        return nnx.merge(self._graphdef, {**shared, "layers": self._abstract_layers})

    def _forward(self, params, k_pages, v_pages, counts, bias, b):
        """One ragged pass: write K/V, attend over the pages, sample per sequence row
        (penalties, bias, log-probabilities: ``sampling.py``). Returns the cache, the
        updated token counts, the tokens and their log-probabilities."""
        with use_rules(self.mesh, self.rules):
            model = self._model(params)
            layer = model.layer_fn()
            ids_1N, pos_1N = b["tokens"][None], b["positions"][None]
            x_1ND = model.embed(ids_1N, pos_1N)

            # The cache rides in the scan's carry and each layer writes its slice in place;
            # as scanned inputs and outputs it would be copied whole on every pass.
            def body(carry, xs):
                x_1ND, k_pages, v_pages = carry
                p_l, l = xs
                new = {}

                def attend(q_1NQH, k_1NKH, v_1NKH):
                    new["k"] = write_pages(k_pages, k_1NKH[0], b["block"], b["offset"], l)
                    new["v"] = write_pages(v_pages, v_1NKH[0], b["block"], b["offset"], l)
                    o = self._attention(q_1NQH[0], new["k"], new["v"], b["tables"],
                                        b["positions"], l)
                    return o[None]

                if self._quantizes_inputs:
                    from jds.compression.activation import serving_bind

                    p_l = serving_bind(model.layers, p_l, l, integer=(
                        self.config.dtype == "int8" and self.config.w8a8))
                x_1ND = layer(p_l, x_1ND, pos_1N, attend)
                return (x_1ND, new["k"], new["v"]), None

            n_layers = k_pages.shape[0]
            (x_1ND, k_pages, v_pages), _ = jax.lax.scan(
                body, (x_1ND, k_pages, v_pages),
                (params["layers"], jnp.arange(n_layers, dtype=jnp.int32)))
            h_1SD = x_1ND[:, b["last"]]
            logits_SV = model.head(h_1SD)[0].astype(jnp.float32)
            adjusted = sampling.adjust(logits_SV, counts, bias, b["presence"], b["frequency"],
                                       b["use_bias"])
            tokens_S = sampling.sample(adjusted, b["temperature"], b["top_k"], b["top_p"],
                                       b["seed"], b["sample_pos"])
            logprobs = sampling.logprobs(logits_SV, tokens_S, b["logprobs"])
            counts = sampling.count(counts, tokens_S, b["count"])
        return k_pages, v_pages, counts, tokens_S, logprobs

    def _decode_steps(self, params, k_pages, v_pages, counts, bias, d, *, steps: int):
        """``steps`` decode passes in one call: row ``s`` is slot ``s``; each pass feeds the
        token the last one sampled. A row stops writing (to the scratch block) after its
        ``d["steps"]`` active steps. Returns the cache, the token counts, the tokens
        ``[steps, slots]`` and
        their log-probabilities (``_logprobs``, each with a leading ``steps`` axis)."""
        S, bs = self.config.max_seqs, self.config.kv_block_size
        rows = jnp.arange(S, dtype=jnp.int32)

        def one(carry, j):
            k_pages, v_pages, counts, tok_N = carry
            active = j < d["steps"]  # [N]; rows past S never are
            pos = d["positions"] + j
            block = jnp.take_along_axis(d["tables"], (pos // bs)[:, None], axis=1)[:, 0]
            b = {"tokens": tok_N, "positions": jnp.where(active, pos, 0),
                 "block": jnp.where(active, block, SCRATCH_BLOCK),
                 "offset": jnp.where(active, pos % bs, 0), "tables": d["tables"],
                 "last": rows, "temperature": d["temperature"], "top_k": d["top_k"],
                 "top_p": d["top_p"], "seed": d["seed"], "sample_pos": pos[:S] + 1,
                 "logprobs": d["logprobs"], "presence": d["presence"],
                 "frequency": d["frequency"], "use_bias": d["use_bias"], "count": active[:S]}
            k_pages, v_pages, counts, new_S, lp = self._forward(params, k_pages, v_pages,
                                                                counts, bias, b)
            tok_N = tok_N.at[:S].set(jnp.where(active[:S], new_S, tok_N[:S]))
            return (k_pages, v_pages, counts, tok_N), (tok_N[:S], lp)

        (k_pages, v_pages, counts, _), (tokens_KS, lp_K) = jax.lax.scan(
            one, (k_pages, v_pages, counts, d["tokens"]), jnp.arange(steps, dtype=jnp.int32))
        return k_pages, v_pages, counts, tokens_KS, lp_K

    def _attention(self, q_NQH, k_pages, v_pages, tables_NM, positions_N, layer):
        """Attention of the pass's tokens over the stacked cache's ``layer``."""
        impl = self.config.attention
        if impl == "reference":
            return paged_attention_reference(q_NQH, k_pages, v_pages, tables_NM, positions_N,
                                             layer=layer)
        if impl.startswith("pallas_tpu"):
            from jds.kernels.attention.paged_tpu import paged_attention_tpu as paged_attention
        else:
            from jds.kernels.attention.paged import paged_attention

        def kernel(q, kp, vp, tables, positions, layer):
            return paged_attention(q, kp, vp, tables, positions, layer=layer,
                                   interpret=impl.endswith("interpret"))

        if self.config.tp_size == 1:
            return kernel(q_NQH, k_pages, v_pages, tables_NM, positions_N, layer)
        # A Pallas call is opaque to XLA's partitioner: run it per tensor-parallel rank on
        # that rank's heads and kv heads.
        heads, pages, rep = P(None, "tensor", None), P(None, None, None, "tensor", None), P()
        return jax.shard_map(kernel, mesh=self.mesh,
                             in_specs=(heads, pages, pages, rep, rep, rep),
                             out_specs=heads, check_vma=False)(
            q_NQH, k_pages, v_pages, tables_NM, positions_N, layer)

    # ------------------------------------------------------------------ requests
    def submit(self, prompt: Sequence[int], max_new_tokens: int = 16, *,
               temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
               seed: int = 0, stop_tokens: Iterable[int] | None = None,
               logprobs: int | None = None, presence_penalty: float = 0.0,
               frequency_penalty: float = 0.0,
               logit_bias: Mapping[int, float] | None = None) -> int:
        """Queue a request; ``step()`` advances it. Returns its id.

        ``logprobs`` (0 to ``TOP_LOGPROBS``) records each generated token's log-probability
        and that many most likely alternatives in ``result(rid).token_logprobs``.
        ``presence_penalty`` / ``frequency_penalty`` (-2 to 2) and ``logit_bias`` ({token id:
        -100 to 100}) change the logits as OpenAI defines them (``sampling.py``).

        Raises:
          ValueError: an empty or out-of-range prompt, one that leaves no room within
            ``max_len``, or bad sampling arguments.
        """
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("prompt is empty; give at least one token id")
        if min(prompt) < 0 or max(prompt) >= self.vocab_size:
            raise ValueError(f"prompt holds ids in [{min(prompt)}, {max(prompt)}] but the "
                             f"model's vocab_size is {self.vocab_size}")
        if len(prompt) >= self.max_len:
            raise ValueError(f"the prompt ({len(prompt)} tokens) leaves no room within "
                             f"{self.max_len} tokens (max_tokens / the model's positions)")
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy); got {temperature}")
        if top_k is not None and not 1 <= top_k <= self.vocab_size:
            raise ValueError(f"top_k must be in [1, {self.vocab_size}]; got {top_k}")
        if top_p is not None and not 0 < top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1]; got {top_p}")
        if logprobs is not None and not 0 <= logprobs <= TOP_LOGPROBS:
            raise ValueError(f"logprobs must be in [0, {TOP_LOGPROBS}]; got {logprobs}")
        for name, v in (("presence_penalty", presence_penalty),
                        ("frequency_penalty", frequency_penalty)):
            if not -2 <= v <= 2:
                raise ValueError(f"{name} must be in [-2, 2]; got {v}")
        bias = {int(t): float(v) for t, v in (logit_bias or {}).items()}
        bad = [t for t, v in bias.items() if not (0 <= t < self.vocab_size and -100 <= v <= 100)]
        if bad:
            raise ValueError(f"logit_bias needs token ids in [0, {self.vocab_size}) and values "
                             f"in [-100, 100]; got {bad[0]}: {bias[bad[0]]}")
        req = Request(rid=self.scheduler.next_id(), prompt=prompt,
                      max_new_tokens=int(max_new_tokens), temperature=float(temperature),
                      top_k=top_k, top_p=top_p, seed=int(seed),
                      stop_tokens=frozenset(int(t) for t in (stop_tokens or ())),
                      limit=self.max_len, logprobs=logprobs,
                      presence_penalty=float(presence_penalty),
                      frequency_penalty=float(frequency_penalty), logit_bias=bias)
        self.scheduler.add(req)
        self._requests[req.rid] = req
        return req.rid

    def _bucket(self, n: int) -> int:
        """Tokens per pass padded to a power of two (16 at least): few distinct shapes."""
        return min(max(16, 1 << (n - 1).bit_length()), max(self.config.max_batch_tokens, 16))

    def _table_width(self, n_blocks: int) -> int:
        """Block-table columns for a pass whose longest sequence holds ``n_blocks`` blocks:
        a power of two, at least ``max_blocks / 4`` (so at most 3 widths are compiled), at
        most ``max_blocks``. The reference attention gathers every column for every token,
        so short contexts should not pay for the longest possible one."""
        floor = max(1, self.max_blocks // 4)
        return min(self.max_blocks, max(floor, 1 << max(n_blocks - 1, 0).bit_length()))

    def _batch(self, work: list[Work], n: int | None = None, width: int | None = None
               ) -> dict[str, np.ndarray]:
        cfg = self.config
        N = self._bucket(sum(w.stop - w.start for w in work) if n is None else n)
        tables = {w.request.rid: self.allocator.table(w.request.rid) for w in work}
        M = width or self._table_width(max((len(t) for t in tables.values()), default=1))
        S, bs = cfg.max_seqs, cfg.kv_block_size
        b = {"tokens": np.zeros(N, np.int32), "positions": np.zeros(N, np.int32),
             "block": np.full(N, SCRATCH_BLOCK, np.int32), "offset": np.zeros(N, np.int32),
             "tables": np.full((N, M), SCRATCH_BLOCK, np.int32),
             "last": np.zeros(S, np.int32), "temperature": np.zeros(S, np.float32),
             "top_k": np.zeros(S, np.int32), "top_p": np.zeros(S, np.float32),
             "seed": np.zeros(S, np.int32), "sample_pos": np.zeros(S, np.int32),
             "logprobs": np.zeros(S, bool), "presence": np.zeros(S, np.float32),
             "frequency": np.zeros(S, np.float32), "use_bias": np.zeros(S, bool),
             "count": np.zeros(S, bool)}
        i = 0
        for w in work:
            r = w.request
            toks = r.tokens()[w.start:w.stop]
            table = tables[r.rid]
            pos = np.arange(w.start, w.stop)
            sl = slice(i, i + len(toks))
            b["tokens"][sl], b["positions"][sl] = toks, pos
            b["block"][sl] = np.asarray(table)[pos // bs]
            b["offset"][sl] = pos % bs
            b["tables"][sl, :len(table)] = table
            if w.sample:
                s = r.slot
                b["last"][s] = i + len(toks) - 1
                b["temperature"][s] = r.temperature
                b["top_k"][s] = r.top_k or 0
                b["top_p"][s] = r.top_p or 0.0
                b["seed"][s], b["sample_pos"][s] = r.seed, w.stop
                b["logprobs"][s] = r.logprobs is not None
                b["presence"][s], b["frequency"][s] = r.presence_penalty, r.frequency_penalty
                b["use_bias"][s], b["count"][s] = bool(r.logit_bias), True
            i += len(toks)
        return b

    def lower_step(self, tokens: int = 1, *, platform: str | None = None
                   ) -> jax.stages.Lowered:
        """Lower one forward pass of ``tokens`` tokens (bucketed as ``step`` does) without
        running it: the HLO, or the program for another platform.

        Args:
          tokens: tokens in the pass (1 is a one-sequence decode step).
          platform: ``"cuda"``, ``"rocm"`` or ``"tpu"`` to lower for that backend from this
            host (``jds.kernels.platform.lowering_for``: the dispatchers pick its kernels).
        """
        b = self._batch([], tokens)
        # A new closure: traces are cached per function, and the platform changes the trace.
        fn = jax.jit(lambda *args: self._forward(*args))
        with lowering_for(platform):
            traced = fn.trace(self.params, self.k_pages, self.v_pages, self.counts, self.bias,
                              b)
            return traced.lower(lowering_platforms=None if platform is None else (platform,))

    def step(self) -> list[tuple[int, int, bool]]:
        """Run one forward pass of the scheduler's next batch.

        Returns:
          ``(request id, new token, finished)`` for every sequence that produced a token.
        """
        work = self.scheduler.plan()
        if not work:
            return []
        K = self.config.decode_steps
        if (K > 1 and len(work) == len(self.scheduler.running)
                and all(w.sample and w.stop - w.start == 1 and not w.request.prefilling
                        for w in work)
                and max(map(self._remaining, (w.request for w in work))) >= K):
            return self._multi_step(work)
        self._sampling_rows(work)
        b = self._batch(work)
        self.k_pages, self.v_pages, self.counts, tokens_S, lp = self._step(
            self.params, self.k_pages, self.v_pages, self.counts, self.bias, b)
        tokens_S = np.asarray(tokens_S)
        lp = jax.tree.map(np.asarray, lp) if b["logprobs"].any() else None
        events = []
        for w in work:
            r = w.request
            r.cached = w.stop
            self.scheduler.computed(r)
            if w.sample:
                events.append(self._emit(r, int(tokens_S[r.slot]),
                                         None if lp is None else [x[r.slot] for x in lp]))
        return events

    def _sampling_rows(self, work: list[Work]) -> None:
        """Set up the sampling-state row of each newly admitted request that uses a penalty
        or a logit bias (its counts zeroed, its bias written): once, before its first pass."""
        for w in work:
            r = w.request
            if r.sampling_row or not (r.presence_penalty or r.frequency_penalty or r.logit_bias):
                continue
            n = max(8, 1 << (max(len(r.logit_bias), 1) - 1).bit_length())  # few shapes
            ids, values = np.zeros(n, np.int32), np.zeros(n, np.float32)
            ids[:len(r.logit_bias)] = list(r.logit_bias)
            values[:len(r.logit_bias)] = list(r.logit_bias.values())
            self.counts, self.bias = sampling.set_row(self.counts, self.bias, np.int32(r.slot),
                                                      ids, values)
            r.sampling_row = True

    @staticmethod
    def _remaining(r: Request) -> int:
        """Tokens ``r`` may still generate."""
        return min(r.max_new_tokens - len(r.output), r.limit - len(r.tokens()))

    def _multi_step(self, work: list[Work]) -> list[tuple[int, int, bool]]:
        """``decode_steps`` decode passes of every running sequence in one call (one compiled
        variant per table width; rows with fewer tokens left idle after theirs)."""
        reqs = [w.request for w in work]
        self._sampling_rows(work)
        remaining = {r.rid: self._remaining(r) for r in reqs}
        steps = self.config.decode_steps
        tables = {r.rid: self.scheduler.extend(r, r.cached + min(steps, remaining[r.rid]))
                  for r in reqs}
        d = self._decode_inputs(reqs, tables, {k: min(steps, v) for k, v in remaining.items()})
        self.k_pages, self.v_pages, self.counts, tokens_KS, lp = self._decode(
            self.params, self.k_pages, self.v_pages, self.counts, self.bias, d, steps=steps)
        tokens_KS = np.asarray(tokens_KS)
        lp = jax.tree.map(np.asarray, lp) if d["logprobs"].any() else None
        events = []
        for j in range(steps):
            for r in reqs:
                if r.finish_reason is not None or j >= d["steps"][r.slot]:
                    continue
                r.cached += 1
                self.scheduler.computed(r)
                events.append(self._emit(r, int(tokens_KS[j, r.slot]), None if lp is None
                                         else [x[j, r.slot] for x in lp]))
        return events

    def _decode_inputs(self, reqs: list[Request], tables: dict[int, list[int]],
                       steps: dict[int, int], width: int | None = None
                       ) -> dict[str, np.ndarray]:
        """The multi-step call's per-slot inputs (rows without a request stay idle)."""
        S = self.config.max_seqs
        M = width or self._table_width(max((len(t) for t in tables.values()), default=1))
        N = max(16, 1 << (S - 1).bit_length())
        d = {"tokens": np.zeros(N, np.int32), "positions": np.zeros(N, np.int32),
             "steps": np.zeros(N, np.int32),
             "tables": np.full((N, M), SCRATCH_BLOCK, np.int32),
             "temperature": np.zeros(S, np.float32), "top_k": np.zeros(S, np.int32),
             "top_p": np.zeros(S, np.float32), "seed": np.zeros(S, np.int32),
             "logprobs": np.zeros(S, bool), "presence": np.zeros(S, np.float32),
             "frequency": np.zeros(S, np.float32), "use_bias": np.zeros(S, bool)}
        for r in reqs:
            s, table = r.slot, tables[r.rid]
            d["tokens"][s], d["positions"][s] = r.tokens()[-1], r.cached
            d["steps"][s] = steps[r.rid]
            d["tables"][s, :len(table)] = table
            d["temperature"][s], d["top_k"][s] = r.temperature, r.top_k or 0
            d["top_p"][s], d["seed"][s] = r.top_p or 0.0, r.seed
            d["logprobs"][s] = r.logprobs is not None
            d["presence"][s], d["frequency"][s] = r.presence_penalty, r.frequency_penalty
            d["use_bias"][s] = bool(r.logit_bias)
        return d

    def warmup_variants(self) -> list[tuple[str, int, int]]:
        """Every compiled pass the scheduler can ask for: ``("step", tokens bucket, table
        width)`` and, with ``decode_steps > 1``, ``("decode", 0, table width)``; the small
        ones (those short requests need) first."""
        mbt = max(self.config.max_batch_tokens, 16)
        widths = sorted({self._table_width(n) for n in range(1, self.max_blocks + 1)})
        buckets = sorted({self._bucket(n) for n in range(1, mbt + 1)})
        out = [("step", n, m) for m in widths for n in buckets]
        if self.config.decode_steps > 1:
            out += [("decode", 0, m) for m in widths]
        return sorted(out, key=lambda v: (v[2], v[1]))

    def warm(self, variant: tuple[str, int, int]) -> None:
        """Compile (and run once, on an all-padding batch that writes only the scratch
        block) one of ``warmup_variants``. Call it between ``step``s, on the same thread."""
        kind, n, m = variant
        if kind == "step":
            self.k_pages, self.v_pages, self.counts, _, _ = self._step(
                self.params, self.k_pages, self.v_pages, self.counts, self.bias,
                self._batch([], n, m))
        else:
            self.k_pages, self.v_pages, self.counts, _, _ = self._decode(
                self.params, self.k_pages, self.v_pages, self.counts, self.bias,
                self._decode_inputs([], {}, {}, m), steps=self.config.decode_steps)

    def warmup(self) -> int:
        """Compile every pass the scheduler can ask for (``warmup_variants``), so that no
        request waits for a compile. Returns how many variants ran. (``jds serve`` instead
        starts at once and warms them one at a time while it is idle.)"""
        variants = self.warmup_variants()
        for v in variants:
            self.warm(v)
        jax.block_until_ready(self.k_pages)
        return len(variants)

    def _emit(self, r: Request, tok: int, lp: list[np.ndarray] | None = None
              ) -> tuple[int, int, bool]:
        """Append a sampled token (and its log-probabilities ``lp``: chosen, top values,
        top ids); finish the request on a stop token or its length."""
        r.output.append(tok)
        if r.logprobs is not None and lp is not None:
            chosen, values, ids = lp
            top = zip(ids[:r.logprobs], values[:r.logprobs], strict=True)
            r.token_logprobs.append((float(chosen), [(int(i), float(v)) for i, v in top]))
        reason = None
        if tok in r.stop_tokens:
            reason = "stop"
        elif len(r.output) >= r.max_new_tokens or len(r.tokens()) >= r.limit:
            reason = "length"
        if reason is not None:
            self.scheduler.finish(r, reason)
        return r.rid, tok, reason is not None

    def result(self, rid: int) -> Request:
        """The request ``rid`` (its ``output`` and ``finish_reason``)."""
        return self._requests[rid]

    def cancel(self, rid: int) -> None:
        """End request ``rid`` now (``finish_reason`` "cancelled" unless it had finished);
        its KV blocks return to the cache. The output so far stays readable."""
        self.scheduler.cancel(self._requests[rid])

    def release(self, rid: int) -> None:
        """Forget a finished request (frees nothing else: its blocks went back on finish)."""
        if self._requests[rid].finish_reason is None:
            raise ValueError(f"request {rid} is still running")
        del self._requests[rid]

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int = 16, *,
                 temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 0, stop_tokens: Iterable[int] | None = None) -> list[list[int]]:
        """Generate a continuation of every prompt (batched continuously).

        Args:
          prompts: token id lists.
          max_new_tokens: tokens to generate per prompt at most (fewer at ``max_len`` or
            after a stop token, which is included).
          temperature, top_k, top_p: sampling; temperature 0 is greedy.
          seed: request ``i`` samples with ``seed + i``.
          stop_tokens: token ids that end a sequence.

        Returns:
          The generated ids of each prompt (prompt not included).
        """
        rids = [self.submit(p, max_new_tokens, temperature=temperature, top_k=top_k,
                            top_p=top_p, seed=seed + i, stop_tokens=stop_tokens)
                for i, p in enumerate(prompts)]
        while any(self._requests[r].finish_reason is None for r in rids):
            self.step()
        out = [list(self._requests[r].output) for r in rids]
        for r in rids:
            self.release(r)
        return out

    def weight_bytes(self) -> dict[str, int]:
        """Bytes of the weights as stored: ``layers`` (int8 + scales in int8 mode), ``other``."""
        def nbytes(tree):
            return sum(int(x.nbytes) for x in jax.tree.leaves(tree))
        return {"layers": nbytes(self.params["layers"]),
                "other": nbytes({k: v for k, v in self.params.items() if k != "layers"})}


def _kv_shape(cfg: Any) -> tuple[int, int]:
    """``(kv_heads, head_dim)`` of a Llama or GPT-2 config."""
    if hasattr(cfg, "num_key_value_heads"):
        return int(cfg.num_key_value_heads), int(cfg.head_size)
    return int(cfg.n_head), int(cfg.n_embd) // int(cfg.n_head)


def init_inference(model: nnx.Module | str | os.PathLike,
                   config: Mapping[str, Any] | InferenceConfig | None = None, *,
                   devices: Sequence[jax.Device] | None = None) -> InferenceEngine:
    """Build an ``InferenceEngine`` (DeepSpeed's ``deepspeed.init_inference``).

    Args:
      model: an ``nnx.Module``, a preset name, a Hugging Face model directory, or a jds
        run / checkpoint directory (``jds train``'s ``--out``; newest intact step).
      config: ``InferenceConfig`` keys (DeepSpeed's ``dtype``, ``tensor_parallel``,
        ``max_tokens``; jds's ``kv_block_size``, ``max_batch_tokens``, ``max_seqs``,
        ``num_kv_blocks``).
      devices: devices to use (the first ``tp_size``); default all.

    Raises:
      ConfigError: an invalid config, or more tensor-parallel ranks than devices.
    """
    return InferenceEngine(model, config, devices=devices)


__all__ = ["InferenceConfig", "InferenceEngine", "init_inference", "load_model",
           "quantize_layers", "source_dtype"]
