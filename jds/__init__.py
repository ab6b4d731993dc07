"""jds: DeepSpeed rebuilt on JAX/XLA.

Public API::

    import jds
    model = jds.models.build("llama-tiny")          # or jds.models.from_pretrained(dir)
    engine = jds.initialize(model=model, config="ds_config.json")
    out = engine.train_batch({"input_ids": x})      # one optimizer step over the global batch

Names are resolved lazily (PEP 562) so ``import jds.partitioning`` or ``import jds.data``
does not pull in the engine and its dependencies.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "Config": ("jds.config", "Config"),
    "ConfigError": ("jds.config", "ConfigError"),
    "TrainEngine": ("jds.engine", "TrainEngine"),
    "initialize": ("jds.engine", "initialize"),
    "init_inference": ("jds.inference.engine", "init_inference"),
    "init_distributed": ("jds.distributed", "init_distributed"),
    "models": ("jds.models", None),
    "lora": ("jds.lora", None),
    "compression": ("jds.compression", None),
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'jds' has no attribute {name!r}")
    module, attr = _LAZY[name]
    mod = importlib.import_module(module)
    value = mod if attr is None else getattr(mod, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])


__all__ = [
    "Config",
    "ConfigError",
    "TrainEngine",
    "__version__",
    "compression",
    "init_distributed",
    "init_inference",
    "initialize",
    "lora",
    "models",
]
