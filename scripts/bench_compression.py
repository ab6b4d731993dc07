"""Quantization-aware training (MoQ) vs post-training quantization on the embedded corpus.

    python scripts/bench_compression.py [--steps 300] [--model llama-tiny] [--groups 8]

Trains ``--model`` with ``jds train``'s default config (the embedded corpus, the same data
order and seed) three times: without compression; with MoQ from 12 down to 8 bits; with MoQ
from 8 down to 4 bits (both with ``--period`` 10: the target is reached at step 80, and
symmetric quantization in ``--groups`` runs of output channels). The attention and MLP
matrices are quantized; embeddings and the LM head stay in full precision. Each trained
model is then quantized to its target bits (``jds.compression.redundancy_clean``: the
weights an int8 / 4-bit deployment holds), and the uncompressed run's model to 8 and 4 bits
with the same quantizer: post-training quantization (PTQ). Prints one JSON object per row:
the validation loss (nats/token, the run's fixed validation windows) of the model as
trained and after quantization, and the run's seconds.

``--finetune N --bits B`` compares at equal compute where post-training quantization hurts:
the uncompressed run goes on for ``N`` more steps in full precision and is then quantized to
``B`` bits (PTQ), or goes on for the same ``N`` steps with quantization-aware training at
``B`` bits (``quantize_weight_in_forward``: QAT fine-tuning; with ``--moq-start S``, MoQ
from ``S`` bits down to ``B``), both from the same trained weights with a fresh AdamW at
``--finetune-lr``.

``--prune N`` (pruning + ``redundancy_clean``): from the trained run, half of each layer's
MLP channels are removed (row pruning of ``mlp.up_proj`` with ``mlp.down_proj`` related,
``dense_ratio`` 0.5): by their L1 norm without training, or after ``N`` fine-tuning steps
with the ``l1`` mask or with learned ``topk`` scores. Prints parameters, bytes (fp32) and
the validation loss of each smaller model beside the full one, as trained and after the
same ``N`` fine-tuning steps unpruned.

``--distill N`` (layer reduction + distillation): a student with half the trained run's
layers (teacher layers 1 and 3 of 4, embeddings, final norm and LM head copied) trains ``N``
steps against the frozen teacher (``distillation_loss``, ``--alpha``, ``--temperature``) or
with the plain cross-entropy, from the same initialisation and data.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np
from flax import nnx

import jds
from jds.config import Config
from jds.data.loader import BatchLoader, eval_batches
from jds.trainer import _load_data


def _wq(start: int, target: int, period: int, groups: int, in_forward: bool = False) -> dict:
    return {"weight_quantization": {
        "shared_parameters": {"enabled": True, "quantize_groups": groups,
                              "quantize_weight_in_forward": in_forward},
        "different_groups": {"layers": {"params": {"start_bits": start, "target_bits": target,
                                                   "quantization_period": period},
                                        "modules": ["self_attn", "mlp"]}}}}


def _val_loss(engine, val) -> float:
    losses = [engine.eval_batch({"input_ids": b}) for b in val]
    return float(sum(x["loss"] * x["tokens"] for x in losses) / sum(x["tokens"] for x in losses))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--model", default="llama-tiny")
    p.add_argument("--groups", type=int, default=8)
    p.add_argument("--period", type=int, default=10)
    p.add_argument("--finetune", type=int, default=0, help="steps of QAT vs full fine-tuning")
    p.add_argument("--bits", type=int, default=3, help="--finetune: the bit width")
    p.add_argument("--finetune-lr", type=float, default=3e-4)
    p.add_argument("--moq-start", type=int, help="--finetune: MoQ from this many bits down "
                   "to --bits every --period steps (default: --bits from the start)")
    p.add_argument("--prune", type=int, default=0, help="fine-tuning steps of MLP row pruning")
    p.add_argument("--distill", type=int, default=0, help="steps of half-depth distillation")
    p.add_argument("--alpha", type=float, default=0.5, help="--distill: the KD loss's share")
    p.add_argument("--temperature", type=float, default=2.0)
    a = p.parse_args()
    base = Config.default_train().to_dict()
    base["train"] = {**base["train"], "model": a.model, "steps": a.steps}
    cfg0 = Config.load(base)
    train_tokens, val_tokens = _load_data(cfg0)
    device = f"{jax.devices()[0].platform}: {jax.devices()[0].device_kind} x {jax.device_count()}"
    runs = {"none": None} if a.finetune or a.prune or a.distill else {
        "none": None, "moq_int8": _wq(12, 8, a.period, a.groups),
        "moq_int4": _wq(8, 4, a.period, a.groups)}
    models = {}
    for name, compression in runs.items():
        cfg = Config.load({**base, **({"compression_training": compression} if compression
                                      else {})})
        engine = jds.initialize(cfg.train.model, cfg)
        loader = BatchLoader(train_tokens, global_batch=engine.batch.train_batch_size,
                             seq_len=cfg.train.seq_len, seed=cfg.seed,
                             vocab_size=engine.vocab_size)
        val = eval_batches(val_tokens, batch=max(engine.batch.micro_batch_global, 8),
                           seq_len=cfg.train.seq_len, num_batches=cfg.train.eval_batches)
        t0 = time.perf_counter()
        for _ in range(a.steps):
            last = engine.train_batch({"input_ids": loader.next()})
        seconds = time.perf_counter() - t0
        models[name] = (engine.model, cfg, val)
        print(json.dumps({"bench": "compression", "device": device, "model": a.model,
                          "run": name, "steps": a.steps, "train_loss": round(last["loss"], 4),
                          "val_loss_as_trained": round(_val_loss(engine, val), 4),
                          "seconds": round(seconds, 1)}), flush=True)
        engine.close()

    plain = {k: v for k, v in base.items() if k != "compression_training"}
    if a.finetune:
        _finetune(a, models["none"], plain, train_tokens, device)
        return
    if a.prune:
        _prune(a, models["none"], plain, train_tokens, device)
    if a.distill:
        _distill(a, models["none"], plain, train_tokens, device)
    if a.prune or a.distill:
        return
    for name, source, bits in (("ptq_int8", "none", 8), ("moq_int8", "moq_int8", 8),
                               ("ptq_int4", "none", 4), ("moq_int4", "moq_int4", 4)):
        model, _, val = models[source]
        quantized = jds.compression.redundancy_clean(
            model, {**plain, "compression_training": _wq(bits, bits, 1, a.groups, True)})
        engine = jds.initialize(quantized, plain)
        n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(engine.split.params))
        print(json.dumps({"bench": "compression", "device": device, "model": a.model,
                          "row": name, "bits": bits, "groups": a.groups,
                          "val_loss_quantized": round(_val_loss(engine, val), 4),
                          "params": n}), flush=True)
        engine.close()


def _finetune(a, trained, plain: dict, train_tokens, device: str) -> None:
    model, cfg0, val = trained
    tuned = {**plain, "scheduler": None,
             "optimizer": {"type": "AdamW", "params": {"lr": a.finetune_lr}}}
    qat = {**tuned, "compression_training": (
        _wq(a.bits, a.bits, 1, a.groups, True) if a.moq_start is None
        else _wq(a.moq_start, a.bits, a.period, a.groups))}
    quantize = {**plain, "compression_training": _wq(a.bits, a.bits, 1, a.groups, True)}
    for name, cfg in (("full_then_ptq", tuned), ("qat", qat)):
        engine = jds.initialize(model, cfg)
        loader = BatchLoader(train_tokens, global_batch=engine.batch.train_batch_size,
                             seq_len=cfg0.train.seq_len, seed=cfg0.seed + 1,
                             vocab_size=engine.vocab_size)
        for _ in range(a.finetune):
            engine.train_batch({"input_ids": loader.next()})
        as_trained = _val_loss(engine, val)
        clean = jds.compression.redundancy_clean(engine.model, quantize)
        engine.close()
        check = jds.initialize(clean, plain)
        print(json.dumps({"bench": "compression_finetune", "device": device,
                          "model": a.model, "row": name, "steps": a.steps,
                          "finetune_steps": a.finetune, "bits": a.bits, "groups": a.groups,
                          "moq_start": a.moq_start if name == "qat" else None,
                          "val_loss_as_trained": round(as_trained, 4),
                          "val_loss_quantized": round(_val_loss(check, val), 4)}), flush=True)
        check.close()


def _rows(method: str) -> dict:
    return {"row_pruning": {
        "shared_parameters": {"enabled": True, "method": method, "schedule_offset": 0},
        "different_groups": {"mlp": {"params": {"dense_ratio": 0.5}, "modules": ["up_proj"],
                                     "related_modules": [["down_proj"]]}}}}


def _size(model) -> tuple[int, int]:
    leaves = jax.tree.leaves(nnx.state(model, nnx.Param))
    return (sum(int(x.size) for x in leaves), sum(int(x.size) * 4 for x in leaves))


def _train(model, cfg: dict, steps: int, train_tokens, seed: int, loss_fn=None):
    engine = jds.initialize(model, cfg, loss_fn=loss_fn)
    loader = BatchLoader(train_tokens, global_batch=engine.batch.train_batch_size,
                         seq_len=Config.load(cfg).train.seq_len, seed=seed,
                         vocab_size=engine.vocab_size)
    t0 = time.perf_counter()
    for _ in range(steps):
        engine.train_batch({"input_ids": loader.next()})
    return engine, time.perf_counter() - t0


def _prune(a, trained, plain: dict, train_tokens, device: str) -> None:
    model, cfg0, val = trained
    tuned = {**plain, "scheduler": None,
             "optimizer": {"type": "AdamW", "params": {"lr": a.finetune_lr}}}

    def report(row: str, clean, steps: int, seconds: float = 0.0) -> None:
        engine = jds.initialize(clean, plain)
        n, nbytes = _size(clean)
        print(json.dumps({"bench": "compression_prune", "device": device, "model": a.model,
                          "row": row, "steps": a.steps, "finetune_steps": steps,
                          "intermediate_size": int(clean.config.intermediate_size),
                          "params": n, "bytes_fp32": nbytes,
                          "val_loss": round(_val_loss(engine, val), 4),
                          "seconds": round(seconds, 1)}), flush=True)
        engine.close()

    report("full", model, 0)
    engine, seconds = _train(model, tuned, a.prune, train_tokens, cfg0.seed + 1)
    report("full_finetuned", engine.model, a.prune, seconds)  # the same extra steps, unpruned
    engine.close()
    l1 = {**plain, "compression_training": _rows("l1")}
    report("row_l1_no_training", jds.compression.redundancy_clean(
        jds.compression.init_compression(nnx.clone(model), l1), l1), 0)
    for method in ("l1", "topk"):
        cfg = {**tuned, "compression_training": _rows(method)}
        engine, seconds = _train(model, cfg, a.prune, train_tokens, cfg0.seed + 1)
        clean = jds.compression.redundancy_clean(engine.model, cfg)
        engine.close()
        report(f"row_{method}_finetuned", clean, a.prune, seconds)


def _distill(a, trained, plain: dict, train_tokens, device: str) -> None:
    teacher, cfg0, val = trained
    tc = teacher.config
    keep = [i for i in range(tc.num_hidden_layers) if i % 2 == 1]
    reduction = {"compression_training": {"layer_reduction": {
        "enabled": True, "keep_number_layer": len(keep), "module_name_prefix": "model.layers",
        "teacher_layer": keep, "other_module_name": ["model.embed_tokens", "model.norm",
                                                     "lm_head"]}}}
    tuned = {**plain, "scheduler": None,
             "optimizer": {"type": "AdamW", "params": {"lr": a.finetune_lr}}}

    def student():
        s = jds.models.build(a.model, num_hidden_layers=len(keep))
        return jds.compression.init_compression(s, {**plain, **reduction},
                                                teacher_model=teacher)

    def report(row: str, model, steps: int, seconds: float) -> None:
        engine = jds.initialize(model, plain)
        print(json.dumps({"bench": "compression_distill", "device": device, "model": a.model,
                          "row": row, "steps": a.steps, "student_steps": steps,
                          "layers": int(model.config.num_hidden_layers),
                          "params": _size(model)[0], "alpha": a.alpha,
                          "temperature": a.temperature,
                          "val_loss": round(_val_loss(engine, val), 4),
                          "seconds": round(seconds, 1)}), flush=True)
        engine.close()

    report("teacher", teacher, 0, 0.0)
    report("student_init", student(), 0, 0.0)
    kd = jds.compression.distillation_loss(a.temperature, a.alpha, int(tc.vocab_size))
    engine, seconds = _train(jds.compression.Distillation(student(), teacher), tuned,
                             a.distill, train_tokens, cfg0.seed + 1, loss_fn=kd)
    report("student_distilled", engine.model.student, a.distill, seconds)
    engine.close()
    engine, seconds = _train(student(), tuned, a.distill, train_tokens, cfg0.seed + 1)
    report("student_cross_entropy", engine.model, a.distill, seconds)
    engine.close()


if __name__ == "__main__":
    main()
