"""Load test for ``jds serve``: N concurrent streamed requests with mixed prompt lengths.

Prints one JSON object: requests per second, generated tokens per second, and latency
percentiles (time to first token, total) over the requests. Without ``--url`` it starts
an in-process server on a free port for ``--model`` first (a preset or Hugging Face
folder); with ``--url`` it loads a server already running (``jds serve MODEL``).

    python scripts/bench_serve.py --requests 32 --concurrency 8
    python scripts/bench_serve.py --url http://127.0.0.1:8000 --requests 256 --concurrency 64
"""

from __future__ import annotations

import argparse
import json
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def one(url: str, prompt: list[int], max_tokens: int) -> tuple[float, float, int]:
    """(seconds to first token, seconds in all, tokens) of one streamed request."""
    body = json.dumps({"prompt": prompt, "max_tokens": max_tokens, "temperature": 0,
                       "stream": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    t0 = time.perf_counter()
    first, n = None, 0
    with urllib.request.urlopen(req, timeout=600) as r:
        for line in r:
            if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            k = len(event["choices"][0]["tokens"])
            if k and first is None:
                first = time.perf_counter() - t0
            n += k
    return first or 0.0, time.perf_counter() - t0, n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", help="a running server; default: start one in-process")
    ap.add_argument("--model", default="llama-tiny")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--max-seqs", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=256, help="token ids are drawn below this")
    a = ap.parse_args()
    server = None
    url = a.url
    if url is None:
        import jds
        from jds.inference.server import CompletionServer

        engine = jds.init_inference(a.model, {"dtype": a.dtype, "max_seqs": a.max_seqs,
                                              "max_tokens": 512})
        engine.warmup()  # as `jds serve` does before it takes requests
        server = CompletionServer(engine, port=0, model_name=a.model)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        url = f"http://127.0.0.1:{server.port}"
    rng = np.random.default_rng(0)
    work = [(rng.integers(0, a.vocab, int(rng.integers(8, 257))).tolist(),
             int(rng.integers(8, 129))) for _ in range(a.requests)]
    one(url, work[0][0][:8], 2)  # warm-up: compile the step's buckets
    t0 = time.perf_counter()
    with ThreadPoolExecutor(a.concurrency) as pool:
        results = list(pool.map(lambda w: one(url, *w), work))
    wall = time.perf_counter() - t0
    ttft = np.array([r[0] for r in results])
    total = np.array([r[1] for r in results])
    tokens = sum(r[2] for r in results)
    pct = lambda x: {f"p{q}": float(np.percentile(x, q)) for q in (50, 90, 99)}  # noqa: E731
    print(json.dumps({"bench": "serve", "url": url, "model": a.model, "requests": a.requests,
                      "concurrency": a.concurrency, "wall_s": wall,
                      "requests_per_s": a.requests / wall, "tokens_per_s": tokens / wall,
                      "ttft_s": pct(ttft), "latency_s": pct(total)}), flush=True)
    if server is not None:
        server.shutdown()


if __name__ == "__main__":
    main()
