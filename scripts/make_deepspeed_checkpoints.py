"""Record real DeepSpeed ZeRO-1/2/3 checkpoints as the fixture ``tests/fixtures/ds_checkpoints/``.

``tests/test_convert_deepspeed.py`` reads these with ``jds.checkpoint.convert.deepspeed`` and
holds the result to DeepSpeed's own ``zero_to_fp32``. The training is exactly the one
``scripts/make_deepspeed_reference.py`` records (its model, ``batches.npy``, per-stage
``ds_config_zeroN.json`` and micro-batch row split are reused from ``tests/fixtures/ds_reference``,
and its helpers are imported, not copied). After step 6 (six optimizer steps done) every rank
calls ``engine.save_checkpoint(dir, tag="global_step6")``; training then goes on to step 12 and
the losses of all 12 steps must equal the stage's ``reference_zeroN.json`` exactly, so saving is
shown not to have changed training.

Output, per stage ``N`` in 1, 2, 3: ``tests/fixtures/ds_checkpoints/zeroN/`` holding the
checkpoint directory exactly as DeepSpeed wrote it (``latest``, ``global_step6/*.pt``), minus the
``zero_to_fp32.py`` / ``zero_to_torch.py`` scripts DeepSpeed copies into it, plus ``info.json``
(stage, world size, step, command, versions, file list and the losses of steps 7..12).

Two modes, as in ``make_deepspeed_reference.py``:

- ``python scripts/make_deepspeed_checkpoints.py [--stages 1,2,3]`` (driver): relaunches this file
  under ``DS_ACCELERATOR=cpu deepspeed --num_gpus 2`` once per stage and checks the result.
- ``--worker --stage N --save-dir DIR`` (one per rank): trains, saves, checks the losses and, on
  rank 0, writes ``DIR/info.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_deepspeed_reference as ref  # noqa: E402

OUT = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "ds_checkpoints"
ZERO_STAGES = (1, 2, 3)
SAVE_AFTER_STEP = 6  # optimizer steps done when the checkpoint is written
TAG = f"global_step{SAVE_AFTER_STEP}"
# Scripts ``engine.save_checkpoint`` copies next to the checkpoint (DeepSpeed 0.19: both).
RECOVERY_SCRIPTS = ("zero_to_fp32.py", "zero_to_torch.py")


def parse_zero_stages(text: str) -> list[int]:
    """``"1,2,3"`` -> ``[1, 2, 3]``; stage 0 has no ZeRO checkpoint and is refused."""
    stages = ref.parse_stages(text)
    if 0 in stages:
        raise argparse.ArgumentTypeError(f"--stages takes ZeRO stages from {ZERO_STAGES}; got 0")
    return stages


def _master_port(stage: int) -> int:
    # Distinct from make_deepspeed_reference.py's ports, so both can run side by side.
    return 29533 + stage


def _command(stage: int) -> str:
    return (
        f"DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus {ref.WORLD_SIZE} "
        f"--master_port {_master_port(stage)} scripts/make_deepspeed_checkpoints.py --worker "
        f"--stage {stage} --save-dir <tmp> (launched by: python "
        "scripts/make_deepspeed_checkpoints.py; <tmp> is then copied to "
        f"tests/fixtures/ds_checkpoints/zero{stage} without zero_to_fp32.py / zero_to_torch.py)"
    )


def worker(reference_dir: Path, save_dir: Path, stage: int, command: str) -> None:
    """One DeepSpeed rank: the reference training of ``stage``, checkpointed after step 6."""
    import deepspeed
    import torch
    import transformers

    torch.manual_seed(ref.SEED)
    torch.use_deterministic_algorithms(True)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    assert torch.distributed.get_world_size() == ref.WORLD_SIZE

    model = transformers.LlamaForCausalLM.from_pretrained(
        reference_dir / "model", attn_implementation="eager", dtype=torch.float32
    )
    model.train()
    ds_config = json.loads((reference_dir / ref.config_name(stage)).read_text())
    if ds_config != ref.stage_config(stage):
        raise RuntimeError(
            f"{reference_dir / ref.config_name(stage)} is not the stage-{stage} config"
        )
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=ds_config
    )
    if engine.zero_optimization_stage() != stage:
        raise RuntimeError(f"DeepSpeed runs ZeRO {engine.zero_optimization_stage()}, not {stage}")
    batches = np.load(reference_dir / "batches.npy")
    gas = engine.gradient_accumulation_steps()

    losses: list[float] = []
    for s in range(ref.STEPS):
        loss_sum = torch.zeros((), dtype=torch.float64)
        for m in range(gas):
            ids = torch.from_numpy(batches[s, ref.micro_rows(m, rank)].astype(np.int64))
            loss = engine(input_ids=ids, labels=ids).loss
            loss_sum += loss.detach().double()
            engine.backward(loss)
            engine.step()
        torch.distributed.all_reduce(loss_sum)
        losses.append(float(loss_sum) / (gas * ref.WORLD_SIZE))
        if s + 1 == SAVE_AFTER_STEP:
            if engine.global_steps != SAVE_AFTER_STEP:
                raise RuntimeError(f"engine.global_steps={engine.global_steps} at the save")
            engine.save_checkpoint(str(save_dir), tag=TAG)  # a collective: every rank calls it
        if rank == 0:
            print(f"[ds_checkpoints] stage {stage} step {s}: loss {losses[-1]!r}", flush=True)

    reference = json.loads((reference_dir / ref.reference_name(stage)).read_text())
    expected = [step["loss"] for step in reference["steps"]]
    if losses != expected:
        raise RuntimeError(
            f"stage {stage}: losses with a checkpoint save differ from "
            f"{ref.reference_name(stage)}:\n got      {losses}\n expected {expected}"
        )
    if rank == 0:
        files = sorted(str(p.relative_to(save_dir)) for p in save_dir.rglob("*") if p.is_file())
        info = {
            "description": "DeepSpeed checkpoint: see scripts/make_deepspeed_checkpoints.py",
            "command": command,
            "versions": {
                "deepspeed": deepspeed.__version__,
                "torch": torch.__version__,
                "transformers": transformers.__version__,
            },
            "zero_stage": stage,
            "world_size": ref.WORLD_SIZE,
            "tag": TAG,
            "step": SAVE_AFTER_STEP,
            "step_note": f"saved after {SAVE_AFTER_STEP} optimizer steps (steps 0..5 of the "
            "reference); training then continued unchanged",
            "ds_config_file": f"tests/fixtures/ds_reference/{ref.config_name(stage)}",
            "files_as_written": files,
            "files_note": "DeepSpeed's copied converter scripts (zero_to_fp32.py, "
            "zero_to_torch.py) are not kept in the fixture",
            "losses_after_save": {
                "note": f"losses of steps {SAVE_AFTER_STEP + 1}..{ref.STEPS} (1-based), equal to "
                f"{ref.reference_name(stage)} steps[{SAVE_AFTER_STEP}:{ref.STEPS}]",
                "values": losses[SAVE_AFTER_STEP:],
            },
        }
        (save_dir / "info.json").write_text(json.dumps(info, indent=1) + "\n")
    torch.distributed.barrier()


def launch_workers(reference_dir: Path, save_dir: Path, stage: int) -> None:
    """Run this file under the DeepSpeed launcher on 2 CPU ranks for ZeRO stage ``stage``."""
    cmd = [
        "deepspeed",
        "--num_gpus",
        str(ref.WORLD_SIZE),
        "--master_port",
        str(_master_port(stage)),
        str(Path(__file__).resolve()),
        "--worker",
        "--stage",
        str(stage),
        "--reference",
        str(reference_dir),
        "--save-dir",
        str(save_dir),
    ]
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        JDS_CHECKPOINT_COMMAND=_command(stage),
    )
    subprocess.run(cmd, env=env, check=True)


def record(reference_dir: Path, out: Path, stage: int) -> Path:
    """Train, save and check one stage; replace ``out/zero{stage}`` with the checkpoint."""
    with tempfile.TemporaryDirectory(prefix=f"ds_ckpt_zero{stage}_") as tmp:
        save_dir = Path(tmp) / f"zero{stage}"
        save_dir.mkdir()
        launch_workers(reference_dir, save_dir, stage)
        for script in RECOVERY_SCRIPTS:  # DeepSpeed's copies of its converter: not fixture data
            if (save_dir / script).exists():
                (save_dir / script).unlink()
        if (save_dir / "latest").read_text().strip() != TAG:
            raise RuntimeError(f"{save_dir / 'latest'} does not name {TAG}")
        target = out / f"zero{stage}"
        if target.exists():
            shutil.rmtree(target)
        out.mkdir(parents=True, exist_ok=True)
        shutil.copytree(save_dir, target)
    return target


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--worker", action="store_true", help="run as one DeepSpeed rank")
    parser.add_argument(
        "--reference", type=Path, default=ref.FIXTURE, help="make_deepspeed_reference.py fixture"
    )
    parser.add_argument("--out", type=Path, default=OUT, help="driver: fixture directory")
    parser.add_argument(
        "--stages",
        type=parse_zero_stages,
        default=list(ZERO_STAGES),
        help="driver: ZeRO stages to record, comma-separated (default 1,2,3)",
    )
    parser.add_argument("--stage", type=int, choices=ZERO_STAGES, help="worker: the ZeRO stage")
    parser.add_argument("--save-dir", type=Path, help="worker: where save_checkpoint writes")
    parser.add_argument("--local_rank", type=int, default=0, help="set by the launcher")
    args = parser.parse_args()
    if args.worker:
        if args.stage is None or args.save_dir is None:
            parser.error("--worker needs --stage and --save-dir")
        worker(
            args.reference, args.save_dir, args.stage, os.environ.get("JDS_CHECKPOINT_COMMAND", "")
        )
        return
    for stage in args.stages:
        target = record(args.reference, args.out, stage)
        size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
        print(f"-> wrote {target} ({size / 1e6:.2f} MB)", flush=True)


if __name__ == "__main__":
    main()
