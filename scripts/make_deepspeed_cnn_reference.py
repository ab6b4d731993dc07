"""Record real DeepSpeed training of a small CNN as the fixture ``tests/fixtures/ds_cnn_reference``.

The fixture is what a jds test holds jds's training of a user-written CNN to (per-step losses
within 1e-4). The model is the CIFAR-10 CNN of DeepSpeed's first tutorial, in torch::

    conv1 = Conv2d(3, 6, 5); pool = MaxPool2d(2, 2); conv2 = Conv2d(6, 16, 5)
    fc1 = Linear(16*5*5, 120); fc2 = Linear(120, 84); fc3 = Linear(84, 10)
    x = pool(relu(conv1(x))); x = pool(relu(conv2(x))); x = flatten(x, 1)
    x = relu(fc1(x)); x = relu(fc2(x)); return fc3(x)

It is trained for 12 steps by DeepSpeed itself (2 ranks on CPU, fp32, AdamW, WarmupLR, gradient
clipping 0.47, GA 2), once per ZeRO stage. The stages' configs differ only in
``zero_optimization.stage`` (stage 3 uses DeepSpeed's defaults; every parameter of this CNN is
below the default ``stage3_param_persistence_threshold`` of 1e5 elements, so ZeRO-3 keeps the
module's parameters whole on each rank and partitions only the optimizer's fp32 copy and state):

=====  ==========================  ===========================
stage  config                      reference
=====  ==========================  ===========================
0      ``ds_config.json``          ``reference.json``
1      ``ds_config_zero1.json``    ``reference_zero1.json``
2      ``ds_config_zero2.json``    ``reference_zero2.json``
3      ``ds_config_zero3.json``    ``reference_zero3.json``
=====  ==========================  ===========================

Fixture files:

- ``model.safetensors``: the initial weights, ``torch.manual_seed(0); Net()`` in float32, under
  torch's own names and layouts: ``conv1.weight`` [6, 3, 5, 5] (OIHW), ``conv1.bias`` [6],
  ``conv2.weight`` [16, 6, 5, 5], ``conv2.bias`` [16], ``fc1.weight`` [120, 400] ([out, in];
  the 400 inputs are torch's NCHW flatten of [16, 5, 5], i.e. channel-major), ``fc1.bias``,
  ``fc2.weight`` [84, 120], ``fc2.bias``, ``fc3.weight`` [10, 84], ``fc3.bias``.
- ``batches.npz``: ``images`` uint8 [12, 8, 32, 32, 3] (NHWC) and ``labels`` int32 [12, 8] in
  [0, 10), from ``np.random.default_rng(0)``: labels first, then one RGB colour per class
  ([10, 3]), then uniform noise [12, 8, 32, 32, 3]; ``image = (3 * colour[label] + noise) // 4``,
  so the classes are learnable and the loss falls visibly within the 12 steps.
- the four configs and four references above; ``final_params.safetensors``: stage 0's trained
  parameters (same names as ``model.safetensors``).

Normalisation (both sides, float32): ``x = (images.astype(np.float32) / 255.0 - 0.5) / 0.5``;
torch gets ``x`` transposed to NCHW, jds uses it as NHWC.

Batch layout (the order the jds engine uses): ``images[s]``, ``labels[s]`` are the global batch
of step ``s`` (``train_batch_size`` = 8 rows). Micro-batch ``m`` (of 2) is rows ``[m*4 : m*4+4]``;
rank ``r`` (of 2) takes rows ``[m*4 + r*2 : m*4 + r*2 + 2]`` of it. Each rank's micro-batch loss
is ``F.cross_entropy(net(x), y)`` (mean over its 2 rows), trained with the plain DeepSpeed loop
``loss = ...(engine(x)); engine.backward(loss); engine.step()``.

Modes:

- ``python scripts/make_deepspeed_cnn_reference.py [--stages 0,1,2,3]`` (driver): writes the
  model, ``batches.npz`` and each stage's config (all deterministic: rewriting them gives the
  same bytes), relaunches this file under the DeepSpeed launcher once per stage
  (``DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus 2 --master_port P <this file>
  --worker --stage N``), then runs the checks of ``--check``.
- ``--worker --stage N`` (one per rank): trains and, on rank 0, writes that stage's reference.
- ``--check``: checks the recorded fixture: the ZeRO-1/2/3 runs equal the stage-0 run (ZeRO
  changes layout, not math), clipping triggers on some steps but not all, the loss falls, and a
  single-process plain-torch replay (torch.optim.AdamW, lr from the WarmupLR formula,
  DeepSpeed's clip factor) reproduces stage 0's losses to <= 1e-5 — so the semantics written
  here are the ones DeepSpeed ran. It also shows that the replay without clipping, or without
  training, misses the losses by far more than 1e-4.

What each stage records, and how:

- ``loss``: per step, the mean over both micro-batches and both ranks of the rank's micro-batch
  mean loss (the ranks' sums are all-reduced). With equal micro-batches this is the mean
  cross-entropy over the step's 8 rows.
- ``lr``: ``engine.get_lr()[0]`` just before the boundary ``engine.step()``: the lr that update
  applied. DeepSpeed's WarmupLR gives ``warmup_min_lr`` (0) to the first *two* updates, then
  ``1e-3 * (s - 1) / 5`` up to 1e-3: ``[0, 0, 2e-4, 4e-4, 6e-4, 8e-4, 1e-3, ...]``.
- ``grad_norm`` (pre-clip, global over both ranks), as ``make_deepspeed_reference.py`` does: for
  fp32 ZeRO-0 DeepSpeed clips in ``engine.clip_fp32_gradients`` and
  ``engine.get_global_grad_norm()`` stays ``None``, so that method is wrapped to keep the norm
  its ``clip_grad_norm_`` returns. Under ZeRO-1/2/3 the ZeRO optimizer computes the norm itself
  (over the data-parallel group, before it clips) and ``engine.get_global_grad_norm()`` returns
  it. The clip multiplies the gradients by ``min(1, max_norm / (norm + 1e-6))``.
- ``clipped``: ``grad_norm > gradient_clipping``.
- final parameter checksums (``sum`` and sum of squares, float64, per torch name) of the full
  parameters; under ZeRO-3 taken inside ``deepspeed.zero.GatheredParameters`` (a collective on
  both ranks), each gathered parameter checked to be whole.
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
import make_deepspeed_reference as ref  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "ds_cnn_reference"
STEPS = 12
IMAGE_SHAPE = (32, 32, 3)  # H, W, C
NUM_CLASSES = 10
WORLD_SIZE = ref.WORLD_SIZE  # 2; ref.micro_rows splits for this many ranks
SEED = 0
STAGES = ref.STAGES
MAX_FIXTURE_BYTES = 1536 * 1024

DS_CONFIG = {
    "train_batch_size": 8,
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 2,
    # Pre-clip norms are 0.37-0.77; 0.47 clips 6 of the 12 steps, none within 0.018 of it.
    "gradient_clipping": 0.47,
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

# Tolerances of --check.
STAGE_LOSS_ATOL = 1e-5  # ZeRO-N vs ZeRO-0 (float32 reduction order only)
STAGE_GRAD_NORM_RTOL = 1e-5
STAGE_CHECKSUM_ATOL = 1e-5
REPLAY_LOSS_ATOL = 1e-5  # plain-torch replay vs DeepSpeed's stage 0
REPLAY_GRAD_NORM_RTOL = 1e-5
REPLAY_CHECKSUM_ATOL = 1e-4
MIN_LOSS_FALL = 1e-2
TEST_LOSS_ATOL = 1e-4  # what the jds test holds jds to; a wrong replay must miss it


def stage_config(stage: int) -> dict:
    """``DS_CONFIG`` with ``zero_optimization.stage`` set to ``stage`` (nothing else changes)."""
    if stage not in STAGES:
        raise ValueError(f"ZeRO stage must be one of {STAGES}; got {stage}")
    config = json.loads(json.dumps(DS_CONFIG))
    config["zero_optimization"] = {"stage": stage}
    return config


def net_class():
    """The DeepSpeed tutorial's CIFAR-10 CNN (torch is imported only when needed)."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 6, 5)
            self.pool = nn.MaxPool2d(2, 2)
            self.conv2 = nn.Conv2d(6, 16, 5)
            self.fc1 = nn.Linear(16 * 5 * 5, 120)
            self.fc2 = nn.Linear(120, 84)
            self.fc3 = nn.Linear(84, 10)

        def forward(self, x):
            x = self.pool(F.relu(self.conv1(x)))
            x = self.pool(F.relu(self.conv2(x)))
            x = torch.flatten(x, 1)
            x = F.relu(self.fc1(x))
            x = F.relu(self.fc2(x))
            return self.fc3(x)

    return Net


