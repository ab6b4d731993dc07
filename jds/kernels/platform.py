"""The platform a program is being built for, which is not always the host's.

Dispatchers choose a kernel by backend: the Pallas int8 matmul on GPU/TPU, the XLA reference on
CPU. Usually that is ``jax.default_backend()``. JAX can also lower a program for another
platform than the one it runs on (``Traced.lower(lowering_platforms=("cuda",))``): a CPU host
then produces the GPU program, kernels included, for inspection or ahead-of-time export. Inside
``lowering_for("cuda")`` the dispatchers answer as they would on a GPU.

Traces are cached by function and argument types, not by this setting: lower a fresh function
(a new ``jax.jit`` of a new closure) for another platform, as ``Engine.lower_train_step`` and
``InferenceEngine.lower_step`` do.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import jax

_GPU = ("gpu", "cuda", "rocm")
_KNOWN = (*_GPU, "tpu", "cpu")
_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar("jds_target", default=None)


def target_platform() -> str:
    """``lowering_for``'s platform when inside one, else ``jax.default_backend()``."""
    target = _TARGET.get()
    return jax.default_backend() if target is None else target


def is_gpu(platform: str) -> bool:
    """Whether ``platform`` names a GPU backend (``gpu``, ``cuda``, ``rocm``)."""
    return platform in _GPU


@contextlib.contextmanager
def lowering_for(platform: str | None) -> Iterator[None]:
    """Within the block, dispatchers build for ``platform`` (``None``: the default backend).

    Raises:
      ValueError: an unknown platform name.
    """
    if platform is not None and platform not in _KNOWN:
        raise ValueError(f"platform {platform!r}: use one of {list(_KNOWN)}")
    token = _TARGET.set(platform)
    try:
        yield
    finally:
        _TARGET.reset(token)


__all__ = ["is_gpu", "lowering_for", "target_platform"]
