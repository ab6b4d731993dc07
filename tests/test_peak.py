"""What the compiled step's peak is made of (jds.partitioning.peak), and the peak itself per
ZeRO stage (issue 19): regression bounds on the bytes per parameter the step holds."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import jds
from jds.models.llama import Llama, LlamaConfig
from jds.partitioning.memory import compiled_memory
from jds.partitioning.peak import (
    CATEGORIES,
    compile_with_breakdown,
    parse_peak_tree,
    peak_breakdown,
)

# XLA's report, its lines cut after the fields that are read
REPORT = """HloLiveRange (max 9):
  BufferLiveRange:
    x{}:0-3
  Stack trace breakdown for peak usage: 1 600 bytes
    main.7_spmd (100.0%, total: 1 600 bytes, current: 0 bytes)
      ├── jit(step)/while (62.5%, total: 1 000 bytes, current: 0 bytes)
      │   └── region_2.32 (62.5%, total: 1 000 bytes, current: 0 bytes)
      │       ├── wide.param.3{4} (25.0%, total: 400 bytes, current: 400 bytes)
      │       └── while/body/transpose(jvp())/dot (37.5%, total: 600 bytes, current: 600 bytes)
      ├── state (25.0%, total: 400 bytes, current: 0 bytes)
      │   ├── params (12.5%, total: 200 bytes, current: 0 bytes)
      │   │   └── w (12.5%, total: 200 bytes, current: 200 bytes)
      │   └── opt_state[0].mu (12.5%, total: 200 bytes, current: 200 bytes)
      └── wrapped_convert.9 (12.5%, total: 200 bytes, current: 200 bytes)

