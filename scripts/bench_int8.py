"""Int8 matmuls against the bf16 XLA dot, measured in the same run.

For each M (tokens) and K = N (a square layer): the baseline ``x_bf16 @ w_bf16`` (XLA),
the weight-only ``int8_matmul`` (W8A16: int8 weights dequantized in registers, the case
decoding with M = 1..64 cares about) and ``w8a8_matmul`` (int8 x int8 -> int32 with
per-token and per-channel scales, for large M). ``jds.kernels.quant`` dispatches to the
Pallas kernels on GPU/TPU and to XLA on CPU, so on CPU the figures compare XLA programs.
One JSON object per (M, K, implementation): median seconds, TFLOP/s, speedup over bf16.

Targets on one H100 (issue 7): W8A16 at M <= 16 >= 1.8x bf16; W8A8 at M >= 1024 >= 1.5x.

    python scripts/bench_int8.py                                    # CPU: small sizes
    python scripts/bench_int8.py --ms 1,8,16,64,256,4096 --ks 4096,8192   # GPU/TPU
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from jds.kernels.quant import int8_matmul, quantize, quantize_activations, w8a8_matmul
from jds.profiling.timing import median_seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    cpu = jax.default_backend() == "cpu"
    ap.add_argument("--ms", default="1,8,16,64,256" if cpu else "1,8,16,64,256,4096")
    ap.add_argument("--ks", default="1024" if cpu else "4096,8192")
    ap.add_argument("--reps", type=int, default=10 if cpu else 50)
    a = ap.parse_args()
    dev = jax.devices()[0]
    rng = np.random.default_rng(0)
    for K in (int(k) for k in a.ks.split(",")):
        w = jnp.asarray(rng.standard_normal((K, K)) / np.sqrt(K), jnp.bfloat16)
        w_q, w_s = jax.jit(lambda w: quantize(w, axis=0))(w)
        bf16 = jax.jit(lambda x, w: x @ w)
        w8a16 = jax.jit(lambda x, q, s: int8_matmul(x, q, s))
        w8a8 = jax.jit(lambda x, q, s: w8a8_matmul(*quantize_activations(x), q, s,
                                                   out_dtype=jnp.bfloat16))
        for M in (int(m) for m in a.ms.split(",")):
            x = jnp.asarray(rng.standard_normal((M, K)), jnp.bfloat16)
            base = median_seconds(bf16, x, w, reps=a.reps)
            runs = {"bf16_xla": base, "w8a16": median_seconds(w8a16, x, w_q, w_s, reps=a.reps),
                    "w8a8": median_seconds(w8a8, x, w_q, w_s, reps=a.reps)}
            for impl, s in runs.items():
                print(json.dumps({
                    "bench": "int8_matmul", "impl": impl,
                    "device": f"{dev.platform}:{dev.device_kind}", "M": M, "K": K, "N": K,
                    "s": s, "tflops": 2 * M * K * K / s / 1e12, "speedup_vs_bf16": base / s,
                    "baseline": "bf16_xla"}), flush=True)


if __name__ == "__main__":
    main()
