"""Orbax training checkpoints: exact resume, resume on another layout, faults, mismatches.

- exact resume (fp16 with a dynamic loss scale, so master weights, loss scale and the skipped
  count all travel), bit-exact on CPU;
- a ZeRO-3 checkpoint from 8 devices restored on 4 and 2 devices, under ZeRO-0/1/2 and with
  tensor parallelism, continuing with the same losses (fp32, rel 1e-5);
- a save killed with SIGKILL leaves the previous step restorable;
- a damaged file (flipped byte, truncation) is named; with no explicit step the newest intact
  step is restored instead, with a warning;
- restoring into a model of another shape names every mismatching array.
"""

import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import jds
from jds.checkpoint import CheckpointCorruptError, Checkpointer, verify_integrity
from jds.checkpoint.integrity import INTEGRITY_FILE

TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
SEQ = 16


def make_model(seed=0, **kw):
    return jds.models.build("llama-tiny", seed=seed, **{**TINY, **kw})


def cfg(stage=0, **kw):
    base = {
        "train_batch_size": 16,
        "gradient_accumulation_steps": 2,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.1}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 3e-3,
                                                     "warmup_num_steps": 4}},
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
    }
    base.update(kw)
    return base


def batches(n, rows=16):
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, size=(rows, SEQ), dtype=np.int32) for _ in range(n)]


def train(engine, bs):
    return [engine.train_batch({"input_ids": b})["loss"] for b in bs]


def flat(tree):
    return np.concatenate([np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)])