"""


def test_parse_the_peak_tree_of_xla_s_live_range_report():
    total, leaves = parse_peak_tree(REPORT)
    assert total == 1600 and sum(n for _, _, n in leaves) == 1600
    paths = {name: path for path, name, _ in leaves}
    assert paths["wide.param.3{4}"] == ("main.7_spmd", "jit(step)/while", "region_2.32")
    assert paths["w"] == ("main.7_spmd", "state", "params")
    assert paths["opt_state[0].mu"] == ("main.7_spmd", "state")
    assert paths["wrapped_convert.9"] == ("main.7_spmd",)
    with pytest.raises(ValueError, match="no peak breakdown"):
        parse_peak_tree("HloLiveRange (max 9):\n")


def test_breakdown_of_a_real_compile_sorts_arguments_loops_and_passes():
    mesh = jax.make_mesh((8,), ("data",), axis_types=(jax.sharding.AxisType.Auto,))
    rep = jax.NamedSharding(mesh, jax.P())

    def step(state, x):
        def loss(w):
            def body(h, w_l):
                return jnp.tanh(h @ w_l), None
            return jax.lax.scan(body, x, w)[0].sum()

        def micro(acc, _):
            return acc + jax.grad(loss)(state["params"]), None

        g, _ = jax.lax.scan(micro, jnp.zeros_like(state["params"]), None, length=3)
        return {"params": state["params"] - 0.1 * g}

    w = jax.ShapeDtypeStruct((6, 128, 128), jnp.float32, sharding=rep)
    x = jax.ShapeDtypeStruct((8, 128), jnp.float32, sharding=rep)
    lowered = jax.jit(step, donate_argnums=0).lower({"params": w}, x)
    compiled, bd = compile_with_breakdown(lowered)
    assert compiled.memory_analysis() is not None
    assert set(bd.by_category) == set(CATEGORIES)
    assert sum(bd.by_category.values()) == sum(i.bytes for i in bd.items) == bd.total
    stack = 6 * 128 * 128 * 4
    # live at the peak: the weights (an argument), the gradient accumulator and its update
    assert [i.bytes for i in bd.items[:3]] == [stack] * 3
    assert bd.by_category["params"] == stack
    # inside the loops: the forward scan's saved activations and the scans' carries
    assert bd.by_category["forward"] > 0 and bd.by_category["loop carry"] > 0
    assert any("jvp()/while" in i.where for i in bd.items)
    assert peak_breakdown(lowered).total == bd.total


MODEL = dict(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
             num_attention_heads=4, num_key_value_heads=4)
# the issue-19 configuration (scripts/bench_zero_peak.py) in fp32: bytes/param per device,
# measured 2026-12-07 with 3% headroom: 20.0, 9.96, 7.11, 3.28 (stage 3 was 3.76 before
# ParamGather pinned the shard it gathers; 2026-12-06: 20.9, 13.9, 10.6, 4.6; before issue
# 19: 24.9, 18.0, 14.5, 8.5). Against the ZeRO table in fp32 (16, 9, 5.5, 2) that is
# 1.25x, 1.11x, 1.29x and 1.64x: stages 0-2 within the bounds (asserted below),
# stage 3 not yet: its table counts no gathered layer, and one layer of this 8-layer model
# is 0.48 bytes/param (see docs/benchmarks.md for the rest).
BOUNDS = {0: 20.6, 1: 10.3, 2: 7.35, 3: 3.38}
TABLE = {0: 16.0, 1: 9.0, 2: 5.5, 3: 2.0}


def peak_per_param(stage, seq=16):
    cfg = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": 4,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
           "gradient_clipping": 1.0, "zero_optimization": {"stage": stage}}
    e = jds.TrainEngine(lambda: Llama(LlamaConfig(**MODEL), rngs=nnx.Rngs(0)), cfg,
                        shapes_only=True)
    psi = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(e.state.params))
    m = compiled_memory(e, seq, breakdown=seq == 16)
    return m.peak / psi, m


def test_compiled_peak_per_zero_stage_decreases_and_stays_within_its_bound():
    peaks = {}
    for stage in range(4):
        peaks[stage], m = peak_per_param(stage)
        assert peaks[stage] <= BOUNDS[stage], (stage, peaks[stage])
        assert m.breakdown is not None and m.breakdown.total > 0
    assert peaks[0] > peaks[1] > peaks[2] > peaks[3], peaks
    # the bounds: 1.25x the table for stage 0 (a few scalars over: 20.0003), 1.5x
    # for stages 1-2
    assert peaks[0] <= 1.25 * TABLE[0] + 0.001, peaks
    assert peaks[1] <= 1.5 * TABLE[1] and peaks[2] <= 1.5 * TABLE[2], peaks
    # the breakdown names the state it holds: ZeRO-3 shards params and Adam's moments
    bd = m.breakdown.by_category
    assert bd["params"] and bd["optimizer"]


@pytest.mark.slow
def test_zero_savings_survive_when_activations_dominate():
    # 2k-token sequences: the saved activations are ~20x the model states of this model,
    # and each stage must still save what the ZeRO table says it saves (measured
    # 2026-12-07, session 17: 152.4, 145.4, 142.4, 139.0 bytes/param; savings 7.0, 2.9,
    # 3.5 against the table's 7, 3.5, 3.5; stage 3 pays for one gathered layer, 0.5
    # bytes/param here)
    peaks = [peak_per_param(stage, seq=2048)[0] for stage in range(4)]
    assert peaks[0] > peaks[1] > peaks[2] > peaks[3], peaks
    for s in range(3):
        assert peaks[s] - peaks[s + 1] >= 0.6 * (TABLE[s] - TABLE[s + 1]), (s, peaks)
    assert peaks[0] - peaks[3] >= 0.9 * (TABLE[0] - TABLE[3]), peaks


@pytest.mark.slow
def test_estimate_fit_names_the_largest_preset_per_stage(capsys):
    from jds.cli import main

    assert main(["estimate", "--fit", "--device-memory", "80MiB", "--json",
                 "--candidates", "llama-125m", "llama-tiny"]) == 0
    import json

    rep = json.loads(capsys.readouterr().out)
    assert rep["device_memory"] == 80 * 2**20 and len(rep["rows"]) == 4
    for row in rep["rows"]:
        assert row["fits"] == "llama-tiny" and row["peak"] <= 80 * 2**20
        # the larger presets were ruled out by their state alone, without compiling
        assert all(t["peak"] is None and t["state"] > 80 * 2**20
                   for t in row["tried"] if t["model"] != "llama-tiny")
        assert row["formula"] == "llama-tiny"
        assert (row["deepspeed"] is None) == (row["stage"] < 2)
    # too little memory for anything: every stage says so
    assert main(["estimate", "--fit", "--device-memory", "1MiB", "--candidates",
                 "llama-tiny"]) == 0
    assert capsys.readouterr().out.count("none") >= 4
