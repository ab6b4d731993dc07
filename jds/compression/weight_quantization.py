"""Weight quantization-aware training (DeepSpeed's ``weight_quantization``, MoQ) on any NNX
model.

**Targets.** DeepSpeed compresses ``Linear``, ``Conv2d`` and ``Embedding`` modules whose
names a group's ``modules`` regexes find (``re.search``; ``"*"`` = all). jds's stacked
decoders (Llama, GPT-2) name each layer's matrices as Hugging Face does
(``model.layers.3.self_attn.q_proj``, ``transformer.h.0.mlp.c_fc``) and as jds does
(``layers.3.wq``), so a pattern may select some layers only (the others are left as they
are inside the same stacked array); their embeddings and LM head are ``model.embed_tokens``
/ ``transformer.wte`` / ``transformer.wpe`` / ``lm_head``. DeepSpeed's own configs are
written for BERT (DeepSpeedExamples' ``compression/bert``, the tutorial's: ``attention.self``,
``intermediate``, ``output.dense``, ``word_embeddings``, ``bert.encoder.layer``) and GPT-2
(``attn.c_attn``, ``mlp.c_fc``); each decoder matrix also answers to the name of the module
with its part (``ROLES``) in those models and in a Llama (``ALIASES``): q/k/v are
``attention.self.query|key|value`` / ``attn.c_attn`` / ``self_attn.q_proj``..., the
attention output ``attention.output.dense`` / ``attn.c_proj``, the MLP's input (Llama's gate
and up) ``intermediate.dense`` / ``mlp.c_fc``, its output ``output.dense`` / ``mlp.c_proj``,
the token embeddings ``bert.embeddings.word_embeddings``. So such a config runs unchanged on
any jds decoder, selecting what it selects in its own model (``output.dense`` finds both
BERT output projections, as DeepSpeed's ``re.search`` does there). Any other model: each
``nnx.Linear``, ``nnx.Conv`` and ``nnx.Embed`` by its attribute path (``encoder.fc1``). A
pattern that matches nothing, or a module two groups claim, is an error naming the group.

**Groups.** DeepSpeed splits a weight in PyTorch's layout (``[out, in]``) into
``quantize_groups`` runs of rows. jds stores ``[in, out]``; the statistics of a group do not
depend on the order of its elements, so jds groups runs of output channels directly (no
transpose), which needs ``quantize_groups`` to divide the output channels (an error says so
otherwise). Embeddings are ``[vocab, dim]`` in both; in ``quantize_weight_in_forward`` mode
DeepSpeed quantizes them per token (groups = vocab), and so does jds. GPT-2's fused
``c_attn`` is three jds matrices (q, k, v); when one group takes all three in the same layers
they are quantized side by side as the one matrix DeepSpeed sees (``HF_FUSED``: its groups
span q, k and v), else each on its own.

**Schedule** (``MoQSchedule``), as DeepSpeed 0.16's engine drives its ``Quantizer``
(tests/fixtures/ds_compression.json): MoQ quantizes after each applied optimizer step, so
the forward pass of step ``t`` sees the weights of quantize call ``q`` = ``t + 1`` when
``schedule_offset`` is 0 and ``t - schedule_offset`` otherwise (none before). Call ``q``
quantizes to ``start_bits`` minus the number of periods passed: the ``k``-th bit drop comes
at call ``quantization_period * 2**(k - 1)`` (at most one per call: period 0 drops a bit
every call), down to ``target_bits``. With
``fp16_mixed_quantize`` the weight used is ``r * w + (1 - r) * q(w)``, ``r`` falling by
``quantize_change_ratio`` per call from 1, and back to 1 at each bit drop (DeepSpeed
subtracts repeatedly and can leave one call at a small negative ``r``; jds clips at 0).
``quantize_weight_in_forward`` quantizes at ``target_bits`` from step ``schedule_offset`` on.

**How.** DeepSpeed's MoQ overwrites the 16-bit weights with their quantized values after
each step and keeps the fp32 master; the gradient of the quantized weights updates the
master. jds computes the same thing in the forward pass with a straight-through estimator,
``stop_gradient(q(w)) + w - stop_gradient(w)``, on the compute-dtype parameters (so the master, the
optimizer and checkpoints keep full precision, and fp32 training works too): the same
forward values and the same gradients. The cost is one quantized copy of the targeted
weights per forward pass (sharded as the weights are under ZeRO-3). Where bits, ratio or
the noise of stochastic rounding change with the step, they are computed from the step in
the compiled program, so nothing recompiles.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
from collections.abc import Callable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jds.compression import quantizers
from jds.config.compression import CompressionConfig

PyTree = Any
_TOP_HF = {"embed_tokens": "model.embed_tokens", "lm_head": "lm_head", "wte": "transformer.wte",
           "wpe": "transformer.wpe"}
# A decoder matrix's module name in the other models DeepSpeed configs are written for, by
# its part in the layer (the layers class's ROLES; see the module docstring): BERT, GPT-2 and
# Llama (Hugging Face names, layer ``{i}``)
ALIASES = {
    "q": ("bert.encoder.layer.{i}.attention.self.query", "transformer.h.{i}.attn.c_attn",
          "model.layers.{i}.self_attn.q_proj"),
    "k": ("bert.encoder.layer.{i}.attention.self.key", "transformer.h.{i}.attn.c_attn",
          "model.layers.{i}.self_attn.k_proj"),
    "v": ("bert.encoder.layer.{i}.attention.self.value", "transformer.h.{i}.attn.c_attn",
          "model.layers.{i}.self_attn.v_proj"),
    "attn_out": ("bert.encoder.layer.{i}.attention.output.dense",
                 "transformer.h.{i}.attn.c_proj", "model.layers.{i}.self_attn.o_proj"),
    "mlp_gate": ("bert.encoder.layer.{i}.intermediate.dense", "transformer.h.{i}.mlp.c_fc",
                 "model.layers.{i}.mlp.gate_proj"),
    "mlp_in": ("bert.encoder.layer.{i}.intermediate.dense", "transformer.h.{i}.mlp.c_fc",
               "model.layers.{i}.mlp.up_proj"),
    "mlp_out": ("bert.encoder.layer.{i}.output.dense", "transformer.h.{i}.mlp.c_proj",
                "model.layers.{i}.mlp.down_proj"),
}
_TOP_ALIASES = {"embed_tokens": ("bert.embeddings.word_embeddings", "transformer.wte"),
                "wte": ("bert.embeddings.word_embeddings", "model.embed_tokens"),
                "wpe": ("bert.embeddings.position_embeddings",)}
_STEP: contextvars.ContextVar[jax.Array | None] = contextvars.ContextVar("jds_quant_step",
                                                                        default=None)


@contextlib.contextmanager
def quantization_step(step: jax.Array | int) -> Iterator[None]:
    """Inside, quantization-aware objectives quantize for optimizer step ``step`` (the
    applied steps so far; the engine's train and eval steps set it)."""
    token = _STEP.set(jnp.asarray(step, jnp.int32))
    try:
        yield
    finally:
        _STEP.reset(token)


@dataclasses.dataclass(frozen=True)
class Target:
    """A compressible weight: where it is in the parameter tree and how it is laid out.

    Attributes:
      path: keys into the pure parameter dict (``nnx.to_pure_dict``).
      names: module names DeepSpeed's patterns are searched in (per layer when stacked).
      layout: ``"linear"`` (``[*in, *out]``, ``n_in`` input dims) or ``"embedding"``
        (``[rows, *dims]``).
      n_in: input dims of a linear weight (after the layer axis when stacked).
      stacked: the leading axis is jds's layer stack.
      shape: the weight's shape.
      module: the module kind DeepSpeed would see: ``"linear"``, ``"conv"`` or
        ``"embedding"`` (pruning applies to some kinds only).
      bias: keys of the bias that goes with the weight (None: none).
    """

    path: tuple
    names: tuple[tuple[str, ...], ...]
    layout: str
    n_in: int
    stacked: bool
    shape: tuple[int, ...] = ()
    module: str = "linear"
    bias: tuple | None = None

    def channels(self) -> int:
        """Rows in DeepSpeed's layout: output channels (linear) or embedding rows."""
        dims = self.shape[1:] if self.stacked else self.shape
        if self.layout == "embedding":
            return int(dims[0])
        n = 1
        for d in dims[self.n_in:]:
            n *= int(d)
        return n


def targets(model: nnx.Module) -> list[Target]:
    """Every compressible weight of ``model`` (see the module docstring)."""
    out: list[Target] = []
    stacked_paths = set()
    for path, m in nnx.iter_modules(model):
        cls = type(m)
        if getattr(cls, "LINEARS", None) and getattr(cls, "HF_NAMES", None):
            path = tuple(path)
            stacked_paths.add(path)
            prefix = ".".join(map(str, path))
            roles = getattr(cls, "ROLES", {})
            for name, n_in in cls.LINEARS.items():
                n_layers = int(getattr(m, name).shape[0])
                own = f"{cls.HF_PREFIX}.{{i}}.{cls.HF_NAMES[name]}"
                aliases = [a for a in ALIASES.get(roles.get(name), ()) if a != own]
                names = tuple((own.format(i=i), f"{prefix}.{i}.{name}",
                               *(a.format(i=i) for a in aliases)) for i in range(n_layers))
                bias = "b" + name[1:]  # wq -> bq, w_up -> b_up
                out.append(Target(path + (name,), names, "linear", n_in, True,
                                  tuple(getattr(m, name).shape), "linear",
                                  path + (bias,) if isinstance(getattr(m, bias, None),
                                                               nnx.Param) else None))
    is_decoder = bool(stacked_paths)
    for path, m in nnx.iter_modules(model):
        path = tuple(path)
        if any(path[:len(s)] == s for s in stacked_paths):
            continue
        dotted = ".".join(map(str, path))
        if isinstance(m, (nnx.Linear, nnx.Conv)):
            n_in = m.kernel.ndim - 1
            out.append(Target(path + ("kernel",), ((dotted,),), "linear", n_in, False,
                              tuple(m.kernel.shape),
                              "conv" if isinstance(m, nnx.Conv) else "linear",
                              path + ("bias",) if getattr(m, "bias", None) is not None else None))
        elif isinstance(m, nnx.Embed):
            out.append(Target(path + ("embedding",), ((dotted,),), "embedding", 0, False,
                              tuple(m.embedding.shape), "embedding"))
        elif is_decoder and not path:  # the decoder's own matrices: embeddings, LM head
            for name, v in vars(m).items():
                if isinstance(v, nnx.Param) and v.get_value().ndim >= 2:
                    axes = tuple(getattr(v, "axes", None) or ())
                    linear = bool(axes) and axes[-1] == "vocab"
                    out.append(Target((name,), ((_TOP_HF.get(name, name), name,
                                                 *_TOP_ALIASES.get(name, ())),),
                                      "linear" if linear else "embedding",
                                      v.get_value().ndim - 1 if linear else 0, False,
                                      tuple(v.get_value().shape),
                                      "linear" if linear else "embedding"))
    return out


def _search(pattern: str, name: str) -> bool:
    return pattern == "*" or re.search(pattern, name) is not None


def matches(found: list[Target], pattern: str, where: str, what: str
            ) -> list[tuple[Target, tuple[bool, ...]]]:
    """The targets a group's ``modules`` pattern selects, each with the layers it selects
    (one entry unless stacked), as DeepSpeed's ``re.search`` over module names.

    Raises:
      ValueError: the pattern selects nothing (``where`` names the key, ``what`` the kind of
        module looked for); the message lists some of the model's modules.
    """
    hits = []
    for t in found:
        layers = tuple(any(_search(pattern, n) for n in names) for names in t.names)
        if any(layers):
            hits.append((t, layers))
    if not hits:
        names = sorted({n for t in found for names in t.names for n in names[:1]})
        raise ValueError(f"{where}: {pattern!r} matches no {what}; the model has {len(names)}"
                         + (f", e.g. {', '.join(names[:6])}" if names else ""))
    return hits


@dataclasses.dataclass(frozen=True)
class MoQSchedule:
    """One group's bit schedule (see the module docstring)."""

    start_bits: int
    target_bits: int
    period: int
    offset: int = 0
    in_forward: bool = False
    change_ratio: float | None = None  # fp16_mixed_quantize

    def calls(self, step: jax.Array) -> jax.Array:
        """MoQ quantize calls made before the forward pass of ``step`` (0: not yet)."""
        step = jnp.asarray(step, jnp.int32)
        if self.offset == 0:
            return step + 1
        return jnp.maximum(step - self.offset, 0)

    def _due(self, k: jax.Array) -> jax.Array:
        """The call of the ``k``-th bit drop: ``period * 2**(k - 1)``, and no sooner than
        call ``k`` (DeepSpeed's ``Quantizer`` drops at most one bit per call; period 0
        drops one every call)."""
        return jnp.maximum(self.period * 2 ** (k - 1), k)

    def _drops(self, q: jax.Array) -> jax.Array:
        k = jnp.arange(1, self.start_bits - self.target_bits + 1, dtype=jnp.int32)
        return jnp.sum(q[..., None] >= self._due(k), axis=-1)

    def __call__(self, step: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """``(quantized, bits, ratio)`` for the forward pass of ``step``: whether the
        weights are quantized, to how many bits, and the full-precision share mixed in."""
        step = jnp.asarray(step, jnp.int32)
        if self.in_forward:
            return step >= self.offset, jnp.int32(self.target_bits), jnp.float32(0.0)
        q = self.calls(step)
        drops = self._drops(q)
        bits = (self.start_bits - drops).astype(jnp.int32)
        ratio = jnp.float32(0.0)
        if self.change_ratio is not None:
            last = jnp.where(drops > 0, self._due(jnp.maximum(drops, 1)), 0)
            ratio = jnp.clip(1.0 - self.change_ratio * (q - last).astype(jnp.float32), 0, 1)
        return q >= 1, bits, ratio


@dataclasses.dataclass(frozen=True)
class Assignment:
    target: Target
    schedule: MoQSchedule
    group: str
    layers: tuple[bool, ...] | None  # stacked: which layers the group quantizes


@dataclasses.dataclass(frozen=True)
class QuantizationPlan:
    """The weights a ``weight_quantization`` config quantizes, and how."""

    assignments: tuple[Assignment, ...]
    groups: int
    kind: str
    stochastic: bool
    seed: int
    verbose: bool = False
    fused: tuple[tuple[tuple, ...], ...] = ()  # member paths of one Hugging Face matrix

    def bits_at(self, step: int) -> dict[str, int | None]:
        """Each group's bit width in the forward pass of ``step`` (None: not quantized yet),
        computed on the host (``quantize_verbose`` prints its changes)."""
        out: dict[str, int | None] = {}
        for a in self.assignments:
            quantized, bits, _ = jax.device_get(a.schedule(jnp.int32(step)))
            out[a.group] = int(bits) if bool(quantized) else None
        return out

    def _one(self, w: jax.Array, a: Assignment, step: jax.Array, key: jax.Array | None
             ) -> jax.Array:
        quantized, bits, ratio = a.schedule(step)
        t = a.target
        groups = self.groups
        if t.layout == "embedding" and a.schedule.in_forward:
            groups = w.shape[1 if t.stacked else 0]  # DeepSpeed: per token

        def matrix(w_m: jax.Array, k: jax.Array | None) -> jax.Array:
            if t.layout == "embedding":
                rows = w_m.shape[0]
                g2 = w_m.reshape(rows, -1)
                if rows % groups:
                    raise ValueError(f"quantize_groups={groups} does not divide the "
                                     f"{rows} rows of {'.'.join(map(str, t.path))}")
                q = quantizers.quantize(g2.reshape(groups, -1), bits, groups, self.kind,
                                        key=k, min_bits=a.schedule.target_bits)
                return q.reshape(w_m.shape)
            n_in = 1
            for d in w_m.shape[:t.n_in]:
                n_in *= d
            n_out = w_m.size // n_in
            if n_out % groups:
                raise ValueError(
                    f"compression_training.weight_quantization.shared_parameters."
                    f"quantize_groups={groups} does not divide the {n_out} output channels of "
                    f"{'.'.join(map(str, t.path))}; use a divisor of them")
            g3 = w_m.reshape(n_in, groups, n_out // groups).transpose(1, 0, 2)
            q = quantizers.quantize(g3.reshape(groups, -1), bits, groups, self.kind, key=k,
                                    min_bits=a.schedule.target_bits)
            return q.reshape(groups, n_in, n_out // groups).transpose(1, 0, 2).reshape(w_m.shape)

        if t.stacked:
            keys = None if key is None else jax.random.split(key, w.shape[0])
            q = jax.vmap(matrix)(w, keys) if keys is not None else jax.vmap(
                lambda x: matrix(x, None))(w)
            if a.layers is not None and not all(a.layers):
                mask = jnp.asarray(a.layers).reshape((-1,) + (1,) * (w.ndim - 1))
                q = jnp.where(mask, q, w.astype(jnp.float32))
        else:
            q = matrix(w, key)
        q = ratio * w.astype(jnp.float32) + (1 - ratio) * q
        q = jnp.where(quantized, q, w.astype(jnp.float32)).astype(w.dtype)
        # straight-through, exactly q in the forward pass (w + (q - w) can be off by a bit)
        return jax.lax.stop_gradient(q) + (w - jax.lax.stop_gradient(w))

    def apply(self, params: PyTree, step: jax.Array) -> PyTree:
        """``params`` with every assigned weight fake-quantized for ``step`` (the gradient
        passes straight through)."""
        flat = dict(_flatten(params))
        base = jax.random.fold_in(jax.random.key(self.seed), step) if self.stochastic else None
        members = {p: f for f in self.fused for p in f}
        for i, a in enumerate(self.assignments):
            key = None if base is None else jax.random.fold_in(base, i)
            f = members.get(a.target.path)
            if f is None:
                flat[a.target.path] = self._one(flat[a.target.path], a, step, key)
            elif a.target.path == f[0]:  # the fused matrix, quantized as one (DeepSpeed)
                ws = [flat[p] for p in f]
                whole = _fuse(ws, a.target.n_in)
                t = dataclasses.replace(a.target, shape=tuple(whole.shape))
                q = self._one(whole, dataclasses.replace(a, target=t), step, key)
                for p, part in zip(f, _unfuse(q, ws, a.target.n_in), strict=True):
                    flat[p] = part
        return _unflatten(params, flat)

    def final(self, params: PyTree) -> PyTree:
        """``params`` quantized at every group's target bits, full precision mixed out (the
        weights ``redundancy_clean`` exports)."""
        done = dataclasses.replace(self, stochastic=False, assignments=tuple(
            dataclasses.replace(a, schedule=dataclasses.replace(
                a.schedule, in_forward=True, offset=0, change_ratio=None))
            for a in self.assignments))
        return done.apply(params, jnp.int32(0))

    def check_int8(self) -> None:
        """Raise ValueError when a targeted weight's quantization is not one the symmetric
        int8 kernels hold exactly (``int8_codes``)."""
        for a in self.assignments:
            bits = a.schedule.target_bits
            if self.kind != "symmetric" or not 3 <= bits <= 8:
                raise ValueError(
                    f"{'.'.join(map(str, a.target.path))} was trained with {self.kind} "
                    f"{bits}-bit quantization; the int8 kernels hold symmetric 3- to 8-bit "
                    "codes exactly. Serve it in bfloat16 (its quantized values: "
                    "jds.compression.redundancy_clean), or train with quantization_type "
                    "'symmetric' and target_bits <= 8")

    def int8_codes(self, path: tuple, w: jax.Array, n_in: int,
                   siblings: dict[str, jax.Array] | None = None
                   ) -> tuple[jax.Array, jax.Array, jax.Array] | None:
        """The int8 form of a stacked weight ``w`` (``[layers, *in, *out]``) at its target
        bits, with the scales its quantizer computes (no second quantization): ``(codes,
        per-output-channel scales [layers, *out], per-layer mask)``, or None when the plan
        does not quantize ``path``. ``codes * scales`` equals what ``final`` writes.

        Raises:
          ValueError: a quantization the symmetric int8 kernels cannot hold exactly
            (asymmetric, more than 8 bits, ternary or binary).
        """
        a = next((x for x in self.assignments if x.target.path == path), None)
        if a is None:
            return None
        self.check_int8()
        groups, half = self.groups, 2 ** (a.schedule.target_bits - 1)

        def one(w_l):
            k = 1
            for d in w_l.shape[:n_in]:
                k *= d
            n_out = w_l.size // k
            g3 = w_l.astype(jnp.float32).reshape(k, groups, n_out // groups)
            scale = 2 * jnp.max(jnp.abs(g3), axis=(0, 2)) / (2.0 * half)
            scale = jnp.where(scale == 0, 1.0, scale)
            codes = jnp.clip(jnp.round(g3 / scale[None, :, None]), -half, half - 1)
            per_channel = jnp.repeat(scale, n_out // groups).reshape(w_l.shape[n_in:])
            return codes.astype(jnp.int8).reshape(w_l.shape), per_channel

        mask = jnp.asarray(a.layers if a.layers is not None else (True,) * w.shape[0])
        f = next((f for f in self.fused if path in f), None)
        if f is None:
            codes, scales = jax.vmap(one)(w)
            return codes, scales, mask
        if siblings is None or any(p[-1] not in siblings for p in f):
            raise ValueError(f"{'.'.join(map(str, path))} was quantized as one matrix with "
                             f"{[p[-1] for p in f]}; pass them as siblings")
        ws = [siblings[p[-1]] for p in f]
        codes, scales = jax.vmap(one)(_fuse(ws, n_in))  # the fused matrix's groups
        i = [p for p in f].index(path)
        c = _unfuse(codes, ws, n_in)[i]
        # per-channel scales: [L, total_out] -> the member's channels, shaped as its outputs
        sizes = [int(np.prod(x.shape[1 + n_in:])) for x in ws]
        start = sum(sizes[:i])
        sc = scales.reshape(scales.shape[0], -1)[:, start:start + sizes[i]]
        return c, sc.reshape((w.shape[0],) + tuple(w.shape[1 + n_in:])), mask

    def wrap(self, objective: Callable) -> Callable:
        """``objective`` with the parameters fake-quantized for the step ``quantization_step``
        names (the engine sets it around its train and eval steps)."""

        def quantized(params, *args, **kwargs):
            step = _STEP.get()
            if step is None:
                raise RuntimeError("a quantization-aware objective ran outside "
                                   "jds.compression.quantization_step(step)")
            return objective(self.apply(params, step), *args, **kwargs)

        return quantized

    def describe(self) -> list[str]:
        """One line per group: its modules and schedule."""
        by_group: dict[str, list[Assignment]] = {}
        for a in self.assignments:
            by_group.setdefault(a.group, []).append(a)
        lines = []
        for g, items in by_group.items():
            s = items[0].schedule
            names = [".".join(map(str, a.target.path)) + (
                "" if a.layers is None or all(a.layers) else
                f"[layers {[i for i, x in enumerate(a.layers) if x]}]") for a in items]
            lines.append(f"{g}: {s.start_bits} -> {s.target_bits} bits every "
                         f"{s.period} steps from step {s.offset}: {', '.join(names)}")
        return lines


def _fuse(ws: list[jax.Array], n_in: int) -> jax.Array:
    """Stacked matrices ``[L, *in, *out_i]`` side by side as ``[L, *in, sum(out_i)]``."""
    lead = ws[0].shape[:1 + n_in]
    return jnp.concatenate([w.reshape(lead + (-1,)) for w in ws], axis=-1)


def _unfuse(whole: jax.Array, like: list[jax.Array], n_in: int) -> list[jax.Array]:
    """``_fuse``'s inverse, each part shaped as its member in ``like``."""
    sizes = [int(np.prod(w.shape[1 + n_in:])) for w in like]
    parts = jnp.split(whole, np.cumsum(sizes)[:-1].tolist(), axis=-1)
    return [p.reshape(w.shape) for p, w in zip(parts, like, strict=True)]


def _flatten(tree: PyTree, prefix: tuple = ()) -> Iterator[tuple[tuple, Any]]:
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from _flatten(v, prefix + (k,))
    else:
        yield prefix, tree


def _unflatten(like: PyTree, flat: dict[tuple, Any], prefix: tuple = ()) -> PyTree:
    if isinstance(like, dict):
        return {k: _unflatten(v, flat, prefix + (k,)) for k, v in like.items()}
    return flat[prefix]


def plan(model: nnx.Module, config: CompressionConfig, *, seed: int = 0,
         trainable: PyTree | None = None) -> QuantizationPlan | None:
    """The ``weight_quantization`` plan of ``config`` for ``model`` (None when off).

    Args:
      model: the model (its compressible weights are matched by name).
      config: the ``compression_training`` section.
      seed: stochastic rounding's seed.
      trainable: the engine's trainable parameter tree; a targeted weight outside it is an
        error (a frozen weight gets no gradient to quantize against).

    Raises:
      ValueError: a ``modules`` pattern matching nothing, a module two groups claim, a
        frozen target.
    """
    wq = config.weight_quantization
    shared = wq.shared_parameters
    if not shared.enabled:
        return None
    found = targets(model)
    key = "compression_training.weight_quantization.different_groups"
    claimed: dict[tuple, str] = {}
    assignments = []
    for gname, group in wq.different_groups.items():
        p = group.params
        schedule = MoQSchedule(p.start_bits, p.target_bits, p.quantization_period,
                               shared.schedule_offset, shared.quantize_weight_in_forward,
                               shared.fp16_mixed_quantize.quantize_change_ratio
                               if shared.fp16_mixed_quantize.enabled else None)
        for pattern in group.modules:
            for t, layers in matches(found, pattern, f"{key}.{gname}.modules",
                                     "compressible module (Linear, Conv, Embed)"):
                for i, on in enumerate(layers):
                    if on and (t.path, i) in claimed and claimed[(t.path, i)] != gname:
                        raise ValueError(
                            f"{key}: {'.'.join(map(str, t.path))} is in groups "
                            f"{claimed[(t.path, i)]!r} and {gname!r}; a module may be in one")
                    if on:
                        claimed[(t.path, i)] = gname
                assignments.append(Assignment(t, schedule, gname,
                                              layers if t.stacked else None))
    merged: dict[tuple, Assignment] = {}
    for a in assignments:  # a target two patterns of one group hit: the union of layers
        old = merged.get(a.target.path)
        if old is not None and old.group == a.group and a.layers is not None:
            a = dataclasses.replace(a, layers=tuple(x or y for x, y in zip(
                old.layers, a.layers, strict=True)))
        elif old is not None and old.group != a.group:
            raise ValueError(f"{key}: {'.'.join(map(str, a.target.path))} is split between "
                             f"groups {old.group!r} and {a.group!r} by layer; jds stacks a "
                             "matrix's layers into one array, so one group must take it")
        merged[a.target.path] = a
    for a in merged.values():
        t = a.target
        per_token = t.layout == "embedding" and shared.quantize_weight_in_forward
        if not per_token and t.channels() % shared.quantize_groups:
            raise ValueError(
                f"compression_training.weight_quantization.shared_parameters.quantize_groups="
                f"{shared.quantize_groups} does not divide the {t.channels()} "
                f"{'rows' if t.layout == 'embedding' else 'output channels'} of "
                f"{'.'.join(map(str, t.path))}; use a divisor of them")
    if trainable is not None:
        have = {p for p, _ in _flatten(trainable)}
        for path in merged:
            if path not in have:
                raise ValueError(f"{key}: {'.'.join(map(str, path))} is not trained (frozen or "
                                 "a LoRA base); quantization-aware training needs its gradient")
    fused = []  # members of one Hugging Face matrix (GPT-2's c_attn) in one group and layers
    for path, m in nnx.iter_modules(model):
        for names in (getattr(type(m), "HF_FUSED", None) or {}).values():
            paths = [tuple(path) + (n,) for n in names]
            got = [merged.get(p) for p in paths]
            if all(g is not None for g in got) and len({(g.group, g.layers) for g in got}) == 1:
                fused.append(tuple(paths))
    return QuantizationPlan(tuple(merged.values()), shared.quantize_groups,
                            shared.quantization_type, shared.rounding == "stochastic", seed,
                            shared.quantize_verbose, tuple(fused))


__all__ = ["ALIASES", "MoQSchedule", "QuantizationPlan", "Target", "matches", "plan",
           "quantization_step", "targets"]
