"""A real two-process hybrid mesh: two CPU processes of 4 devices each, joined by gloo.

Each process is one DCN granule. The test checks that ``mesh.dcn`` puts each process's
devices in its own block of the ``data`` axis and that collectives over the DCN axis, the
ICI axis and both reach the right devices. The subprocesses set their own ``XLA_FLAGS``
(conftest's 8 devices belong to this process) before importing jax.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

WORKER = r'''
import json, os, sys
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
os.environ["JAX_PLATFORMS"] = "cpu"
import jax
port, pid = sys.argv[1], int(sys.argv[2])
try:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    from jax._src.lib import _jax
    _jax.make_gloo_tcp_collectives  # what jax's CPU backend calls for "gloo"
except (ValueError, AttributeError, ImportError) as e:  # a jax/jaxlib without gloo
    print("NO_GLOO", repr(e), flush=True)
    sys.exit(77)
jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=pid,
                           initialization_timeout=30)
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P
from jds.config import MeshConfig
from jds.partitioning.mesh import make_mesh

# The engine's call: make_mesh(cfg.mesh.model_dump(), devices) with every device on data.
flat = make_mesh(MeshConfig(dcn={"data": 2}).model_dump())
mesh = make_mesh({"data": 2, "fsdp": -1, "dcn": {"data": 2}})
x = jax.make_array_from_callback(
    (8,), NamedSharding(mesh, P(("data", "fsdp"))),
    lambda idx: np.arange(8, dtype=np.float32)[idx])

def sums(b):
    return jax.lax.psum(b, "fsdp"), jax.lax.psum(b, "data"), jax.lax.psum(b, ("data", "fsdp"))

spec = P(("data", "fsdp"))
ici, dcn, both = jax.jit(jax.shard_map(sums, mesh=mesh, in_specs=spec,
                                       out_specs=(spec, spec, spec)))(x)
local = lambda a: [float(s.data[0]) for s in sorted(a.addressable_shards, key=lambda s: s.index)]
total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
print("RESULT", json.dumps({
    "flat_shape": dict(flat.shape),
    "flat_procs": [d.process_index for d in flat.devices.flat],
    "procs": np.vectorize(lambda d: d.process_index)(mesh.devices[:, :, 0, 0]).tolist(),
    "ici": local(ici), "dcn": local(dcn), "both": local(both),
    "total": float(total.addressable_data(0)),
}), flush=True)
jax.distributed.shutdown()
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_process_hybrid_mesh_places_and_reduces(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, str(script), str(port), str(i)], env=env, cwd=REPO,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(2)]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=90)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.communicate()
    for p, out in zip(procs, outs, strict=True):
        if p.returncode == 77:
            pytest.skip(f"gloo CPU collectives unavailable in this jax: {out.strip()[-300:]}")
        assert p.returncode == 0, out[-3000:]
    results = [json.loads(out.split("RESULT ", 1)[1].splitlines()[0]) for out in outs]
    for pid, r in enumerate(results):
        assert r["flat_shape"] == {"data": 8, "fsdp": 1, "tensor": 1, "stage": 1}
        assert r["flat_procs"] == [0] * 4 + [1] * 4  # process i owns half i of data
        assert r["procs"] == [[0] * 4, [1] * 4]  # mesh.devices[data, fsdp] -> process
        # x = 0..7; process p holds x[4p:4p+4]. fsdp (ICI) sums stay in the process, data
        # (DCN) sums pair element k with k +- 4 across processes, both sum everything.
        assert r["ici"] == [[6.0] * 4, [22.0] * 4][pid]
        assert r["dcn"] == [4.0, 6.0, 8.0, 10.0]
        assert r["both"] == [28.0] * 4 and r["total"] == 28.0


# ---------------------------------------------------------------- training across processes
TINY = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64)
ZERO3 = {"train_batch_size": 16, "gradient_accumulation_steps": 2,
         "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 0.1}},
         "gradient_clipping": 1.0, "zero_optimization": {"stage": 3}}

TRAIN_WORKER = r'''
import json, sys
import jds
from jds.distributed import PeerFailureError, exit_after_peer_failure
info = jds.init_distributed()  # from jds launch's JDS_* variables
import jax, numpy as np
TINY, CFG, mode, ckpt = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
rng = np.random.default_rng(0)
bs = [rng.integers(0, 256, size=(16, 16), dtype=np.int32) for _ in range(5)]
e = jds.initialize(model=jds.models.build("llama-tiny", seed=0, **TINY), config=CFG)
rows = e.local_rows()  # this process reads only its rows of each global batch
step = lambda b: e.train_batch({"input_ids": b[rows]}, process_local=True)["loss"]
if mode == "train":
    losses = [step(b) for b in bs[:3]]
    e.save_checkpoint(ckpt)
    e.wait_for_checkpoints()
    losses += [step(b) for b in bs[3:]]
    print("RESULT", json.dumps({"pid": jax.process_index(), "n": jax.process_count(),
                                "devices": jax.device_count(), "rows": rows.tolist(),
                                "losses": losses}), flush=True)
    e.close()
else:  # "die": process 1 kills itself at step 3; process 0 must not hang
    import os, time
    try:
        for i in range(10_000):
            step(bs[i % 5])
            if jax.process_index() == 1 and i == 2:
                print("DYING", time.time(), flush=True)
                os.kill(os.getpid(), 9)
    except PeerFailureError as err:
        print("DETECTED", time.time(), flush=True)
        exit_after_peer_failure(err)
'''


def _launch(tmp_path, *worker_args, timeout=240):
    script = tmp_path / "train_worker.py"
    script.write_text(TRAIN_WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    cmd = [sys.executable, "-m", "jds.cli", "launch", "--nproc", "2", "--cpu-devices", "4",
           "--", str(script), *worker_args]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def _train_two_processes(tmp_path, config, ckpt):
    """The two workers' RESULT rows (by process), after a training run with ``config``."""
    run = _launch(tmp_path, json.dumps(TINY), json.dumps(config), "train", str(ckpt))
    out = run.stdout + run.stderr
    if "NO_GLOO" in out:
        pytest.skip("gloo CPU collectives unavailable in this jax")
    assert run.returncode == 0, out[-4000:]
    return sorted((json.loads(line.split("RESULT ", 1)[1]) for line in out.splitlines()
                   if "RESULT " in line), key=lambda r: r["pid"])


