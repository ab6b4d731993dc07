"""The examples run as a user runs them, at a few steps: alone, and as two processes
(``jds launch``) forming one 8-device mesh.

The ResNet's accuracy on real digits is checked in ``test_user_models.py``.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _env(devices: int | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS")}
    if devices is not None:
        env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
        env["JAX_PLATFORMS"] = "cpu"
    return env


def test_cifar_example_runs_under_zero3():
    r = subprocess.run([sys.executable, "examples/cifar_cnn.py", "--steps", "3", "--batch", "16",
                        "--zero", "3"], env=_env(8), cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert re.search(r"eval loss \d+\.\d+\s+eval accuracy 0\.\d+", r.stdout), r.stdout


def test_cifar_example_reads_cifar_python_batches_without_running_code(tmp_path):
    import pickle

    import numpy as np

    sys.path.insert(0, str(REPO / "examples"))
    try:
        import cifar_cnn
    finally:
        sys.path.pop(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        d = {b"data": rng.integers(0, 256, (4, 3072), dtype=np.uint8),
             b"labels": rng.integers(0, 10, 4).tolist(), b"batch_label": b"x",
             b"filenames": [b"a.png"] * 4}
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))
    x_train, y_train, x_test, y_test = cifar_cnn.load_data(str(folder))
    assert x_train.shape == (20, 32, 32, 3) and y_train.shape == (20,)
    assert x_test.shape == (4, 32, 32, 3) and x_test.dtype == np.uint8
    # CIFAR's rows are channel-major (1024 R, 1024 G, 1024 B): pixel (0, 0)'s RGB
    raw = pickle.loads((folder / "test_batch").read_bytes())[b"data"][0]
    assert list(x_test[0, 0, 0]) == [raw[0], raw[1024], raw[2048]]

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        cifar_cnn.load_data(str(folder))


@pytest.mark.slow  # 32 s; tests/test_multihost.py runs a two-process launch by default
def test_cifar_example_under_jds_launch_two_processes():
    cmd = [sys.executable, "-m", "jds.cli", "launch", "--nproc", "2", "--cpu-devices", "4",
           "--", sys.executable, "examples/cifar_cnn.py", "--steps", "2", "--batch", "16",
           "--zero", "2"]
    r = subprocess.run(cmd, env=_env(None), cwd=REPO, capture_output=True, text=True,
                       timeout=300)
    out = r.stdout + r.stderr
    if "gloo" in out.lower() and r.returncode != 0 and "NO_GLOO" in out:
        pytest.skip("gloo CPU collectives unavailable in this jax")
    assert r.returncode == 0, out[-3000:]
    losses = re.findall(r"step\s+1\s+loss (\d+\.\d+)", out)
    assert len(losses) == 2 and losses[0] == losses[1], out[-2000:]  # one SPMD program
    assert len(re.findall(r"eval accuracy", out)) == 1  # printed by process 0 only
