"""Pipeline parallelism: schedules as tables, the SPMD executor against one device, memory.

The full layout grid (2 and 4 stages x ZeRO-1/2/3 x tensor 1/2 x every schedule, 36 runs)
is marked ``slow``; the default suite runs a covering subset in which every schedule,
ZeRO stage, stage count and tensor size appears.
"""

from __future__ import annotations

import itertools
import json
from fractions import Fraction

import jax
import numpy as np
import pytest

import jds
from jds.config import ConfigError
from jds.partitioning import pipeline as pp

# ------------------------------------------------------------------------------ schedules
GRID = [("gpipe", 2, 4, 1), ("gpipe", 4, 16, 1), ("1f1b", 2, 8, 1), ("1f1b", 4, 16, 1),
        ("1f1b", 4, 2, 1), ("interleaved", 2, 4, 2), ("interleaved", 4, 8, 2),
        ("interleaved", 4, 16, 4)]


@pytest.mark.parametrize("name,p,m,v", GRID)
def test_bubble_measured_from_the_table_equals_theory(name, p, m, v):
    sched = pp.build_schedule(name, p, m, v)
    cells = len(sched.ticks) * p
    idle = sum(a is None for row in sched.ticks for a in row)
    assert Fraction(idle, cells) == Fraction(p - 1, v * m + p - 1)
    assert sched.bubble_fraction == pytest.approx(sched.theoretical_bubble, abs=1e-12)
    assert len(sched.ticks) == 2 * (v * m + p - 1)


@pytest.mark.parametrize("name,p,m,v", GRID)
def test_every_action_runs_once_after_its_inputs(name, p, m, v):
    sched = pp.build_schedule(name, p, m, v)
    K = p * v
    when = {}
    for t, row in enumerate(sched.ticks):
        for s, a in enumerate(row):
            if a is not None:
                key = (a.kind, a.mb, a.chunk * p + s)
                assert key not in when, f"{key} ran twice"
                when[key] = t
    assert set(when) == {(k, i, vs) for k in "FB" for i in range(m) for vs in range(K)}
    for (kind, i, k), t in when.items():
        if kind == "F" and k > 0:
            assert when[("F", i, k - 1)] < t
        if kind == "B":
            assert when[("F", i, k)] < t
            if k < K - 1:
                assert when[("B", i, k + 1)] < t


def test_1f1b_holds_at_most_p_micro_batches_and_gpipe_holds_m():
    p, m = 4, 16
    assert pp.build_schedule("gpipe", p, m).in_flight() == [m] * p
    assert pp.build_schedule("1f1b", p, m).in_flight() == [p - s for s in range(p)]
    gpipe, one = pp.tick_tables(pp.build_schedule("gpipe", p, m)), pp.tick_tables(
        pp.build_schedule("1f1b", p, m))
    assert one.x_slots <= p < gpipe.x_slots == m


def test_report_prints_the_table_and_both_bubbles():
    text = pp.build_schedule("interleaved", 2, 4, 2).report()
    assert "F0.1" in text and "B3" in text and "stage 1" in text
    assert "bubble (idle cells / all cells, from the table): 0.1111" in text
    assert "theory (p-1)/(v*m+p-1) = 1/(2*4+1) = 0.1111" in text


@pytest.mark.parametrize("args,match", [
    (("zigzag", 2, 4, 1), "pipeline.schedule='zigzag'"),
    (("1f1b", 2, 4, 2), "virtual_stages=2 needs pipeline.schedule='interleaved'"),
    (("interleaved", 4, 6, 2), "gradient_accumulation_steps=6 is not a multiple of 4"),
])
def test_schedules_that_cannot_run_are_refused(args, match):
    with pytest.raises(ValueError, match=match):
        pp.build_schedule(*args)


def test_uneven_layers_are_refused_naming_the_keys():
    with pytest.raises(ValueError, match=r"6 layers do not split into mesh.stage=4 x "
                       r"pipeline.virtual_stages=1 = 4 equal chunks; use a model with 4 or 8"):
        pp.check_layers(6, 4, 1)
    model = jds.models.build("llama-tiny", num_hidden_layers=6)
    with pytest.raises(ConfigError, match="do not split into mesh.stage=4"):
        jds.initialize(model, {"train_batch_size": 8, "mesh": {"stage": 4}})