def _single_process_run(bs, ckpt=None, config=ZERO3):
    import jax
    import numpy as np

    import jds

    # seed 0 as in the workers; a restore starts from other weights to show they are replaced
    seed = 0 if ckpt is None else 3
    e = jds.initialize(model=jds.models.build("llama-tiny", seed=seed, **TINY), config=config)
    assert jax.process_count() == 1 and e.mesh.size == 8
    if ckpt is not None:
        e.load_checkpoint(ckpt)
    out = [e.train_batch({"input_ids": b})["loss"] for b in bs]
    e.close()
    return np.asarray(out)


def test_jds_launch_two_processes_zero3_matches_one_process_and_checkpoint_restores(tmp_path):
    import numpy as np

    ckpt = tmp_path / "ckpt"
    results = _train_two_processes(tmp_path, ZERO3, ckpt)
    assert [r["pid"] for r in results] == [0, 1]
    assert all(r["n"] == 2 and r["devices"] == 8 for r in results)
    # per-host data: each process read only its half of every micro-batch
    assert results[0]["rows"] == [0, 1, 2, 3, 8, 9, 10, 11]
    assert results[1]["rows"] == [4, 5, 6, 7, 12, 13, 14, 15]
    assert results[0]["losses"] == results[1]["losses"]

    rng = np.random.default_rng(0)
    bs = [rng.integers(0, 256, size=(16, 16), dtype=np.int32) for _ in range(5)]
    np.testing.assert_allclose(results[0]["losses"], _single_process_run(bs), rtol=1e-5)
    # both processes wrote their own shards; one process with 8 devices continues from them
    state_dir = ckpt / "3" / "state"
    assert (state_dir / "ocdbt.process_0").is_dir() and (state_dir / "ocdbt.process_1").is_dir()
    np.testing.assert_allclose(_single_process_run(bs[3:], ckpt), results[0]["losses"][3:],
                               rtol=1e-5)


@pytest.mark.slow  # 60 s; the default suite runs both NVMe tiers in one process
def test_two_processes_with_both_nvme_tiers_match_one_process(tmp_path):
    """Each process keeps its own shards in its own swap folder; checkpoints (read back
    per process, not streamed) restore onto one process without offload."""
    import numpy as np

    swap, ckpt = tmp_path / "swap", tmp_path / "ckpt"
    swap.mkdir()
    nvme = {"device": "nvme", "nvme_path": str(swap)}
    cfg = {**ZERO3, "bf16": {"enabled": True}, "zero_optimization": {
        "stage": 3, "offload_optimizer": {**nvme, "pipeline_write": True},
        "offload_param": nvme, "sub_group_size": 4096}}
    results = _train_two_processes(tmp_path, cfg, ckpt)
    assert results[0]["losses"] == results[1]["losses"]
    assert os.listdir(swap) == []  # each process removed its swap folder as it exited
    rng = np.random.default_rng(0)
    bs = [rng.integers(0, 256, size=(16, 16), dtype=np.int32) for _ in range(5)]
    plain = {**ZERO3, "bf16": {"enabled": True}}
    np.testing.assert_allclose(results[0]["losses"], _single_process_run(bs, config=plain),
                               rtol=1e-5)
    np.testing.assert_allclose(_single_process_run(bs[3:], ckpt, config=plain),
                               results[0]["losses"][3:], rtol=1e-5)


