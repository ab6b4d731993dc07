"""jds vs DeepSpeed vs plain PyTorch: the same training step, side by side, in one run.

One command trains the same Hugging Face Llama (weights from one ``torch.manual_seed(0)``
checkpoint) on the same random token batches with the same optimizer (AdamW, lr 1e-4,
weight decay 0.01, gradient clipping 1.0, ZeRO-0, one device) in three frameworks:

- ``jds``: ``jds.models.from_pretrained`` + ``jds.initialize(...).train_batch``;
- ``deepspeed``: ``deepspeed.initialize`` on the ``transformers`` model (``DS_ACCELERATOR=cpu``
  on CPU; its AdamW is FusedAdam there, CUDA's on a GPU);
- ``torch``: the ``transformers`` model, ``torch.optim.AdamW`` and ``clip_grad_norm_``, the
  loop a PyTorch user writes;
- ``jds-untuned`` (only when named in ``--frameworks``): jds under glibc's default
  allocator. The ``jds`` row runs in the environment the ``jds`` command gives itself
  (``jds.host_env``: huge pages for XLA:CPU's buffers); DeepSpeed and PyTorch run in the
  caller's environment (the same setting does not speed them up: measured 2026-12-06).

Each framework runs in its own process (so peak RSS is its own and imports don't mix), once
per round, and the rounds alternate the order (``jds, deepspeed, torch``, then ``deepspeed,
torch, jds``, ...) so machine noise falls on all three. Every step is synchronised (the loss
is read back as a float, what a user who logs the loss each step pays); the first
``--warmup`` steps of every process (compilation, allocator warm-up) are not timed.

Prints one JSON object per framework (median s/step over every timed step of every round,
tokens/s, peak RSS of its process, first and last loss, per-round medians) and one row of
ratios (tokens/s relative to DeepSpeed, the largest loss difference to DeepSpeed over the
steps)::

    python scripts/bench_vs_deepspeed.py                      # the 3.0M model, CPU, fp32
    python scripts/bench_vs_deepspeed.py --size 125m --steps 20 --rounds 2
    python scripts/bench_vs_deepspeed.py --device cuda --size 1b --precision bf16

Sizes (``--size``): ``3m`` is vocab 256, hidden 256, intermediate 688, 4 layers, 8 heads,
4 kv heads, untied (3.0M parameters); ``125m`` and ``1b`` are jds's ``llama-125m`` and
``llama-1b`` shapes (vocab 32,000). Batches are ``--batch`` x ``--seq`` uniform random tokens.

Needs the ``test`` extra (torch, transformers, deepspeed). On a GPU, jds runs with its GPU
defaults and DeepSpeed with CUDA; ``--precision bf16`` is DeepSpeed's ``bf16`` section, jds's
``bf16`` section and ``torch.autocast`` for plain PyTorch.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

FRAMEWORKS = ("jds", "deepspeed", "torch")
# Optional: jds under glibc's default allocator (what ``jds.host_env`` changes).
OPTIONAL = ("jds-untuned",)
SIZES = {
    "3m": dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4,
               num_attention_heads=8, num_key_value_heads=4, vocab_size=256),
    "125m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
                 num_attention_heads=12, num_key_value_heads=12, vocab_size=32000),
    "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22,
               num_attention_heads=32, num_key_value_heads=4, vocab_size=32000),
}
LR, WEIGHT_DECAY, CLIP = 1e-4, 0.01, 1.0


def write_inputs(work: Path, size: str, batch: int, seq: int, n_steps: int) -> None:
    """The seeded HF checkpoint (``work/model``) and ``n_steps`` batches (``work/batches.npy``)."""
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        **SIZES[size], max_position_embeddings=max(seq, 128), rope_theta=10000.0,
        tie_word_embeddings=False, torch_dtype="float32",
    )
    model = transformers.LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(work / "model", safe_serialization=True)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, config.vocab_size, size=(n_steps, batch, seq), dtype=np.int64)
    np.save(work / "batches.npy", ids.astype(np.int32))


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _run_steps(step, batches: np.ndarray) -> tuple[list[float], list[float]]:
    """``step(ids) -> loss as float`` over every batch: (seconds per step, losses)."""
    times, losses = [], []
    for ids in batches:
        t0 = time.perf_counter()
        losses.append(step(ids))
        times.append(time.perf_counter() - t0)
    return times, losses


def _jds_part(op_name: str) -> str:
    """The model part an HLO op's metadata ``op_name`` belongs to (jds's HF-named scopes)."""
    for key, part in (("/attention/", "attention (scores, softmax, values)"),
                      ("self_attn", "attention projections + rope"), ("/mlp", "mlp"),
                      ("layernorm", "norms"), ("/norm/", "norms"), ("lm_head", "lm_head"),
                      ("embed", "embedding")):
        if key in op_name:
            return part
    return "loss, clipping, optimizer, scan plumbing" if op_name else "unattributed"


def _jds_kind(op: str) -> str:
    """What an HLO op (by XLA:CPU's instruction name) does."""
    if op.startswith(("ynn_fusion", "dot", "xnn_fusion", "onednn")):
        return "matmul (+ fused element-wise)"
    if "dynamic-update-slice" in op or "dynamic-slice" in op:
        return "layer-scan stacking (dynamic (update-)slice)"
    if "copy" in op or "transpose" in op:
        return "copies / transposes (+ fused element-wise)"
    if "broadcast" in op:
        return "broadcasts"
    return "other element-wise / reductions"


def jds_breakdown(engine, ids: np.ndarray, steps: int = 3) -> dict:
    """Milliseconds per step by model part, forward/backward and op kind, from XLA's
    per-op times (``jax.profiler``) of the compiled training step."""
    import re

    from jds.profiling.op_time import op_times

    text = engine.lower_train_step(batch={"input_ids": ids}).compile().as_text()
    module = re.search(r"HloModule (\S+?),", text).group(1)
    meta = {m.group(1): (re.search(r'op_name="([^"]+)"', m.group(2)) or [None, ""])[1]
            for m in re.finditer(r"^\s*(?:ROOT )?%([\w.\-]+) = (.*)$", text, re.M)}
    times = op_times(lambda: [engine.train_batch({"input_ids": ids}) for _ in range(steps)],
                     module) or {}
    out: dict = {"part": {}, "kind": {}, "pass": {}}
    for op, seconds in times.items():
        name = meta.get(op, "")
        for key, label in (("part", _jds_part(name)), ("kind", _jds_kind(op)),
                           ("pass", "backward" if "transpose(" in name else "forward + update")):
            out[key][label] = out[key].get(label, 0.0) + seconds * 1e3 / steps
    return {k: dict(sorted(((a, round(b, 1)) for a, b in v.items()), key=lambda t: -t[1]))
            for k, v in out.items()} | {"profiled_ms_per_step": round(
                sum(times.values()) * 1e3 / steps, 1)}


def torch_breakdown(step, ids: np.ndarray, steps: int = 3, top: int = 12) -> dict:
    """Milliseconds per step of the most expensive aten ops (self time), from
    ``torch.profiler`` over ``steps`` steps."""
    import torch.profiler

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            step(ids)
    rows = sorted(prof.key_averages(), key=lambda e: -e.self_cpu_time_total)[:top]
    total = sum(e.self_cpu_time_total for e in prof.key_averages())
    return {"top_ops": {e.key: round(e.self_cpu_time_total / 1e3 / steps, 1) for e in rows},
            "profiled_ms_per_step": round(total / 1e3 / steps, 1)}


def worker_jds(work: Path, batches: np.ndarray, device: str, precision: str,
               breakdown: bool = False) -> dict:
    import jax

    import jds

    model = jds.models.from_pretrained(work / "model")
    config = {
        "train_batch_size": int(batches.shape[1]),
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WEIGHT_DECAY}},
        "gradient_clipping": CLIP,
        "bf16": {"enabled": precision == "bf16"},
        "zero_optimization": {"stage": 0},
    }
    engine = jds.initialize(model=model, config=config, devices=jax.devices()[:1])
    dev = jax.devices()[0]

    def step(ids):
        return float(engine.train_batch({"input_ids": ids}, sync=False)["loss"])

    times, losses = _run_steps(step, batches)
    return {"times": times, "losses": losses, "device": f"{dev.platform}:{dev.device_kind}",
            "impl": f"jax {jax.__version__}",
            **({"breakdown": jds_breakdown(engine, batches[0])} if breakdown else {})}


