"""Training-step throughput: ``jds.initialize(...).train_batch`` vs a hand-written JAX loop.

The baseline, measured in the same run on the same devices, model, batch and optimizer, is
the shortest correct JAX training step a user would write: ``jax.jit`` of
``value_and_grad`` of the mean causal-LM cross-entropy and ``optax.adamw``, batch sharded
over every device, parameters replicated. The difference is what jds's engine costs (or
saves): loss-scale bookkeeping, DeepSpeed clipping, the micro-batch scan, metrics, and the
layout chosen with ``--zero-stage`` / ``--mesh`` / ``--remat`` (the baseline always runs
plain data parallel without remat).

FLOP convention (MFU): ``6 N + 12 L H S`` per token, with ``N`` the non-embedding
parameters plus the output projection, ``L`` layers, ``H`` hidden size, ``S`` sequence
length (``jds.profiling.flops.train_flops_per_token``); recomputation under remat is not
counted as useful work.

Prints one JSON object per result line::

    python scripts/bench_train.py --model llama-tiny --batch 32 --seq 128 --steps 20
    python scripts/bench_train.py --model llama-1b --batch 8 --seq 2048 --precision bf16 \
        --zero-stage 3 --remat dots --attention cudnn
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


def bench_jds(
    model_name: str, batch: int, seq: int, steps: int, precision: str, layout: dict | None = None
) -> float:
    layout = layout or {}
    attention = layout.get("attention")
    config = {
        "train_batch_size": batch,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.1}},
        "gradient_clipping": 1.0,
        "bf16": {"enabled": precision == "bf16"},
        "zero_optimization": {"stage": layout.get("zero_stage", 0)},
        "mesh": layout.get("mesh", {}),
    }
    if layout.get("remat", "none") != "none":
        config["activation_checkpointing"] = {"policy": layout["remat"]}
    # A factory: the engine builds the weights sharded, never whole on one device.
    engine = jds.initialize(model=lambda: jds.models.build(model_name, attention_impl=attention),
                            config=config)
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
    ap.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=0)
    ap.add_argument("--mesh", default="", help="jds mesh sizes, e.g. 'data=4,tensor=2'")
    ap.add_argument("--remat", choices=["none", "full", "dots", "offload"], default="none")
    ap.add_argument("--attention", default=None,
                    choices=["xla", "cudnn", "pallas", "pallas_tpu"],
                    help="the jds model's attention_impl (default: the dispatcher's, XLA); the "
                    "baseline always uses jax.nn.dot_product_attention's default")
    ap.add_argument("--skip-baseline", action="store_true", help="jds only (e.g. a model "
                    "whose replicated baseline would not fit in memory)")
    a = ap.parse_args()
    mesh = {k: int(v) for k, v in (kv.split("=") for kv in a.mesh.split(",") if kv)}
    layout = {"zero_stage": a.zero_stage, "mesh": mesh, "remat": a.remat,
              "attention": a.attention}
    dev = jax.devices()[0]
    cfg = nnx.eval_shape(lambda: jds.models.build(a.model)).config  # shapes only
    runs = [("jds_engine", lambda: bench_jds(a.model, a.batch, a.seq, a.steps, a.precision,
                                             layout))]
    if not a.skip_baseline:
        runs.insert(0, ("baseline_jax_optax",
                        lambda: bench_baseline(a.model, a.batch, a.seq, a.steps, a.precision)))
    for name, fn in runs:
        s = fn()
        tps = a.batch * a.seq / s
        row = {
            "bench": "train_step", "impl": name, "device": f"{dev.platform}:{dev.device_kind}",
            "n_devices": jax.device_count(), "model": a.model, "batch": a.batch, "seq": a.seq,
            "precision": a.precision, "s_per_step": s, "tokens_per_s": tps,
            "layout": layout if name == "jds_engine" else {"zero_stage": 0, "mesh": {},
                                                           "remat": "none", "attention": None},
            "flops_per_token": train_flops_per_token(cfg, a.seq),
            "mfu": mfu(tps, cfg, a.seq, jax.device_count()),
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
