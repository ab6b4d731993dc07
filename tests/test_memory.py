"""ZeRO memory estimator: formulas vs DeepSpeed's, shard bytes vs formulas, sharding goldens.

Set ``JDS_UPDATE_GOLDENS=1`` (or run ``python scripts/update_goldens.py``) to rewrite
``tests/golden/sharding/*.txt`` from the current code instead of diffing against them.
"""

import itertools
import math
import os
from pathlib import Path

import jax
import pytest

from jds.models import PRESETS
from jds.partitioning.memory import (
    deepspeed_estimates,
    estimate_zero2_model_states_mem_needs,
    estimate_zero3_model_states_mem_needs,
    model_states_for_groups,
    model_states_per_device,
    state_memory,
)
from jds.profiling import memory_report as mr

GOLDEN_DIR = Path(__file__).parent / "golden" / "sharding"
UPDATE = os.environ.get("JDS_UPDATE_GOLDENS") == "1"
BF16 = {"bf16": {"enabled": True}}
# name -> config; every layout spans 8 devices
LAYOUTS = {
    "zero0-dp8": {**BF16, "zero_optimization": {"stage": 0}},
    "zero3-dp8": {**BF16, "zero_optimization": {"stage": 3}},
    "zero2-dp4-tp2": {**BF16, "mesh": {"data": 4, "tensor": 2},
                      "zero_optimization": {"stage": 2}},
    "zero3-hpz4-dp8": {**BF16, "zero_optimization": {"stage": 3, "zero_hpz_partition_size": 4}},
}


def devices(n=8):
    return jax.devices()[:n]


# ------------------------------------------------------------------ formulas
@pytest.mark.parametrize("psi,nd", [(10**9, 8), (7 * 10**9, 64), (123_457, 3)])
def test_paper_table_mixed_precision_and_fp32(psi, nd):
    want_bf16 = [16 * psi, 4 * psi + 12 * psi / nd, 2 * psi + 14 * psi / nd, 16 * psi / nd]
    want_fp32 = [16 * psi, 8 * psi + 8 * psi / nd, 4 * psi + 12 * psi / nd, 16 * psi / nd]
    for stage in range(4):
        bf16 = model_states_per_device(psi, stage, nd, precision="bf16")
        fp32 = model_states_per_device(psi, stage, nd, precision="fp32")
        assert bf16.total == pytest.approx(want_bf16[stage], rel=1e-12)
        assert fp32.total == pytest.approx(want_fp32[stage], rel=1e-12)
        assert fp32.master == 0
    # stage 3 is the layout with every state sharded over the whole group
    s3 = model_states_for_groups(psi, {"params": nd, "grads": nd, "optimizer": nd})
    assert s3 == model_states_per_device(psi, 3, nd)


def test_formula_errors_name_the_problem():
    with pytest.raises(ValueError, match="stage"):
        model_states_per_device(10, 4, 8)
    with pytest.raises(ValueError, match="precision"):
        model_states_per_device(10, 1, 8, precision="int8")
    with pytest.raises(ValueError, match="num_devices"):
        model_states_per_device(10, 1, 0)


def test_deepspeed_estimators_match_deepspeed():
    s12 = pytest.importorskip("deepspeed.runtime.zero.stage_1_and_2")
    s3 = pytest.importorskip("deepspeed.runtime.zero.stage3")
    grid = itertools.product(
        [1_049_728, 124_439_808, 6_738_415_616],  # llama-tiny, gpt2-small, llama-7b
        [1, 8, 16], [1, 4], [1.0, 1.5])
    n = 0
    for psi, gpn, nodes, factor in grid:
        largest = psi // 20 + 7
        for off in (True, False):
            assert estimate_zero2_model_states_mem_needs(psi, gpn, nodes, off, factor) == \
                s12.estimate_zero2_model_states_mem_needs(psi, gpn, nodes, off, factor)
            for off_p, zinit in itertools.product((True, False), repeat=2):
                assert estimate_zero3_model_states_mem_needs(
                    psi, largest, gpn, nodes, off, off_p, zinit, factor
                ) == s3.estimate_zero3_model_states_mem_needs(
                    psi, largest, gpn, nodes, off, off_p, zinit, factor)
                n += 1
    assert n == 3 * 3 * 2 * 2 * 2 * 4
    # the option rows are the ones DeepSpeed's *_all_cold functions print
    rows = deepspeed_estimates(10**9, 10**7, 8, 2)
    assert [(r["stage"], r["offload_optimizer"], r["offload_param"], r["zero_init"])
            for r in rows] == [
        (2, True, None, None), (2, False, None, None),
        (3, True, True, True), (3, True, True, False), (3, True, False, True),
        (3, True, False, False), (3, False, False, True), (3, False, False, False)]