def _hf_model(work: Path, device: str):
    import torch
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(
        work / "model", attn_implementation="sdpa", dtype=torch.float32
    )
    return model.to(device).train()


def _torch_device_name(device: str) -> str:
    import torch

    if device == "cuda":
        return f"cuda:{torch.cuda.get_device_name(0)}"
    return f"cpu:{torch.get_num_threads()} threads"


def worker_deepspeed(work: Path, batches: np.ndarray, device: str, precision: str,
                     breakdown: bool = False) -> dict:
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if device == "cpu" else "cuda")
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
        os.environ.setdefault(key, value)
    import deepspeed
    import torch

    deepspeed.init_distributed(dist_backend="gloo" if device == "cpu" else "nccl")
    model = _hf_model(work, device)
    config = {
        "train_batch_size": int(batches.shape[1]),
        "train_micro_batch_size_per_gpu": int(batches.shape[1]),
        "optimizer": {"type": "AdamW", "params": {"lr": LR, "weight_decay": WEIGHT_DECAY}},
        "gradient_clipping": CLIP,
        "bf16": {"enabled": precision == "bf16"},
        "zero_optimization": {"stage": 0},
        "steps_per_print": 10**9,
    }
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=config)
    opt = getattr(engine.optimizer, "optimizer", engine.optimizer)

    def step(ids):
        ids = torch.from_numpy(ids.astype(np.int64)).to(device)
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        return float(loss)

    times, losses = _run_steps(step, batches)
    return {"times": times, "losses": losses, "device": _torch_device_name(device),
            "impl": f"deepspeed {deepspeed.__version__} ({type(opt).__name__}), "
                    f"torch {torch.__version__}",
            **({"breakdown": torch_breakdown(step, batches[0])} if breakdown else {})}


