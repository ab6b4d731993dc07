"""Gradient accumulation in place vs JAX's own backward: step time and compiled memory.

With several micro-batches, jds's stacked decoders add each layer's weight gradients into
the fp32 accumulator inside their backward layer scan (``jds.partitioning.accumulate``);
the baseline is the same engine's step rebuilt with ``StepConfig.accumulate_in_place``
off (JAX's scan transpose stacks each micro-batch's gradients first), measured in the same
run, rounds alternating. One JSON line per variant: median s/step, tokens/s, the compiled
step's temp and peak bytes per device, and the largest loss difference from the baseline.

    python scripts/bench_accumulate.py                         # llama-tiny, 1 device, CPU
    python scripts/bench_accumulate.py --devices 8 --stage 1
    JAX_PLATFORMS=cuda python scripts/bench_accumulate.py --model llama-125m --precision bf16
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

if "--devices" in sys.argv and not os.environ.get("JAX_PLATFORMS", "").startswith(("cuda",
                                                                                     "tpu")):
    n = sys.argv[sys.argv.index("--devices") + 1]
    os.environ.setdefault("XLA_FLAGS", f"--xla_force_host_platform_device_count={n}")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jds  # noqa: E402
from jds.train_step import make_train_step  # noqa: E402


def build(args: argparse.Namespace, in_place: bool) -> jds.TrainEngine:
    cfg = {
        "train_batch_size": args.batch * args.accumulation,
        "gradient_accumulation_steps": args.accumulation,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
        "gradient_clipping": 1.0,
        "bf16": {"enabled": args.precision == "bf16"},
        "zero_optimization": {"stage": args.stage},
    }
    e = jds.initialize(model=jds.models.build(args.model, seed=0), config=cfg)
    if not in_place:  # the same step with JAX's own backward for the layer scan
        step_cfg = dataclasses.replace(e._step_cfg, accumulate_in_place=False)
        e._train_step = e._jit_train_step(
            make_train_step(e._objective, e.loss.weight, e.tx, e.schedule, step_cfg))
    return e


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-tiny")
    ap.add_argument("--devices", type=int, default=1)
    ap.add_argument("--stage", type=int, default=0)
    ap.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    ap.add_argument("--batch", type=int, default=8, help="sequences per micro-batch (global)")
    ap.add_argument("--accumulation", type=int, default=4)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    engines = {v: build(args, v == "in_place") for v in ("in_place", "baseline")}
    vocab = engines["in_place"].vocab_size
    batches = [{"input_ids": rng.integers(0, vocab, (args.batch * args.accumulation, args.seq),
                                          dtype=np.int32)} for _ in range(args.steps + 2)]
    times: dict[str, list[float]] = {v: [] for v in engines}
    losses: dict[str, list[float]] = {v: [] for v in engines}
    memory = {}
    for v, e in engines.items():
        m = e.lower_train_step(args.seq).compile().memory_analysis()
        memory[v] = (m.temp_size_in_bytes, m.argument_size_in_bytes + m.temp_size_in_bytes
                     + m.output_size_in_bytes - m.alias_size_in_bytes)
    for r in range(args.rounds):
        order = list(engines) if r % 2 == 0 else list(engines)[::-1]
        for v in order:
            e = engines[v]
            for i, b in enumerate(batches):
                t = time.perf_counter()
                loss = float(e.train_batch(b)["loss"])
                if i >= 2:  # the first two: compile and warm-up
                    times[v].append(time.perf_counter() - t)
                if r == 0:
                    losses[v].append(loss)
    psi = sum(x.size for x in jax.tree.leaves(engines["baseline"].state.params))
    tokens = args.batch * args.accumulation * args.seq
    base = float(np.median(times["baseline"]))
    for v in engines:
        med = float(np.median(times[v]))
        print(json.dumps({
            "bench": "accumulate", "variant": v, "device": jax.devices()[0].device_kind,
            "devices": jax.device_count(), "model": args.model, "stage": args.stage,
            "precision": args.precision, "accumulation": args.accumulation,
            "tokens_per_step": tokens, "median_s_per_step": round(med, 4),
            "tokens_per_s": round(tokens / med, 1), "s_per_step_vs_baseline": round(med / base, 3),
            "temp_bytes_per_param": round(memory[v][0] / psi, 3),
            "peak_bytes_per_param": round(memory[v][1] / psi, 3),
            "max_loss_diff_vs_baseline": float(np.max(np.abs(
                np.array(losses[v]) - np.array(losses["baseline"])))),
        }), flush=True)


if __name__ == "__main__":
    main()
