"""ZeRO-Infinity's NVMe tier for the optimizer (jds/partitioning/nvme.py).

- with ``offload_optimizer.device: "nvme"`` the losses, gradient norms, skipped fp16 steps,
  weights and optimizer state equal the device-resident run to 1e-6 (ZeRO-3 fp16 here;
  ZeRO-0/1/2 and fp32 under ``-m slow``); the states are swap files of the expected size,
  the state reports them as ``nvme``, the compiled step has no host or optimizer-state
  arguments, and the host buffers in flight never exceed ``buffer_count`` tensors;
- checkpoints move between NVMe and device-resident runs both ways; an update that fails
  half-way leaves the last checkpoint intact and the engine refuses to train until it is
  loaded, then trains on as the uninterrupted run;
- resident host memory at rest drops by the states' size (measured RSS, two processes);
- bad input: nvme_path missing, not a folder or not writable, a disk too small, a partial
  (ratio) NVMe offload — each a ConfigError naming the key before anything is made.
"""

import json
import os
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from flax import nnx
from test_offload import MLP, batches, config, flat, lm, mse, train_alike

import jds
from jds.checkpoint.orbax import Checkpointer
from jds.config import ConfigError
from jds.partitioning import nvme as nv
from jds.partitioning import offload as off
from jds.partitioning.memory import shard_bytes, state_memory


def nvme(path, **kw):
    return {"device": "nvme", "nvme_path": str(path), **kw}


@pytest.mark.parametrize("stage, precision, params", [
    (3, "fp16", False),
    pytest.param(3, "bf16", True, marks=pytest.mark.slow),
    pytest.param(2, "bf16", False, marks=pytest.mark.slow),
    pytest.param(1, "fp32", False, marks=pytest.mark.slow),
    pytest.param(0, "bf16", False, marks=pytest.mark.slow)])