def worker_torch(work: Path, batches: np.ndarray, device: str, precision: str,
                 breakdown: bool = False) -> dict:
    import contextlib

    import torch

    model = _hf_model(work, device)
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    autocast = (torch.autocast(device_type=device, dtype=torch.bfloat16)
                if precision == "bf16" else contextlib.nullcontext())

    def step(ids):
        ids = torch.from_numpy(ids.astype(np.int64)).to(device)
        with autocast:
            loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), CLIP)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss)

    times, losses = _run_steps(step, batches)
    return {"times": times, "losses": losses, "device": _torch_device_name(device),
            "impl": f"torch {torch.__version__}",
            **({"breakdown": torch_breakdown(step, batches[0])} if breakdown else {})}


WORKERS = {"jds": worker_jds, "jds-untuned": worker_jds, "deepspeed": worker_deepspeed,
           "torch": worker_torch}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_worker(framework: str, work: Path, args: argparse.Namespace,
               breakdown: bool = False) -> dict:
    """One framework in a fresh process; its last stdout line is its JSON result."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", framework,
           "--workdir", str(work), "--device", args.device, "--precision", args.precision,
           "--steps", str(args.warmup + (3 if breakdown else args.steps))]
    if breakdown:
        cmd.append("--breakdown")
    env = dict(os.environ)
    if framework == "jds":  # the environment the `jds` command gives itself (jds.host_env)
        from jds.host_env import tuned_environ

        env = tuned_environ(env) or env
    elif framework == "jds-untuned":
        env["JDS_HOST_ALLOCATOR"] = "system"
    if args.device == "cpu":
        env.setdefault("JAX_PLATFORMS", "cpu")
        env.setdefault("CUDA_VISIBLE_DEVICES", "")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{framework} worker failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def round_orders(frameworks: list[str], rounds: int) -> list[list[str]]:
    """Round ``r`` runs the frameworks rotated by ``r``, so each goes first equally often."""
    n = len(frameworks)
    return [[frameworks[(r + i) % n] for i in range(n)] for r in range(rounds)]


def summarise(results: dict[str, list[dict]], warmup: int, tokens_per_step: int) -> list[dict]:
    """One row per framework (medians over all timed steps of all rounds), then the ratios."""
    rows = []
    for fw, runs in results.items():
        timed = [t for run in runs for t in run["times"][warmup:]]
        median = statistics.median(timed)
        rows.append({
            "bench": "vs_deepspeed", "framework": fw, "device": runs[0]["device"],
            "impl": runs[0]["impl"], "glibc_tunables": runs[0]["glibc_tunables"],
            "median_s_per_step": median,
            "tokens_per_s": tokens_per_step / median,
            "round_medians": [statistics.median(run["times"][warmup:]) for run in runs],
            "timed_steps": len(timed), "peak_rss_mb": max(run["peak_rss_mb"] for run in runs),
            "first_loss": runs[0]["losses"][0], "last_loss": runs[0]["losses"][-1],
        })
    by_fw = {row["framework"]: row for row in rows}
    ratios: dict = {"bench": "vs_deepspeed", "ratios": True}
    if "deepspeed" in by_fw:
        ds = by_fw["deepspeed"]
        ds_losses = results["deepspeed"][0]["losses"]
        for fw, row in by_fw.items():
            if fw == "deepspeed":
                continue
            ratios[f"{fw}_tokens_per_s_vs_deepspeed"] = row["tokens_per_s"] / ds["tokens_per_s"]
            ratios[f"{fw}_peak_rss_vs_deepspeed"] = row["peak_rss_mb"] / ds["peak_rss_mb"]
            losses = results[fw][0]["losses"]
            ratios[f"{fw}_max_loss_diff_vs_deepspeed"] = max(
                abs(a - b) for a, b in zip(losses, ds_losses, strict=True))
    rows.append(ratios)
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="3m")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=30, help="timed steps per process and round")
    ap.add_argument("--warmup", type=int, default=3, help="untimed first steps per process")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--frameworks", default=",".join(FRAMEWORKS),
                    help=f"comma-separated, from {','.join(FRAMEWORKS + OPTIONAL)} (jds-untuned: "
                    "jds without the huge-page allocator setting the jds command uses)")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    ap.add_argument("--workdir", type=Path, default=None,
                    help="where the checkpoint and batches go (default: a temporary folder)")
    ap.add_argument("--breakdown", action="store_true",
                    help="after the timed rounds, profile one more process per framework and "
                    "print where a step's time goes (jds: XLA's per-op times by model part, "
                    "pass and op kind; PyTorch and DeepSpeed: torch.profiler's top aten ops)")
    ap.add_argument("--worker", choices=FRAMEWORKS + OPTIONAL, default=None,
                    help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    if args.worker:
        batches = np.load(args.workdir / "batches.npy")[: args.steps]
        out = WORKERS[args.worker](args.workdir, batches, args.device, args.precision,
                                   breakdown=args.breakdown)
        out["peak_rss_mb"] = _peak_rss_mb()
        out["glibc_tunables"] = os.environ.get("GLIBC_TUNABLES", "")
        print(json.dumps(out), flush=True)
        return

    frameworks = [fw.strip() for fw in args.frameworks.split(",") if fw.strip()]
    unknown = sorted(set(frameworks) - set(FRAMEWORKS + OPTIONAL))
    if unknown or not frameworks:
        ap.error(f"--frameworks takes names from {','.join(FRAMEWORKS + OPTIONAL)}; got "
                 f"{args.frameworks!r}")
    with tempfile.TemporaryDirectory(prefix="jds_vs_ds_") as tmp:
        work = args.workdir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        write_inputs(work, args.size, args.batch, args.seq, args.warmup + args.steps)
        results: dict[str, list[dict]] = {fw: [] for fw in frameworks}
        for order in round_orders(frameworks, args.rounds):
            for fw in order:
                results[fw].append(run_worker(fw, work, args))
        breakdowns = {fw: run_worker(fw, work, args, breakdown=True)["breakdown"]
                      for fw in (frameworks if args.breakdown else [])}
    config = {"size": args.size, "batch": args.batch, "seq": args.seq,
              "precision": args.precision, "optimizer": f"AdamW lr={LR} wd={WEIGHT_DECAY}",
              "clip": CLIP, "rounds": args.rounds, "warmup": args.warmup}
    for row in summarise(results, args.warmup, args.batch * args.seq):
        print(json.dumps({**row, "config": config}), flush=True)
    for fw, breakdown in breakdowns.items():
        print(json.dumps({"bench": "vs_deepspeed_breakdown", "framework": fw, **breakdown,
                          "config": config}), flush=True)


if __name__ == "__main__":
    main()
