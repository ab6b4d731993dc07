"""ZeRO-Offload on memory kinds (jds/partitioning/offload.py) and engine.offload_states.

- with ``offload_optimizer.device: "cpu"`` the losses and weights equal the run without
  offload under ZeRO 1 (``-m slow``)/2/3 with bf16, fp16 (skipped overflow steps included)
  and fp32, for
  an LM and for a user's own module; master weights and optimizer state report
  ``pinned_host`` (``unpinned_host`` without ``pin_memory``), parameters ``device``;
  ``ratio`` offloads about that share and keeps the rest in device memory;
- the compiled ZeRO-2 step's device-memory arguments fall to the bf16 parameters (2
  bytes/param) while the 12 bytes/param of master and Adam state are host arguments, read
  from the compiled entry layout; ``jds estimate`` reports the same split;
- the step lowers for CUDA and TPU from this CPU host with the host-memory annotations;
- checkpoints move between offloaded and device-resident runs with equal continuations;
- ``offload_states`` / ``reload_states`` round-trip the state bit for bit and guard steps;
- bad input: no host memory space, an unknown state name.
"""

import json

import jax
import numpy as np
import pytest
from flax import nnx

import jds
from jds.config import ConfigError
from jds.partitioning import offload as off
from jds.profiling import memory_report as mr

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)


def config(stage, precision="bf16", offload=None, **kw):
    c = {"train_batch_size": 16, "gradient_accumulation_steps": 2,
         "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.1}},
         "gradient_clipping": 1.0, "zero_optimization": {"stage": stage}, **kw}
    if precision == "bf16":
        c["bf16"] = {"enabled": True}
    elif precision == "fp16":  # 2^23 overflows at first: skipped steps, then training
        c["fp16"] = {"enabled": True, "initial_scale_power": 23, "hysteresis": 1}
    if offload is not None:
        c["zero_optimization"]["offload_optimizer"] = offload
    return c


def batches(n, rows=16, seq=16):
    rng = np.random.default_rng(0)
    return [{"input_ids": rng.integers(0, 256, size=(rows, seq), dtype=np.int32)}
            for _ in range(n)]


def lm():
    return jds.models.build("llama-tiny", seed=0, **TINY)


def kinds(tree):
    return {x.sharding.memory_kind for x in jax.tree.leaves(tree) if x.ndim}


def flat(tree):
    return np.concatenate([np.asarray(jax.device_get(x), np.float64).ravel()
                           for x in jax.tree.leaves(tree)])


def host_share(tree):
    leaves = [x for x in jax.tree.leaves(tree) if x.ndim]
    return sum(x.size for x in leaves if "host" in x.sharding.memory_kind) / sum(
        x.size for x in leaves)


CPU = {"device": "cpu"}


def train_alike(ref, got, bs, precision):
    """Both engines trained on ``bs``: the same losses, norms, skips and loss scales (1e-6);
    in fp16 some steps skipped at first, the last one applied."""
    m_ref = [ref.train_batch(b) for b in bs]
    m_got = [got.train_batch(b) for b in bs]
    for key in ("loss", "grad_norm", "skipped", "loss_scale"):
        np.testing.assert_allclose([m[key] for m in m_got], [m[key] for m in m_ref],
                                   rtol=1e-6, atol=1e-6, err_msg=key)
    if precision == "fp16":
        assert sum(m["skipped"] for m in m_got) >= 1 and m_got[-1]["skipped"] == 0


@pytest.mark.parametrize("stage, precision, zero", [
    pytest.param(1, "bf16", {"offload_optimizer": CPU}, marks=pytest.mark.slow),
    (2, "fp16", {"offload_optimizer": CPU}),
    pytest.param(3, "bf16", {"offload_optimizer": CPU, "offload_param": CPU},
                 marks=pytest.mark.slow),
    pytest.param(2, "fp32", {"offload_optimizer": CPU}, marks=pytest.mark.slow),
    (3, "bf16", {"offload_optimizer": {"device": "cpu", "pin_memory": False, "ratio": 0.5},
                 "offload_param": CPU}),
    pytest.param(3, "fp32", {"offload_param": CPU}, marks=pytest.mark.slow)])
