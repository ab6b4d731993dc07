"""Decode speed: batch-1 tokens/s in bf16 and int8 against the memory-bandwidth limit, and
continuous batching (SplitFuse) against static batching on a mixed-length workload.

One JSON object per result line:

- ``decode_b1``: one sequence decoding after its prompt; tokens/s over ``--decode-tokens``
  steps, and the bandwidth limit ``copy bandwidth / bytes of the weights`` (every decode
  step reads every weight once), with the copy bandwidth measured in the same run (a
  jitted copy of a 256 MiB array: read + write bytes / time).
- ``prefix``: ``--requests`` requests sharing a 192-token prompt prefix (a system prompt)
  with 8..32-token suffixes and 16 new tokens each, after one request has computed the
  prefix, on an engine with prefix caching and on one without it (the baseline).
- ``workload``: ``--requests`` requests with prompts of 8..256 tokens and 4..128 new
  tokens (seeded), run twice on the same engine: continuously batched (every request
  submitted at once; the scheduler admits them as slots free up and packs decodes with
  prompt chunks) and statically batched (groups of ``max_seqs``; a group starts when the
  previous one has completely finished, as a padded ``generate`` over a fixed batch
  would). Generated tokens per second of each and their ratio.

    python scripts/bench_decode.py                                    # llama-tiny, CPU
    python scripts/bench_decode.py --model path/to/hf_llama_1b --max-seqs 32   # a GPU
    python scripts/bench_decode.py --model llama-1b --attention pallas         # GPU kernel
    python scripts/bench_decode.py --w8a8            # W8A8 vs W8A16 only (int8, same model)

- ``w8a8`` (``--w8a8``, instead of the rows above): the model served in int8 as trained
  with 8-bit symmetric activation quantization of every layer matrix's input (dynamic, per
  token): its layers' int8 input codes times the int8 weights in integers (``w8a8: true``,
  the default) against the same inputs fake-quantized for the weight-only int8 matmul
  (``w8a8: false``, the baseline); batch-1 decode and continuous-batching tokens/s of each.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import jds


def copy_bandwidth(n_bytes: int = 256 << 20) -> float:
    """Bytes per second of a device-side copy (read + write)."""
    x = jnp.ones((n_bytes // 4,), jnp.float32)
    copy = jax.jit(lambda a: a * 1.0)
    jax.block_until_ready(copy(x))
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        jax.block_until_ready(copy(x))
        times.append(time.perf_counter() - t0)
    return 2 * n_bytes / min(times)


def decode_b1(engine, prompt: list[int], n: int) -> float:
    """Tokens per second of one sequence's decode steps (its prefill not timed)."""
    rid = engine.submit(prompt, n + 1)
    engine.step()  # prefill (and the first token)
    t0 = time.perf_counter()
    tokens = 0
    while engine.result(rid).finish_reason is None:
        tokens += len(engine.step())  # decode_steps tokens per call when it can
    dt = time.perf_counter() - t0
    engine.release(rid)
    return tokens / dt


def workload(engine, reqs: list[tuple[list[int], int]], *, static: bool) -> tuple[float, int]:
    """(seconds, generated tokens) for ``reqs`` batched continuously or statically."""
    group = engine.config.max_seqs if static else len(reqs)
    t0, total = time.perf_counter(), 0
    for i in range(0, len(reqs), group):
        rids = [engine.submit(p, n) for p, n in reqs[i:i + group]]
        while any(engine.result(r).finish_reason is None for r in rids):
            engine.step()
        for r in rids:
            total += len(engine.result(r).output)
            engine.release(r)
    return time.perf_counter() - t0, total


def prefix_workload(engine, prefix: list[int], suffixes: list[list[int]], n_new: int
                    ) -> tuple[float, int]:
    """(seconds, generated tokens) for prompts ``prefix + suffix`` once the prefix is cached."""
    engine.generate([prefix + suffixes[0]], n_new)  # computes (and publishes) the prefix
    t0 = time.perf_counter()
    out = engine.generate([prefix + s for s in suffixes], n_new)
    return time.perf_counter() - t0, sum(len(o) for o in out)


