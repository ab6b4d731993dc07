"""Compiling for GPUs this machine does not have (``jds.partitioning.targets``): the errors
always; with JAX's CUDA plugin installed (``pip install 'jds[aot-gpu]'``), the train step
XLA:GPU compiles for 8 H100s and the form of its skipped step (issue 19)."""

from __future__ import annotations

import importlib.util

import jax
import numpy as np
import pytest
from flax import nnx

import jds
from jds.models.llama import Llama, LlamaConfig
from jds.partitioning.memory import compiled_memory
from jds.partitioning.targets import TARGETS, compile_only_devices, device_memory

try:
    HAVE_PLUGIN = importlib.util.find_spec("jax_plugins.xla_cuda12") is not None
except ModuleNotFoundError:  # no jax_plugins package at all
    HAVE_PLUGIN = False


def test_bad_targets_are_named_and_a_missing_plugin_says_what_to_install():
    with pytest.raises(ValueError, match=r"choose one of \['h100', 'h200'\]"):
        compile_only_devices("a100", 8)
    with pytest.raises(ValueError, match="at least one device"):
        compile_only_devices("h100", 0)
    assert device_memory("h100") == 84_929_347_584 and set(TARGETS) == {"h100", "h200"}
    if not HAVE_PLUGIN:
        with pytest.raises(ImportError, match=r"jds\[aot-gpu\]"):
            compile_only_devices("h100", 8)


# issue 19's configuration (tests/test_peak.py), fp32
MODEL = dict(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
             num_attention_heads=4, num_key_value_heads=4)
TABLE = {0: 16.0, 1: 9.0, 2: 5.5, 3: 2.0}


def _peak(stage: int, devices: list) -> tuple[float, jds.TrainEngine]:
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 4,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
           "gradient_clipping": 1.0, "zero_optimization": {"stage": stage}}
    e = jds.TrainEngine(lambda: Llama(LlamaConfig(**MODEL), rngs=nnx.Rngs(0)), cfg,
                        shapes_only=True, devices=devices)
    psi = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(e.state.params))
    return compiled_memory(e, 16, breakdown=False).peak / psi, e


@pytest.mark.skipif(not HAVE_PLUGIN, reason="needs JAX's CUDA plugin (jds[aot-gpu])")
def test_the_step_compiled_for_h100s_updates_in_place(monkeypatch):
    devices = compile_only_devices("h100", 8)
    assert devices[0].device_kind.startswith("NVIDIA H100")
    peaks = {}
    for stage in range(4):
        peaks[stage], e = _peak(stage, devices)
        assert e._step_cfg.skip_by_select  # the GPU's form of a skipped step
    # measured 2026-12-07: 20.0, 9.89, 7.81, 3.11 bytes/param (1.25x, 1.10x, 1.42x, 1.55x)
    assert peaks[0] <= 1.25 * TABLE[0] + 0.01, peaks
    assert peaks[1] <= 1.5 * TABLE[1] and peaks[2] <= 1.5 * TABLE[2], peaks
    assert peaks[3] <= 3.2 and peaks[0] > peaks[1] > peaks[2] > peaks[3], peaks
    # with the CPU's form (a lax.cond) XLA:GPU keeps the old state beside the new: 28.0
    monkeypatch.setattr(jds.engine, "is_gpu", lambda platform: False)
    assert _peak(0, devices)[0] > 26.0