def initial_net():
    """``torch.manual_seed(0); Net()`` in float32: the weights ``model.safetensors`` holds."""
    import torch

    torch.manual_seed(SEED)
    return net_class()().to(torch.float32)


def load_net(out: Path):
    """``Net`` with the fixture's initial weights (checked against a fresh seeded ``Net()``)."""
    import torch
    from safetensors.torch import load_file

    net = net_class()()
    state = load_file(out / "model.safetensors")
    net.load_state_dict(state, strict=True)
    for name, p in initial_net().state_dict().items():
        if not torch.equal(p, state[name]):
            raise RuntimeError(f"{out / 'model.safetensors'}: {name} is not torch.manual_seed(0)")
    return net


def make_batches() -> tuple[np.ndarray, np.ndarray]:
    """``images`` uint8 [12, 8, 32, 32, 3] (NHWC), ``labels`` int32 [12, 8] (see the docstring)."""
    rng = np.random.default_rng(0)
    rows = DS_CONFIG["train_batch_size"]
    labels = rng.integers(0, NUM_CLASSES, size=(STEPS, rows))
    colours = rng.integers(0, 256, size=(NUM_CLASSES, IMAGE_SHAPE[-1]))
    noise = rng.integers(0, 256, size=(STEPS, rows, *IMAGE_SHAPE))
    images = (3 * colours[labels][:, :, None, None, :] + noise) // 4
    return images.astype(np.uint8), labels.astype(np.int32)


