"""Analytic training FLOPs and model-FLOPs utilisation (MFU).

FLOPs per trained token follow the PaLM appendix-B accounting: ``6 * N`` for the matmuls
with the ``N`` non-embedding parameters (forward 2N, backward 4N), plus the LM head
``6 * D * V``, plus attention scores and values ``12 * L * T * D`` (forward + backward, no
causal discount, as PaLM and MaxText count it). Remat recomputation is not counted: MFU
measures useful work.

Peak FLOP/s per device come from a table of accelerators (dense bf16, from vendor sheets).
On CPU there is no published peak, so jds estimates one from the core count, the clock
(``/proc/cpuinfo``'s ``cpu MHz`` where present, else 2.5 GHz) and the fp32 FMA width: 32
FLOPs/cycle/core for AVX2 or AVX-512 parts (two 256-bit FMA pipes, 8 lanes x 2 FLOPs each;
Zen 4 runs AVX-512 on those same pipes), 8 without FMA. It is a rough scale for comparing
runs on the same machine, not a hardware fact.
"""

from __future__ import annotations

import os
from typing import Any

import jax

# Dense bf16 peak FLOP/s per device, matched by substring of ``device_kind`` (lower case).
PEAK_FLOPS: dict[str, float] = {
    "h200": 989e12,
    "h100": 989e12,
    "a100": 312e12,
    "l4": 121e12,
    "a10g": 125e12,
    "v100": 125e12,
    "tpu v6": 918e12,
    "tpu v5p": 459e12,
    "tpu v5 lite": 197e12,
    "tpu v5e": 197e12,
    "tpu v4": 275e12,
}
CPU_CLOCK_HZ = 2.5e9


def _cpu_info() -> tuple[float, int]:
    """(clock Hz, fp32 FLOPs per cycle per core) of this host, from ``/proc/cpuinfo``."""
    clock, flops = CPU_CLOCK_HZ, 32
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return clock, flops
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "cpu MHz" and clock == CPU_CLOCK_HZ:
            try:
                clock = float(value) * 1e6
            except ValueError:
                pass
        elif key == "flags":
            flops = 32 if " fma" in f" {value} " or "avx512f" in value else 8
    return clock, flops


def _dims(model_config: Any) -> tuple[int, int, int, int, int]:
    """(layers, embed, mlp, vocab, attention projection width) of a Llama/GPT-2 config."""
    c = model_config
    if hasattr(c, "num_hidden_layers"):
        heads, kv = c.num_attention_heads, c.num_key_value_heads
        head_dim = c.head_dim or c.hidden_size // heads
        attn = c.hidden_size * head_dim * (2 * heads + 2 * kv)
        return c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.vocab_size, attn
    inner = c.n_inner or 4 * c.n_embd
    return c.n_layer, c.n_embd, inner, c.vocab_size, 4 * c.n_embd * c.n_embd


def train_flops_per_token(model_config: Any, seq_len: int, *,
                          trainable_fraction: float = 1.0) -> float:
    """Training FLOPs per token (forward + backward) for a Llama or GPT-2 config.

    Args:
      model_config: ``LlamaConfig`` or ``GPT2Config``.
      seq_len: tokens per sequence (attention cost grows with it).
      trainable_fraction: the share of the matrices' parameters that get weight gradients
        (LoRA: about 0, the base frozen): the backward pass's ``2 * N`` for the weights'
        gradients scales with it; the forward ``2 * N`` and the inputs' gradients ``2 * N``
        are always spent.
    """
    layers, d, f, v, attn = _dims(model_config)
    mlp = (3 if hasattr(model_config, "num_hidden_layers") else 2) * d * f
    n = layers * (attn + mlp) + d * v
    return (4.0 + 2.0 * trainable_fraction) * n + 12.0 * layers * seq_len * d


def device_peak_flops(device: jax.Device | None = None) -> float:
    """Peak FLOP/s of one device (table for accelerators, an estimate for CPU)."""
    device = device or jax.devices()[0]
    if device.platform == "cpu":
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        # Simulated devices share the host's cores: split the host peak between them.
        clock, per_cycle = _cpu_info()
        return (cores or 1) * clock * per_cycle / max(jax.local_device_count(), 1)
    kind = device.device_kind.lower()
    for key, flops in PEAK_FLOPS.items():
        if key in kind:
            return flops
    return float("nan")


def mfu(tokens_per_s: float, model_config: Any, seq_len: int, n_devices: int, *,
        trainable_fraction: float = 1.0) -> float:
    """Model-FLOPs utilisation: achieved training FLOP/s over the devices' peak."""
    peak = device_peak_flops() * n_devices
    flops = train_flops_per_token(model_config, seq_len, trainable_fraction=trainable_fraction)
    return tokens_per_s * flops / peak
