"""A small ResNet with BatchNorm on a real dataset (scikit-learn's 8x8 handwritten digits),
trained with jds under any ZeRO stage: model state that is not a parameter in practice.

BatchNorm's running statistics are ``nnx.BatchStat`` variables: they ride in the train
state, are updated by every training forward pass (normalising over the whole global
micro-batch, i.e. synchronised across data-parallel devices), are checkpointed, and are
what ``engine.eval_batch`` normalises with (the model runs in ``.eval()`` mode there).

    python examples/resnet_digits.py                  # ~96% eval accuracy in about 70 s (2 cores)
    python examples/resnet_digits.py --zero 3 --steps 400

The digits (1,797 images, 8 x 8, 10 classes) ship inside scikit-learn (no download); the
last 297 are held out for evaluation.
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
import optax
from flax import nnx

import jds


class Block(nnx.Module):
    """conv-BN-relu-conv-BN plus the input (a 1x1 conv when the width changes)."""

    def __init__(self, c_in: int, c_out: int, rngs: nnx.Rngs) -> None:
        self.conv1 = nnx.Conv(c_in, c_out, (3, 3), use_bias=False, rngs=rngs)
        self.bn1 = nnx.BatchNorm(c_out, momentum=0.9, rngs=rngs)
        self.conv2 = nnx.Conv(c_out, c_out, (3, 3), use_bias=False, rngs=rngs)
        self.bn2 = nnx.BatchNorm(c_out, momentum=0.9, rngs=rngs)
        self.skip = (nnx.Conv(c_in, c_out, (1, 1), use_bias=False, rngs=rngs)
                     if c_in != c_out else None)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = nnx.relu(self.bn1(self.conv1(x)))
        h = self.bn2(self.conv2(h))
        return nnx.relu(h + (x if self.skip is None else self.skip(x)))


class ResNet(nnx.Module):
    """Stem conv, three residual blocks (16, 32, 32 channels), global pool, linear head."""

    def __init__(self, rngs: nnx.Rngs, num_classes: int = 10) -> None:
        self.stem = nnx.Conv(1, 16, (3, 3), use_bias=False, rngs=rngs)
        self.bn = nnx.BatchNorm(16, momentum=0.9, rngs=rngs)
        self.blocks = nnx.List([Block(16, 16, rngs), Block(16, 32, rngs), Block(32, 32, rngs)])
        self.head = nnx.Linear(32, num_classes, rngs=rngs)

    def __call__(self, x_BHWC: jax.Array) -> jax.Array:
        x = nnx.relu(self.bn(self.stem(x_BHWC)))
        for block in self.blocks:
            x = block(x)
        return self.head(x.mean(axis=(1, 2)))


def loss_fn(model: ResNet, batch: dict) -> tuple[jax.Array, dict]:
    """Mean cross-entropy of the micro-batch, and its accuracy."""
    logits = model(batch["image"])
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, {"accuracy": (logits.argmax(-1) == batch["label"]).mean()}


def load_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(x_train, y_train, x_test, y_test)``: float32 [N, 8, 8, 1] in [0, 1], int32 labels."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = (d.images.astype(np.float32) / 16.0)[..., None]
    y = d.target.astype(np.int32)
    return x[:1500], y[:1500], x[1500:], y[1500:]


def ds_config(zero: int, batch: int) -> dict:
    return {
        "train_batch_size": batch,
        "optimizer": {"type": "AdamW", "params": {"lr": 3e-3, "weight_decay": 1e-4}},
        "scheduler": {"type": "WarmupDecayLR", "params": {
            "warmup_min_lr": 0, "warmup_max_lr": 3e-3, "warmup_num_steps": 20,
            "total_num_steps": 300}},
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": zero},
    }


def train(steps: int = 300, batch: int = 64, zero: int = 0, seed: int = 0,
          log_every: int = 50) -> dict:
    """Train and evaluate; returns the last train metrics and the eval metrics."""
    x_train, y_train, x_test, y_test = load_digits()
    cfg = ds_config(zero, batch)
    cfg["scheduler"]["params"]["total_num_steps"] = steps
    engine = jds.initialize(model=ResNet(nnx.Rngs(seed)), config=cfg, loss_fn=loss_fn)
    rng = np.random.default_rng(seed)
    out = {}
    for step in range(1, steps + 1):
        idx = rng.choice(len(x_train), batch, replace=False)
        out = engine.train_batch({"image": x_train[idx], "label": y_train[idx]})
        if log_every and (step % log_every == 0 or step == 1):
            print(f"step {step:4d}  loss {out['loss']:.4f}  accuracy {out['accuracy']:.3f}")
    n = len(x_test) // 8 * 8  # rows that split over up to 8 data-parallel devices
    ev = engine.eval_batch({"image": x_test[:n], "label": y_test[:n]})
    return {"train": out, "eval": ev}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--zero", type=int, default=0, choices=(0, 1, 2, 3))
    args = ap.parse_args()
    t0 = time.perf_counter()
    res = train(args.steps, args.batch, args.zero)
    print(f"eval loss {res['eval']['loss']:.4f}  eval accuracy {res['eval']['accuracy']:.3f}  "
          f"({args.steps} steps in {time.perf_counter() - t0:.1f} s, ZeRO-{args.zero})")


if __name__ == "__main__":
    main()