def test_resume_is_bit_exact_with_master_weights_and_loss_scale(tmp_path):
    config = cfg(1, fp16={"enabled": True, "initial_scale_power": 8, "loss_scale_window": 2})
    bs = batches(6)
    e = jds.initialize(model=make_model(), config=config)
    train(e, bs[:3])
    e.save_checkpoint(tmp_path, client_state={"data": {"position": 3}})
    want = train(e, bs[3:])
    want_state = e.state
    e.close()
    assert want_state.master is not None and float(want_state.loss_scale.scale) != 2.0**8

    e2 = jds.initialize(model=make_model(seed=1), config=config)
    assert e2.load_checkpoint(tmp_path) == {"data": {"position": 3}}
    assert int(e2.state.step) == 3
    assert train(e2, bs[3:]) == want
    for a, b in zip(jax.tree.leaves(e2.state), jax.tree.leaves(want_state), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    e2.close()


@pytest.fixture(scope="module")
def zero3_checkpoint(tmp_path_factory):
    """A ZeRO-3 run on 8 devices saved after 3 steps, and its next 3 losses."""
    path = tmp_path_factory.mktemp("zero3")
    bs = batches(6)
    e = jds.initialize(model=make_model(), config=cfg(3))
    assert e.mesh.size == 8
    train(e, bs[:3])
    e.save_checkpoint(path)
    want = train(e, bs[3:])
    e.close()
    return path, want, bs[3:]


@pytest.mark.parametrize(
    "n_devices,stage,mesh",
    [(4, 3, None), (2, 0, None), (4, 1, None), (8, 2, {"data": 4, "tensor": 2}),
     (1, 0, None)],
    ids=["4dev-zero3", "2dev-zero0", "4dev-zero1", "8dev-zero2-tp2", "1dev"],
)
def test_zero3_checkpoint_restores_on_any_layout(zero3_checkpoint, n_devices, stage, mesh):
    path, want, rest = zero3_checkpoint
    config = cfg(stage, **({"mesh": mesh} if mesh else {}))
    e = jds.initialize(model=make_model(seed=5), config=config, devices=jax.devices()[:n_devices])
    e.load_checkpoint(path)
    wq = e.state.params["layers"]["wq"]
    assert len(wq.sharding.device_set) == n_devices
    if mesh:
        assert "tensor" in jax.tree.leaves(tuple(wq.sharding.spec))
    np.testing.assert_allclose(train(e, rest), want, rtol=1e-5)
    e.close()


def test_every_committed_step_carries_a_verified_manifest(tmp_path):
    e = jds.initialize(model=make_model(), config=cfg())
    e.save_checkpoint(tmp_path)
    train(e, batches(1))
    e.save_checkpoint(tmp_path)
    e.close()
    ck = Checkpointer(tmp_path)
    assert ck.all_steps() == [0, 1]
    for step in (0, 1):
        assert (tmp_path / str(step) / INTEGRITY_FILE).is_file()
        assert verify_integrity(tmp_path / str(step))
    ck.close()


def _largest_data_file(step_dir: Path) -> Path:
    files = [p for p in (step_dir / "state").rglob("*") if p.is_file() and "d" in p.parent.name]
    return max(files, key=lambda p: p.stat().st_size)


@pytest.fixture
def two_steps(tmp_path):
    """Checkpoints at steps 1 and 2 and the states they hold."""
    e = jds.initialize(model=make_model(), config=cfg())
    states = {}
    for step, b in enumerate(batches(2), start=1):
        train(e, [b])
        e.save_checkpoint(tmp_path)
        states[step] = flat(e.state.params)
    e.close()
    return tmp_path, states


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_file_is_named_and_resume_falls_back(two_steps, damage):
    path, states = two_steps
    victim = _largest_data_file(path / "2")
    data = bytearray(victim.read_bytes())
    if damage == "flip":
        data[len(data) // 2] ^= 0xFF
    else:
        data = data[: len(data) // 2]
    victim.write_bytes(bytes(data))

    e = jds.initialize(model=make_model(seed=3), config=cfg())
    why = "CRC-32 mismatch" if damage == "flip" else "truncated"
    with pytest.raises(CheckpointCorruptError, match=why) as err:
        e.load_checkpoint(path, tag=2)
    assert str(victim) in str(err.value)
    with pytest.warns(UserWarning, match="falling back"):
        e.load_checkpoint(path)
    assert int(e.state.step) == 1
    np.testing.assert_array_equal(flat(e.state.params), states[1])
    e.close()


def test_every_step_damaged_is_an_error_naming_each(two_steps):
    path, _ = two_steps
    for step in ("1", "2"):
        (path / step / "state" / "_METADATA").write_text("{not json")
    e = jds.initialize(model=make_model(), config=cfg())
    with pytest.warns(UserWarning), pytest.raises(CheckpointCorruptError) as err:
        e.load_checkpoint(path)
    assert str(path / "1" / "state" / "_METADATA") in str(err.value)
    assert str(path / "2" / "state" / "_METADATA") in str(err.value)
    e.close()


def test_shape_mismatch_names_every_array(tmp_path):
    e = jds.initialize(model=make_model(), config=cfg())
    e.save_checkpoint(tmp_path)
    e.close()
    e2 = jds.initialize(model=make_model(intermediate_size=48), config=cfg())
    with pytest.raises(ValueError, match="does not match this run") as err:
        e2.load_checkpoint(tmp_path)
    msg = str(err.value)
    for name in ("params/layers/w_gate", "params/layers/w_up", "params/layers/w_down",
                 "opt_state/0/mu/layers/w_up"):
        assert name in msg, name
    assert "(2, 32, 64)" in msg and "(2, 32, 48)" in msg
    assert "wq" not in msg  # matching arrays are not listed
    e2.close()


_CHILD = textwrap.dedent(
    """
    import os, sys
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    import jds, numpy as np
    model = jds.models.build("llama-tiny", hidden_size=256, intermediate_size=1024,
                             num_hidden_layers=4, num_attention_heads=4,
                             num_key_value_heads=4, max_position_embeddings=64)
    e = jds.initialize(model=model, config={"train_batch_size": 8,
                                            "optimizer": {"type": "AdamW",
                                                          "params": {"lr": 1e-3}}})
    ids = np.random.default_rng(0).integers(0, 256, (8, 16)).astype(np.int32)
    step = 0
    while True:
        e.train_batch({"input_ids": ids})
        e.save_checkpoint(sys.argv[1])
        e.wait_for_checkpoints()
        print("saved", int(e.state.step), flush=True)
        if int(e.state.step) >= 2:
            e.train_batch({"input_ids": ids})
            e.save_checkpoint(sys.argv[1])  # step 3: the one that gets killed
            print("saving", flush=True)
            import time
            time.sleep(60)
    """
)


def test_sigkill_mid_save_leaves_the_previous_step_restorable(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    ckpt = tmp_path / "ckpt"
    killed_mid_save = False
    for attempt in range(4):
        if ckpt.exists():
            shutil.rmtree(ckpt)
        proc = subprocess.Popen([sys.executable, str(script), str(ckpt)],
                                stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        try:
            for line in proc.stdout:
                if line.startswith("saving"):
                    break
            time.sleep(0.002 * attempt)
            proc.send_signal(signal.SIGKILL)
        finally:
            proc.wait(timeout=120)
        assert proc.returncode == -signal.SIGKILL
        leftovers = [p for p in ckpt.iterdir() if "orbax-checkpoint-tmp" in p.name]
        if leftovers:
            killed_mid_save = True
            break
    assert killed_mid_save, "the save always finished before SIGKILL; nothing was tested"
    ck = Checkpointer(ckpt)
    assert ck.all_steps() == [1, 2]
    assert verify_integrity(ckpt / "2")
    ck.close()
    e = jds.initialize(model=jds.models.build(
        "llama-tiny", hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=64),
        config={"train_batch_size": 8, "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}})
    e.load_checkpoint(ckpt)
    assert int(e.state.step) == 2
    # the half-written step 3 is invisible, and saving step 3 again works
    assert not (ckpt / "3").exists()
    e.save_checkpoint(ckpt, tag=3)
    e.wait_for_checkpoints()
    e.close()
    assert verify_integrity(ckpt / "3")
