"""Attention TFLOP/s, forward and forward+backward, per implementation, same run.

Implementations: ``xla`` (``jax.nn.dot_product_attention(implementation="xla")``),
``cudnn`` (the same with ``implementation="cudnn"``; GPU only), ``jds_pallas`` (jds's
Pallas flash attention, GPU) and ``jds_splash`` (splash attention behind jds's contract,
TPU). Each JSON line: implementation, sequence length, head_dim, causal, pass, median
seconds and TFLOP/s, with the FlashAttention convention for FLOPs (forward
``4 B N T S H``, halved when causal; forward+backward 3.5x the forward).

Target on one H100 (issue 7): at least cuDNN's TFLOP/s for seq >= 2k, head_dim 128, causal.

    python scripts/bench_attention.py                      # CPU: XLA only, short sequences
    python scripts/bench_attention.py --seqs 1024,2048,4096,8192,16384 --head-dims 64,128
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from jds.kernels.attention import dot_product_attention
from jds.profiling.timing import median_seconds


def implementations(backend: str) -> dict:
    def nn(impl):
        return lambda q, k, v, causal: jax.nn.dot_product_attention(
            q, k, v, is_causal=causal, implementation=impl)

    impls = {"xla": nn("xla")}
    if backend == "gpu":
        impls["cudnn"] = nn("cudnn")
        impls["jds_pallas"] = lambda q, k, v, causal: dot_product_attention(
            q, k, v, causal=causal, implementation="pallas")
    if backend == "tpu":
        impls["jds_splash"] = lambda q, k, v, causal: dot_product_attention(
            q, k, v, causal=causal, implementation="pallas_tpu")
    return impls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    backend = jax.default_backend()
    cpu = backend == "cpu"
    ap.add_argument("--seqs", default="256,512" if cpu else "1024,2048,4096,8192,16384")
    ap.add_argument("--head-dims", default="64" if cpu else "64,128")
    ap.add_argument("--heads", type=int, default=4 if cpu else 16)
    ap.add_argument("--tokens", type=int, default=2048 if cpu else 32768,
                    help="batch x seq per run (batch = tokens // seq, at least 1)")
    ap.add_argument("--reps", type=int, default=5 if cpu else 20)
    a = ap.parse_args()
    dev = jax.devices()[0]
    dtype = jnp.float32 if cpu else jnp.bfloat16
    rng = np.random.default_rng(0)
    for H in (int(h) for h in a.head_dims.split(",")):
        for T in (int(t) for t in a.seqs.split(",")):
            B, N = max(1, a.tokens // T), a.heads
            q, k, v = (jnp.asarray(rng.standard_normal((B, T, N, H)), dtype) for _ in range(3))
            for causal in (True, False):
                fwd_flops = 4 * B * N * T * T * H * (0.5 if causal else 1.0)
                for name, fn in implementations(backend).items():
                    f = jax.jit(lambda q, k, v, fn=fn, causal=causal: fn(q, k, v, causal))
                    g = jax.jit(jax.grad(lambda q, k, v, fn=fn, causal=causal: fn(
                        q, k, v, causal).astype(jnp.float32).sum(), argnums=(0, 1, 2)))
                    for pas, fun, flops in (("fwd", f, fwd_flops),
                                            ("fwd+bwd", g, 3.5 * fwd_flops)):
                        try:
                            s = median_seconds(fun, q, k, v, reps=a.reps)
                        except Exception as e:  # noqa: BLE001 - report and go on
                            print(json.dumps({"bench": "attention", "impl": name, "seq": T,
                                              "head_dim": H, "causal": causal, "pass": pas,
                                              "error": f"{type(e).__name__}: "
                                                       f"{str(e).splitlines()[0][:200]}"}))
                            continue
                        print(json.dumps({
                            "bench": "attention", "impl": name,
                            "device": f"{dev.platform}:{dev.device_kind}", "batch": B,
                            "seq": T, "heads": N, "head_dim": H, "causal": causal,
                            "pass": pas, "dtype": jnp.dtype(dtype).name, "s": s,
                            "tflops": flops / s / 1e12, "baseline": "xla"}), flush=True)


if __name__ == "__main__":
    main()