def w8a8_rows(a: argparse.Namespace, dev: jax.Device) -> None:
    """The ``w8a8`` rows (see the module docstring)."""
    section = {"activation_quantization": {
        "shared_parameters": {"enabled": True, "schedule_offset": 0},
        "different_groups": {"a": {"params": {"bits": 8}, "modules": ["*"]}}}}
    rng = np.random.default_rng(1)
    out = {}
    for w8a8 in (True, False):
        cfg = {"dtype": "int8", "max_seqs": a.max_seqs, "max_batch_tokens": a.max_batch_tokens,
               "max_tokens": a.max_tokens, "attention": a.attention, "prefix_caching": False,
               "compression_training": section, "w8a8": w8a8}
        engine = jds.init_inference(a.model, cfg, devices=jax.devices()[:1])
        engine.warmup()
        V = engine.vocab_size
        b1 = decode_b1(engine, rng.integers(0, V, a.prompt_len).tolist(), a.decode_tokens)
        reqs = [(rng.integers(0, V, int(rng.integers(8, 129))).tolist(),
                 int(rng.integers(4, 65))) for _ in range(a.requests)]
        secs, n = workload(engine, reqs, static=False)
        out[w8a8] = (b1, n / secs)
    print(json.dumps({"bench": "w8a8", "device": f"{dev.platform}:{dev.device_kind}",
                      "model": a.model, "attention": a.attention,
                      "w8a8_decode_b1_tokens_per_s": out[True][0],
                      "w8a16_decode_b1_tokens_per_s": out[False][0],
                      "w8a8_workload_tokens_per_s": out[True][1],
                      "w8a16_workload_tokens_per_s": out[False][1],
                      "speedup_b1": out[True][0] / out[False][0],
                      "speedup_workload": out[True][1] / out[False][1],
                      "baseline": "w8a8 false: the same inputs fake-quantized, weight-only "
                                  "int8 matmul"}), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="llama-tiny", help="preset or Hugging Face folder")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--requests", type=int, default=48)
    ap.add_argument("--max-seqs", type=int, default=8)
    ap.add_argument("--max-batch-tokens", type=int, default=256)
    ap.add_argument("--max-tokens", type=int, default=512)
    ap.add_argument("--dtypes", default="bfloat16,int8")
    ap.add_argument("--attention", default="reference",
                    choices=["reference", "pallas", "pallas_tpu"],
                    help="paged attention: the XLA reference or the Pallas kernel (GPU / TPU)")
    ap.add_argument("--w8a8", action="store_true",
                    help="instead: W8A8 against W8A16 on an activation-quantized model")
    a = ap.parse_args()
    dev = jax.devices()[0]
    if a.w8a8:
        w8a8_rows(a, dev)
        return
    bw = copy_bandwidth()
    rng = np.random.default_rng(0)
    for dtype in a.dtypes.split(","):
        cfg = {"dtype": dtype, "max_seqs": a.max_seqs, "max_batch_tokens": a.max_batch_tokens,
               "max_tokens": a.max_tokens, "attention": a.attention}
        engine = jds.init_inference(a.model, cfg, devices=jax.devices()[:1])
        engine.warmup()  # every pass shape compiled before anything is timed
        V = engine.vocab_size
        wb = engine.weight_bytes()
        weights = wb["layers"] + wb["other"]
        tps = decode_b1(engine, rng.integers(0, V, a.prompt_len).tolist(), a.decode_tokens)
        base = {"device": f"{dev.platform}:{dev.device_kind}", "model": a.model,
                "dtype": dtype, "attention": a.attention}
        print(json.dumps({"bench": "decode_b1", **base, "tokens_per_s": tps,
                          "weight_bytes": weights, "copy_bytes_per_s": bw,
                          "bandwidth_limit_tokens_per_s": bw / weights,
                          "fraction_of_limit": tps * weights / bw}), flush=True)
        prefix = rng.integers(0, V, 192).tolist()
        suffixes = [rng.integers(0, V, int(rng.integers(8, 33))).tolist()
                    for _ in range(a.requests)]
        # Without prefix caching: the baseline here, and the engine of the batching runs
        # below (which submit the same prompts twice: a cache would serve the second run).
        plain = jds.init_inference(a.model, {**cfg, "prefix_caching": False},
                                   devices=jax.devices()[:1])
        plain.warmup()
        timed = {True: prefix_workload(engine, prefix, suffixes, 16),
                 False: prefix_workload(plain, prefix, suffixes, 16)}
        (on_s, on_n), (off_s, off_n) = timed[True], timed[False]
        print(json.dumps({"bench": "prefix", **base, "requests": a.requests,
                          "prefix_tokens": 192, "cached_tokens_per_s": on_n / on_s,
                          "uncached_tokens_per_s": off_n / off_s,
                          "speedup": (on_n / on_s) / (off_n / off_s),
                          "baseline": "prefix_caching off, same workload"}), flush=True)
        reqs = [(rng.integers(0, V, int(rng.integers(8, 257))).tolist(),
                 int(rng.integers(4, 129))) for _ in range(a.requests)]
        reqs = [(p[: a.max_tokens - n - 1], n) for p, n in reqs]
        cont_s, cont_n = workload(plain, reqs, static=False)
        stat_s, stat_n = workload(plain, reqs, static=True)
        print(json.dumps({"bench": "workload", **base, "requests": a.requests,
                          "max_seqs": a.max_seqs, "max_batch_tokens": a.max_batch_tokens,
                          "continuous_tokens_per_s": cont_n / cont_s,
                          "static_tokens_per_s": stat_n / stat_s,
                          "speedup": (cont_n / cont_s) / (stat_n / stat_s),
                          "baseline": "static batching, same engine"}), flush=True)


if __name__ == "__main__":
    main()