def test_offloaded_run_equals_the_device_run(stage, precision, zero):
    bs = batches(3)
    ref = jds.initialize(model=lm(), config=config(stage, precision))
    cfg = config(stage, precision)
    cfg["zero_optimization"].update(zero)
    got = jds.initialize(model=lm(), config=cfg)
    opt = zero.get("offload_optimizer")
    host = "unpinned_host" if opt and not opt.get("pin_memory", True) else "pinned_host"
    weights = got.state.opt_state if precision == "fp32" else got.state.master
    assert kinds(ref.state.opt_state) == kinds(ref.state.params) == {"device"}
    assert kinds(got.state.params) == {"pinned_host" if "offload_param" in zero else "device"}
    if opt is None:
        assert kinds(got.state.opt_state) == {"device"}
    elif "ratio" in opt:  # whole parameters, near the ratio; the rest stays on device
        assert kinds(got.state.opt_state) == kinds(weights) == {host, "device"}
        assert 0.3 < host_share(weights) < 0.7 and "0.5 share" in got.offload.describe()
    else:
        assert kinds(got.state.opt_state) == kinds(weights) == {host}
    assert precision != "fp32" or got.state.master is None
    train_alike(ref, got, bs, precision)
    np.testing.assert_allclose(flat(got.state.fp32_params), flat(ref.state.fp32_params),
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(flat(got.state.opt_state), flat(ref.state.opt_state),
                               rtol=1e-6, atol=1e-9)
    assert got.eval_batch(bs[0])["loss"] == pytest.approx(ref.eval_batch(bs[0])["loss"],
                                                          rel=1e-6)
    # the eval-mode model has its weights in device memory
    assert kinds(nnx.state(got.model, nnx.Param)) == {"device"}


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(8, 32, rngs=rngs)
        self.l2 = nnx.Linear(32, 1, rngs=rngs)

    def __call__(self, x):
        return self.l2(nnx.relu(self.l1(x)))[:, 0]


def mse(model, batch):
    return ((model(batch["x"]) - batch["y"]) ** 2).mean()


def test_user_module_trains_with_offload_like_without():
    rng = np.random.default_rng(1)
    bs = [{"x": rng.normal(size=(16, 8)).astype(np.float32),
           "y": rng.normal(size=(16,)).astype(np.float32)} for _ in range(3)]
    runs = []
    for o in (None, {"device": "cpu"}):
        e = jds.initialize(model=MLP(nnx.Rngs(0)), config=config(2, "bf16", o), loss_fn=mse)
        runs.append([e.train_batch(b)["loss"] for b in bs])
    assert kinds(e.state.master) == {"pinned_host"}
    np.testing.assert_allclose(runs[1], runs[0], rtol=1e-6)


def test_parameter_offload_leaves_only_the_batch_in_device_arguments():
    cfg = config(3)
    cfg["zero_optimization"].update(offload_optimizer=CPU, offload_param=CPU)
    e = mr.shapes_engine("llama-tiny", cfg, jax.devices())
    psi = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(e.state.params))
    got = off.entry_memory(e.lower_train_step(16).compile().as_text())
    # 16 bytes/param of ZeRO-3 state, all of it in host memory: 2 bytes/param / 8 there
    assert got["argument_host"] == pytest.approx(14 * psi / 8, rel=0.01)
    assert got["argument_device"] < 0.01 * psi  # the batch and a few counters
    assert "parameters in host memory" in e.offload.describe()


def test_compiled_device_arguments_fall_to_the_zero_offload_figure(capsys):
    from jds.cli import main

    got = {}
    for o in ("none", "cpu"):
        assert main(["estimate", "--stage", "2", "--offload-optimizer", o, "--json"]) == 0
        got[o] = json.loads(capsys.readouterr().out)
    psi = got["cpu"]["num_params"]
    for o, r in got.items():  # the state's shardings, the formula and the compiled step agree
        st, f, c = r["state"], r["formula"]["config"], r["compiled"]
        assert st["host"] == c["host_argument"] == c["host_output"] == c["host_alias"]
        assert st["host"] == f["host"] and st["device"] == st["total"] - st["host"]
        assert c["device_peak"] == c["peak"] - c["host_argument"] - c["host_output"] + c[
            "host_alias"]
        device_args = c["argument"] - c["host_argument"]
        if o == "none":  # ZeRO-2: bf16 params + 12 B/param of master and Adam state / 8
            assert st["host"] == 0 and "no offload" in r["offload"]
            assert device_args == pytest.approx(2 * psi + 12 * psi / 8, rel=0.01)
        else:  # only the bf16 parameters (and the batch and counters) in device memory
            assert "host memory" in r["offload"] and f["device"] == f["params"]
            assert st["host"] == st["master"] + st["optimizer"]
            assert device_args == pytest.approx(2 * psi, rel=0.01)
            assert c["host_argument"] == pytest.approx(12 * psi / 8, rel=0.01)


@pytest.mark.parametrize("platform, params", [("cuda", False), ("tpu", False), ("cuda", True)])
def test_step_lowers_for_accelerators_with_host_memory_annotations(platform, params):
    cfg = config(3, "bf16", CPU)
    if params:
        cfg["zero_optimization"]["offload_param"] = CPU
    e = mr.shapes_engine("llama-tiny", cfg, jax.devices())
    text = e.lower_train_step(16, platform=platform).as_text()
    assert 'mhlo.memory_kind = "pinned_host"' in text
    assert 'mhlo.memory_kind = "device"' in text  # the streamed update's copies
    if params:  # each layer's copy to the device is made inside the layer scan's body
        bodies = [f for f in text.split("\n  func.func ")[1:] if not f.startswith("public @main")]
        assert any("annotate_device_placement" in f for f in bodies)


