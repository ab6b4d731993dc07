"""Training-step throughput: ``jds.initialize(...).train_batch`` vs a hand-written JAX loop.

The baseline, measured in the same run on the same devices, model, batch and optimizer, is
the shortest correct JAX training step a user would write: ``jax.jit`` of
``value_and_grad`` of the mean causal-LM cross-entropy and ``optax.adamw``, batch sharded
over every device, parameters replicated. The difference is what jds's engine costs (or
saves): loss-scale bookkeeping, DeepSpeed clipping, the micro-batch scan, metrics.

Prints one JSON object per result line::

    python scripts/bench_train.py --model llama-tiny --batch 32 --seq 128 --steps 20
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import jds
from jds.profiling.flops import mfu, train_flops_per_token


def _time(step_fn, n_steps: int) -> float:
    """Seconds per step after one warm-up (compile) step; the last result is awaited."""
    jax.block_until_ready(step_fn())
    t0 = time.perf_counter()
    out = None
    for _ in range(n_steps):
        out = step_fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / n_steps


def bench_jds(model_name: str, batch: int, seq: int, steps: int, precision: str) -> float:
    config = {
        "train_batch_size": batch,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1}},
        "gradient_clipping": 1.0,
        "bf16": {"enabled": precision == "bf16"},
    }
    engine = jds.initialize(model=model_name, config=config)
    vocab = engine.vocab_size
    ids = np.random.default_rng(0).integers(0, vocab, (batch, seq), dtype=np.int32)
    return _time(lambda: engine.train_batch({"input_ids": ids}, sync=False), steps)


def bench_baseline(model_name: str, batch: int, seq: int, steps: int, precision: str) -> float:
    model = jds.models.build(model_name)
    graphdef, params = nnx.split(model)
    dtype = jnp.bfloat16 if precision == "bf16" else jnp.float32
    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    rep, rows = NamedSharding(mesh, PartitionSpec()), NamedSharding(mesh, PartitionSpec("data"))
    params = jax.device_put(params, rep)
    tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3, weight_decay=0.1))
    opt_state = jax.device_put(tx.init(params), rep)

    def loss_fn(p, ids):
        p = jax.tree.map(lambda x: x.astype(dtype), p)
        logits = nnx.merge(graphdef, p)(ids).astype(jnp.float32)
        return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], ids[:, 1:]).mean()

    @jax.jit
    def step(p, o, ids):
        loss, g = jax.value_and_grad(loss_fn)(p, ids)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    vocab = model.config.vocab_size
    ids = jax.device_put(
        np.random.default_rng(0).integers(0, vocab, (batch, seq), dtype=np.int32), rows
    )
    state = [params, opt_state]

    def run():
        state[0], state[1], loss = step(state[0], state[1], ids)
        return loss

    return _time(run, steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-tiny")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    a = ap.parse_args()
    dev = jax.devices()[0]
    cfg = nnx.eval_shape(lambda: jds.models.build(a.model)).config  # shapes only
    for name, fn in (("baseline_jax_optax", bench_baseline), ("jds_engine", bench_jds)):
        s = fn(a.model, a.batch, a.seq, a.steps, a.precision)
        tps = a.batch * a.seq / s
        row = {
            "bench": "train_step", "impl": name, "device": f"{dev.platform}:{dev.device_kind}",
            "n_devices": jax.device_count(), "model": a.model, "batch": a.batch, "seq": a.seq,
            "precision": a.precision, "s_per_step": s, "tokens_per_s": tps,
            "flops_per_token": train_flops_per_token(cfg, a.seq),
            "mfu": mfu(tps, cfg, a.seq, jax.device_count()),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