def test_config_reads_deepspeed_pipeline_keys():
    cfg = jds.Config.load({"train_batch_size": 8, "pipeline": {
        "stages": 2, "partition": "uniform", "activation_checkpoint_interval": 1,
        "seed_layers": True, "schedule": "interleaved", "virtual_stages": 2}})
    assert cfg.mesh.stage == 2 and cfg.pipeline.virtual_stages == 2
    assert jds.Config.load(json.loads(json.dumps(cfg.to_dict()))) == cfg
    with pytest.raises(ConfigError, match="pipeline.stages=4 but mesh.stage=2"):
        jds.Config.load({"pipeline": {"stages": 4}, "mesh": {"stage": 2}})
    with pytest.raises(ConfigError, match="pipeline.partition='type:transformer'"):
        jds.Config.load({"pipeline": {"partition": "type:transformer"}})
    with pytest.raises(ConfigError, match="needs pipeline.schedule='interleaved'"):
        jds.Config.load({"pipeline": {"virtual_stages": 2}})


# ------------------------------------------------------------------------------ executor
VOCAB = 64


def _model():
    return jds.models.build("llama-tiny", hidden_size=32, intermediate_size=64,
                            num_hidden_layers=8, num_attention_heads=4, num_key_value_heads=2,
                            vocab_size=VOCAB)


def _config(stages=1, zero=0, tensor=1, schedule="1f1b", v=1, ga=4, **extra):
    return {"train_batch_size": 16, "gradient_accumulation_steps": ga,
            "zero_optimization": {"stage": zero}, "mesh": {"stage": stages, "tensor": tensor},
            "pipeline": {"schedule": schedule, "virtual_stages": v, **extra},
            "optimizer": {"type": "adamw", "params": {"lr": 1e-2}}}


BATCH = {"input_ids": np.random.default_rng(0).integers(0, VOCAB, (16, 8))}


@pytest.fixture(scope="module")
def one_device():
    engine = jds.initialize(_model(), _config(), devices=jax.devices()[:1])
    grads, loss = engine.gradients(BATCH)
    return jax.device_get(grads), loss


def _rel_err(got, want) -> float:
    """Largest per-leaf ``max |a - b| / max |b|``. A leaf whose gradient is 1000x below the
    largest is measured against 1e-3 of that: the key bias's gradient is zero in exact
    arithmetic (softmax ignores a per-row constant), and its 1e-12 of rounding noise
    differs in any summation order."""
    pairs = list(zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True))
    top = max(float(np.max(np.abs(b))) for _, b in pairs)
    return max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
               / max(float(np.max(np.abs(b))), 1e-3 * top) for a, b in pairs)


# (schedule, virtual stages, pipeline stages, ZeRO stage, tensor): every schedule, ZeRO
# stage, stage count and tensor size appears; 4 stages x tensor 2 leaves data = 1.
COVER = [("gpipe", 1, 2, 3, 2), ("1f1b", 1, 4, 2, 1), ("1f1b", 1, 4, 0, 2),
         ("interleaved", 2, 2, 1, 2), ("interleaved", 2, 4, 3, 1)]
FULL = [(s, 2 if s == "interleaved" else 1, p, z, t) for s, p, z, t in itertools.product(
    pp.SCHEDULES, (2, 4), (1, 2, 3), (1, 2))]


def _check_gradients(one_device, schedule, v, stages, zero, tensor):
    want, want_loss = one_device
    engine = jds.initialize(_model(), _config(stages, zero, tensor, schedule, v))
    assert dict(engine.mesh.shape) == {"data": 8 // (stages * tensor), "fsdp": 1,
                                       "tensor": tensor, "stage": stages}
    wq = engine.state.params["layers"]["wq"]
    assert {s.data.shape[0] for s in wq.addressable_shards} == {8 // stages}  # layer blocks
    grads, loss = engine.gradients(BATCH)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert _rel_err(jax.device_get(grads), want) <= 1e-5


@pytest.mark.parametrize("schedule,v,stages,zero,tensor", COVER)
def test_pipeline_gradients_equal_one_device(one_device, schedule, v, stages, zero, tensor):
    _check_gradients(one_device, schedule, v, stages, zero, tensor)


@pytest.mark.slow
@pytest.mark.parametrize("schedule,v,stages,zero,tensor",
                         [c for c in FULL if c not in COVER])
def test_pipeline_gradients_equal_one_device_full_grid(one_device, schedule, v, stages, zero,
                                                       tensor):
    _check_gradients(one_device, schedule, v, stages, zero, tensor)


def test_pipeline_training_matches_one_device_step_by_step():
    ref = jds.initialize(_model(), _config(), devices=jax.devices()[:1])
    pipe = jds.initialize(_model(), _config(stages=2, zero=1, tensor=2, schedule="1f1b",
                                            activation_checkpoint_interval=2))
    for _ in range(3):
        a, b = ref.train_batch(BATCH), pipe.train_batch(BATCH)
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)
    # Adam divides by sqrt(v) + 1e-8: a gradient of ~1e-9 (1e-6 of the largest, summed in
    # another order) moves its weight by a visibly different step; the gradients themselves
    # agree to 1e-5 (test above). Three steps of lr 1e-2 move weights by up to 3e-2.
    for a, b in zip(jax.tree.leaves(jax.device_get(pipe.state.params)),
                    jax.tree.leaves(jax.device_get(ref.state.params)), strict=True):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-4)
    assert pipe.eval_batch(BATCH)["loss"] == pytest.approx(ref.eval_batch(BATCH)["loss"],
                                                           rel=1e-5)
    # evaluation runs forwards through the stages too: no layer stack is gathered over them
    from test_zero import collectives

    placed = pipe.shard_batch(BATCH, micro_batches=4)
    with pipe._tracing():
        s = pipe.state
        hlo = pipe._eval_step.lower(s.params, s.frozen, s.model_state, placed,
                                    s.applied_steps).compile().as_text()
    stacked = {s[0] for comp, op, sizes, shapes in collectives(hlo) if op == "all-gather"
               for s in shapes if s}
    assert 8 not in stacked, stacked  # 8 = the model's layer count, 4 per stage


