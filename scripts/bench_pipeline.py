"""Pipeline step time per schedule (GPipe, 1F1B, interleaved) against the same model and
batch without a pipeline (every device data parallel), measured in the same run.

Each result is one JSON line: the schedule, stages ``p``, micro-batches ``m``, virtual
stages ``v``, seconds per optimizer step (median of ``--steps`` after a compile step), tokens
per second, the bubble fraction of the schedule's table and the compiled step's temporary
bytes per device (XLA's ``memory_analysis``: 1F1B's activation buffer is bounded by ``p``,
GPipe's by ``m``). On CPU the simulated devices share the host's cores, so the figures say
that the schedules run, not how fast a pipeline is; on GPUs/TPUs they are the real cost.

    python scripts/bench_pipeline.py                         # 8 simulated CPU devices
    python scripts/bench_pipeline.py --model llama-125m --stages 4 --micro-batches 16 \\
        --seq 2048 --precision bf16                          # on a GPU/TPU host
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

if "jax" not in sys.modules and not os.environ.get("JAX_PLATFORMS", "").startswith(("cuda",
                                                                                     "tpu")):
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax  # noqa: E402
import numpy as np  # noqa: E402

import jds  # noqa: E402


def bench(model: str, config: dict, rows: int, seq: int, steps: int) -> dict:
    """Compile, then time ``steps`` optimizer steps; return timings and memory."""
    engine = jds.initialize(model, config)
    rng = np.random.default_rng(0)
    batch = {"input_ids": rng.integers(0, engine.vocab_size, (rows, seq))}
    t0 = time.perf_counter()
    engine.train_batch(batch)
    compile_s = time.perf_counter() - t0
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        engine.train_batch(batch)  # sync=True waits for the step
        times.append(time.perf_counter() - t0)
    with engine._tracing():
        mem = engine.lower_train_step(seq).compile().memory_analysis()
    s = statistics.median(times)
    return {"s_per_step": s, "tokens_per_s": rows * seq / s, "compile_s": compile_s,
            "temp_bytes_per_device": None if mem is None else int(mem.temp_size_in_bytes),
            "schedule_table": engine.schedule_table}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-tiny")
    ap.add_argument("--stages", type=int, default=2)
    ap.add_argument("--micro-batches", type=int, default=8)
    ap.add_argument("--virtual-stages", type=int, default=2, help="for the interleaved run")
    ap.add_argument("--micro-batch", type=int, default=2, help="rows per micro-batch and "
                    "data-parallel replica")
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--zero-stage", type=int, choices=[0, 1, 2, 3], default=1)
    a = ap.parse_args()
    n = jax.device_count()
    p, m = a.stages, a.micro_batches
    if n % p:
        raise SystemExit(f"--stages {p} does not divide the {n} devices")
    dev = jax.devices()[0]
    rows = a.micro_batch * m * (n // p)  # the same global batch for every run
    base = {"train_batch_size": rows, "gradient_accumulation_steps": m,
            "bf16": {"enabled": a.precision == "bf16"},
            "zero_optimization": {"stage": a.zero_stage},
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}
    runs = [("no_pipeline", 1, {}, 1)]
    runs += [(s, p, {"schedule": s, "virtual_stages": v}, v)
             for s, v in (("gpipe", 1), ("1f1b", 1), ("interleaved", a.virtual_stages))]
    for name, stages, pipe, v in runs:
        cfg = {**base, "mesh": {"stage": stages}, "pipeline": pipe}
        if stages == 1:  # data parallel over all devices: same rows, fewer micro-batches
            cfg["gradient_accumulation_steps"] = m // p if m % p == 0 else m
        r = bench(a.model, cfg, rows, a.seq, a.steps)
        sched = r.pop("schedule_table")
        row = {
            "bench": "pipeline_step", "impl": name, "device": f"{dev.platform}:{dev.device_kind}",
            "n_devices": n, "model": a.model, "stages": stages, "micro_batches":
            cfg["gradient_accumulation_steps"], "virtual_stages": v, "global_batch": rows,
            "seq": a.seq, "precision": a.precision, "zero_stage": a.zero_stage, **r,
            "bubble_fraction": None if sched is None else sched.bubble_fraction,
            "baseline": "no_pipeline",
        }
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