def normalise(images: np.ndarray) -> np.ndarray:
    """uint8 NHWC -> float32 NHWC in [-1, 1], exactly as jds does it."""
    return (images.astype(np.float32) / 255.0 - 0.5) / 0.5


def torch_inputs(images: np.ndarray, labels: np.ndarray):
    """The torch side: normalised float32 NCHW images and int64 labels."""
    import torch

    x = np.ascontiguousarray(normalise(images).transpose(0, 3, 1, 2))
    return torch.from_numpy(x), torch.from_numpy(labels.astype(np.int64))


def load_batches(out: Path) -> tuple[np.ndarray, np.ndarray]:
    with np.load(out / "batches.npz") as data:
        return data["images"], data["labels"]


def build_inputs(out: Path, stages: list[int]) -> None:
    """Write the initial CNN, the batches and each stage's DeepSpeed config into ``out``.

    All of it is seeded, so rewriting an existing fixture reproduces the same bytes (stage 0's
    config is always written: the replay check reads it).
    """
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in initial_net().state_dict().items()}
    save_file(state, out / "model.safetensors")
    images, labels = make_batches()
    np.savez(out / "batches.npz", images=images, labels=labels)
    for stage in sorted({0, *stages}):
        text = json.dumps(stage_config(stage), indent=2) + "\n"
        (out / ref.config_name(stage)).write_text(text)


def _master_port(stage: int) -> int:
    # One port per stage, distinct from make_deepspeed_reference.py's (29513+) and
    # make_deepspeed_checkpoints.py's (29533+), so they can run side by side.
    return 29553 + stage


def _command(stage: int, out: Path) -> str:
    try:
        shown = out.resolve().relative_to(Path(__file__).resolve().parents[1])
    except ValueError:
        shown = out
    return (
        f"DS_ACCELERATOR=cpu OMP_NUM_THREADS=1 deepspeed --num_gpus {WORLD_SIZE} "
        f"--master_port {_master_port(stage)} scripts/make_deepspeed_cnn_reference.py --worker "
        f"--stage {stage} --out {shown} "
        "(launched by: python scripts/make_deepspeed_cnn_reference.py)"
    )


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
    env = dict(
        os.environ,
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        JDS_REFERENCE_COMMAND=_command(stage, out),
    )
    subprocess.run(cmd, env=env, check=True)


