"""ZeRO stages, hpZ / MiCS / per-state sharding factors and tensor parallelism as shardings.

On 8 simulated devices:

- bytes: every state's per-device bytes, read from the arrays' shards, equal the ZeRO
  table's figure (ARCHITECTURE.md) for Adam in bf16 mixed precision and in fp32; the
  ZeRO-2 gradient accumulation buffer is sharded (``compiled.memory_analysis()``).
- collectives, read from the compiled HLO: ZeRO-2 reduce-scatters gradients and never
  all-reduces a full gradient; ZeRO-3 all-gathers parameters inside the layer loop, one
  layer at a time; tensor parallelism all-reduces twice per layer.
- parity: 5 steps (with gradient accumulation) give the single-device losses and
  parameters (fp32, rel. 1e-5) for stages 0-3, hpZ, MiCS, separate factors and ZeRO x TP.
"""

import functools
import re
import warnings

import jax
import numpy as np
import pytest

import jds
from jds.config import Config, ConfigError, ConfigWarning
from jds.partitioning.zero import ZeroLayout, layout_from_config

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
SEQ = 16
STEPS = 5


def make_model(**overrides):
    return jds.models.build("llama-tiny", seed=0, **{**TINY, **overrides})


def cfg(stage=0, ga=2, **kw):
    base = {
        "train_batch_size": 16,
        "gradient_accumulation_steps": ga,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.1}},
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
    }
    for k, v in kw.items():
        if k == "zero":
            base["zero_optimization"].update(v)
        else:
            base[k] = v
    return base


def batches(n=STEPS, rows=16):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(rows, SEQ), dtype=np.int32) for _ in range(n)]


def run(config, devices=None):
    engine = jds.initialize(model=make_model(), config=config, devices=devices)
    losses = [engine.train_batch({"input_ids": b})["loss"] for b in batches()]
    return engine, losses


@functools.cache
def single_device():
    engine, losses = run(cfg(0), devices=jax.devices()[:1])
    return losses, flat(engine.state.params)


