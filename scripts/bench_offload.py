"""ZeRO-Offload's cost and gain: step time with and without ``offload_optimizer`` on the same
model in one run, and the largest llama preset whose compiled step fits one device's memory
with and without it.

Step time: the same model, batch, optimizer and ZeRO stage, once with the master weights and
optimizer state in device memory (the baseline), once in host memory
(``zero_optimization.offload_optimizer.device: "cpu"``) and, with ``--nvme-path``, once in
swap files there (``"nvme"``, with ``pipeline_write``), rounds alternating so noise hits
all; one JSON row per setting (median s/step, tokens/s, per-device bytes in device and in
host memory from the compiled entry layout) and a ratio row per offload. Issue 21's target
on one H100 is ZeRO-2 + offload within 1.3x of the baseline for a model that fits both
ways.

Fit: ``jds.profiling.memory_report.fit_report`` per ZeRO stage with and without offload,
from shapes only (nothing is allocated), against ``--device-memory`` (the compiled step's
device peak: host-memory arguments excluded).

    python scripts/bench_offload.py                                # llama-tiny on this host
    python scripts/bench_offload.py --model llama-125m --batch 8 --seq 2048 --stage 2 \
        --device-memory 80GiB                                      # on one H100
    python scripts/bench_offload.py --no-fit --steps 10
    python scripts/bench_offload.py --no-fit --nvme-path /local_nvme   # + the NVMe tier

On a CPU host both memories are the same RAM, so the step-time ratio there measures only the
extra copies; the GPU figure is the one that matters.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import jax
import numpy as np

import jds
from jds.partitioning.offload import entry_memory


def _config(stage: int, precision: str, batch: int, offload: bool | str,
            nvme_path: str | None = None, buffer_count: int = 6) -> dict:
    zero: dict = {"stage": stage}
    if offload == "nvme":
        zero["offload_optimizer"] = {"device": "nvme", "nvme_path": nvme_path,
                                     "buffer_count": buffer_count, "pipeline_write": True}
    elif offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    return {"train_batch_size": batch,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-4, "weight_decay": 0.01}},
            "gradient_clipping": 1.0, "bf16": {"enabled": precision == "bf16"},
            "zero_optimization": zero}


def _engine(args: argparse.Namespace, offload: bool | str):
    devices = jax.devices()[: args.devices] if args.devices else None
    return jds.initialize(model=lambda: jds.models.build(args.model),
                          config=_config(args.stage, args.precision, args.batch, offload,
                                         args.nvme_path, args.buffer_count),
                          devices=devices)


def step_times(args: argparse.Namespace) -> list[dict]:
    """Rows for the baseline and the offloaded runs, then a ratio row per offload."""
    engines = {"device": _engine(args, False), "offload": _engine(args, True)}
    if args.nvme_path:
        engines["nvme"] = _engine(args, "nvme")
    ids = np.random.default_rng(0).integers(0, engines["device"].vocab_size,
                                            (args.batch, args.seq), dtype=np.int32)
    batch = {"input_ids": ids}
    times: dict[str, list[float]] = {k: [] for k in engines}
    losses: dict[str, list[float]] = {k: [] for k in engines}
    for e in engines.values():  # compile and warm up
        jax.block_until_ready(e.train_batch(batch, sync=False))
    for r in range(args.rounds):
        order = list(engines) if r % 2 == 0 else list(reversed(engines))
        for name in order:
            e = engines[name]
            for _ in range(args.steps):
                t0 = time.perf_counter()
                m = e.train_batch(batch)
                times[name].append(time.perf_counter() - t0)
                losses[name].append(m["loss"])
    rows = []
    device = jax.devices()[0].device_kind
    for name, e in engines.items():
        mem = entry_memory(e.lower_train_step(args.seq).compile().as_text())
        s = statistics.median(times[name])
        rows.append({
            "bench": "offload_step", "device": device, "devices": len(e.mesh.devices.flat),
            "model": args.model, "stage": args.stage, "precision": args.precision,
            "batch": args.batch, "seq": args.seq, "setting": name,
            "s_per_step": round(s, 5), "tokens_per_s": round(args.batch * args.seq / s, 1),
            "device_argument_bytes": mem["argument_device"],
            "host_argument_bytes": mem["argument_host"],
            "last_loss": losses[name][-1]})
    base = rows[0]
    for got in rows[1:]:
        name = got["setting"]
        rows.append({"bench": "offload_step_ratio", "device": device, "model": args.model,
                     "stage": args.stage, "setting": name,
                     "time_vs_device": round(got["s_per_step"] / base["s_per_step"], 3),
                     "device_bytes_vs_device": round(got["device_argument_bytes"]
                                                     / base["device_argument_bytes"], 3),
                     "max_loss_diff": float(np.max(np.abs(np.subtract(losses[name],
                                                                      losses["device"]))))})
    return rows


def fit_rows(args: argparse.Namespace) -> list[dict]:
    from jds.cli import _size
    from jds.profiling import memory_report as mr

    mem = _size(args.device_memory)
    devices = mr.cpu_devices(1) if jax.default_backend() == "cpu" else jax.devices()[:1]
    out = []
    for setting in ("none", "cpu"):
        rep = mr.fit_report(_config(0, args.precision, 1, False), devices, mem, seq_len=args.seq,
                            candidates=args.candidates, offload_optimizer=setting)
        for row in rep["rows"]:
            out.append({"bench": "offload_fit", "device_memory": mem, "offload_optimizer": setting,
                        "stage": row["stage"], "fits": row["fits"], "device_peak": row["peak"],
                        "seq": args.seq, "precision": args.precision})
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="llama-tiny")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--stage", type=int, default=2, choices=(0, 1, 2, 3))
    p.add_argument("--precision", default="bf16", choices=("bf16", "fp32"))
    p.add_argument("--devices", type=int, help="devices the mesh spans (default all)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per round")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--device-memory", default="80GiB", help="for the fit rows")
    p.add_argument("--candidates", nargs="+", help="presets the fit tries (default all llama)")
    p.add_argument("--no-fit", action="store_true", help="step times only")
    p.add_argument("--nvme-path", help="also time the NVMe tier with its swap files here")
    p.add_argument("--buffer-count", type=int, default=6, help="NVMe host buffers")
    args = p.parse_args()
    for row in step_times(args):
        print(json.dumps(row), flush=True)
    if not args.no_fit:
        for row in fit_rows(args):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
