"""Write tests/fixtures/ds_compression.json from DeepSpeed's own compression code.

    python scripts/make_compression_fixtures.py [--deepspeed-src DIR] [--out tests/fixtures]

DeepSpeed 0.19 (the test extra's version) no longer ships its compression library
(``deepspeed/compression``) or MoQ's ``deepspeed/runtime/quantize.py``; 0.16.0 does. The
script takes them from a DeepSpeed 0.16.0 source tree (``--deepspeed-src``, or downloads the
sdist with ``pip download deepspeed==0.16.0 --no-binary :all:``), loads them as they are
(the compression package under the name ``deepspeed.compression_old``, so its relative
imports reach the installed DeepSpeed's ``runtime`` and ``utils``), and records:

* ``quantizers``: ``SymQuantizer``, ``AsymQuantizer``, ``TernaryQuantizer``,
  ``BinaryQuantizer`` (``compression/utils.py``) and MoQ's ``Quantizer.quantize_highbit``
  with nearest rounding, on fixed fp32 tensors, per bit width and group count; the static
  (min, max) activation form; ``TopKBinarizer`` masks.
* ``training``: a two-layer MLP trained with MoQ (AdamW on an fp32 master, the weights
  quantized after each step as above): its initial weights, data and losses.
* ``pruning``: small models (an MLP, a CNN) pruned with sparse / row / head / channel
  pruning (``l1`` and ``topk``, with and without ``related_modules``) as DeepSpeed 0.16's
  engine runs it: masks and scores after ``init_compression``, the losses of 12 AdamW
  steps, and the model after ``redundancy_clean``.
* ``activation``: the same runs with activation quantization (dynamic and static ranges,
  alone and beside pruning / weight quantization in the forward pass).
* ``ds_gpt2_compression/``: a 2-layer Hugging Face GPT-2 (its initial weights) compressed
  with the shape of DeepSpeedExamples' GPT-2 config (weights and activations at 8 bits, MLP
  rows pruned and removed), its losses and the cleaned model's logits (``ds_run.json``);
  the same with static activation ranges (``ds_run_static.json``, with DeepSpeed's final
  ranges).
* ``schedules``: MoQ driven as DeepSpeed 0.16.0's engine drives it. ``init_compression``
  sets each weight's ``start_bits`` / ``target_bits`` / ``q_period``; the engine's first
  ``forward`` calls ``compression_scheduler.step(step_zero_check=True)`` and, once weight
  quantization is enabled, ``Quantizer.quantize``; every ``_take_model_step`` runs the
  optimizer, then ``quantize`` (if enabled), then ``compression_scheduler.step()``. The
  optimizer writes the fp32 master back into the 16-bit weights before ``quantize`` (here:
  the master is held fixed and copied back), so each record is the weight the forward pass
  of global step ``t`` sees, with its bit width and ``quantize_real_ratio``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import numpy as np

STEPS = 24
SCHEDULES = [  # (name, shared parameters, start_bits, target_bits, quantization_period)
    ("sym_8_to_4", dict(schedule_offset=0, quantize_groups=1), 8, 4, 3),
    ("asym_12_to_8_offset", dict(schedule_offset=4, quantize_groups=4,
                                 quantization_type="asymmetric"), 12, 8, 2),
    ("fixed_8", dict(schedule_offset=2, quantize_groups=2), 8, 8, 5),
    ("mixed_6_to_3", dict(schedule_offset=0, quantize_groups=2,
                          fp16_mixed_quantize={"enabled": True, "quantize_change_ratio": 0.1}),
     6, 3, 2),
    ("ternary", dict(schedule_offset=1, quantize_groups=1), 4, 2, 2),
    ("binary", dict(schedule_offset=0, quantize_groups=8), 3, 1, 1),
    ("period_0_mixed", dict(schedule_offset=0, quantize_groups=2,  # DeepSpeedExamples' period
                            fp16_mixed_quantize={"enabled": True, "quantize_change_ratio": 0.3}),
     8, 4, 0),
]


def _source(src: str | None) -> Path:
    if src:
        return Path(src)
    tmp = Path(tempfile.mkdtemp())
    subprocess.run([sys.executable, "-m", "pip", "download", "deepspeed==0.16.0", "--no-deps",
                    "--no-binary", ":all:", "-d", str(tmp), "-q"], check=True)
    with tarfile.open(next(tmp.glob("deepspeed-0.16.0.tar.gz"))) as tar:
        members = [m for m in tar.getmembers() if m.name.startswith(
            ("deepspeed-0.16.0/deepspeed/compression/",
             "deepspeed-0.16.0/deepspeed/runtime/quantize.py"))]
        tar.extractall(tmp, members=members, filter="data")
    return tmp / "deepspeed-0.16.0"


def _load(root: Path):
    import deepspeed.ops.quantizer as ops_quantizer

    if not hasattr(ops_quantizer, "ds_quantizer"):  # 0.16's quantize.py imports it (unused)
        ops_quantizer.ds_quantizer = None
    comp = root / "deepspeed" / "compression"
    spec = importlib.util.spec_from_file_location(
        "deepspeed.compression_old", comp / "__init__.py", submodule_search_locations=[str(comp)])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules["deepspeed.compression_old"] = pkg
    spec.loader.exec_module(pkg)
    spec = importlib.util.spec_from_file_location("ds_runtime_quantize",
                                                  root / "deepspeed" / "runtime" / "quantize.py")
    rq = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rq)
    return rq


def _quantizers(x: np.ndarray) -> list[dict]:
    import torch
    from deepspeed.compression_old import utils as u

    t = torch.tensor(x)
    out = []
    for fn, bits_list in ((u.SymQuantizer, (8, 4, 3)), (u.AsymQuantizer, (8, 4, 3)),
                          (u.TernaryQuantizer, (2,)), (u.BinaryQuantizer, (1,))):
        for bits in bits_list:
            for groups in (1, 4, 8, 24):
                y = fn.apply(t.clone(), bits, None, None, groups)
                out.append({"fn": fn.__name__, "bits": bits, "groups": groups,
                            "out": y.numpy().tolist()})
    lo, hi = torch.tensor(-1.5), torch.tensor(0.9)
    for fn in (u.SymQuantizer, u.AsymQuantizer):  # static activation ranges
        y = fn.apply(t.clone(), 8, lo, hi, 1)
        out.append({"fn": fn.__name__, "bits": 8, "groups": 1, "min": -1.5, "max": 0.9,
                    "out": y.numpy().tolist()})
    for ratio in (0.5, 0.25, 0.9):
        mask = u.TopKBinarizer.apply(t.abs(), ratio, False)
        out.append({"fn": "TopKBinarizer", "ratio": ratio, "out": mask.numpy().tolist()})
    return out


def _highbit(rq, x: np.ndarray) -> list[dict]:
    import torch

    out = []
    for q_type in ("symmetric", "asymmetric"):
        for bits in (8, 5, 3):
            for groups in (1, 4, 8):
                q = rq.Quantizer(q_groups=groups, q_type=q_type, q_rounding="nearest")
                y = q.quantize_highbit(torch.tensor(x), bits)
                out.append({"fn": "quantize_highbit", "type": q_type, "bits": bits,
                            "groups": groups, "out": y.numpy().tolist()})
    return out


def _schedule(rq, x: np.ndarray, shared: dict, start: int, target: int, period: int) -> dict:
    import torch
    from deepspeed.compression_old.compress import init_compression
    from deepspeed.compression_old.scheduler import compression_scheduler

    model = torch.nn.Sequential(torch.nn.Linear(x.shape[1], x.shape[0], bias=False))
    master = torch.tensor(x)
    model[0].weight.data.copy_(master)
    config = {"compression_training": {"weight_quantization": {
        "shared_parameters": {"enabled": True, "quantize_weight_in_forward": False,
                              **shared},
        "different_groups": {"wq1": {"params": {"start_bits": start, "target_bits": target,
                                                "quantization_period": period},
                                     "modules": ["0"]}}}}}
    init_compression(model, config)
    sched = compression_scheduler(model, get_compression_config_of(config))
    mixed = shared.get("fp16_mixed_quantize", {})
    quantizer = rq.Quantizer(q_groups=shared.get("quantize_groups", 1),
                             q_mixed_fp16=mixed.get("enabled", False),
                             q_change_ratio=mixed.get("quantize_change_ratio", 0.001),
                             q_type=shared.get("quantization_type", "symmetric"),
                             q_rounding="nearest")
    weight = model[0].weight
    groups = [[weight]]

    def quantize():  # the optimizer copied the master into the 16-bit weight first
        weight.data.copy_(master)
        quantizer.quantize(groups, False, False, None)

    records = []
    for step in range(STEPS):
        if step == 0:  # engine.forward at global step 0
            sched.step(step_zero_check=True)
            if sched.weight_quantization_enabled:
                quantize()
        records.append({"step": step, "quantized": quantizer.qsteps > 0,
                        "bits": int(weight.start_bits), "qsteps": quantizer.qsteps,
                        "ratio": quantizer.quantize_real_ratio,
                        "weight": weight.data.numpy().tolist()})
        # engine._take_model_step: optimizer.step(), quantize, compression_scheduler.step()
        weight.data.copy_(master)
        if sched.weight_quantization_enabled:
            quantize()
        sched.step()
    return {"start_bits": start, "target_bits": target, "quantization_period": period,
            **{k: v for k, v in shared.items()}, "records": records}


TRAIN_STEPS = 8
TRAININGS = [  # (name, shared parameters, start_bits, target_bits, quantization_period)
    ("moq_8_to_4", dict(schedule_offset=0, quantize_groups=4), 8, 4, 2),
    ("moq_asym_mixed_offset", dict(schedule_offset=2, quantize_groups=2,
                                   quantization_type="asymmetric",
                                   fp16_mixed_quantize={"enabled": True,
                                                        "quantize_change_ratio": 0.25}),
     6, 4, 1),
]


def _training(rq, shared: dict, start: int, target: int, period: int) -> dict:
    """A two-layer MLP trained with MoQ as DeepSpeed 0.16's engine runs it, in fp32: the
    optimizer (AdamW) updates the fp32 master, the master is copied into the model's weights,
    ``Quantizer.quantize`` quantizes them, the next forward/backward runs on them."""
    import torch
    from deepspeed.compression_old.compress import init_compression
    from deepspeed.compression_old.scheduler import compression_scheduler

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = {"compression_training": {"weight_quantization": {
        "shared_parameters": {"enabled": True, "quantize_weight_in_forward": False, **shared},
        "different_groups": {"wq1": {"params": {"start_bits": start, "target_bits": target,
                                                "quantization_period": period},
                                     "modules": ["0", "2"]}}}}}
    init_compression(model, config)
    sched = compression_scheduler(model, get_compression_config_of(config))
    mixed = shared.get("fp16_mixed_quantize", {})
    quantizer = rq.Quantizer(q_groups=shared.get("quantize_groups", 1),
                             q_mixed_fp16=mixed.get("enabled", False),
                             q_change_ratio=mixed.get("quantize_change_ratio", 0.001),
                             q_type=shared.get("quantization_type", "symmetric"),
                             q_rounding="nearest")
    params = list(model.parameters())
    master = [p.detach().clone().requires_grad_(True) for p in params]
    opt = torch.optim.AdamW(master, lr=0.05, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01)

    def quantize():
        with torch.no_grad():
            for p, m in zip(params, master, strict=True):
                p.copy_(m)
        quantizer.quantize([params], False, False, None)

    rng = np.random.default_rng(1)
    data = [(rng.normal(size=(8, 12)).astype(np.float32),
             rng.normal(size=(8, 4)).astype(np.float32)) for _ in range(TRAIN_STEPS)]
    losses = []
    for step, (x, y) in enumerate(data):
        if step == 0:
            sched.step(step_zero_check=True)
            if sched.weight_quantization_enabled:
                quantize()
        loss = torch.nn.functional.mse_loss(model(torch.tensor(x)), torch.tensor(y))
        model.zero_grad()
        loss.backward()
        for p, m in zip(params, master, strict=True):
            m.grad = p.grad.clone()
        opt.step()
        with torch.no_grad():
            for p, m in zip(params, master, strict=True):
                p.copy_(m)
        if sched.weight_quantization_enabled:
            quantize()
        sched.step()
        losses.append(float(loss))
    return {"start_bits": start, "target_bits": target, "quantization_period": period,
            **shared, "init": {k: v.numpy().tolist() for k, v in init.items()},
            "data": [(x.tolist(), y.tolist()) for x, y in data], "losses": losses}


PRUNINGS = {  # name: (model, compression_training)
    "sparse_l1_row_topk_related": ("mlp", {
        "sparse_pruning": {"shared_parameters": {"enabled": True, "method": "l1",
                                                 "schedule_offset": 2},
                           "different_groups": {"sp1": {"params": {"dense_ratio": 0.5},
                                                        "modules": ["2"]}}},
        "row_pruning": {"shared_parameters": {"enabled": True, "method": "topk",
                                              "schedule_offset": 1},
                        "different_groups": {"rp1": {"params": {"dense_ratio": 0.5},
                                                     "modules": ["0"],
                                                     "related_modules": [["2"]]}}}}),
    "sparse_topk_head_topk_related": ("mlp", {
        "sparse_pruning": {"shared_parameters": {"enabled": True, "method": "topk",
                                                 "schedule_offset": 0},
                           "different_groups": {"sp1": {"params": {"dense_ratio": 0.3},
                                                        "modules": ["0"]}}},
        "head_pruning": {"shared_parameters": {"enabled": True, "method": "topk",
                                               "num_heads": 4, "schedule_offset": 3},
                         "different_groups": {"hp1": {"params": {"dense_ratio": 0.5},
                                                      "modules": ["2"],
                                                      "related_modules": [["0"]]}}}}),
    "row_l1_in_place": ("mlp", {
        "row_pruning": {"shared_parameters": {"enabled": True, "method": "l1",
                                              "schedule_offset": 0},
                        "different_groups": {"rp1": {"params": {"dense_ratio": 0.75},
                                                     "modules": ["0"]}}}}),
    "channel_l1_related": ("cnn", {
        "channel_pruning": {"shared_parameters": {"enabled": True, "method": "l1",
                                                  "schedule_offset": 1},
                            "different_groups": {"cp1": {"params": {"dense_ratio": 0.5},
                                                         "modules": ["^0$"],
                                                         "related_modules": [["^2$"]]}}}}),
    "channel_topk_sparse_l1": ("cnn", {
        "channel_pruning": {"shared_parameters": {"enabled": True, "method": "topk",
                                                  "schedule_offset": 0},
                            "different_groups": {"cp1": {"params": {"dense_ratio": 0.75},
                                                         "modules": ["^2$"]}}},
        "sparse_pruning": {"shared_parameters": {"enabled": True, "method": "l1",
                                                 "schedule_offset": 2},
                           "different_groups": {"sp1": {"params": {"dense_ratio": 0.4},
                                                        "modules": ["^0$"]}}}}),
}


ACTIVATIONS = {  # name: (model, compression_training)
    "dynamic_asym_8_offset": ("mlp", {"activation_quantization": {
        "shared_parameters": {"enabled": True, "quantization_type": "asymmetric",
                              "range_calibration": "dynamic", "schedule_offset": 2},
        "different_groups": {"aq1": {"params": {"bits": 8}, "modules": ["0", "2"]}}}}),
    "static_sym_4": ("mlp", {"activation_quantization": {
        "shared_parameters": {"enabled": True, "quantization_type": "symmetric",
                              "range_calibration": "static", "schedule_offset": 1},
        "different_groups": {"aq1": {"params": {"bits": 4}, "modules": ["2"]}}}}),
    "conv_dynamic_sym_8_with_rows": ("cnn", {
        "activation_quantization": {
            "shared_parameters": {"enabled": True, "range_calibration": "dynamic",
                                  "schedule_offset": 0},
            "different_groups": {"aq1": {"params": {"bits": 8}, "modules": ["^2$"]}}},
        "channel_pruning": {"shared_parameters": {"enabled": True, "method": "l1",
                                                  "schedule_offset": 0},
                            "different_groups": {"cp1": {"params": {"dense_ratio": 0.5},
                                                         "modules": ["^0$"]}}}}),
    "static_asym_8_with_weights": ("mlp", {
        "activation_quantization": {
            "shared_parameters": {"enabled": True, "quantization_type": "asymmetric",
                                  "range_calibration": "static", "schedule_offset": 0},
            "different_groups": {"aq1": {"params": {"bits": 8}, "modules": ["0"]}}},
        "weight_quantization": {
            "shared_parameters": {"enabled": True, "quantize_weight_in_forward": True,
                                  "schedule_offset": 0, "quantize_groups": 4},
            "different_groups": {"wq1": {"params": {"start_bits": 8, "target_bits": 8},
                                         "modules": ["0", "2"]}}}}),
}


def _pruning(model_kind: str, section: dict) -> dict:
    """A small model pruned as DeepSpeed 0.16's engine runs it, in fp32: ``init_compression``
    replaces its modules (masks from the initial weights, scores initialised), the first
    forward is preceded by ``compression_scheduler.step(step_zero_check=True)``, each
    optimizer step (AdamW over every parameter, scores included) by a forward/backward and
    followed by ``compression_scheduler.step()``; ``redundancy_clean`` at the end.

    DeepSpeed 0.16's scheduler reads ``schedule_offset_end`` for sparse pruning, which its
    config parser sets for ``snip_momentum`` only; the run sets it equal to a large step (the
    mask then stays on, as it would: the scheduler never turns a technique off). Its ``l1``
    channel pruning calls ``torch.linalg.norm(w, ord=1, dim=[1, 2, 3])``, which torch
    refuses (a vector norm over three dims needs ``vector_norm``); the run computes what it
    means, each output kernel's L1 norm."""
    import torch

    norm = torch.linalg.norm

    def linalg_norm(x, ord=None, dim=None, **kw):
        if ord == 1 and isinstance(dim, list | tuple) and len(dim) > 2:
            return torch.linalg.vector_norm(x, ord=1, dim=dim, **kw)
        return norm(x, ord=ord, dim=dim, **kw)

    torch.linalg.norm = linalg_norm
    from deepspeed.compression_old.compress import init_compression, redundancy_clean
    from deepspeed.compression_old.scheduler import compression_scheduler

    torch.manual_seed(0)
    if model_kind == "mlp":
        model = torch.nn.Sequential(torch.nn.Linear(12, 16), torch.nn.ReLU(),
                                    torch.nn.Linear(16, 4))
        shape_x, shape_y = (8, 12), (8, 4)
        head = None
    else:
        model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(),
                                    torch.nn.Conv2d(8, 4, 3))
        shape_x, shape_y = (4, 3, 7, 7), (4, 4)
        head = "mean"
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    config = {"compression_training": json.loads(json.dumps(section))}
    init_compression(model, config)
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cc = get_compression_config_of(config)
    cc["sparse_pruning"]["shared_parameters"].setdefault("schedule_offset_end", 10**9)
    sched = compression_scheduler(model, cc)
    opt = torch.optim.AdamW(model.parameters(), lr=0.05, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.01)
    rng = np.random.default_rng(2)
    data = [(rng.normal(size=shape_x).astype(np.float32),
             rng.normal(size=shape_y).astype(np.float32)) for _ in range(TRAIN_STEPS)]
    losses = []
    for step, (x, y) in enumerate(data):
        if step == 0:
            sched.step(step_zero_check=True)
        out = model(torch.tensor(x))
        if head == "mean":
            out = out.mean(dim=(2, 3))
        loss = torch.nn.functional.mse_loss(out, torch.tensor(y))
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss))
    trained = {k: v.detach().clone() for k, v in model.state_dict().items()}
    redundancy_clean(model, config)
    final = {k: v.detach().clone() for k, v in model.state_dict().items()}
    x = data[0][0]
    model.eval()  # a static activation range is read, not updated
    out = model(torch.tensor(x))
    if head == "mean":
        out = out.mean(dim=(2, 3))
    return {"model": model_kind, "compression_training": section,
            "init": {k: v.numpy().tolist() for k, v in init.items()},
            "compressed": {k: v.float().numpy().tolist() for k, v in state.items()},
            "data": [(x.tolist(), y.tolist()) for x, y in data], "losses": losses,
            "trained": {k: v.float().numpy().tolist() for k, v in trained.items()},
            "clean": {k: v.numpy().tolist() for k, v in final.items()},
            "clean_output": out.detach().numpy().tolist()}


