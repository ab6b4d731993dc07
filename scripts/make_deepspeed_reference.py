"""Record real DeepSpeed training runs as the fixture ``tests/fixtures/ds_reference/``.

The fixture is what ``tests/test_deepspeed_equivalence.py`` holds jds to: the same tiny
Hugging Face Llama, the same batches and the same ``ds_config.json``, trained for 12 steps by
DeepSpeed itself (2 ranks on CPU, fp32, AdamW, WarmupLR, gradient clipping 0.9, GA 2), once
per ZeRO stage. The stages' configs differ only in ``zero_optimization.stage``:

=====  ==========================  ===========================
stage  config                      reference
=====  ==========================  ===========================
0      ``ds_config.json``          ``reference.json``
1      ``ds_config_zero1.json``    ``reference_zero1.json``
2      ``ds_config_zero2.json``    ``reference_zero2.json``
3      ``ds_config_zero3.json``    ``reference_zero3.json``
=====  ==========================  ===========================

Two modes:

- ``python scripts/make_deepspeed_reference.py [--stages 0,1,2,3]`` (driver): writes the model
  (safetensors), ``batches.npy`` and each stage's config (all deterministic: rewriting them
  gives the same bytes), then relaunches this file under the DeepSpeed launcher once per stage
  (``DS_ACCELERATOR=cpu deepspeed --num_gpus 2 <this file> --worker --stage N``).
- ``--worker --stage N`` (one per rank): trains and, on rank 0, writes that stage's reference.

What each stage records, and how:

- loss, lr: the same code for every stage (see the ``loss`` / ``lr`` fields of the json).
- grad norm (pre-clip, global over both ranks): for fp32 ZeRO-0 DeepSpeed clips in
  ``engine.clip_fp32_gradients`` and ``engine.get_global_grad_norm()`` stays ``None``, so that
  method is wrapped to keep the norm its ``clip_grad_norm_`` returns. Under ZeRO-1/2/3 the ZeRO
  optimizer computes the norm itself (all-reduced over the data-parallel group, before it
  clips) and ``engine.get_global_grad_norm()`` returns it; that is what is recorded.
- final parameter checksums: under ZeRO-1/2 every rank's module holds the full updated
  parameters (the fp32 partitions are all-gathered back after each step). Under ZeRO-3 each
  rank holds only its partition, so the checksums are taken inside
  ``deepspeed.zero.GatheredParameters`` (a collective on both ranks) and each gathered
  parameter is checked to have its full size.

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
STAGES = (0, 1, 2, 3)


def stage_config(stage: int) -> dict:
    """``DS_CONFIG`` with ``zero_optimization.stage`` set to ``stage`` (nothing else changes)."""
    if stage not in STAGES:
        raise ValueError(f"ZeRO stage must be one of {STAGES}; got {stage}")
    config = json.loads(json.dumps(DS_CONFIG))
    config["zero_optimization"] = {"stage": stage}
    return config


def config_name(stage: int) -> str:
    """File name of stage ``stage``'s DeepSpeed config inside the fixture."""
    return "ds_config.json" if stage == 0 else f"ds_config_zero{stage}.json"


def reference_name(stage: int) -> str:
    """File name of stage ``stage``'s recorded run inside the fixture."""
    return "reference.json" if stage == 0 else f"reference_zero{stage}.json"


def parse_stages(text: str) -> list[int]:
    """``"0,1,2,3"`` -> ``[0, 1, 2, 3]``; an unknown stage is an error naming ``--stages``."""
    try:
        stages = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"--stages takes e.g. 0,1,2,3; got {text!r}") from err
    bad = [stage for stage in stages if stage not in STAGES]
    if bad or not stages:
        raise argparse.ArgumentTypeError(
            f"--stages takes ZeRO stages from {STAGES}, comma-separated; got {text!r}"
        )
    return sorted(set(stages))


def micro_rows(micro: int, rank: int, micro_batch_per_rank: int = 2) -> slice:
    """Rows of the global batch that ``rank`` trains on in micro-batch ``micro``."""
    per_micro = micro_batch_per_rank * WORLD_SIZE
    start = micro * per_micro + rank * micro_batch_per_rank
    return slice(start, start + micro_batch_per_rank)


def build_inputs(out: Path, stages: list[int]) -> None:
    """Write the tiny random Llama, the batches and each stage's DeepSpeed config into ``out``.

    All of it is seeded, so rewriting an existing fixture reproduces the same bytes (stage 0's
    config is always written: it is the one the stage-0 test reads).
    """
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
    for stage in sorted({0, *stages}):
        text = json.dumps(stage_config(stage), indent=2) + "\n"
        (out / config_name(stage)).write_text(text)


def _master_port(stage: int) -> int:
    # One port per stage: back-to-back launches on one port can hit its TIME_WAIT.
    return 29513 + stage


def launch_workers(out: Path, stage: int) -> None:
    """Run this file under the DeepSpeed launcher on 2 CPU ranks for ZeRO stage ``stage``."""
    cmd = [
        "deepspeed",
        "--num_gpus",
        str(WORLD_SIZE),
        "--master_port",
        str(_master_port(stage)),
        str(Path(__file__).resolve()),
        "--worker",
        "--stage",
        str(stage),
        "--out",
        str(out),
    ]
    command = (
        f"DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus {WORLD_SIZE} "
        f"--master_port {_master_port(stage)} scripts/make_deepspeed_reference.py --worker "
        f"--stage {stage} --out tests/fixtures/ds_reference "
        "(launched by: python scripts/make_deepspeed_reference.py)"
    )
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", JDS_REFERENCE_COMMAND=command)
    subprocess.run(cmd, env=env, check=True)