@pytest.mark.slow
def test_survivor_of_a_killed_process_exits_with_a_clear_error(tmp_path):
    """Process 1 dies by SIGKILL mid-training: process 0 must say so and exit, not hang.

    The processes are started directly (as Slurm or a hostfile launch would), not through
    jds launch, which would stop the survivor itself.
    """
    script = tmp_path / "train_worker.py"
    script.write_text(TRAIN_WORKER)
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", JDS_CPU_COLLECTIVES="gloo",
               XLA_FLAGS="--xla_force_host_platform_device_count=4", JDS_NUM_PROCESSES="2",
               JDS_COORDINATOR=f"127.0.0.1:{_free_port()}", JDS_FAILURE_TIMEOUT="10")
    config = dict(ZERO3, gradient_accumulation_steps=1)
    procs = [subprocess.Popen(
        [sys.executable, str(script), json.dumps(TINY), json.dumps(config), "die", "-"],
        env=dict(env, JDS_PROCESS_ID=str(i)), cwd=REPO, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True) for i in range(2)]
    try:
        outs = [p.communicate(timeout=180)[0] for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any("NO_GLOO" in o for o in outs):
        pytest.skip("gloo CPU collectives unavailable in this jax")
    assert procs[1].returncode == -9, outs[1][-2000:]
    assert procs[0].returncode == 3, outs[0][-3000:]
    assert "another process most likely died" in outs[0]
    died = float(outs[1].split("DYING ", 1)[1].split()[0])
    detected = float(outs[0].split("DETECTED ", 1)[1].split()[0])
    assert detected - died < 10  # within JDS_FAILURE_TIMEOUT


_CLUSTER_VARS = ("JDS_COORDINATOR", "JDS_NUM_PROCESSES", "JDS_PROCESS_ID", "OMPI_COMM_WORLD_SIZE",
                 "OMPI_COMM_WORLD_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_JOB_ID",
                 "SLURM_NTASKS", "TPU_WORKER_HOSTNAMES", "CLOUD_TPU_TASK_ID")


@pytest.mark.parametrize("env,want", [
    ({}, (None, None, None, "none")),
    ({"JDS_COORDINATOR": "h:1", "JDS_NUM_PROCESSES": "4", "JDS_PROCESS_ID": "2"},
     ("h:1", 4, 2, "JDS_* variables")),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1", "MASTER_ADDR": "m",
      "MASTER_PORT": "9"}, ("m:9", 2, 1, "Open MPI")),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "4"}, (None, None, None,
                                                  "Slurm (JAX cluster detection)")),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, (None, None, None, "none")),
])
def test_cluster_detection(monkeypatch, env, want):
    from jds.distributed import _detect

    for k in _CLUSTER_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert _detect() == want


@pytest.mark.parametrize("env,match", [
    ({"JDS_NUM_PROCESSES": "2", "JDS_PROCESS_ID": "0"}, r"\['JDS_COORDINATOR'\] unset"),
    ({"JDS_NUM_PROCESSES": "two"}, "JDS_NUM_PROCESSES='two' must be an integer"),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "0"}, "MASTER_ADDR and MASTER_PORT"),
])
def test_bad_cluster_variables_are_named(monkeypatch, env, match):
    from jds.distributed import init_distributed

    for k in _CLUSTER_VARS:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match=match):
        init_distributed()


def test_init_distributed_is_a_no_op_for_one_process(monkeypatch):
    import jds

    for k in _CLUSTER_VARS:
        monkeypatch.delenv(k, raising=False)
    info = jds.init_distributed()
    assert (info.num_processes, info.process_id, info.source) == (1, 0, "none")


@pytest.mark.parametrize("pid,message", [
    ("0", "processes [1, 2] did not join"),
    ("1", "process 1 of 3 could not reach process 0"),
])
def test_start_up_timeout_names_who_is_missing(pid, message):
    """One process of 3 alone: after JDS_INIT_TIMEOUT it fails naming what it waited for."""
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS",)}
    env.update(PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu", JDS_NUM_PROCESSES="3",
               JDS_PROCESS_ID=pid, JDS_COORDINATOR=f"127.0.0.1:{_free_port()}",
               JDS_INIT_TIMEOUT="2")
    r = subprocess.run([sys.executable, "-c", "import jds; jds.init_distributed()"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert message in r.stderr, r.stderr[-2000:]