def worker(out: Path, stage: int, command: str) -> None:
    """One DeepSpeed rank: train 12 steps under ZeRO ``stage``; record loss, lr, grad norm."""
    import deepspeed
    import torch
    import torch.nn.functional as F

    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    assert torch.distributed.get_world_size() == WORLD_SIZE

    net = load_net(out)
    net.train()
    initial = ref._checksums(net)
    ds_config = json.loads((out / ref.config_name(stage)).read_text())
    if ds_config != stage_config(stage):
        raise RuntimeError(
            f"{out / ref.config_name(stage)} is not this script's stage-{stage} config"
        )
    engine, _, _, _ = deepspeed.initialize(
        model=net, model_parameters=net.parameters(), config=ds_config
    )
    images, labels = load_batches(out)
    gas = engine.gradient_accumulation_steps()
    optimizer_impl = ref._optimizer_impl(engine)
    grad_norms = ref._record_grad_norm(engine)
    if engine.zero_optimization_stage() != stage:
        raise RuntimeError(f"DeepSpeed runs ZeRO {engine.zero_optimization_stage()}, not {stage}")
    if rank == 0:
        print(f"[ds_cnn_reference] stage {stage} optimizer: {optimizer_impl}", flush=True)
        if stage == 3:
            persist = {n: bool(getattr(p, "ds_persist", False)) for n, p in net.named_parameters()}
            print(f"[ds_cnn_reference] ZeRO-3 persistent parameters: {persist}", flush=True)

    steps = []
    for s in range(STEPS):
        loss_sum = torch.zeros((), dtype=torch.float64)
        lr = None
        for m in range(gas):
            rows = ref.micro_rows(m, rank)
            x, y = torch_inputs(images[s, rows], labels[s, rows])
            loss = F.cross_entropy(engine(x), y)
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
            print(f"[ds_cnn_reference] stage {stage} step {s}: {steps[-1]}", flush=True)

    final = ref._full_checksums(engine, stage)  # a collective under ZeRO-3: every rank calls it
    if rank == 0:
        if stage == 0:
            from safetensors.torch import save_file

            trained = {
                k: v.detach().clone().contiguous() for k, v in engine.module.state_dict().items()
            }
            save_file(trained, out / "final_params.safetensors")
        reference = {
            "description": "DeepSpeed reference run of the tutorial CIFAR-10 CNN: see "
            "scripts/make_deepspeed_cnn_reference.py",
            "command": command,
            "versions": {"deepspeed": deepspeed.__version__, "torch": torch.__version__},
            "world_size": WORLD_SIZE,
            "zero_stage": stage,
            "ds_config_file": ref.config_name(stage),
            "optimizer_impl": optimizer_impl,
            "batch_layout": (
                "images[s] [8, 32, 32, 3] (NHWC uint8) and labels[s] [8] of batches.npz are the "
                "global batch of step s; micro-batch m is rows [m*4:m*4+4]; rank r trains rows "
                "[m*4+r*2 : m*4+r*2+2] of step s"
            ),
            "normalisation": "x = (images.astype(float32) / 255.0 - 0.5) / 0.5 in float32; "
            "torch gets x transposed to NCHW",
            "loss": "per step: mean over both ranks and both micro-batches of "
            "F.cross_entropy(net(x), y) (each the mean over the rank's 2 rows), i.e. the mean "
            "cross-entropy over the step's 8 rows",
            "grad_norm": ref._GRAD_NORM_NOTE[min(stage, 1)],
            "lr": "engine.get_lr()[0] before the optimizer step (the lr that step applied)",
            "steps": steps,
            "final_param_checksums": {
                "format": "name -> [sum, sum of squares] in float64, torch parameter names"
                + (", of the full parameters gathered by GatheredParameters" if stage == 3 else ""),
                "values": final,
            },
            "initial_param_totals": ref._totals(initial),
            "final_param_totals": ref._totals(final),
        }
        (out / ref.reference_name(stage)).write_text(json.dumps(reference, indent=1) + "\n")
    torch.distributed.barrier()


def warmup_lr(config: dict, step: int) -> float:
    """DeepSpeed WarmupLR (linear) as the engine applies it: the scheduler sets the lr for
    iteration -1 (= warmup_min_lr) at construction and steps after each update, so update s
    uses gamma = (s - 1) / warmup_num_steps, i.e. warmup_min_lr for both of the first two."""
    p = config["scheduler"]["params"]
    gamma = 0.0 if step == 0 else min(1.0, (step - 1) / p["warmup_num_steps"])
    return p["warmup_min_lr"] + (p["warmup_max_lr"] - p["warmup_min_lr"]) * gamma