def _checksums(model) -> dict[str, list[float]]:
    return {
        name: [float(p.detach().double().sum()), float((p.detach().double() ** 2).sum())]
        for name, p in model.named_parameters()
    }


def _full_checksums(engine, stage: int) -> dict[str, list[float]]:
    """Checksums of the full parameters; a collective under ZeRO-3 (call on every rank).

    ZeRO-3 leaves each rank only its partition of every parameter (``p.numel()`` is 0 outside
    a gather), so the parameters are gathered first and each is checked to be whole.
    """
    if stage < 3:
        return _checksums(engine.module)
    import deepspeed

    params = list(engine.module.parameters())
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        for name, p in engine.module.named_parameters():
            if p.numel() != p.ds_numel or tuple(p.shape) != tuple(p.ds_shape):
                raise RuntimeError(f"ZeRO-3 gather left {name} partial: {tuple(p.shape)}")
        return _checksums(engine.module)


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


_GRAD_NORM_NOTE = (
    "pre-clip global L2 norm, the value DeepSpeed's clip_grad_norm_ returns "
    "inside engine.step() (engine.get_global_grad_norm() is None for fp32 ZeRO-0)",
    "pre-clip global L2 norm: engine.get_global_grad_norm() after the boundary engine.step(), "
    "which the ZeRO optimizer computes over both ranks' gradient partitions before it clips",
)


def worker(out: Path, stage: int, command: str) -> None:
    """One DeepSpeed rank: train 12 steps under ZeRO ``stage``; record loss, lr, grad norm."""
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
    ds_config = json.loads((out / config_name(stage)).read_text())
    if ds_config != stage_config(stage):
        raise RuntimeError(f"{out / config_name(stage)} is not this script's stage-{stage} config")
    engine, optimizer, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config
    )
    batches = np.load(out / "batches.npy")
    gas = engine.gradient_accumulation_steps()
    optimizer_impl = _optimizer_impl(engine)
    grad_norms = _record_grad_norm(engine)
    if engine.zero_optimization_stage() != stage:
        raise RuntimeError(f"DeepSpeed runs ZeRO {engine.zero_optimization_stage()}, not {stage}")
    if rank == 0:
        print(f"[ds_reference] stage {stage} optimizer: {optimizer_impl}", flush=True)

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
        if stage == 0:
            # fp32 ZeRO-0: DeepSpeed discards the norm; the wrapper kept it.
            if grad_norm is not None or len(grad_norms) != s + 1:
                raise RuntimeError("ZeRO-0 grad norm: expected the clip_fp32_gradients path")
            grad_norm = grad_norms[-1]
        elif grad_norm is None or grad_norms:
            raise RuntimeError(f"ZeRO-{stage}: expected engine.get_global_grad_norm()")
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
            print(f"[ds_reference] stage {stage} step {s}: {steps[-1]}", flush=True)

    final = _full_checksums(engine, stage)  # a collective under ZeRO-3: every rank calls it
    if rank == 0:
        reference = {
            "description": "DeepSpeed reference run: see scripts/make_deepspeed_reference.py",
            "command": command,
            "versions": {
                "deepspeed": deepspeed.__version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
            "world_size": WORLD_SIZE,
            "zero_stage": stage,
            "ds_config_file": config_name(stage),
            "optimizer_impl": optimizer_impl,
            "batch_layout": (
                "batches[s] is the global batch [8, 32] of step s; micro-batch m is rows "
                "[m*4:m*4+4]; rank r trains rows [m*4+r*2 : m*4+r*2+2] of step s"
            ),
            "loss": "global-batch mean of HF LlamaForCausalLM(input_ids, labels=input_ids).loss "
            "over both ranks and both micro-batches",
            "grad_norm": _GRAD_NORM_NOTE[min(stage, 1)],
            "lr": "engine.get_lr()[0] before the optimizer step (the lr that step applied)",
            "steps": steps,
            "final_param_checksums": {
                "format": "name -> [sum, sum of squares] in float64, HF parameter names"
                + (", of the full parameters gathered by GatheredParameters" if stage == 3 else ""),
                "values": final,
            },
            "initial_param_totals": _totals(initial),
            "final_param_totals": _totals(final),
        }
        (out / reference_name(stage)).write_text(json.dumps(reference, indent=1) + "\n")
    torch.distributed.barrier()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help="run as one DeepSpeed rank")
    parser.add_argument("--out", type=Path, default=FIXTURE, help="fixture directory")
    parser.add_argument(
        "--stages",
        type=parse_stages,
        default=list(STAGES),
        help="driver: ZeRO stages to record, comma-separated (default 0,1,2,3)",
    )
    parser.add_argument("--stage", type=int, choices=STAGES, help="worker: the ZeRO stage")
    parser.add_argument("--local_rank", type=int, default=0, help="set by the launcher")
    args = parser.parse_args()
    if args.worker:
        if args.stage is None:
            parser.error("--worker needs --stage")
        worker(args.out, args.stage, os.environ.get("JDS_REFERENCE_COMMAND", ""))
        return
    build_inputs(args.out, args.stages)
    for stage in args.stages:
        launch_workers(args.out, stage)
        print(shlex.join([sys.executable, *sys.argv]), "-> wrote", args.out / reference_name(stage))


if __name__ == "__main__":
    main()
