"""Record a real DeepSpeed training run as the fixture ``tests/fixtures/ds_reference/``.

The fixture is what ``tests/test_deepspeed_equivalence.py`` holds jds to: the same tiny
Hugging Face Llama, the same batches and the same ``ds_config.json``, trained for 12 steps by
DeepSpeed itself (2 ranks on CPU, ZeRO stage 0, fp32, AdamW, WarmupLR, gradient clipping).

Two modes:

- ``python scripts/make_deepspeed_reference.py`` (driver): writes the model (safetensors),
  ``batches.npy`` and ``ds_config.json``, then relaunches this file under the DeepSpeed
  launcher (``DS_ACCELERATOR=cpu deepspeed --num_gpus 2 <this file> --worker``).
- ``--worker`` (one per rank): trains and, on rank 0, writes ``reference.json``.

Batch layout (the order the jds engine uses): ``batches[s]`` is the global batch of step
``s``, shape ``[train_batch_size=8, seq_len=32]``. Micro-batch ``m`` (of 2) is rows
``[m*4 : m*4+4]``; rank ``r`` (of 2) takes rows ``[m*4 + r*2 : m*4 + r*2 + 2]`` of it.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "ds_reference"
STEPS = 12
SEQ_LEN = 32
WORLD_SIZE = 2
SEED = 0

DS_CONFIG = {
    "train_batch_size": 8,
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 2,
    # 1.0 never clips this model (pre-clip norms are 0.87-0.97); 0.9 clips about half the steps.
    "gradient_clipping": 0.9,
    "steps_per_print": 1000,
    "optimizer": {
        "type": "AdamW",
        "params": {"lr": 1e-3, "weight_decay": 0.01, "betas": [0.9, 0.999], "eps": 1e-8},
    },
    "scheduler": {
        "type": "WarmupLR",
        "params": {
            "warmup_min_lr": 0.0,
            "warmup_max_lr": 1e-3,
            "warmup_num_steps": 5,
            "warmup_type": "linear",
        },
    },
    "fp16": {"enabled": False},
    "bf16": {"enabled": False},
    "zero_optimization": {"stage": 0},
}


def micro_rows(micro: int, rank: int, micro_batch_per_rank: int = 2) -> slice:
    """Rows of the global batch that ``rank`` trains on in micro-batch ``micro``."""
    per_micro = micro_batch_per_rank * WORLD_SIZE
    start = micro * per_micro + rank * micro_batch_per_rank
    return slice(start, start + micro_batch_per_rank)


def build_inputs(out: Path) -> None:
    """Write the tiny random Llama, the batches and the DeepSpeed config into ``out``."""
    import torch
    import transformers

    torch.manual_seed(SEED)
    config = transformers.LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=10000.0,
        tie_word_embeddings=False,
        attn_implementation="eager",
        torch_dtype="float32",
    )
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out / "model", safe_serialization=True)

    rng = np.random.default_rng(0)
    batches = rng.integers(0, 256, size=(STEPS, DS_CONFIG["train_batch_size"], SEQ_LEN))
    np.save(out / "batches.npy", batches.astype(np.int32))
    (out / "ds_config.json").write_text(json.dumps(DS_CONFIG, indent=2) + "\n")


def launch_workers(out: Path) -> list[str]:
    """Run this file under the DeepSpeed launcher on 2 CPU ranks; returns the command."""
    cmd = [
        "deepspeed",
        "--num_gpus",
        str(WORLD_SIZE),
        "--master_port",
        "29513",
        str(Path(__file__).resolve()),
        "--worker",
        "--out",
        str(out),
    ]
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    subprocess.run(cmd, env=env, check=True)
    return cmd


def _checksums(model) -> dict[str, list[float]]:
    return {
        name: [float(p.detach().double().sum()), float((p.detach().double() ** 2).sum())]
        for name, p in model.named_parameters()
    }


def _totals(checksums: dict[str, list[float]]) -> dict[str, float]:
    """Layout-free totals: sum and sum of squares over every parameter element."""
    return {
        "sum": sum(v[0] for v in checksums.values()),
        "sum_sq": sum(v[1] for v in checksums.values()),
    }


def _optimizer_impl(engine) -> str:
    opt = engine.optimizer
    inner = getattr(opt, "optimizer", opt)
    return f"{type(inner).__module__}.{type(inner).__name__}"


def _record_grad_norm(engine) -> list[float]:
    """Capture the pre-clip global grad norm DeepSpeed computes when it clips.

    For fp32 ZeRO-0 DeepSpeed clips in ``engine.clip_fp32_gradients`` with its own
    ``clip_grad_norm_`` and discards the norm (``get_global_grad_norm()`` stays None), so the
    method is wrapped to keep what that same call returns.
    """
    from deepspeed.runtime.utils import clip_grad_norm_

    norms: list[float] = []

    def clip_and_record() -> None:
        norm = clip_grad_norm_(
            parameters=engine.module.parameters(),
            max_norm=engine.gradient_clipping(),
            mpu=engine.mpu,
        )
        norms.append(float(norm))

    engine.clip_fp32_gradients = clip_and_record
    return norms


def worker(out: Path, command: str) -> None:
    """One DeepSpeed rank: train 12 steps and record loss, lr and grad norm per step."""
    import deepspeed
    import torch
    import transformers

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    assert torch.distributed.get_world_size() == WORLD_SIZE

    model = transformers.LlamaForCausalLM.from_pretrained(
        out / "model", attn_implementation="eager", dtype=torch.float32
    )
    model.train()
    initial = _checksums(model)
    ds_config = json.loads((out / "ds_config.json").read_text())
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config
    )
    batches = np.load(out / "batches.npy")
    gas = engine.gradient_accumulation_steps()
    optimizer_impl = _optimizer_impl(engine)
    grad_norms = _record_grad_norm(engine)
    if rank == 0:
        print(f"[ds_reference] optimizer: {optimizer_impl}", flush=True)

    steps = []
    for s in range(STEPS):
        loss_sum = torch.zeros((), dtype=torch.float64)
        lr = None
        for m in range(gas):
            ids = torch.from_numpy(batches[s, micro_rows(m, rank)].astype(np.int64))
            loss = engine(input_ids=ids, labels=ids).loss
            loss_sum += loss.detach().double()
            engine.backward(loss)
            lr = engine.get_lr()[0]  # before the boundary step: the lr this update uses
            engine.step()
        torch.distributed.all_reduce(loss_sum)
        grad_norm = engine.get_global_grad_norm()
        if grad_norm is None:
            grad_norm = grad_norms[-1]
        steps.append(
            {
                "step": s,
                "loss": float(loss_sum) / (gas * WORLD_SIZE),
                "lr": float(lr),
                "grad_norm": float(grad_norm),
                "clipped": bool(float(grad_norm) > ds_config["gradient_clipping"]),
            }
        )
        if rank == 0:
            print(f"[ds_reference] step {s}: {steps[-1]}", flush=True)

    if rank == 0:
        final = _checksums(engine.module)
        reference = {
            "description": "DeepSpeed reference run: see scripts/make_deepspeed_reference.py",
            "command": command,
            "versions": {
                "deepspeed": deepspeed.__version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
            "world_size": WORLD_SIZE,
            "optimizer_impl": optimizer_impl,
            "batch_layout": (
                "batches[s] is the global batch [8, 32] of step s; micro-batch m is rows "
                "[m*4:m*4+4]; rank r trains rows [m*4+r*2 : m*4+r*2+2] of step s"
            ),
            "loss": "global-batch mean of HF LlamaForCausalLM(input_ids, labels=input_ids).loss "
            "over both ranks and both micro-batches",
            "grad_norm": "pre-clip global L2 norm, the value DeepSpeed's clip_grad_norm_ returns "
            "inside engine.step() (engine.get_global_grad_norm() is None for fp32 ZeRO-0)",
            "lr": "engine.get_lr()[0] before the optimizer step (the lr that step applied)",
            "steps": steps,
            "final_param_checksums": {
                "format": "name -> [sum, sum of squares] in float64, HF parameter names",
                "values": final,
            },
            "initial_param_totals": _totals(initial),
            "final_param_totals": _totals(final),
        }
        (out / "reference.json").write_text(json.dumps(reference, indent=1) + "\n")
    torch.distributed.barrier()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help="run as one DeepSpeed rank")
    parser.add_argument("--out", type=Path, default=FIXTURE, help="fixture directory")
    parser.add_argument("--local_rank", type=int, default=0, help="set by the launcher")
    args = parser.parse_args()
    if args.worker:
        worker(args.out, os.environ.get("JDS_REFERENCE_COMMAND", ""))
        return
    build_inputs(args.out)
    command = (
        "DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 --master_port 29513 "
        "scripts/make_deepspeed_reference.py --worker --out tests/fixtures/ds_reference "
        "(launched by: python scripts/make_deepspeed_reference.py)"
    )
    os.environ["JDS_REFERENCE_COMMAND"] = command
    launch_workers(args.out)
    print(shlex.join([sys.executable, *sys.argv]), "-> wrote", args.out / "reference.json")


if __name__ == "__main__":
    main()