def flat(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def shard_bytes(tree):
    """Bytes of one device's shard, summed over the tree (device 0's view)."""
    total = 0
    for leaf in jax.tree.leaves(tree):
        shard = leaf.addressable_shards[0].data
        total += shard.size * shard.dtype.itemsize
    return total


def assert_matches_single_device(engine, losses):
    ref_losses, ref_params = single_device()
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    np.testing.assert_allclose(flat(engine.state.params), ref_params, rtol=1e-5, atol=1e-6)


# --------------------------------------------------------------------------- layouts
def test_layout_per_stage_and_hierarchical_options():
    mesh = {"data": 2, "fsdp": 4, "tensor": 1, "stage": 1}
    z = lambda **kw: Config.load(cfg(**{"zero": kw})).zero_optimization  # noqa: E731
    assert layout_from_config(z(stage=0), mesh) == ZeroLayout(0)
    full = ("fsdp", "data")
    assert layout_from_config(z(stage=1), mesh) == ZeroLayout(1, (), (), full)
    assert layout_from_config(z(stage=2), mesh) == ZeroLayout(2, (), full, full)
    assert layout_from_config(z(stage=3), mesh) == ZeroLayout(3, full, full, full)
    hpz = layout_from_config(z(stage=3, zero_hpz_partition_size=4), mesh)
    assert hpz == ZeroLayout(3, ("fsdp",), full, full)
    mics = layout_from_config(z(stage=3, mics_shard_size=4), mesh)
    assert mics == ZeroLayout(3, ("fsdp",), ("fsdp",), ("fsdp",))
    mixed = layout_from_config(
        z(stage=0, param_partition_size=1, grad_partition_size=4, optimizer_partition_size=8),
        mesh,
    )
    assert mixed == ZeroLayout(0, (), ("fsdp",), full)


@pytest.mark.parametrize(
    "zero, mesh, match",
    [
        ({"stage": 2, "zero_hpz_partition_size": 4}, None, "needs stage 3"),
        ({"stage": 0, "mics_shard_size": 4}, None, "needs a ZeRO stage >= 1"),
        ({"stage": 3, "zero_hpz_partition_size": 4}, {"fsdp": 2}, "set mesh.fsdp to 4"),
        ({"stage": 1, "optimizer_partition_size": 3}, None, "optimizer_partition_size=3.*divisor"),
        ({"stage": 1, "optimizer_partition_size": 2}, {"fsdp": 4}, "set mesh.fsdp to 2"),
    ],
)
def test_bad_zero_configs_name_the_key(zero, mesh, match):
    config = cfg(**{"zero": zero})
    if mesh:
        config["mesh"] = mesh
    with pytest.raises(ConfigError, match=match):
        jds.TrainEngine(make_model, config, shapes_only=True)


def test_subgroup_sizes_the_fsdp_axis():
    e = jds.TrainEngine(make_model, cfg(3, zero={"zero_hpz_partition_size": 4}),
                        shapes_only=True)
    assert (e.mesh.shape["data"], e.mesh.shape["fsdp"]) == (2, 4)
    assert e.zero_layout.describe(e.mesh) == {"params": 4, "grads": 8, "optimizer": 8}


# --------------------------------------------------------------------------- bytes
def table_state_bytes(stage, precision, psi, nd):
    """Per-device bytes of params + fp32 master + Adam m, v (the table without gradients)."""
    p = psi / nd if stage >= 3 else psi
    o = psi / nd if stage >= 1 else psi
    if precision == "bf16":
        return 2 * p + 4 * o + 8 * o  # bf16 compute copy, fp32 master, m, v
    return 4 * p + 8 * o  # fp32: the weights are the master; m, v


@pytest.mark.parametrize("precision", ["bf16", "fp32"])
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_state_bytes_per_device_match_the_zero_table(stage, precision):
    config = cfg(stage, bf16={"enabled": precision == "bf16"})
    e = jds.initialize(model=make_model(), config=config)
    psi = sum(x.size for x in jax.tree.leaves(e.state.params))
    nd = 8
    # every parameter of this model divides by 8, so nothing stays replicated
    assert all(d >= 0 for d in jax.tree.leaves(e.zero.dims)) or stage == 0
    model_states = shard_bytes(e.state.params) + shard_bytes(e.state.opt_state)
    if e.state.master is not None:
        model_states += shard_bytes(e.state.master)
    scalars = 64  # Adam's step count: one int32 per optimizer state, replicated
    assert table_state_bytes(stage, precision, psi, nd) <= model_states
    assert model_states <= table_state_bytes(stage, precision, psi, nd) + scalars
    # the stage-0 run is the plain data-parallel figure: 16 bytes/param less 2 for gradients
    if stage == 0 and precision == "bf16":
        assert model_states - scalars <= 14 * psi


def _carried_f32_shapes(stage, **model):
    """Shapes of the fp32 arrays the compiled step's outermost loops (the micro-batch
    scan) carry, and the model's stacked MLP weight shape."""
    e = jds.TrainEngine(lambda: make_model(**model), cfg(stage, ga=2), shapes_only=True)
    hlo = e.lower_train_step(SEQ).compile().as_text()
    entry = hlo[hlo.index("ENTRY"):]
    carried = set()
    for line in entry.splitlines():
        if " while(" in line:
            for dims in re.findall(r"f32\[([\d,]+)\]", line.split(" while(")[0]):
                carried.add(tuple(int(d) for d in dims.split(",")))
    return carried, tuple(e.state.params["layers"]["w_up"].shape)


def test_zero2_gradient_accumulation_buffer_is_sharded():
    # ZeRO-1 accumulates each device's full fp32 gradients across micro-batches (with a
    # leading shard axis of 1 per device); ZeRO-2 only its 1/8 slice. (The loops also
    # carry the replicated weights themselves, unchanged, as loop invariants.)
    big = dict(hidden_size=128, intermediate_size=512, vocab_size=512)
    c1, (L, D, F) = _carried_f32_shapes(1, **big)
    c2, _ = _carried_f32_shapes(2, **big)
    assert (1, L, D, F) in c1, c1
    assert (L, D // 8, F) in c2 and (1, L, D, F) not in c2, c2


# --------------------------------------------------------------------------- HLO
COLLECTIVE = re.compile(r"= (\([^)]*\)|\S+) (all-reduce|reduce-scatter|all-gather)(?:-start)?\(")


def collectives(hlo):
    """[(computation name, op, [element counts of the result arrays], [their shapes])]."""
    out, comp = [], None
    for line in hlo.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if head:
            comp = head.group(1)
        m = COLLECTIVE.search(line)
        if m:
            dims = re.findall(r"\w+\[([\d,]*)\]", m.group(1))
            shapes = [tuple(int(d) for d in ds.split(",") if d) for ds in dims]
            out.append((comp, m.group(2), [int(np.prod(x)) for x in shapes], shapes))
    return out


def loop_bodies(hlo):
    return set(re.findall(r"while\([^\n]*body=%?([\w.\-]+)", hlo))


@functools.cache
def compiled_hlo(stage, ga=2, mesh=None):
    config = cfg(stage, ga=ga)
    if mesh:
        config["mesh"] = dict(mesh)
    e = jds.TrainEngine(make_model, config, shapes_only=True)
    return e, e.lower_train_step(SEQ).compile().as_text()


def test_zero1_reduce_scatters_at_the_accumulation_boundary_and_gathers_updated_params():
    e, hlo = compiled_hlo(1)
    bodies = loop_bodies(hlo)
    largest = max(x.size for x in jax.tree.leaves(e.state.params))
    ops = collectives(hlo)
    # once per step, after the micro-batch loop: each device keeps its optimizer shard of
    # the summed gradients (DeepSpeed's ZeRO-1 reduction at the boundary) ...
    assert any(op == "reduce-scatter" and c not in bodies and largest // 8 in s
               for c, op, s, _ in ops), ops
    # ... so no full-size gradient is all-reduced
    assert all(max(s) < largest for _, op, s, _ in ops if op == "all-reduce"), ops
    assert any(op == "all-gather" for _, op, _, _ in ops)  # updated shards -> replicated params


def test_zero2_reduces_each_layers_gradients_inside_the_backward_scan():
    e, hlo = compiled_hlo(2)
    bodies = loop_bodies(hlo)
    layers = jax.tree.leaves(e.state.params["layers"])
    one_layer = {x.size // x.shape[0] for x in layers}
    others = [leaf.size for k, x in e.state.params.items() if k != "layers"
              for leaf in jax.tree.leaves(x)]
    reduced = [(c, s) for c, op, sizes, _ in collectives(hlo)
               if op in ("all-reduce", "reduce-scatter") for s in sizes]
    # a layer's weight gradients are reduced inside a loop body (the backward layer scan),
    # one layer at a time (XLA:CPU lowers the reduce-scatter as an all-reduce and a slice;
    # the GPU and TPU compilers turn that pair into a reduce-scatter) ...
    assert one_layer <= {s for c, s in reduced if c in bodies}, reduced
    # ... and no full gradient of the layer stack is ever reduced, or held (its size)
    assert max(s for _, s in reduced) <= max(max(others), max(one_layer)), reduced


def test_zero3_gathers_parameters_layer_by_layer_inside_the_loop():
    e, hlo = compiled_hlo(3)
    bodies = loop_bodies(hlo)
    squeeze = lambda shape: tuple(d for d in shape if d != 1)  # noqa: E731
    layer_shapes = {squeeze(x.shape[1:]) for x in e.state.params["layers"].values()}
    stacked_shapes = {x.shape for x in e.state.params["layers"].values()}
    gathers = [(c, squeeze(s)) for c, op, _, shapes in collectives(hlo) if op == "all-gather"
               for s in shapes]
    in_loop = {s for c, s in gathers if c in bodies}
    # every layer weight is gathered inside a loop body, one layer's slice at a time ...
    assert layer_shapes <= in_loop, (layer_shapes, gathers)
    # ... and no stacked (all-layer) weight is ever gathered whole
    assert not stacked_shapes & {s for _, s in gathers}, gathers
    for leaf in jax.tree.leaves(e.state.params):  # and the stored params are sharded 8 ways
        assert np.prod(leaf.sharding.shard_shape(leaf.shape)) * 8 == leaf.size


def test_tensor_parallel_all_reduces_twice_per_layer():
    e, hlo = compiled_hlo(0, ga=1, mesh=(("data", 4), ("tensor", 2)))
    bodies = loop_bodies(hlo)
    act = 16 // 4 * SEQ * TINY["hidden_size"]  # one device's [B, T, D] residual stream
    per_loop = {}
    for comp, op, sizes, _ in collectives(hlo):
        if op == "all-reduce" and comp in bodies and act in sizes:
            per_loop[comp] = per_loop.get(comp, 0) + sizes.count(act)
    # forward layer loop: attention output and MLP output, the two Megatron all-reduces
    assert 2 in per_loop.values(), per_loop


# --------------------------------------------------------------------------- parity
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_every_stage_matches_single_device(stage):
    e, losses = run(cfg(stage))
    assert_matches_single_device(e, losses)
    assert losses[-1] < losses[0]


@pytest.mark.parametrize(
    "zero, factors",
    [
        ({"stage": 3, "zero_hpz_partition_size": 4}, {"params": 4, "grads": 8, "optimizer": 8}),
        ({"stage": 3, "mics_shard_size": 4}, {"params": 4, "grads": 4, "optimizer": 4}),
        ({"stage": 0, "param_partition_size": 2, "grad_partition_size": 8,
          "optimizer_partition_size": 8}, {"params": 2, "grads": 8, "optimizer": 8}),
        ({"stage": 1, "grad_partition_size": 4}, {"params": 1, "grads": 4, "optimizer": 8}),
    ],
    ids=["hpz4", "mics4", "separate-2-8-8", "zero1-grads4"],
)
def test_hierarchical_sharding_bytes_and_parity(zero, factors):
    e, losses = run(cfg(**{"zero": zero}))
    assert e.zero_layout.describe(e.mesh) == factors
    assert_matches_single_device(e, losses)
    psi = sum(x.size for x in jax.tree.leaves(e.state.params))
    assert shard_bytes(e.state.params) == 4 * psi // factors["params"]
    assert shard_bytes(e.state.opt_state) <= 8 * psi // factors["optimizer"] + 64


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_zero_composes_with_tensor_parallel(stage):
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConfigWarning)  # nothing ignored: the layout is exact
        e, losses = run(cfg(stage, mesh={"data": 4, "tensor": 2}))
    assert_matches_single_device(e, losses)
    wq = e.state.params["layers"]["wq"]
    spec = wq.sharding.spec
    assert "tensor" in jax.tree.leaves(tuple(spec))


def test_shapes_only_engine_materialises_nothing_and_refuses_to_train():
    e = jds.TrainEngine(make_model, cfg(3), shapes_only=True)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(e.state))
    with pytest.raises(RuntimeError, match="shapes_only=True"):
        e.train_batch({"input_ids": batches(1)[0]})


def test_sequence_parallel_matches_one_device_and_splits_the_residual_stream():
    """mesh.sequence_parallel: the residual stream between sublayers is split over tensor
    along the sequence (Megatron SP). Same losses as one device; the stacked layer inputs
    that full remat keeps take about half the bytes."""
    def model():
        return jds.models.build("llama-tiny", hidden_size=256, intermediate_size=256,
                                num_hidden_layers=8, num_attention_heads=4,
                                num_key_value_heads=2, vocab_size=64,
                                max_position_embeddings=256)

    batch = {"input_ids": np.random.default_rng(0).integers(0, 64, (8, 64))}
    ref = jds.initialize(model(), {"train_batch_size": 8}, devices=jax.devices()[:1])
    sp = jds.initialize(model(), {"train_batch_size": 8, "zero_optimization": {"stage": 1},
                                  "mesh": {"tensor": 2, "sequence_parallel": True}})
    for _ in range(2):
        assert sp.train_batch(batch)["loss"] == pytest.approx(ref.train_batch(batch)["loss"],
                                                              rel=1e-5)
    temps = {}
    for flag in (False, True):
        e = jds.TrainEngine(model, {"train_batch_size": 8, "train": {"remat": "full"},
                                    "mesh": {"tensor": 2, "sequence_parallel": flag}},
                            shapes_only=True)
        temps[flag] = e.lower_train_step(256).compile().memory_analysis().temp_size_in_bytes
    layer_inputs = 8 * (8 // 4) * 256 * 256 * 4  # L x [B per data shard, T, D] fp32
    assert temps[False] - temps[True] >= layer_inputs / 2 / 4, temps
    with pytest.raises(jds.ConfigError, match="mesh.sequence_parallel=true .* mesh.tensor is 1"):
        jds.initialize(model(), {"train_batch_size": 8, "mesh": {"sequence_parallel": True}})


def test_zero3_keeps_no_gathered_copy_of_the_layers_for_the_backward_pass():
    # DeepSpeed's ZeRO-3 gathers each layer again in the backward pass. Without remat jds
    # keeps every activation, but must not keep the gathered weights: that was an
    # unsharded copy of the whole layer stack (save_costly_not_gathered).
    big = dict(hidden_size=128, intermediate_size=512, vocab_size=512, num_hidden_layers=4)

    def temp(remat):
        e = jds.TrainEngine(lambda: make_model(remat=remat, **big), cfg(3), shapes_only=True)
        layer_bytes = sum(4 * int(np.prod(x.shape))
                          for x in jax.tree.leaves(e.state.params["layers"]))
        return e.lower_train_step(SEQ).compile().memory_analysis().temp_size_in_bytes, layer_bytes

    keep, layer_bytes = temp("none")
    recompute, _ = temp("full")
    # at 1 x 16 tokens per device the kept activations are small beside the layer stack
    # (keeping the gathered weights cost 1.24 layer stacks)
    assert keep - recompute < 0.5 * layer_bytes, (keep, recompute, layer_bytes)