def test_nvme_run_equals_the_device_run(tmp_path, stage, precision, params, monkeypatch):
    bs = batches(3)
    # several chunks, two in flight, the last ones written while the next step computes
    cfg = config(stage, precision, nvme(tmp_path, buffer_count=6, pipeline_write=True))
    cfg["zero_optimization"]["sub_group_size"] = 2048
    if params:  # and the parameters, between steps
        cfg["zero_optimization"]["offload_param"] = nvme(tmp_path)
    live, write, init_from = [], nv.SwapStore.write, nv.NvmeOptimizer.init_from

    def buffers():  # bytes of the distinct device buffers alive
        return sum({s.data.unsafe_buffer_pointer(): s.data.nbytes
                    for x in jax.live_arrays() for s in x.addressable_shards}.values())

    def counting(self, leaf, value):  # whenever a state tensor is written
        live.append(buffers())
        write(self, leaf, value)

    def init(self, state, weights):
        live.append(buffers())
        return init_from(self, state, weights)

    monkeypatch.setattr(nv.SwapStore, "write", counting)
    monkeypatch.setattr(nv.NvmeOptimizer, "init_from", init)
    got = jds.initialize(model=lm(), config=cfg)
    monkeypatch.undo()
    # the fresh master weights and moments are made chunk by chunk, never whole: while
    # they are written, less than half of them is ever alive on the devices
    whole = sum(shard_bytes(d) * 8 for d in got.nvme.disk_leaves)
    assert len(got.nvme.chunks) > 5
    assert 0 < max(live) - live[0] < whole / 2
    ref = jds.initialize(model=lm(), config=config(stage, precision))
    store = got.nvme.store
    assert os.path.dirname(store.folder) == str(tmp_path)
    # every master/moment shard is a file; the state holds their descriptions
    disk = got.nvme.disk_leaves
    assert {off.memory_kind(x) for x in disk} == {"nvme"}
    assert sum(os.path.getsize(os.path.join(store.folder, f))
               for f in os.listdir(store.folder)) == got.nvme.disk_bytes()
    psi = sum(x.size for x in jax.tree.leaves(got.state.params))
    per_param = 8 if precision == "fp32" else 12  # Adam moments (+ fp32 master weights)
    local = 1 if stage == 0 else 8  # ZeRO 1-3: each device's own shard, one file each
    assert got.nvme.disk_bytes() == pytest.approx(per_param * psi, rel=0.01) and len(
        os.listdir(store.folder)) == len(disk) * local
    if precision != "fp32":
        assert all(nv.on_disk(x) for x in jax.tree.leaves(got.state.master,
                                                            is_leaf=nv.on_disk))
    st = state_memory(got.state)  # what jds estimate shows
    assert st["host"] == 0 and st["nvme"] == st["master"] + st["optimizer"] + (
        st["params"] if params else 0) > 0
    # the compiled step takes neither master weights nor moments: parameters (in host
    # memory with offload_param), batch, counters
    mem = off.entry_memory(got.lower_train_step(16).compile().as_text())
    p_bytes = sum(shard_bytes(d) for d in jax.tree.leaves(got.state.params,
                                                           is_leaf=nv.on_disk))
    assert mem["argument_host"] == (p_bytes if params else 0)
    assert mem["argument_device"] < (0 if params else p_bytes) + 4096
    train_alike(ref, got, bs, precision)
    if params:
        assert {off.memory_kind(x) for x in jax.tree.leaves(got.state.params,
                                                             is_leaf=nv.on_disk)} == {"nvme"}
        np.testing.assert_array_equal(flat(got._params_view().params), flat(ref.state.params))
    np.testing.assert_allclose(flat(got.nvme.materialise(got.state.fp32_params)),
                               flat(ref.state.fp32_params), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(flat(got.nvme.materialise(got.state.opt_state)),
                               flat(ref.state.opt_state), rtol=1e-6, atol=1e-9)
    assert got.nvme.buffer_bytes < got.nvme.disk_bytes() / 6
    assert 2 * got.nvme.buffer_bytes < got.nvme.budget.peak <= got.nvme.budget_bytes
    assert got.eval_batch(bs[0])["loss"] == pytest.approx(ref.eval_batch(bs[0])["loss"],
                                                          rel=1e-6)
    assert off.memory_kind(jax.tree.leaves(nnx.state(got.model, nnx.Param))[0]) == "device"


def _mlp_batches(n):
    rng = np.random.default_rng(1)
    return [{"x": rng.normal(size=(16, 8)).astype(np.float32),
             "y": rng.normal(size=(16,)).astype(np.float32)} for _ in range(n)]


def _mlp(cfg):
    return jds.initialize(model=MLP(nnx.Rngs(0)), config=cfg, loss_fn=mse)


def test_checkpoints_move_both_ways_and_a_failed_update_waits_for_one(tmp_path, monkeypatch):
    bs = _mlp_batches(4)
    swap = tmp_path / "swap"
    swap.mkdir()
    cfg = config(3, "bf16", nvme(swap, buffer_count=6))  # ZeRO-3, both NVMe tiers
    cfg["zero_optimization"].update(sub_group_size=64, offload_param=nvme(swap))  # 3 chunks
    disk = _mlp(cfg)
    assert len(disk.nvme.chunks) == 3
    plain = _mlp(config(3, "bf16"))
    for b in bs[:2]:  # a user's own module trains on NVMe as on device
        assert disk.train_batch(b)["loss"] == pytest.approx(plain.train_batch(b)["loss"],
                                                            rel=1e-6)
    disk.save_checkpoint(tmp_path / "disk")
    disk.wait_for_checkpoints()
    # offload_states leaves the swap files where they are and moves the rest
    disk.offload_states()
    disk.reload_states()
    # a write that fails half-way through the update: the step raises, and the engine
    # refuses to go on from half-updated states
    calls = {"n": 0}
    write = nv.SwapStore.write

    def failing(self, leaf, value):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OSError(28, "No space left on device")
        write(self, leaf, value)

    monkeypatch.setattr(nv.SwapStore, "write", failing)
    with pytest.raises(OSError, match="No space left"):
        disk.train_batch(bs[2])
    monkeypatch.setattr(nv.SwapStore, "write", write)
    with pytest.raises(RuntimeError, match="load a checkpoint"):
        disk.train_batch(bs[2])
    # the last checkpoint is intact; loaded, the run goes on as the device-resident one
    disk.load_checkpoint(tmp_path / "disk")
    assert int(disk.state.step) == 2
    assert disk.train_batch(bs[2])["loss"] == pytest.approx(
        plain.train_batch(bs[2])["loss"], rel=1e-6)
    # the NVMe run's checkpoint into a device-resident run, and a device-resident one back
    other = _mlp(config(3, "bf16"))
    other.load_checkpoint(tmp_path / "disk")
    # the save reads the swap files while the next step runs (slowly here): the update
    # waits for it
    saved = flat(disk.nvme.materialise(disk.state.master))
    read_whole = nv.SwapStore.read_whole
    monkeypatch.setattr(nv.SwapStore, "read_whole",
                        lambda self, leaf: (time.sleep(0.1), read_whole(self, leaf))[1])
    disk.save_checkpoint(tmp_path / "disk")
    plain.save_checkpoint(tmp_path / "plain")
    plain.wait_for_checkpoints()
    disk.train_batch(bs[0])
    plain.train_batch(bs[0])
    monkeypatch.undo()
    other.load_checkpoint(tmp_path / "disk")
    np.testing.assert_array_equal(flat(other.state.master), saved)
    # restored into the swap files a group at a time, each in a partial restore of its own
    restores, restore_one = [], Checkpointer._restore_one

    def spy(self, step, stored, target, partial=False):
        restores.append(len(jax.tree.leaves(target)))
        return restore_one(self, step, stored, target, partial)

    monkeypatch.setattr(Checkpointer, "_restore_one", spy)
    disk.load_checkpoint(tmp_path / "plain")
    monkeypatch.undo()
    # the rest, the parameters, then each chunk's master weights and moments
    assert restores[1:] == [len(disk.nvme_params.disk_leaves)] + [
        len(c.states) + len(c.params) for c in disk.nvme.chunks]
    plain.load_checkpoint(tmp_path / "plain")
    np.testing.assert_array_equal(flat(disk.nvme.materialise(disk.state.opt_state)),
                                  flat(plain.state.opt_state))
    assert disk.train_batch(bs[3])["loss"] == pytest.approx(
        plain.train_batch(bs[3])["loss"], rel=1e-6)
    # weights only (a converted checkpoint): a fresh optimizer made on disk chunk by chunk
    ck = Checkpointer(str(tmp_path / "weights"))
    ck.save_tree(0, {"params": jax.device_get(plain.state.master)}, {"kind": "weights"})
    ck.wait()
    disk.load_checkpoint(tmp_path / "weights")
    plain.load_checkpoint(tmp_path / "weights")
    assert int(disk.state.step) == 0
    np.testing.assert_array_equal(flat(disk.nvme.materialise(disk.state.opt_state)),
                                  flat(plain.state.opt_state))
    assert disk.train_batch(bs[0])["loss"] == pytest.approx(
        plain.train_batch(bs[0])["loss"], rel=1e-6)


def test_a_write_failing_behind_the_step_is_reported_by_the_next(tmp_path, monkeypatch):
    bs = _mlp_batches(3)
    disk = _mlp(config(2, "bf16", nvme(tmp_path, pipeline_write=True)))
    disk.train_batch(bs[0])
    disk.nvme.flush()  # its writes, behind it

    def failing(self, leaf, value):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(nv.SwapStore, "write", failing)
    disk.train_batch(bs[1])  # its writes run behind it, and fail there
    with pytest.raises(OSError, match="Input/output error"):
        disk.train_batch(bs[2])
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match="load a checkpoint"):
        disk.eval_batch(bs[2])


