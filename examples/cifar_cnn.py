"""DeepSpeed's first tutorial (CIFAR-10), in jds: your model, your loss, a ds_config.

The network is the tutorial's ``Net`` written as a Flax NNX module; the training loop is
``engine.train_batch`` (one optimizer step, gradient accumulation included) where DeepSpeed
has ``engine(x)`` / ``engine.backward(loss)`` / ``engine.step()``. No parameter needs a
sharding annotation: under ZeRO each one is split over the data-parallel devices along its
largest dimension that divides.

    python examples/cifar_cnn.py                            # synthetic CIFAR-shaped data
    python examples/cifar_cnn.py --data cifar-10-batches-py # the real CIFAR-10 (python version)
    python examples/cifar_cnn.py --data cifar10.npz         # arrays x_train/y_train/x_test/y_test
    python examples/cifar_cnn.py --zero 3 --steps 200
    jds launch --nproc 2 -- python examples/cifar_cnn.py    # two processes, one mesh

The CIFAR-10 "python version" batches are pickles; they are read here without unpickling
code (``pickle`` with a restricted unpickler that only builds dicts, lists, bytes, numbers
and numpy arrays), so a tampered file cannot run anything.
"""

from __future__ import annotations

import argparse
import io
import pickle
import time
from pathlib import Path

import jax
import numpy as np
import optax
from flax import nnx

import jds


class Net(nnx.Module):
    """The tutorial CNN: conv 3->6 k5, pool, conv 6->16 k5, pool, fc 400->120->84->10."""

    def __init__(self, rngs: nnx.Rngs) -> None:
        self.conv1 = nnx.Conv(3, 6, (5, 5), padding="VALID", rngs=rngs)
        self.conv2 = nnx.Conv(6, 16, (5, 5), padding="VALID", rngs=rngs)
        self.fc1 = nnx.Linear(16 * 5 * 5, 120, rngs=rngs)
        self.fc2 = nnx.Linear(120, 84, rngs=rngs)
        self.fc3 = nnx.Linear(84, 10, rngs=rngs)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        x = nnx.max_pool(nnx.relu(self.conv1(x_BHWC)), (2, 2), (2, 2))
        x = nnx.max_pool(nnx.relu(self.conv2(x)), (2, 2), (2, 2))
        x = x.reshape(x.shape[0], -1)
        return self.fc3(nnx.relu(self.fc2(nnx.relu(self.fc1(x)))))


def loss_fn(model: Net, batch: dict) -> tuple[jax.Array, dict]:
    """Mean cross-entropy of the micro-batch, and its accuracy."""
    logits = model(batch["image"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, {"accuracy": (logits.argmax(-1) == batch["label"]).mean()}


def normalise(images_u8: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 in [-1, 1] (the tutorial's ``Normalize((0.5,)*3, (0.5,)*3)``)."""
    return (images_u8.astype(np.float32) / 255.0 - 0.5) / 0.5


class _DataOnly(pickle.Unpickler):
    """Builds plain data only: CIFAR's batches hold a dict of bytes, lists and one ndarray."""

    _ALLOWED = {("numpy.core.multiarray", "_reconstruct"),
                ("numpy._core.multiarray", "_reconstruct"), ("numpy", "ndarray"),
                ("numpy", "dtype"), ("_codecs", "encode")}  # bytes in a Python 3 protocol 2

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing {module}.{name}: CIFAR batches hold data only")


def _read_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    d = _DataOnly(io.BytesIO(path.read_bytes()), encoding="bytes").load()
    x = np.asarray(d[b"data"], np.uint8).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return x, np.asarray(d[b"labels"], np.int32)


def load_data(path: str | None, seed: int = 0) -> tuple[np.ndarray, ...]:
    """``(x_train, y_train, x_test, y_test)``: uint8 NHWC images and int32 labels.

    ``path``: the ``cifar-10-batches-py`` folder, an ``.npz`` with those four arrays, or
    None for synthetic CIFAR-shaped data (one colour per class plus noise: learnable).
    """
    if path is None:
        rng = np.random.default_rng(seed)
        colours = rng.integers(0, 256, (10, 3))
        def make(n):
            y = rng.integers(0, 10, n).astype(np.int32)
            noise = rng.integers(0, 256, (n, 32, 32, 3))
            return ((3 * colours[y][:, None, None, :] + noise) // 4).astype(np.uint8), y
        return (*make(5000), *make(1000))
    p = Path(path)
    if p.suffix == ".npz":
        with np.load(p, allow_pickle=False) as z:
            return (z["x_train"], z["y_train"].astype(np.int32), z["x_test"],
                    z["y_test"].astype(np.int32))
    train = [_read_batch(p / f"data_batch_{i}") for i in range(1, 6)]
    x_test, y_test = _read_batch(p / "test_batch")
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]),
            x_test, y_test)


def ds_config(zero: int, batch: int) -> dict:
    """The tutorial's ds_config, ZeRO stage and batch size from the command line."""
    return {
        "train_batch_size": batch,
        "gradient_accumulation_steps": 1,
        "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "betas": [0.8, 0.999],
                                                  "eps": 1e-8, "weight_decay": 3e-7}},
        "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": 0, "warmup_max_lr": 1e-3,
                                                     "warmup_num_steps": 100}},
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": zero},
        "steps_per_print": 2000,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", help="cifar-10-batches-py folder or .npz; default synthetic")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3))
    args = ap.parse_args()

    jds.init_distributed()  # joins the job under `jds launch`; a no-op alone
    x_train, y_train, x_test, y_test = load_data(args.data)
    engine = jds.initialize(model=Net(nnx.Rngs(0)), config=ds_config(args.zero, args.batch),
                            loss_fn=loss_fn)
    rng = np.random.default_rng(0)  # the same order on every process
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = rng.choice(len(x_train), args.batch, replace=False)
        out = engine.train_batch({"image": normalise(x_train[idx]), "label": y_train[idx]})
        if step % 50 == 0 or step == 1:
            print(f"step {step:4d}  loss {out['loss']:.4f}  accuracy {out['accuracy']:.3f}")
    n = len(x_test) // args.batch * args.batch
    ev = engine.eval_batch({"image": normalise(x_test[:n]), "label": y_test[:n]})
    if jax.process_index() == 0:
        print(f"eval loss {ev['loss']:.4f}  eval accuracy {ev['accuracy']:.3f}  "
              f"({args.steps} steps in {time.perf_counter() - t0:.1f} s, ZeRO-{args.zero})")


if __name__ == "__main__":
    main()
