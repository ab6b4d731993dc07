"""Write the DeepSpeed reference fixtures for jds.optim from REAL DeepSpeed, on CPU.

    DS_ACCELERATOR=cpu python scripts/make_ds_schedule_table.py [--out tests/fixtures]

tests/fixtures/ds_schedules.json: DeepSpeed's scheduler classes
(``deepspeed.runtime.lr_schedules``) on a torch AdamW, stepped as
``DeepSpeedEngine._take_model_step`` does (``optimizer.step()``, then
``lr_scheduler.step()``); each record is the lr (and betas) the k-th ``optimizer.step()``
ran with. Two cases are also run through a real ``deepspeed.initialize`` engine, and the
script asserts the engine saw the same values.

tests/fixtures/ds_optimizers.json: parameters after each of 10 steps on fixed gradients.
- adam/adamw: ``deepspeed.ops.adam.FusedAdam``, the class the engine builds, JIT-built for
  the CPU accelerator (csrc/cpu/adam/fused_adam.cpp over cpu_adam_impl.cpp).
- lion: ``deepspeed.ops.lion.DeepSpeedCPULion`` (the engine's ZeRO-Offload Lion, a real op)
  on gradients without exact zeros. FusedLion's builder is CUDA-only, so the zero-gradient
  case, where the CUDA kernel and the CPU op disagree (c == 0), comes from a line-by-line
  torch transcription of csrc/lion/multi_tensor_lion.cu.
- lamb: FusedLamb's builder is CUDA-only (its CPU builder raises "not implemented"), so
  all lamb cases come from a line-by-line torch transcription of
  csrc/lamb/fused_lamb_cuda_kernel.cu.
The transcriptions are checked here against the real ops where both exist: the Adam
transcription (same style) against FusedAdam, the Lion one against DeepSpeedCPULion.
Each case names its source in the fixture.
"""

from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path
from typing import Any

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import deepspeed  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from deepspeed.runtime import lr_schedules  # noqa: E402

# fmt: off
SCHEDULE_CASES: list[dict[str, Any]] = [
    {"name": "warmup_log", "type": "WarmupLR", "base_lr": 0.01, "steps": 80,
     "params": {"warmup_min_lr": 1e-5, "warmup_max_lr": 1e-3, "warmup_num_steps": 50}},
    {"name": "warmup_linear_max_from_optimizer", "type": "WarmupLR", "base_lr": 0.02,
     "steps": 60, "params": {"warmup_min_lr": 0.001, "warmup_num_steps": 40,
                             "warmup_type": "linear"}},
    {"name": "warmup_one_step", "type": "WarmupLR", "base_lr": 0.01, "steps": 8,
     "params": {"warmup_max_lr": 0.5, "warmup_num_steps": 1}},
    {"name": "warmup_decay_log", "type": "WarmupDecayLR", "base_lr": 0.01, "steps": 110,
     "params": {"total_num_steps": 100, "warmup_min_lr": 0.0, "warmup_max_lr": 0.003,
                "warmup_num_steps": 20}},
    {"name": "warmup_decay_linear_resumed", "type": "WarmupDecayLR", "base_lr": 0.005,
     "steps": 60, "params": {"total_num_steps": 50, "warmup_min_lr": 1e-4,
                             "warmup_max_lr": 2e-3, "warmup_num_steps": 15,
                             "warmup_type": "linear", "last_batch_iteration": 9}},
    {"name": "warmup_cosine_log", "type": "WarmupCosineLR", "base_lr": 0.003, "steps": 120,
     "params": {"total_num_steps": 100, "warmup_num_steps": 10, "warmup_min_ratio": 0.1,
                "cos_min_ratio": 0.01}},
    {"name": "warmup_cosine_linear_defaults", "type": "WarmupCosineLR", "base_lr": 0.1,
     "steps": 100, "params": {"total_num_steps": 80, "warmup_num_steps": 30,
                              "warmup_type": "linear"}},
    {"name": "one_cycle_momentum_decay", "type": "OneCycle", "base_lr": 0.01, "steps": 90,
     "params": {"cycle_min_lr": 1e-4, "cycle_max_lr": 1e-2, "cycle_first_step_size": 20,
                "cycle_second_step_size": 30, "decay_step_size": 5, "decay_lr_rate": 0.1,
                "decay_mom_rate": 0.01, "cycle_min_mom": 0.85, "cycle_max_mom": 0.95}},
    {"name": "one_cycle_stairs_no_momentum", "type": "OneCycle", "base_lr": 0.01, "steps": 60,
     "params": {"cycle_min_lr": 0.001, "cycle_max_lr": 0.005, "cycle_first_step_size": 24,
                "cycle_first_stair_count": 4, "cycle_second_step_size": 16,
                "cycle_second_stair_count": 2, "cycle_momentum": False}},
    {"name": "one_cycle_stairs_decay_resumed", "type": "OneCycle", "base_lr": 0.02,
     "steps": 50, "params": {"cycle_min_lr": 0.002, "cycle_max_lr": 0.02,
                             "cycle_first_step_size": 9, "cycle_first_stair_count": 3,
                             "decay_step_size": 4, "decay_lr_rate": 0.5,
                             "last_batch_iteration": 7}},
    {"name": "lr_range_continuous", "type": "LRRangeTest", "base_lr": 0.01, "steps": 60,
     "params": {"lr_range_test_min_lr": 1e-4, "lr_range_test_step_size": 10,
                "lr_range_test_step_rate": 0.5}},
    {"name": "lr_range_staircase", "type": "LRRangeTest", "base_lr": 0.01, "steps": 60,
     "params": {"lr_range_test_min_lr": 1e-3, "lr_range_test_step_size": 7,
                "lr_range_test_step_rate": 2.0, "lr_range_test_staircase": True}},
]
# fmt: on
ENGINE_CHECKED = ("warmup_cosine_log", "one_cycle_momentum_decay")
OPTIMIZER_BETAS = (0.85, 0.95)  # distinct from OneCycle's (mom, 0.99), so the fixture shows both