def test_1f1b_activation_memory_is_below_gpipe_at_m_equal_4p():
    """XLA's own accounting of the compiled step: GPipe's buffer holds m stage inputs,
    1F1B's at most p (+1 arriving), at m = 4p."""
    p, m, seq = 2, 8, 128
    temps, slots = {}, {}
    for schedule in ("gpipe", "1f1b"):
        cfg = _config(stages=p, schedule=schedule, ga=m) | {"train_batch_size": 4 * m}
        engine = jds.TrainEngine("llama-tiny", cfg, devices=jax.devices()[:p], shapes_only=True)
        mem = engine.lower_train_step(seq).compile().memory_analysis()
        temps[schedule] = mem.temp_size_in_bytes
        slots[schedule] = pp.tick_tables(engine.schedule_table).x_slots
    assert (slots["gpipe"], slots["1f1b"]) == (m, p)
    act = 4 * seq * engine.model_config.hidden_size * 4  # one [4, seq, D] fp32 activation
    assert temps["gpipe"] - temps["1f1b"] >= (m - p) * act * 0.9, temps


def test_explain_pipeline_prints_the_schedule_and_its_bubble(capsys):
    from jds.cli import main

    args = ["explain", "--model", "llama-tiny", "--pipeline", "--pipeline-stages", "2",
            "--micro-batches", "4", "--schedule", "interleaved", "--virtual-stages", "2"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "layers/wq" in out and "stage" in out  # the layer stack is split over stages
    assert pp.build_schedule("interleaved", 2, 4, 2).report() in out
    assert main([*args, "--json"]) == 0
    rep = json.loads(capsys.readouterr().out)["pipeline"]
    assert rep["bubble_fraction"] == rep["theoretical_bubble"] == pytest.approx(1 / 9)
    assert rep["ticks"][0] == ["F0", None]
    assert main(["explain", "--model", "llama-tiny", "--pipeline"]) == 2
    assert "this layout has no pipeline" in capsys.readouterr().err


def test_gpt2_tied_embeddings_and_learned_positions_through_the_pipeline():
    """GPT-2 uses ``wte`` on the first stage (lookup) and the last (output projection):
    the two contributions meet in the sum over stages."""
    def gpt2():
        return jds.models.build("gpt2-tiny", n_embd=32, n_layer=4, n_head=4,
                                vocab_size=VOCAB, n_positions=16)

    ref = jds.initialize(gpt2(), _config(), devices=jax.devices()[:1])
    want, want_loss = ref.gradients(BATCH)
    pipe = jds.initialize(gpt2(), _config(stages=2, zero=2, tensor=2, schedule="interleaved",
                                          v=2))
    got, loss = pipe.gradients(BATCH)
    assert loss == pytest.approx(want_loss, rel=1e-5)
    assert _rel_err(jax.device_get(got), jax.device_get(want)) <= 1e-5


def test_zero1_pipeline_all_reduces_weight_gradients_once_per_step_not_per_micro_batch():
    """Gradients replicated over the data group: each backward keeps per-shard gradients
    and the sum over shards is one all-reduce after the schedule, outside its loop."""
    import re

    from test_zero import collectives

    engine = jds.TrainEngine(_model, _config(stages=2, zero=1, schedule="1f1b"),
                             shapes_only=True)
    hlo = engine.lower_train_step(8).compile().as_text()
    entry = re.search(r"^ENTRY %?([\w.\-]+)", hlo, re.M).group(1)
    w_gate = 32 * 64  # one layer's smallest weight matrix
    big = [(comp, s) for comp, op, s, _ in collectives(hlo) if op == "all-reduce"
           and max(s) >= w_gate]
    assert big and all(comp == entry for comp, _ in big), big
