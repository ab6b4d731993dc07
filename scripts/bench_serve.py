"""Load test for ``jds serve``: streamed requests with mixed prompt lengths at several
concurrencies, continuous batching against one request at a time, and start-up time.

Prints one JSON object per result: requests/s, output tokens/s, time to first token and
inter-token latency percentiles (p50/p90/p99). Without ``--url`` it starts two in-process
servers for ``--model`` (a preset or Hugging Face folder): continuous batching with
``--max-seqs`` sequences, and the baseline, the same server with ``max_seqs=1`` (one request
at a time), both loaded with the same requests in the same run. With ``--url`` it loads a
server already running (``jds serve MODEL``). ``--startup`` also times ``jds serve MODEL``
from launch to its first answer, with the compilation cache off and then warm.

    python scripts/bench_serve.py --requests 32 --concurrency 1,4,16
    python scripts/bench_serve.py --url http://127.0.0.1:8000 --requests 256 --concurrency 64
    python scripts/bench_serve.py --startup --requests 0
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def one(url: str, prompt: list[int], max_tokens: int) -> tuple[float, list[float], int, float]:
    """(seconds to first token, per-token gaps after it, tokens, seconds in all) of one
    streamed request. Tokens that arrive in one event (multi-step decoding sends up to
    ``decode_steps`` at once) share that event's gap evenly."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first, last, gaps, n = None, None, [], 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            k = len(event["choices"][0]["tokens"])
            if not k:
                continue
            now = time.perf_counter()
            if first is None:
                first = now - t0
                k -= 1
            elif k:
                gaps += [(now - last) / k] * k
            last, n = now, n + len(event["choices"][0]["tokens"])
    return first or 0.0, gaps, n, time.perf_counter() - t0


def load(url: str, work: list, concurrency: int) -> dict:
    one(url, work[0][0][:8], 2)  # a short request first: the server is up and compiled
    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda w: one(url, *w), work))
    wall = time.perf_counter() - t0

    def pct(x):
        return {f"p{q}": round(float(np.percentile(x, q)) * 1e3, 2) for q in (50, 90, 99)}

    tokens = sum(r[2] for r in results)
    itl = [g for r in results for g in r[1]] or [0.0]
    return {"requests": len(work), "concurrency": concurrency, "wall_s": round(wall, 3),
            "requests_per_s": round(len(work) / wall, 3),
            "output_tokens_per_s": round(tokens / wall, 1),
            "ttft_ms": pct([r[0] for r in results]), "itl_ms": pct(itl),
            "latency_ms": pct([r[3] for r in results])}


def start(model: str, dtype: str, max_seqs: int):
    import jds
    from jds.inference.server import CompletionServer, tokenizer_for

    engine = jds.init_inference(model, {"dtype": dtype, "max_seqs": max_seqs,
                                        "max_tokens": 512})
    engine.warmup()  # compile every shape first: the load measures serving, not compiling
    server = CompletionServer(engine, port=0, model_name=model, warm=False,
                              tokenizer=tokenizer_for(model, engine.vocab_size))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.port}"


def startup(model: str, cache: str | None) -> float:
    """Seconds from launching ``jds serve MODEL`` to its first answer."""
    env = dict(os.environ, JDS_COMPILATION_CACHE=cache or "0")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "jds", "serve", model, "--port", "0"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env=env)
    try:
        for line in proc.stdout:
            if "http://" in line:
                url = line.split("http://", 1)[1].split("/v1", 1)[0]
                break
        else:
            raise RuntimeError("jds serve exited before it was ready")
        one("http://" + url, [1, 2, 3, 4], 4)
        return time.perf_counter() - t0
    finally:
        proc.terminate()
        proc.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", help="a running server; default: start them in-process")
    ap.add_argument("--model", default="llama-tiny")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", default="1,4,16", help="comma-separated")
    ap.add_argument("--max-seqs", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=256, help="token ids are drawn below this")
    ap.add_argument("--startup", action="store_true", help="also time jds serve's start")
    a = ap.parse_args()
    import jax

    device = f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind}"
    rng = np.random.default_rng(0)
    work = [(rng.integers(0, a.vocab, int(rng.integers(8, 257))).tolist(),
             int(rng.integers(8, 129))) for _ in range(a.requests)]
    levels = [int(c) for c in a.concurrency.split(",")]
    if a.requests:
        servers = ([(None, a.url, "given")] if a.url else
                   [(*start(a.model, a.dtype, s), f"max_seqs={s}")
                    for s in dict.fromkeys((a.max_seqs, 1))])
        for server, url, setup in servers:
            for c in levels if setup != "max_seqs=1" else levels[-1:]:
                row = load(url, work, c)
                print(json.dumps({"bench": "serve", "device": device, "model": a.model,
                                  "dtype": a.dtype, "server": setup, **row}), flush=True)
            if server is not None:
                server.shutdown()
    if a.startup:
        with tempfile.TemporaryDirectory() as cache:
            cold = startup(a.model, cache)
            warm = startup(a.model, cache)
        print(json.dumps({"bench": "serve_startup", "device": device, "model": a.model,
                          "first_answer_s_cold_cache": round(cold, 2),
                          "first_answer_s_warm_cache": round(warm, 2)}), flush=True)


if __name__ == "__main__":
    main()