TENSORS = {"w": ((4, 3), 0.5), "b": ((5,), 0.0), "k": ((2, 3), 0.001)}
OPT_STEPS = 10

# fmt: off
ONE_CYCLE_LR = {"type": "OneCycle", "base_lr": 0.01, "params": {
    "cycle_min_lr": 0.001, "cycle_max_lr": 0.01, "cycle_first_step_size": 3,
    "cycle_second_step_size": 3, "decay_step_size": 2, "decay_lr_rate": 0.2,
    "cycle_min_mom": 0.8, "cycle_max_mom": 0.9}}
COSINE_LR = {"type": "WarmupCosineLR", "base_lr": 0.02, "params": {
    "total_num_steps": 8, "warmup_num_steps": 3, "warmup_type": "linear"}}

OPTIMIZER_CASES: list[dict[str, Any]] = [
    {"name": "adam_default_is_adamw", "type": "adam", "grads": "dense", "lr": 0.01,
     "params": {"betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.01}},
    {"name": "adam_l2", "type": "adam", "grads": "sparse_start", "lr": 0.003,
     "params": {"adam_w_mode": False, "weight_decay": 0.1, "betas": [0.8, 0.99]}},
    {"name": "adamw_no_bias_correction", "type": "adamw", "grads": "dense", "lr": 0.002,
     "params": {"bias_correction": False, "eps": 1e-6, "weight_decay": 0.05}},
    {"name": "adamw_one_cycle_momentum", "type": "adamw", "grads": "dense",
     "lr": ONE_CYCLE_LR, "params": {"weight_decay": 0.02, "betas": [0.9, 0.999]}},
    {"name": "adam_warmup_cosine", "type": "adam", "grads": "sparse_start", "lr": COSINE_LR,
     "params": {"weight_decay": 0.0}},
    {"name": "lion_cpu_op", "type": "lion", "grads": "dense", "lr": 0.001,
     "params": {"betas": [0.9, 0.99], "weight_decay": 0.1}},
    {"name": "lion_zero_grad_cuda", "type": "lion", "grads": "sparse_start", "lr": 0.002,
     "params": {"betas": [0.95, 0.98], "weight_decay": 0.0}},
    {"name": "lamb_default", "type": "lamb", "grads": "dense", "lr": 0.01, "params": {}},
    {"name": "lamb_clamped_decay", "type": "lamb", "grads": "sparse_start", "lr": 0.005,
     "params": {"weight_decay": 0.01, "max_coeff": 0.3, "min_coeff": 0.05}},
    {"name": "lamb_eps_inside_no_bias", "type": "lamb", "grads": "dense", "lr": 0.002,
     "params": {"eps_inside_sqrt": True, "bias_correction": False, "eps": 1e-6,
                "betas": [0.85, 0.98], "weight_decay": 0.001}},
]
# fmt: on


def _f(x: float) -> float:
    """9 significant digits: enough to round-trip float32, short in JSON."""
    return float(f"{float(x):.9g}")


def _new_scheduler(case: dict[str, Any]) -> tuple[torch.optim.Optimizer, Any]:
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.AdamW([param], lr=case["base_lr"], betas=OPTIMIZER_BETAS)
    return opt, getattr(lr_schedules, case["type"])(opt, **case["params"])


def run_schedule(case: dict[str, Any]) -> dict[str, Any]:
    """lr and betas of each optimizer.step(), stepping as _take_model_step does."""
    opt, sched = _new_scheduler(case)
    param = opt.param_groups[0]["params"][0]
    lrs, betas = [], []
    for _ in range(case["steps"]):
        group = opt.param_groups[0]
        lrs.append(_f(group["lr"]))
        betas.append([_f(b) for b in group["betas"]])
        param.grad = torch.ones_like(param)
        opt.step()
        sched.step()
    return {
        **{k: case[k] for k in ("name", "type", "base_lr", "params")},
        "optimizer_betas": list(OPTIMIZER_BETAS),
        "lr": lrs,
        "betas": betas,
    }


def engine_schedule(case: dict[str, Any]) -> tuple[list[float], list[list[float]]]:
    """The same schedule inside a real DeepSpeedEngine, read before each engine.step()."""
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    config = {
        "train_batch_size": 1,
        "optimizer": {
            "type": "AdamW",
            "params": {"lr": case["base_lr"], "torch_adam": True, "betas": list(OPTIMIZER_BETAS)},
        },
        "scheduler": {"type": case["type"], "params": case["params"]},
    }
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=model.parameters(), config=config
    )
    lrs, betas = [], []
    for _ in range(case["steps"]):
        loss = engine(torch.ones(1, 3)).sum()
        engine.backward(loss)
        group = engine.optimizer.param_groups[0]
        lrs.append(_f(group["lr"]))
        betas.append([_f(b) for b in group["betas"]])
        engine.step()
    return lrs, betas


def make_grads(kind: str, gen: torch.Generator) -> list[dict[str, torch.Tensor]]:
    steps = []
    for step in range(OPT_STEPS):
        grads = {
            name: torch.randn(shape, generator=gen) * (0.1 if name == "b" else 1.0)
            for name, (shape, _) in TENSORS.items()
        }
        if kind == "sparse_start" and step < 2:
            grads["b"] = torch.zeros_like(grads["b"])  # zero grad and zero momentum: c == 0
        steps.append(grads)
    return steps


def lamb_cuda_step(
    p,
    m,
    v,
    g,
    *,
    lr,
    beta1,
    beta2,
    max_coeff,
    min_coeff,
    eps,
    step,
    eps_inside_sqrt,
    bias_correction,
    decay,
) -> None:
    """fused_lamb_cuda + lamb_cuda_kernel_part1..3 of fused_lamb_cuda_kernel.cu (grad_scale=1)."""
    if bias_correction:
        bias_correction1 = np.float32(1 - math.pow(beta1, step))
        bias_correction2 = np.float32(1 - math.pow(beta2, step))
        step_size = np.float32(lr) * np.sqrt(bias_correction2) / bias_correction1
    else:
        step_size = np.float32(lr)
    scaled_grad = g / 1.0
    m.mul_(beta1).add_((1 - beta1) * scaled_grad)
    v.mul_(beta2).add_((1 - beta2) * scaled_grad * scaled_grad)
    denom = torch.sqrt(v + eps) if eps_inside_sqrt else torch.sqrt(v) + eps
    update = m / denom + decay * p
    reg_w = torch.sqrt(torch.sum(p * p)).item()
    reg_u = torch.sqrt(torch.sum(update * update)).item()
    lamb_coeff = 1.0
    if reg_w != 0 and reg_u != 0:
        lamb_coeff = reg_w / reg_u
        if lamb_coeff > max_coeff:
            lamb_coeff = max_coeff
        if lamb_coeff < min_coeff:
            lamb_coeff = min_coeff
    p.sub_(float(step_size) * lamb_coeff * update)


def lion_cuda_step(p, m, g, *, lr, beta1, beta2, decay) -> None:
    """LionFunctor of multi_tensor_lion.cu."""
    after_decay = 1.0 - lr * decay
    c = beta1 * m + (1 - beta1) * g
    update = torch.where(c > 0, torch.full_like(c, -lr), torch.full_like(c, lr))
    p.mul_(after_decay).add_(update)
    m.mul_(beta2).add_((1 - beta2) * g)


def adam_cuda_step(
    p, m, v, g, *, lr, beta1, beta2, eps, step, adam_w_mode, bias_correction, decay
) -> None:
    """AdamFunctor of multi_tensor_adam.cu; only used to check the transcription style."""
    bc1 = 1 - math.pow(beta1, step) if bias_correction else 1.0
    bc2 = 1 - math.pow(beta2, step) if bias_correction else 1.0
    if not adam_w_mode:
        g = g + decay * p
    m.mul_(beta1).add_((1 - beta1) * g)
    v.mul_(beta2).add_((1 - beta2) * g * g)
    update = (m / bc1) / (torch.sqrt(v / bc2) + eps)
    if adam_w_mode:
        update = update + decay * p
    p.sub_(lr * update)


def ds_optimizer(case: dict[str, Any], params: list[torch.nn.Parameter], lr: float):
    """The optimizer DeepSpeedEngine._configure_basic_optimizer builds for this config."""
    kw = {k: (tuple(v) if k == "betas" else v) for k, v in case["params"].items()}
    if case["type"] in ("adam", "adamw"):
        adam_w_mode = case["type"] == "adamw" or kw.pop("adam_w_mode", True)
        return deepspeed.ops.adam.FusedAdam(params, lr=lr, adam_w_mode=adam_w_mode, **kw)
    if case["type"] == "lion":
        return deepspeed.ops.lion.DeepSpeedCPULion(params, lr=lr, **kw)
    raise ValueError(case["type"])


def run_real_optimizer(case, init, grads) -> list[dict[str, list[float]]]:
    params = {n: torch.nn.Parameter(t.clone()) for n, t in init.items()}
    lr_spec = case["lr"]
    base_lr = lr_spec if isinstance(lr_spec, float) else lr_spec["base_lr"]
    opt = ds_optimizer(case, list(params.values()), base_lr)
    sched = None
    if isinstance(lr_spec, dict):
        sched = getattr(lr_schedules, lr_spec["type"])(opt, **lr_spec["params"])
    out = []
    for step_grads in grads:
        for n, p in params.items():
            p.grad = step_grads[n].clone()
        opt.step()
        if sched is not None:
            sched.step()
        out.append({n: [_f(x) for x in p.detach().flatten().tolist()] for n, p in params.items()})
    return out


def run_transcribed(case, init, grads) -> list[dict[str, list[float]]]:
    """Lamb/Lion/Adam CUDA-kernel transcriptions, constant lr, one param group."""
    hp = {
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "weight_decay": 0.0,
        "bias_correction": True,
        "eps_inside_sqrt": False,
        "max_coeff": 10.0,
        "min_coeff": 0.01,
        "adam_w_mode": True,
    }
    hp.update(case["params"])
    b1, b2 = hp["betas"]
    state = {n: (t.clone(), torch.zeros_like(t), torch.zeros_like(t)) for n, t in init.items()}
    out = []
    for step, step_grads in enumerate(grads, start=1):
        for n, (p, m, v) in state.items():
            g = step_grads[n].clone()
            if case["type"] == "lamb":
                lamb_cuda_step(
                    p,
                    m,
                    v,
                    g,
                    lr=case["lr"],
                    beta1=b1,
                    beta2=b2,
                    max_coeff=hp["max_coeff"],
                    min_coeff=hp["min_coeff"],
                    eps=hp["eps"],
                    step=step,
                    eps_inside_sqrt=hp["eps_inside_sqrt"],
                    bias_correction=hp["bias_correction"],
                    decay=hp["weight_decay"],
                )
            elif case["type"] == "lion":
                lion_cuda_step(p, m, g, lr=case["lr"], beta1=b1, beta2=b2, decay=hp["weight_decay"])
            else:
                adam_cuda_step(
                    p,
                    m,
                    v,
                    g,
                    lr=case["lr"],
                    beta1=b1,
                    beta2=b2,
                    eps=hp["eps"],
                    step=step,
                    adam_w_mode=case["type"] == "adamw" or hp["adam_w_mode"],
                    bias_correction=hp["bias_correction"],
                    decay=hp["weight_decay"],
                )
        out.append({n: [_f(x) for x in p.flatten().tolist()] for n, (p, _, _) in state.items()})
    return out


def _assert_close(a, b, what: str) -> None:
    for sa, sb in zip(a, b, strict=True):
        for n in sa:
            np.testing.assert_allclose(sa[n], sb[n], rtol=1e-5, atol=1e-6, err_msg=what)


def make_optimizer_table() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(1234)
    init = {n: torch.randn(shape, generator=gen) * std for n, (shape, std) in TENSORS.items()}
    grads = {kind: make_grads(kind, gen) for kind in ("dense", "sparse_start")}
    cases = []
    for case in OPTIMIZER_CASES:
        g = grads[case["grads"]]
        if case["type"] == "lamb" or case["name"] == "lion_zero_grad_cuda":
            source = (
                "torch transcription of deepspeed/ops/csrc/"
                + (
                    "lamb/fused_lamb_cuda_kernel.cu"
                    if case["type"] == "lamb"
                    else "lion/multi_tensor_lion.cu"
                )
                + " (the DeepSpeed op's builder is CUDA-only)"
            )
            after = run_transcribed(case, init, g)
        else:
            real = (
                "deepspeed.ops.adam.FusedAdam (CPU accelerator op build)"
                if case["type"] != "lion"
                else "deepspeed.ops.lion.DeepSpeedCPULion"
            )
            source = real + (
                " + deepspeed.runtime.lr_schedules." + case["lr"]["type"]
                if isinstance(case["lr"], dict)
                else ""
            )
            after = run_real_optimizer(case, init, g)
            if isinstance(case["lr"], float):  # the transcriptions reproduce the real ops
                _assert_close(after, run_transcribed(case, init, g), case["name"])
        cases.append({**case, "source": source, "params_after": after})
    return {
        "source": (
            "parameters after each step; each case's 'source' names the DeepSpeed op "
            "that produced it, or the CUDA kernel transcribed where DeepSpeed's op "
            "builds only for CUDA (FusedLamb; FusedLion's c == 0 case)"
        ),
        "deepspeed_version": deepspeed.__version__,
        "torch_version": torch.__version__,
        "shapes": {n: list(shape) for n, (shape, _) in TENSORS.items()},
        "init": {n: [_f(x) for x in t.flatten().tolist()] for n, t in init.items()},
        "grads": {
            kind: [
                {n: [_f(x) for x in t.flatten().tolist()] for n, t in step.items()}
                for step in steps
            ]
            for kind, steps in grads.items()
        },
        "cases": cases,
    }


def make_schedule_table() -> dict[str, Any]:
    cases = [run_schedule(case) for case in SCHEDULE_CASES]
    for name in ENGINE_CHECKED:
        case = next(c for c in SCHEDULE_CASES if c["name"] == name)
        rec = next(c for c in cases if c["name"] == name)
        lrs, betas = engine_schedule(case)
        assert lrs == rec["lr"] and betas == rec["betas"], f"engine disagrees on {name}"
    return {
        "source": (
            "deepspeed.runtime.lr_schedules on torch.optim.AdamW, stepped as "
            "DeepSpeedEngine._take_model_step: lr/betas of each optimizer.step(), "
            "then lr_scheduler.step(); cases in engine_checked were also run in a "
            "real deepspeed.initialize engine and matched"
        ),
        "deepspeed_version": deepspeed.__version__,
        "torch_version": torch.__version__,
        "engine_checked": list(ENGINE_CHECKED),
        "cases": cases,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("tests/fixtures"))
    args = parser.parse_args()
    for var, val in (
        ("RANK", "0"),
        ("LOCAL_RANK", "0"),
        ("WORLD_SIZE", "1"),
        ("MASTER_ADDR", "127.0.0.1"),
        ("MASTER_PORT", "29517"),
    ):
        os.environ.setdefault(var, val)
    args.out.mkdir(parents=True, exist_ok=True)
    tables = {
        "ds_optimizers.json": make_optimizer_table(),
        "ds_schedules.json": make_schedule_table(),
    }
    for name, table in tables.items():
        path = args.out / name
        path.write_text(json.dumps(table, separators=(",", ":")) + "\n")
        print(json.dumps({"wrote": str(path), "bytes": path.stat().st_size}))


if __name__ == "__main__":
    main()