def replay(out: Path, *, clip: bool = True, train: bool = True):
    """Stage 0 in one process: the global batch of 8 rows in one forward, torch AdamW.

    Returns (per-step losses, per-step pre-clip norms, the trained net). ``clip=False`` skips
    the clipping and ``train=False`` the updates: the wrong replays ``--check`` shows to miss.
    """
    import torch
    import torch.nn.functional as F

    config = json.loads((out / ref.config_name(0)).read_text())
    images, labels = load_batches(out)
    net = load_net(out)
    net.train()
    opt_params = config["optimizer"]["params"]
    opt = torch.optim.AdamW(
        net.parameters(),
        lr=0.0,
        betas=tuple(opt_params["betas"]),
        eps=opt_params["eps"],
        weight_decay=opt_params["weight_decay"],
    )
    losses, norms = [], []
    for s in range(STEPS):
        for group in opt.param_groups:
            group["lr"] = warmup_lr(config, s) if train else 0.0
        opt.zero_grad()
        x, y = torch_inputs(images[s], labels[s])
        loss = F.cross_entropy(net(x), y)
        loss.backward()
        losses.append(float(loss))
        norm = float(torch.sqrt(sum((p.grad.double() ** 2).sum() for p in net.parameters())))
        norms.append(norm)
        if clip:
            # DeepSpeed's clip_grad_norm_: coefficient max_norm / (norm + 1e-6), capped at 1.
            coef = min(1.0, config["gradient_clipping"] / (norm + 1e-6))
            for p in net.parameters():
                p.grad.mul_(coef)
        opt.step()
    return losses, norms, net


