"""Peak host memory of ``jds convert`` against the checkpoint size (one JSON object per result).

Builds a random Hugging Face Llama checkpoint (default ~1.7 GB fp32: hidden 1536, 12 layers,
MLP 4096, vocab 32000), then runs each direction in a fresh process and reads that process's
peak RSS (``ru_maxrss``) minus its RSS after imports. The baseline measured in the same run is
``jds.models.from_pretrained`` of the same directory, which holds the whole model.

    python scripts/bench_convert.py [--hidden 1536 --layers 12 --ffn 4096 --vocab 32000]
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORKER = r"""
import json, resource, sys, time
import jax
from jds.checkpoint.convert import api
import jds.models
def rss_mib():
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS"):
                return int(line.split()[1]) / 1024
before = rss_mib()
what, src, out = sys.argv[1:4]
t = time.perf_counter()
if what == "hf-to-orbax":
    api.hf_to_orbax(src, out)
elif what == "orbax-to-hf":
    api.orbax_to_hf(src, out)
elif what == "orbax-to-safetensors-jds":
    api.orbax_to_safetensors(src, out, names="jds")
elif what == "orbax-to-safetensors-hf":
    api.orbax_to_safetensors(src, out, names="hf")
elif what == "from_pretrained (baseline)":
    model = jds.models.from_pretrained(src)
    jax.block_until_ready(jax.tree.leaves(jds.models.hf.nnx.state(model)))
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"rss_after_imports_mib": before, "peak_rss_mib": peak, "seconds": seconds}))
"""


def make_checkpoint(path: Path, hidden: int, layers: int, ffn: int, vocab: int) -> int:
    import numpy as np

    from jds.checkpoint.convert.hf import hf_config, hf_tensor_plan
    from jds.checkpoint.convert.safetensors_writer import write_safetensors
    from jds.models.llama import LlamaConfig

    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=ffn,
                      num_hidden_layers=layers, num_attention_heads=hidden // 128,
                      num_key_value_heads=max(1, hidden // 512), max_position_embeddings=2048)
    path.mkdir(parents=True)
    rng = np.random.default_rng(0)
    entries = [(t.name, t.shape, np.float32,
                (lambda t=t: rng.standard_normal(t.shape, dtype=np.float32) * 0.02))
               for t in hf_tensor_plan(cfg)]
    size = write_safetensors(path / "model.safetensors", entries, metadata={"format": "pt"})
    (path / "config.json").write_text(json.dumps(hf_config(cfg)))
    return size


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--hidden", type=int, default=1536)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--ffn", type=int, default=4096)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--workdir", help="scratch directory (default: a temp dir, removed)")
    args = p.parse_args()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="jds-bench-convert-"))
    try:
        size = make_checkpoint(work / "hf", args.hidden, args.layers, args.ffn, args.vocab)
        largest = 4 * max(args.vocab * args.hidden, args.layers * args.hidden * args.ffn)
        steps = [
            ("from_pretrained (baseline)", work / "hf", work / "unused"),
            ("hf-to-orbax", work / "hf", work / "orbax"),
            ("orbax-to-hf", work / "orbax", work / "hf2"),
            ("orbax-to-safetensors-jds", work / "orbax", work / "jds.safetensors"),
            ("orbax-to-safetensors-hf", work / "orbax", work / "hf.safetensors"),
        ]
        for what, src, out in steps:
            r = subprocess.run([sys.executable, "-c", WORKER, what, str(src), str(out)],
                               capture_output=True, text=True, check=True)
            m = json.loads(r.stdout.strip().splitlines()[-1])
            grown = m["peak_rss_mib"] - m["rss_after_imports_mib"]
            print(json.dumps({
                "bench": "convert", "date": time.strftime("%Y-%m-%d"),
                "device": f"CPU ({platform.processor() or platform.machine()}), host memory",
                "direction": what,
                "config": {"hidden": args.hidden, "layers": args.layers, "ffn": args.ffn,
                           "vocab": args.vocab},
                "checkpoint_mib": round(size / 2**20, 1),
                "largest_stacked_array_mib": round(largest / 2**20, 1),
                "peak_rss_mib": round(m["peak_rss_mib"], 1),
                "rss_growth_mib": round(grown, 1),
                "growth_over_checkpoint": round(grown * 2**20 / size, 3),
                "seconds": round(m["seconds"], 2),
            }), flush=True)
    finally:
        if not args.workdir:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
