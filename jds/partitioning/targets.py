"""Compile for GPUs this machine does not have: XLA:GPU's deviceless (ahead-of-time) compile.

``jds estimate --target h100`` and ``scripts/bench_zero_peak.py --target h100`` build the
train step for N H100s and read XLA:GPU's own memory analysis and buffer assignment on a
laptop or a CI runner. JAX makes compile-only devices from a PJRT topology description:
the CUDA plugin (``pip install 'jds[aot-gpu]'``: ``jax-cuda12-plugin`` and its PJRT
library, the same version as jax, without the CUDA libraries) given a topology shape and
XLA's ``GpuTargetConfig`` of the card (SM count, shared memory, memory size: what XLA's GPU
compiler reads). No GPU, driver or CUDA runtime is needed to compile; nothing compiled this
way runs here.

**Why a GPU compile and not the CPU one.** ``jds estimate`` compiles for simulated CPU
devices by default, and XLA:CPU makes choices a GPU compiler does not: it rewrites every
bf16 data-movement op in fp32 (an fp32 copy of each 16-bit layer stack) and updates the
optimizer state in place inside a ``lax.cond``, where XLA:GPU gives a conditional's
results buffers of their own. Issue 19's 8-layer Llama on 8 devices, ZeRO-0 fp32: 20.0
bytes/param compiled for CPU, 28.0 compiled for H100 before jds chose the GPU's form of
the skipped step (``StepConfig.skip_by_select``), 20.0 after; that choice was found and is
tested this way.

**TPU.** libtpu compiles deviceless too (``topologies.get_topology_desc("v5e:2x4",
"tpu")``), but its memory analysis of the same steps reports 0-1 bytes/param of
temporaries, less than the gradients alone: not offered until that is understood.

The target configurations are XLA's ``GpuTargetConfig`` text for each card (the form of
XLA's ``gpu_specs``), filled in from the cards' datasheets (SXM parts; the H200's memory
size is its usable 143,771 MiB). The compile reads the SM count, the shared-memory and
register limits and the memory size; a card a user has may differ a little from these.
"""

from __future__ import annotations

import jax

_HOPPER_SM = """
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  shared_memory_per_block_optin: 232448
  cuda_compute_capability { major: 9 }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
"""


def _hopper(name: str, memory: int, bandwidth: int) -> str:
    return (f"gpu_device_info {{{_HOPPER_SM}  device_memory_size: {memory}\n"
            f"  memory_bandwidth: {bandwidth}\n}}\n"
            'platform_name: "CUDA"\n'
            "dnn_version_info { major: 9 minor: 8 }\n"
            "runtime_version { major: 12 minor: 9 }\n"
            f'device_description_str: "{name}"\n')


# name -> (XLA GpuTargetConfig text, device memory in bytes)
TARGETS: dict[str, tuple[str, int]] = {
    "h100": (_hopper("NVIDIA H100 80GB HBM3", 84_929_347_584, 3_352_320_000_000),
             84_929_347_584),
    "h200": (_hopper("NVIDIA H200", 150_754_820_096, 4_800_000_000_000), 150_754_820_096),
}

AOT_GPU_INSTALL = "pip install 'jds[aot-gpu]'  (jax[cuda12-local]: the CUDA plugin, no GPU needed)"


def device_memory(target: str) -> int:
    """Bytes of memory one ``target`` card has."""
    return TARGETS[_check(target)][1]


def _check(target: str) -> str:
    if target not in TARGETS:
        raise ValueError(f"--target {target!r}: choose one of {sorted(TARGETS)} (or leave it "
                         "out to compile for simulated CPU devices)")
    return target


def compile_only_devices(target: str, count: int) -> list[jax.Device]:
    """``count`` compile-only devices of the card ``target`` (one host), for
    ``jax.jit(...).lower(...).compile()`` and the engine's ``devices=`` with
    ``shapes_only=True``.

    Raises:
      ValueError: an unknown target, or ``count`` below 1.
      ImportError: JAX's CUDA plugin is not installed (the message says what to install).
    """
    _check(target)
    if count < 1:
        raise ValueError(f"--devices {count}: need at least one device")
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(
            platform="cuda", topology=f"1x1x{count}", target_config=TARGETS[target][0])
    except (RuntimeError, NotImplementedError, KeyError, ValueError) as e:
        if "cuda" not in str(e).lower() and "platform" not in str(e).lower():
            raise
        raise ImportError(
            f"compiling for {target} without a GPU needs JAX's CUDA plugin: "
            f"{AOT_GPU_INSTALL} ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    return list(topology.devices)


__all__ = ["AOT_GPU_INSTALL", "TARGETS", "compile_only_devices", "device_memory"]