GPT2_TUTORIAL = {  # DeepSpeedExamples' GPT-2 compression config's shape: W8A8 + MLP rows
    "weight_quantization": {
        "shared_parameters": {"enabled": True, "quantizer_kernel": False,
                              "schedule_offset": 0, "quantize_groups": 1,
                              "quantize_verbose": False, "quantization_type": "symmetric",
                              "quantize_weight_in_forward": True, "rounding": "nearest",
                              "fp16_mixed_quantize": {"enabled": False,
                                                      "quantize_change_ratio": 0.001}},
        "different_groups": {"wq1": {"params": {"start_bits": 8, "target_bits": 8,
                                                "quantization_period": 50},
                                     "modules": ["attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                 "mlp.c_proj"]}}},
    "activation_quantization": {
        "shared_parameters": {"enabled": True, "quantization_type": "symmetric",
                              "range_calibration": "dynamic", "schedule_offset": 1},
        "different_groups": {"aq1": {"params": {"bits": 8},
                                     "modules": ["attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                 "mlp.c_proj"]}}},
    "row_pruning": {
        "shared_parameters": {"enabled": True, "method": "l1", "schedule_offset": 2},
        "different_groups": {"rp1": {"params": {"dense_ratio": 0.5}, "modules": ["mlp.c_fc"],
                                     "related_modules": [["mlp.c_proj"]]}}},
}


GPT2_STATIC = {  # the same with static input ranges (QuantAct's running [min, max] per layer)
    **GPT2_TUTORIAL,
    "activation_quantization": {
        "shared_parameters": {"enabled": True, "quantization_type": "asymmetric",
                              "range_calibration": "static", "schedule_offset": 2},
        "different_groups": {"aq1": {"params": {"bits": 8},
                                     "modules": ["attn.c_attn", "attn.c_proj", "mlp.c_fc",
                                                 "mlp.c_proj"]}}},
}


def _gpt2_tutorial(out: Path, section: dict | None = None, run: str = "ds_run.json") -> None:
    """A 2-layer Hugging Face GPT-2 compressed with ``GPT2_TUTORIAL`` as DeepSpeed's GPT-2
    example does it (``convert_conv1d_to_linear``, ``init_compression``, AdamW, the
    compression scheduler, ``redundancy_clean``), written as an HF folder of its initial
    weights plus ``ds_run.json`` (data, losses, the cleaned model's logits and shapes).
    DeepSpeed quantizes ``c_attn`` as one fused q/k/v matrix (one group here), as jds does
    when one group takes all three."""
    import torch
    import transformers
    from deepspeed.compression_old.compress import init_compression, redundancy_clean
    from deepspeed.compression_old.helper import convert_conv1d_to_linear
    from deepspeed.compression_old.scheduler import compression_scheduler

    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=32, n_embd=32, n_layer=2,
                                  n_head=4, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    model = transformers.GPT2LMHeadModel(cfg)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    convert_conv1d_to_linear(model, transformers.pytorch_utils.Conv1D)
    section = GPT2_TUTORIAL if section is None else section
    config = {"compression_training": json.loads(json.dumps(section))}
    init_compression(model, config)
    # init_compression replaces every Linear / Embedding with a new module around the same
    # tensor, so GPT-2's tied wte and lm_head become two Parameters sharing storage, which
    # AdamW would update twice a step; tie them again (one Parameter, as the model defines)
    model.lm_head.weight = model.transformer.wte.weight
    cc = get_compression_config_of(config)
    cc["sparse_pruning"]["shared_parameters"].setdefault("schedule_offset_end", 10**9)
    sched = compression_scheduler(model, cc)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.999), eps=1e-8,
                            weight_decay=0.01)
    rng = np.random.default_rng(3)
    data = [rng.integers(0, 64, (4, 16)) for _ in range(6)]
    losses = []
    model.train()
    for step, ids in enumerate(data):
        if step == 0:
            sched.step(step_zero_check=True)
        t = torch.tensor(ids)
        loss = model(input_ids=t, labels=t).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    redundancy_clean(model, config)
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor(data[0])).logits
    (out / run).write_text(json.dumps({
        "compression_training": section, "data": [d.tolist() for d in data],
        "losses": losses, "clean_logits": logits.numpy().tolist(),
        "clean_shapes": {k: list(v.shape) for k, v in model.state_dict().items()
                         if "h.0.mlp" in k},
        "ranges": {k: v.tolist() for k, v in model.state_dict().items()
                   if k.endswith("x_min_max")}}))


def get_compression_config_of(config: dict) -> dict:
    from deepspeed.compression_old.config import get_compression_config

    return get_compression_config(json.loads(json.dumps(config)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--deepspeed-src", help="a DeepSpeed 0.16.0 source tree (default: download)")
    p.add_argument("--out", default="tests/fixtures")
    args = p.parse_args()
    rq = _load(_source(args.deepspeed_src))
    x = np.random.default_rng(0).normal(size=(8, 12)).astype(np.float32)
    x[0, 0] = 3.0  # an outlier, so group ranges differ
    fixture = {"source": "DeepSpeed 0.16.0 deepspeed/compression + deepspeed/runtime/quantize.py",
               "input": x.tolist(), "quantizers": _quantizers(x) + _highbit(rq, x),
               "schedules": {name: _schedule(rq, x, shared, s, t, per)
                             for name, shared, s, t, per in SCHEDULES},
               "training": {name: _training(rq, shared, s, t, per)
                            for name, shared, s, t, per in TRAININGS},
               "pruning": {name: _pruning(kind, section)
                           for name, (kind, section) in PRUNINGS.items()},
               "activation": {name: _pruning(kind, section)
                              for name, (kind, section) in ACTIVATIONS.items()}}
    _gpt2_tutorial(Path(args.out) / "ds_gpt2_compression")
    _gpt2_tutorial(Path(args.out) / "ds_gpt2_compression", GPT2_STATIC, "ds_run_static.json")
    out = Path(args.out) / "ds_compression.json"
    out.write_text(json.dumps(fixture))
    print(f"wrote {out} ({out.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