_RSS_SCRIPT = textwrap.dedent("""
    import gc, json, sys
    import jax, numpy as np
    from flax import nnx
    import jds
    from jds.host_env import release_free_heap

    class Deep(nnx.Module):  # 16.8M parameters in 4 equal layers
        def __init__(self, rngs):
            self.hidden = nnx.List([nnx.Linear(2048, 2048, rngs=rngs) for _ in range(4)])

        def __call__(self, x):
            for layer in self.hidden:
                x = nnx.relu(layer(x))
            return x.mean(-1)

    zero = {"stage": 2}
    if sys.argv[1] == "nvme":
        zero["offload_optimizer"] = {"device": "nvme", "nvme_path": sys.argv[2]}
        zero["sub_group_size"] = 2048 * 2049  # a chunk per layer
    cfg = {"train_batch_size": 8, "bf16": {"enabled": True}, "zero_optimization": zero,
           "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    e = jds.initialize(model=lambda: Deep(nnx.Rngs(0)), config=cfg,
                       loss_fn=lambda m, b: ((m(b["x"]) - b["y"]) ** 2).mean(),
                       devices=jax.devices()[:1])
    def status(key):
        return [int(line.split()[1]) * 1024 for line in open("/proc/self/status")
                if line.startswith(key)][0]

    built = status("VmHWM")  # the peak of building the engine
    rng = np.random.default_rng(0)
    b = {"x": rng.normal(size=(8, 2048)).astype(np.float32),
         "y": rng.normal(size=(8,)).astype(np.float32)}
    for _ in range(3):
        e.train_batch(b)
    gc.collect()
    release_free_heap()
    print(json.dumps({"rss": status("VmRSS"), "built": built}))
""")