# ------------------------------------------------------------------ shard bytes
def llama_params(engine):
    return sum(math.prod(x.shape) for x in jax.tree.leaves(engine.state.params))


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_state_shard_bytes_equal_the_formula(stage):
    engine = mr.shapes_engine("llama-tiny", {**BF16, "zero_optimization": {"stage": stage}},
                              devices())
    psi = llama_params(engine)
    want = model_states_per_device(psi, stage, 8, precision="bf16")
    got = state_memory(engine.state)
    # every llama-tiny parameter divides by 8, so the shards are exact
    assert got["params"] == want.params
    assert got["master"] == want.master
    assert got["optimizer"] == want.optimizer
    assert 0 < got["other"] < 100  # step, counters, loss scale, rng
    assert got["total"] == want.persistent + got["other"]


def test_fp32_state_has_no_master_copy():
    engine = mr.shapes_engine("llama-tiny", {"zero_optimization": {"stage": 1}}, devices())
    psi = llama_params(engine)
    got = state_memory(engine.state)
    want = model_states_per_device(psi, 1, 8, precision="fp32")
    assert (got["params"], got["master"], got["optimizer"]) == (4 * psi, 0, 8 * psi / 8)
    assert got["params"] + got["optimizer"] == want.persistent


def test_hpz_layout_shards_params_within_the_subgroup():
    engine = mr.shapes_engine("llama-tiny", LAYOUTS["zero3-hpz4-dp8"], devices())
    psi = llama_params(engine)
    assert engine.zero_layout.describe(engine.mesh) == {"params": 4, "grads": 8, "optimizer": 8}
    got = state_memory(engine.state)
    want = model_states_for_groups(psi, {"params": 4, "grads": 8, "optimizer": 8})
    assert (got["params"], got["master"], got["optimizer"]) == (
        want.params, want.master, want.optimizer)


def test_explain_bytes_add_up_to_the_state():
    for name in ("llama-tiny", "gpt2-tiny"):
        engine = mr.shapes_engine(name, LAYOUTS["zero2-dp4-tp2"], devices())
        rep = mr.explain_report(engine, name)
        st = state_memory(engine.state)
        assert rep["bytes_per_device"]["params"] == st["params"]
        assert rep["bytes_per_device"]["optimizer"] == st["master"] + st["optimizer"]
        assert rep["num_params"] == llama_params(engine)
        # stage 2: fp32 gradient shards, split like the optimizer state
        for p in rep["params"]:
            assert p["specs"]["grads"] == p["specs"]["optimizer"]
            assert p["bytes_per_device"]["grads"] * 3 == p["bytes_per_device"]["optimizer"]


def test_estimate_formula_path_for_the_largest_preset_is_fast():
    # 64 devices are more than this process has: the formula path needs no compile, but
    # the engine needs the devices, so use 8 with an fsdp-sized layout instead.
    engine = mr.shapes_engine("llama-7b", LAYOUTS["zero3-dp8"], devices())
    rep = mr.estimate_report(engine, "llama-7b", 2048, compile=False)
    assert rep["num_params"] == 6_738_415_616
    assert rep["largest_layer_params"] == 32000 * 4096  # embedding / lm head
    assert rep["optimizer_state_bytes_per_param"] == 8
    config = rep["formula"]["config"]
    assert {k: config[k] for k in rep["formula"]["3"]} == rep["formula"]["3"]
    assert (config["device"], config["host"]) == (config["persistent"], 0)  # no offload
    assert rep["state"]["params"] == rep["formula"]["3"]["params"]
    assert rep["compiled"] is None


def test_load_config_fills_the_batch_and_overrides_the_stage():
    cfg = mr.load_config(None, stage=3)
    assert cfg.precision == "bf16" and cfg.zero_optimization.stage == 3
    assert cfg.train_micro_batch_size_per_gpu == 1
    cfg = mr.load_config({"train_batch_size": 16})
    assert cfg.train_batch_size == 16 and cfg.train_micro_batch_size_per_gpu is None


# ------------------------------------------------------------------ goldens
def golden_text(preset, layout):
    try:
        engine = mr.shapes_engine(preset, LAYOUTS[layout], devices())
    except ValueError as e:  # e.g. a vocabulary that tensor parallelism cannot split
        return f"error: {e}\n"
    return mr.explain_text(mr.explain_report(engine, preset))


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_sharding_goldens(layout):
    mismatched = []
    for preset in PRESETS:
        path = GOLDEN_DIR / f"{preset}__{layout}.txt"
        text = golden_text(preset, layout)
        if UPDATE:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
        elif not path.exists() or path.read_text() != text:
            mismatched.append(path.name)
    assert not mismatched, (
        f"explain output differs from {mismatched}; if the change is intended, run "
        "python scripts/update_goldens.py and review the diff")


def test_every_golden_belongs_to_a_preset_and_layout():
    want = {f"{p}__{lay}.txt" for p in PRESETS for lay in LAYOUTS}
    assert {p.name for p in GOLDEN_DIR.glob("*.txt")} == want
