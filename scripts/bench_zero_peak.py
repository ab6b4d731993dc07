"""The compiled train step's per-device peak memory per ZeRO stage, against the ZeRO table.

Issue 19's configuration: an 8-layer Llama (hidden 256, MLP 768, vocab 512: 7.08M
parameters), 8 devices, AdamW, gradient accumulation 4, micro-batch 1 x 16 tokens per
device (so activations are negligible and the peak is the model states plus whatever the
step keeps beside them). Each result is one JSON line: the stage, precision, the table's
bytes/parameter (the baseline: ARCHITECTURE.md's ZeRO table, fp16 gradients for mixed
precision), the compiled peak (argument + temp + output - alias, from XLA's
``memory_analysis()`` of the AOT-compiled step) in bytes/parameter, and their ratio.

    python scripts/bench_zero_peak.py                       # bf16 and fp32, stages 0-3
    python scripts/bench_zero_peak.py --precision bf16 --stages 3 --seq 2048
    python scripts/bench_zero_peak.py --target h100         # XLA:GPU's compile, no GPU

Nothing is materialised (``shapes_only``), so this runs on any host. On CPU, XLA computes
16-bit dots and collectives in fp32, which adds fp32 copies a GPU would not make: the bf16
figures there are an upper bound of a GPU's. ``--target h100`` (or ``h200``) compiles for
8 compile-only GPUs with XLA:GPU instead (``jds.partitioning.targets``; needs
``pip install 'jds[aot-gpu]'``, not a GPU).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

if "jax" not in sys.modules and not os.environ.get("JAX_PLATFORMS", "").startswith(("cuda",
                                                                                     "tpu")):
    os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    if "--target" in sys.argv:  # compile-only GPUs: no CUDA backend to start here
        os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

import jds  # noqa: E402
from jds.models.llama import Llama, LlamaConfig  # noqa: E402
from jds.partitioning.memory import compiled_memory  # noqa: E402
from jds.partitioning.targets import TARGETS, compile_only_devices  # noqa: E402

MODEL = dict(vocab_size=512, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
             num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=4096)


def table(stage: int, precision: str, nd: int) -> float:
    """The ZeRO table's bytes/parameter per device (gradients at the compute dtype)."""
    if precision == "bf16":  # 2 params + 2 grads + 12 master and Adam
        return {0: 16, 1: 4 + 12 / nd, 2: 2 + 14 / nd, 3: 16 / nd}[stage]
    return {0: 16, 1: 8 + 8 / nd, 2: 4 + 12 / nd, 3: 16 / nd}[stage]  # 4 + 4 + 8


def config(stage: int, precision: str, accumulation: int, remat: str = "none") -> dict:
    return {
        "train": {"remat": remat},
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": accumulation,
        "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "weight_decay": 0.01}},
        "bf16": {"enabled": precision == "bf16"},
        "gradient_clipping": 1.0,
        "zero_optimization": {"stage": stage},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--precision", choices=("bf16", "fp32"), action="append")
    ap.add_argument("--stages", type=int, nargs="+", default=[0, 1, 2, 3])
    ap.add_argument("--seq", type=int, default=16, help="tokens per sequence")
    ap.add_argument("--accumulation", type=int, default=4)
    ap.add_argument("--remat", default="none", help="train.remat (none, full, ...)")
    ap.add_argument("--target", choices=sorted(TARGETS), default=None,
                    help="compile for 8 of these GPUs with XLA:GPU (no GPU needed)")
    args = ap.parse_args()
    devices = None if args.target is None else compile_only_devices(args.target, 8)
    nd = jax.device_count() if devices is None else len(devices)
    kind = (jax.devices()[0] if devices is None else devices[0]).device_kind
    if devices is not None:
        kind += " (compile-only)"
    for precision in args.precision or ["bf16", "fp32"]:
        for stage in args.stages:
            engine = jds.TrainEngine(lambda: Llama(LlamaConfig(**MODEL), rngs=nnx.Rngs(0)),
                                     config(stage, precision, args.accumulation, args.remat),
                                     shapes_only=True, devices=devices)
            psi = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(engine.state.params))
            m = compiled_memory(engine, args.seq)
            base = table(stage, precision, nd)
            print(json.dumps({
                "device": f"{kind} x{nd}", "stage": stage,
                "precision": precision, "params": psi, "seq": args.seq,
                "accumulation": args.accumulation, "remat": args.remat,
                "table_bytes_per_param": round(base, 3),
                "peak_bytes_per_param": round(m.peak / psi, 3),
                "ratio": round(m.peak / psi / base, 2),
                "temp_bytes_per_param": round(m.temp / psi, 3),
            }), flush=True)


if __name__ == "__main__":
    main()
