"""Fine-tuning cost: full fine-tuning vs LoRA vs QLoRA (int8, NF4), and Progressive Layer
Dropping vs none, on the same model, batch and devices in one run.

Fine-tuning rows (``bench: "lora"``): per setting, median s/step and tokens/s over
alternating rounds, and the per-device train-state bytes read from the arrays' shards:
trainable params, master weights, optimizer state, and the frozen base (``state_memory``),
with the frozen base's bytes per parameter. Settings: ``full`` (every parameter trains),
``lora`` (rank ``--rank`` on every linear matrix, base in the compute dtype), ``qlora-int8``
and ``qlora-nf4`` (the base quantized).

PLD rows (``bench: "pld"``): step time without PLD and with ``theta`` chosen so that the
layers' mean keep probability is 0.5 from the first step (``gamma`` large, and the schedule
at its floor), plus the ratio; issue 22's goal is a step approaching 2x fewer layer FLOPs.

    python scripts/bench_lora.py                                 # llama-tiny on this host
    python scripts/bench_lora.py --model llama-125m --batch 4 --seq 128 --devices 1
    python scripts/bench_lora.py --no-pld --settings full lora
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

import jds
from jds.models.adapters import frozen_param_count
from jds.partitioning.memory import state_memory

LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
           "c_attn", "c_proj", "c_fc"]


def _config(args: argparse.Namespace, setting: str, pld_theta: float | None = None) -> dict:
    cfg: dict = {"train_batch_size": args.batch,
                 "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.0}},
                 "gradient_clipping": 1.0, "bf16": {"enabled": args.precision == "bf16"},
                 "zero_optimization": {"stage": args.stage}}
    if setting in ("lora", "qlora-int8", "qlora-nf4"):
        cfg["lora"] = {"enabled": True, "r": args.rank, "alpha": 2 * args.rank,
                       "target_modules": LINEARS if "llama" in args.model else None}
        if setting.startswith("qlora-"):
            cfg["lora"]["quantize_base"] = setting.split("-", 1)[1]
    if pld_theta is not None:
        cfg["progressive_layer_drop"] = {"enabled": True, "theta": pld_theta, "gamma": 100.0}
    return cfg


def _time(engines: dict, batch: dict, args: argparse.Namespace) -> dict[str, list[float]]:
    for e in engines.values():  # compile; two steps so PLD's schedule reaches its floor
        for _ in range(2):
            jax.block_until_ready(e.train_batch(batch, sync=False))
    times: dict[str, list[float]] = {k: [] for k in engines}
    for r in range(args.rounds):
        order = list(engines) if r % 2 == 0 else list(reversed(engines))
        for name in order:
            for _ in range(args.steps):
                t0 = time.perf_counter()
                engines[name].train_batch(batch)
                times[name].append(time.perf_counter() - t0)
    return times


def _engine(args: argparse.Namespace, config: dict):
    devices = jax.devices()[: args.devices] if args.devices else None
    return jds.initialize(model=lambda: jds.models.build(args.model), config=config,
                          devices=devices)


def lora_rows(args: argparse.Namespace) -> list[dict]:
    engines = {s: _engine(args, _config(args, s)) for s in args.settings}
    vocab = next(iter(engines.values())).vocab_size
    batch = {"input_ids": np.random.default_rng(0).integers(0, vocab, (args.batch, args.seq),
                                                            dtype=np.int32)}
    times = _time(engines, batch, args)
    device = jax.devices()[0].device_kind
    rows = []
    for name, e in engines.items():
        st = state_memory(e.state)
        n_frozen = frozen_param_count(e.state.frozen, e.state.model_state)
        frozen_bytes = sum(x.size * x.dtype.itemsize for x in
                           jax.tree.leaves((e.state.frozen, e.state.model_state)))
        s = statistics.median(times[name])
        rows.append({
            "bench": "lora", "device": device, "devices": len(e.mesh.devices.flat),
            "model": args.model, "stage": args.stage, "precision": args.precision,
            "batch": args.batch, "seq": args.seq, "setting": name, "rank": args.rank,
            "s_per_step": round(s, 5), "tokens_per_s": round(args.batch * args.seq / s, 1),
            "trainable_params": int(sum(x.size for x in jax.tree.leaves(e.state.params))),
            "per_device_bytes": {k: st[k] for k in ("params", "master", "optimizer", "frozen",
                                                    "total")},
            "frozen_bytes_per_param": round(frozen_bytes / n_frozen, 3) if n_frozen else None,
        })
    full = next((r for r in rows if r["setting"] == "full"), None)
    if full is not None:
        for r in rows:
            r["speed_vs_full"] = round(full["s_per_step"] / r["s_per_step"], 3)
            r["state_vs_full"] = round(r["per_device_bytes"]["total"]
                                       / full["per_device_bytes"]["total"], 3)
    return rows


def pld_rows(args: argparse.Namespace) -> list[dict]:
    # mean over layers of 1 - (l + 1) / L * (1 - theta) is 0.5 at theta = 1 - L / (L + 1)
    layers = jds.models.get_config(args.model)
    n = getattr(layers, "num_hidden_layers", None) or layers.n_layer
    theta = 1.0 - n / (n + 1)
    engines = {"base": _engine(args, _config(args, "base")),
               "pld": _engine(args, _config(args, "pld", pld_theta=theta))}
    vocab = engines["base"].vocab_size
    batch = {"input_ids": np.random.default_rng(0).integers(0, vocab, (args.batch, args.seq),
                                                            dtype=np.int32)}
    times = _time(engines, batch, args)
    device = jax.devices()[0].device_kind
    med = {k: statistics.median(v) for k, v in times.items()}
    return [{"bench": "pld", "device": device, "model": args.model, "stage": args.stage,
             "batch": args.batch, "seq": args.seq, "layers": n, "theta": round(theta, 4),
             "mean_keep_probability": 0.5, "s_per_step_base": round(med["base"], 5),
             "s_per_step_pld": round(med["pld"], 5),
             "speedup": round(med["base"] / med["pld"], 3)}]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--stage", type=int, default=0, choices=(0, 1, 2, 3))
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--devices", type=int, help="devices the mesh spans (default all)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--settings", nargs="+", default=["full", "lora", "qlora-int8", "qlora-nf4"],
                   choices=("full", "lora", "qlora-int8", "qlora-nf4"))
    p.add_argument("--no-pld", action="store_true", help="fine-tuning rows only")
    args = p.parse_args()
    for row in lora_rows(args):
        print(json.dumps(row), flush=True)
    if not args.no_pld:
        for row in pld_rows(args):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