def check(out: Path) -> None:
    """Check the recorded fixture (see the module docstring); raise on any failure."""
    import torch
    from safetensors.torch import load_file

    torch.set_num_threads(1)
    size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file())
    print(f"[check] fixture {out}: {size} bytes")
    if size > MAX_FIXTURE_BYTES:
        raise AssertionError(f"fixture is {size} bytes, over {MAX_FIXTURE_BYTES}")
    images, labels = load_batches(out)
    want_images, want_labels = make_batches()
    if not (np.array_equal(images, want_images) and np.array_equal(labels, want_labels)):
        raise AssertionError("batches.npz is not what make_batches() generates")

    refs = {
        stage: json.loads((out / ref.reference_name(stage)).read_text())
        for stage in STAGES
        if (out / ref.reference_name(stage)).exists()
    }
    if 0 not in refs:
        raise AssertionError(f"{out / ref.reference_name(0)} is missing")
    base = refs[0]
    steps0 = base["steps"]
    config = json.loads((out / ref.config_name(0)).read_text())
    max_norm = config["gradient_clipping"]
    assert config == stage_config(0), "ds_config.json is not this script's stage-0 config"
    assert len(steps0) == STEPS and [st["step"] for st in steps0] == list(range(STEPS))

    print("[check] stage 0 per step: loss, lr, pre-clip grad norm, clipped")
    for st in steps0:
        print(
            f"  step {st['step']:2d}: loss {st['loss']:.7f}  lr {st['lr']:.1e}  "
            f"norm {st['grad_norm']:.6f}  {'CLIPPED' if st['clipped'] else ''}"
        )
    clipped = [st["grad_norm"] > max_norm for st in steps0]
    assert clipped == [st["clipped"] for st in steps0]
    if not 0 < sum(clipped) < STEPS:
        raise AssertionError(f"clipping at {max_norm} must trigger on some steps, not all")
    print(f"[check] clipping at {max_norm}: steps {[i for i, c in enumerate(clipped) if c]}")
    losses0 = [st["loss"] for st in steps0]
    fall = float(np.mean(losses0[:3]) - np.mean(losses0[-3:]))
    print(f"[check] loss fall (mean of first 3 - mean of last 3 steps): {fall:.4f}")
    if fall <= MIN_LOSS_FALL:
        raise AssertionError(f"the loss must fall by more than {MIN_LOSS_FALL}; fell {fall}")
    for s, st in enumerate(steps0):
        if abs(st["lr"] - warmup_lr(config, s)) > 1e-12 * max(1.0, abs(st["lr"])):
            raise AssertionError(f"step {s}: lr {st['lr']} != WarmupLR {warmup_lr(config, s)}")

    final0 = base["final_param_checksums"]["values"]
    for stage, reference in sorted(refs.items()):
        if stage == 0:
            continue
        cfg = json.loads((out / ref.config_name(stage)).read_text())
        assert cfg == stage_config(stage), f"stage {stage}: config differs from the script's"
        assert reference["zero_stage"] == stage and reference["world_size"] == WORLD_SIZE
        assert reference["initial_param_totals"] == base["initial_param_totals"], stage
        d_loss = d_norm = d_sum = 0.0
        for a, b in zip(reference["steps"], steps0, strict=True):
            assert a["step"] == b["step"] and a["lr"] == b["lr"], (stage, a, b)
            assert a["clipped"] == b["clipped"], (stage, a, b)
            d_loss = max(d_loss, abs(a["loss"] - b["loss"]))
            d_norm = max(d_norm, abs(a["grad_norm"] - b["grad_norm"]) / b["grad_norm"])
        final = reference["final_param_checksums"]["values"]
        assert final.keys() == final0.keys(), stage
        for name, (total, total_sq) in final.items():
            d_sum = max(d_sum, abs(total - final0[name][0]), abs(total_sq - final0[name][1]))
        print(
            f"[check] ZeRO-{stage} vs stage 0: max |loss diff| {d_loss:.2e}, max grad-norm "
            f"rel diff {d_norm:.2e}, max checksum diff {d_sum:.2e}"
        )
        if d_loss > STAGE_LOSS_ATOL or d_norm > STAGE_GRAD_NORM_RTOL or d_sum > STAGE_CHECKSUM_ATOL:
            raise AssertionError(f"DeepSpeed's ZeRO-{stage} run differs from its stage-0 run")
    missing = [stage for stage in STAGES if stage not in refs]
    if missing:
        print(f"[check] (no reference recorded for stages {missing})")

    losses, norms, net = replay(out)
    d_loss = max(abs(a - st["loss"]) for a, st in zip(losses, steps0, strict=True))
    d_norm = max(
        abs(a - st["grad_norm"]) / st["grad_norm"] for a, st in zip(norms, steps0, strict=True)
    )
    d_sum = 0.0
    for name, p in net.named_parameters():
        w = p.detach().double()
        d_sum = max(
            d_sum,
            abs(float(w.sum()) - final0[name][0]),
            abs(float((w**2).sum()) - final0[name][1]),
        )
    trained = load_file(out / "final_params.safetensors")
    d_param = max(
        float((p.detach() - trained[name]).abs().max()) for name, p in net.named_parameters()
    )
    print(
        f"[check] plain-torch replay vs DeepSpeed stage 0: max |loss diff| {d_loss:.2e}, "
        f"max grad-norm rel diff {d_norm:.2e}, max checksum diff {d_sum:.2e}, "
        f"max |param diff| vs final_params.safetensors {d_param:.2e}"
    )
    if d_loss > REPLAY_LOSS_ATOL or d_norm > REPLAY_GRAD_NORM_RTOL or d_sum > REPLAY_CHECKSUM_ATOL:
        raise AssertionError("the plain-torch replay does not reproduce DeepSpeed's stage 0")
    if d_param > 1e-5:
        raise AssertionError("final_params.safetensors is not the replay's trained parameters")
    for label, kwargs in (("without clipping", {"clip": False}), ("untrained", {"train": False})):
        wrong = replay(out, **kwargs)[0]
        miss = max(abs(a - b) for a, b in zip(wrong, losses0, strict=True))
        print(f"[check] replay {label}: max |loss diff| {miss:.2e} (must exceed {TEST_LOSS_ATOL})")
        if miss <= TEST_LOSS_ATOL:
            raise AssertionError(f"the losses cannot tell a replay {label} from DeepSpeed's")
    print("[check] OK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--worker", action="store_true", help="run as one DeepSpeed rank")
    mode.add_argument("--check", action="store_true", help="only check the recorded fixture")
    parser.add_argument("--out", type=Path, default=FIXTURE, help="fixture directory")
    parser.add_argument(
        "--stages",
        type=ref.parse_stages,
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
    if args.check:
        check(args.out)
        return
    build_inputs(args.out, args.stages)
    for stage in args.stages:
        launch_workers(args.out, stage)
        print(
            shlex.join([sys.executable, *sys.argv]),
            "-> wrote",
            args.out / ref.reference_name(stage),
        )
    check(args.out)


if __name__ == "__main__":
    main()