@pytest.mark.slow
def test_checkpoints_move_between_offloaded_and_device_runs(tmp_path):
    bs = batches(3)
    off_run = jds.initialize(model=lm(), config=config(2, "bf16", {"device": "cpu"}))
    for b in bs[:2]:
        off_run.train_batch(b)
    off_run.save_checkpoint(tmp_path / "off")
    off_run.wait_for_checkpoints()
    plain = jds.initialize(model=lm(), config=config(2))
    plain.load_checkpoint(tmp_path / "off")
    assert kinds(plain.state.master) == {"device"}
    np.testing.assert_allclose(plain.train_batch(bs[2])["loss"],
                               off_run.train_batch(bs[2])["loss"], rtol=1e-6)
    np.testing.assert_allclose(flat(plain.state.master), flat(off_run.state.master), rtol=1e-6)
    # and back: the device-resident run's checkpoint into the offloaded one
    plain.save_checkpoint(tmp_path / "plain")
    plain.wait_for_checkpoints()
    off_run.load_checkpoint(tmp_path / "plain")
    assert kinds(off_run.state.opt_state) == {"pinned_host"} and int(off_run.state.step) == 3
    np.testing.assert_array_equal(flat(off_run.state.master), flat(plain.state.master))


def test_offload_states_round_trip_and_guard_the_step():
    e = jds.initialize(model=lm(), config=config(2))
    b = batches(2)
    e.train_batch(b[0])
    before = flat(e.state)
    e.offload_states(include=["optim_states", "hp_params"])
    assert kinds(e.state.opt_state) == kinds(e.state.master) == {"pinned_host"}
    assert kinds(e.state.params) == {"device"}
    with pytest.raises(RuntimeError, match=r"reload_states\(\)"):
        e.train_batch(b[1])
    e.offload_states(pin_memory=False)  # everything else too, into unpinned memory
    assert kinds(e.state.params) == {"unpinned_host"}
    e.reload_states()
    assert kinds(e.state) == {"device"}
    np.testing.assert_array_equal(flat(e.state), before)
    assert np.isfinite(e.train_batch(b[1])["loss"])
    with pytest.raises(ValueError, match="unknown \\['optimizer'\\]"):
        e.offload_states(include=["optimizer"])


def test_no_host_memory_space_is_a_config_error(monkeypatch):
    monkeypatch.setattr(off, "_memory_kinds", lambda devices: {"device"})
    with pytest.raises(ConfigError, match="zero_optimization.offload_optimizer: .* no "
                       "'pinned_host' memory space"):
        jds.initialize(model=lm(), config=config(2, "bf16", {"device": "cpu"}))


def test_offload_beyond_the_hosts_memory_is_refused_before_any_work(monkeypatch):
    monkeypatch.setattr(off, "available_host_memory", lambda: 100_000)
    with pytest.raises(ConfigError, match=r"zero_optimization.offload_optimizer: the offloaded "
                       r"states need 0.4 MiB of host memory on this process \(8 device\(s\)\), "
                       r"but 0.1 MiB is available"):
        jds.initialize(model=lm(), config=config(2, "bf16", {"device": "cpu"}))
    monkeypatch.setattr(off, "available_host_memory", lambda: 10**12)
    jds.initialize(model=lm(), config=config(2, "bf16", {"device": "cpu"}))


@pytest.mark.parametrize("zero, match", [
    ({"stage": 2, "offload_param": CPU}, "offload_param: parameter offload needs "
     "zero_optimization.stage 3"),
    ({"stage": 1, "cpu_offload_param": True}, "cpu_offload_param: parameter offload needs"),
])
def test_parameter_offload_needs_stage_3(zero, match):
    with pytest.raises(ConfigError, match=match):
        jds.initialize(model=lm(), config={**config(0), "zero_optimization": zero})


def test_parameter_offload_with_pipeline_stages_is_refused():
    cfg = {**config(3), "mesh": {"stage": 2}}
    cfg["zero_optimization"]["offload_param"] = CPU
    with pytest.raises(ConfigError, match="offload_param with pipeline stages"):
        jds.initialize(model=lm(), config=cfg)


def test_chunks_and_entry_layout_parsing():
    assert off.chunk_leaves([4, 1, 1, 4, 2, 2, 1]) == [[0], [1, 2], [3], [4, 5], [6]]
    hlo = ("HloModule m, input_output_alias={ {1}: (1, {}, may-alias) }, "
           "entry_computation_layout={(bf16[4,8]{1,0}, f32[2,8]{1,0:S(5)}, s32[]{:S(5)})->"
           "(bf16[4,8]{1,0}, f32[2,8]{1,0:S(5)})}, num_partitions=8\n")
    assert off.entry_memory(hlo) == {"argument_device": 64, "argument_host": 68,
                                     "output_device": 64, "output_host": 64, "alias_host": 64}