@pytest.mark.slow  # 10 s: two processes; the default tests count the buffers in flight
def test_states_on_nvme_leave_host_memory(tmp_path):
    """Measured resident memory at rest, the same model with its master weights and Adam
    state on the device (here: host RAM) and in swap files: the difference is the 12
    bytes/param of states (the step's own buffers aside)."""
    rss = {}
    for mode in ("device", "nvme"):
        out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, mode, str(tmp_path)],
                             capture_output=True, text=True, timeout=300,
                             env={**os.environ, "JAX_PLATFORMS": "cpu"})
        assert out.returncode == 0, out.stderr[-2000:]
        rss[mode] = json.loads(out.stdout.strip().splitlines()[-1])["rss"]
    states = 12 * 16 * 512 * 512  # fp32 master weights and Adam's two moments
    assert rss["device"] - rss["nvme"] > 0.5 * states, rss


def test_bad_nvme_input_is_refused_before_anything_is_made(tmp_path, monkeypatch):
    def build(opt, stage=2):
        return _mlp(config(stage, "bf16", opt))

    with pytest.raises(ConfigError, match="offload_optimizer.nvme_path: required"):
        build({"device": "nvme"})
    with pytest.raises(ConfigError, match="is not a folder"):
        build(nvme(tmp_path / "missing"))
    with pytest.raises(ConfigError, match="cannot write in '/sys'"):
        build(nvme("/sys"))
    with pytest.raises(ConfigError, match="offload_param.nvme_path: required"):
        cfg = config(3, "bf16")
        cfg["zero_optimization"]["offload_param"] = {"device": "nvme"}
        _mlp(cfg)
    with pytest.raises(ConfigError, match="offload_param: parameter offload needs "
                                          "zero_optimization.stage 3"):
        cfg = config(2, "bf16")
        cfg["zero_optimization"]["offload_param"] = nvme(tmp_path)
        _mlp(cfg)
    with pytest.raises(ConfigError, match="ratio: a partial offload"):
        build(nvme(tmp_path, ratio=0.5), stage=3)
    monkeypatch.setattr(nv.shutil, "disk_usage", lambda p: type("U", (), {"free": 1000})())
    with pytest.raises(ConfigError, match=r"swap files need .* MiB .* has 0.0 MiB free"):
        build(nvme(tmp_path))
    assert os.listdir(tmp_path) == []  # nothing was made
    # the disk a process needs: each distinct shard once (replicated: one copy, not eight)
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("d",))
    spec = lambda *p: jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(*p))  # noqa: E731
    x = jax.ShapeDtypeStruct((8, 4), np.float32, sharding=spec())
    y = jax.ShapeDtypeStruct((8, 4), np.float32, sharding=spec("d"))
    assert nv.swap_bytes(x) == nv.swap_bytes(y) == 128
