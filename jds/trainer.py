"""The ``jds train`` loop as a library function: data, engine, logging, eval, checkpoints.

``run(config, out_dir)`` trains ``config.train.model`` (a preset or a Hugging Face
directory) on ``config.train.data`` (default: the embedded byte-level corpus), and writes
into ``out_dir``:

- ``metrics.jsonl``: one JSON object per logged step (``step``, ``loss``, ``lr``,
  ``grad_norm``, ``loss_scale``, ``skipped``, ``tokens_per_s``, ``mfu``; eval rows add
  ``val_loss``);
- TensorBoard event files (``tensorboardX``) under ``out_dir/tb``;
- Orbax checkpoints under ``out_dir/checkpoints`` every ``save_interval`` steps and at the
  end, with the data loader's position so ``resume=True`` continues with the next batch;
- ``config.json`` (the resolved config) and ``sample.txt`` (text generated at the end);
- ``curves.png``: loss / val loss / lr / tokens-per-s / gradient-norm curves, drawn at the
  end when matplotlib is installed (``jds plot`` draws them at any time).

Metrics are fetched one step late so the host never stalls the device.
"""

from __future__ import annotations

import json
import math
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jax
import numpy as np
from tqdm.auto import tqdm

from jds.checkpoint.recovery import step_folders
from jds.config import Config
from jds.data import BatchLoader, embedded_corpus, eval_batches, load_tokens, unigram_entropy
from jds.distributed import init_distributed, peer_failure_guard
from jds.engine import TrainEngine
from jds.profiling.flops import mfu as mfu_of

SAMPLE_PROMPT = "def "


@dataclass
class RunSummary:
    """What a training run measured (also written to ``out_dir/summary.json``)."""

    steps: int
    train_loss: float
    val_loss: float
    unigram_baseline: float
    tokens_per_s: float
    mfu: float
    seconds: float
    out_dir: str
    sample: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _load_data(cfg: Config) -> tuple[np.ndarray, np.ndarray]:
    if cfg.train.data is None:
        return embedded_corpus()
    tokens = load_tokens(cfg.train.data)
    n_val = max(len(tokens) // 20, cfg.train.seq_len * 2)
    if n_val * 2 >= len(tokens):
        raise ValueError(
            f"train.data={cfg.train.data!r} has {len(tokens)} tokens: too few to hold out a "
            f"validation split at seq_len {cfg.train.seq_len}; give more data"
        )
    return tokens[:-n_val], tokens[-n_val:]  # views: a memmap stays memory-mapped


def _model_arg(name: str):
    """A Hugging Face directory is loaded; anything else is a registry preset name."""
    if os.path.isdir(name):
        from jds.models import from_pretrained

        return from_pretrained(name)
    return name


class _Logger:
    """metrics.jsonl + TensorBoard, both flushed as they go (process 0 only: the metrics are
    global, and every process of a multi-host job shares the run folder)."""

    def __init__(self, out: Path) -> None:
        from tensorboardX import SummaryWriter

        self.enabled = jax.process_index() == 0
        if not self.enabled:
            return
        self._jsonl = open(out / "metrics.jsonl", "a", encoding="utf-8")
        self._tb = SummaryWriter(logdir=str(out / "tb"))

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        # not measured yet (the first step's throughput): null in JSON, absent in TensorBoard
        known = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                 for k, v in row.items()}
        self._jsonl.write(json.dumps(known) + "\n")
        self._jsonl.flush()
        for k, v in known.items():
            if k != "step" and isinstance(v, int | float):
                self._tb.add_scalar(k, v, row["step"])

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def run(config: Config, out_dir: str | os.PathLike, *, resume: bool = False,
        progress: bool = True) -> RunSummary:
    """Train per ``config`` and write logs, checkpoints and a sample into ``out_dir``.

    Args:
      config: the validated config (``config.train`` holds the loop settings).
      out_dir: run directory (created).
      resume: continue from the newest checkpoint in ``out_dir/checkpoints``.
      progress: show a progress bar.

    Returns:
      A ``RunSummary``.

    Raises:
      FileNotFoundError: ``resume`` with no checkpoint in ``out_dir``.
    """
    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tc = config.train
    ckpt_dir = out / "checkpoints"

    train_tokens, val_tokens = _load_data(config)
    init_distributed()  # a no-op unless launched as one of several processes
    engine = TrainEngine(_model_arg(tc.model), config)
    local_rows = engine.local_rows()
    vocab = engine.vocab_size
    sizes = [sum(int(np.prod(x.shape)) for x in jax.tree.leaves(t))
             for t in (engine.split.params, engine.split.frozen)]
    trained = sizes[0] / max(sum(sizes), 1)  # LoRA: the base gets no weight gradients
    loader = BatchLoader(train_tokens, global_batch=engine.batch.train_batch_size,
                         seq_len=tc.seq_len, seed=config.seed, vocab_size=vocab)
    saved_step = None  # the step whose checkpoint is on disk already (never written twice)
    if resume and ckpt_dir.is_dir() and not step_folders(ckpt_dir):
        # The run started here but was stopped before its first save was committed (or
        # every step was damaged and moved aside): there is nothing to lose by starting over.
        warnings.warn(f"--resume: {ckpt_dir} holds no checkpoint yet (a run stopped before "
                      "its first save completed); starting from step 0", stacklevel=2)
        resume = False
    if resume:
        client = engine.load_checkpoint(ckpt_dir)
        if "data" in client:
            loader.load_state_dict(client["data"])
        # else: a converted checkpoint (jds convert) has no data position: start the data
        # from its beginning
        saved_step = int(engine.state.step)
        if saved_step >= tc.steps:
            engine.close()
            raise ValueError(
                f"{out} is at step {saved_step} already and the run asks for {tc.steps} steps "
                f"in all (--steps / train.steps): nothing to train. Give --steps greater than "
                f"{saved_step} to continue")
    primary = jax.process_index() == 0
    if primary:
        (out / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    val = eval_batches(val_tokens, batch=max(engine.batch.micro_batch_global, 8),
                       seq_len=tc.seq_len, num_batches=tc.eval_batches)
    baseline = unigram_entropy(train_tokens, vocab)

    def evaluate() -> float:
        losses = [engine.eval_batch({"input_ids": b}) for b in val]
        tokens = sum(x["tokens"] for x in losses)
        return float(sum(x["loss"] * x["tokens"] for x in losses) / tokens)

    logger = _Logger(out)
    start = int(engine.state.step)
    tokens_per_step = engine.batch.train_batch_size * tc.seq_len
    n_dev = engine.mesh.size
    bar = tqdm(total=tc.steps, initial=start, disable=not progress, desc="train", unit="step")
    pending: tuple[int, dict] | None = None
    last = {"loss": float("nan")}
    t_mark, steps_since, timed_tps = None, 0, float("nan")
    val_loss = float("nan")
    print_every = max(1, config.steps_per_print)

    def flush(step: int, metrics: dict) -> None:
        nonlocal last, t_mark, steps_since, timed_tps
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        last = m
        # The bar advances as metrics arrive (one step behind the dispatch), so the loss it
        # shows is the loss of the step it counts.
        bar.update(step - bar.n)
        if step % print_every and step not in (start + 1, tc.steps):
            return
        engine.check_loss_scale()
        now = time.perf_counter()
        if t_mark is not None and steps_since:
            timed_tps = steps_since * tokens_per_step / (now - t_mark)
        t_mark, steps_since = now, 0
        util = mfu_of(timed_tps, engine.model_config, tc.seq_len, n_dev,
                      trainable_fraction=trained)
        row = {"step": step, **{k: m[k] for k in ("loss", "lr", "grad_norm", "loss_scale",
                                                  "skipped")},
               "tokens_per_s": timed_tps, "mfu": util}
        logger.log(row)
        bar.set_postfix(loss=f"{m['loss']:.3f}", tok_s=f"{timed_tps:,.0f}",
                        mfu=f"{100 * util:.1f}%")

    try:
        with peer_failure_guard("training"):
            for step in range(start + 1, tc.steps + 1):
                ids = loader.next(rows=local_rows)  # this process's rows only
                metrics = engine.train_batch({"input_ids": ids}, sync=False, process_local=True)
                if pending is not None:
                    flush(*pending)
                elif t_mark is None:
                    jax.block_until_ready(metrics)  # first step: compile; start the clock after it
                    t_mark = time.perf_counter()
                    steps_since = -1  # this step ended before the clock started: not timed
                steps_since += 1
                pending = (step, metrics)
                if tc.eval_interval and step % tc.eval_interval == 0 and step != tc.steps:
                    val_loss = evaluate()
                    logger.log({"step": step, "val_loss": val_loss})
                if tc.save_interval and step % tc.save_interval == 0:
                    engine.save_checkpoint(ckpt_dir, client_state={"data": loader.state_dict()})
                    saved_step = step
            if pending is not None:
                flush(*pending)
            bar.close()
            val_loss = evaluate()
            final_step = int(engine.state.step)
            logger.log({"step": final_step, "val_loss": val_loss, "unigram_baseline": baseline})
            if final_step != saved_step:
                engine.save_checkpoint(ckpt_dir, client_state={"data": loader.state_dict()})
            # Every process runs the sampler (one SPMD program over the sharded weights, the
            # same seed, so the same tokens everywhere); the primary writes it.
            sample = _sample(engine, tc.sample_tokens, config.seed)
            if primary:
                (out / "sample.txt").write_text(sample, encoding="utf-8")
                if config.lora.enabled:  # the adapters as a PEFT folder, beside the checkpoints
                    from jds.lora import save_peft

                    save_peft(engine.model, out / "adapter", base_model_name_or_path=tc.model)
            engine.wait_for_checkpoints()
    finally:
        logger.close()
        engine.close()
    seconds = time.perf_counter() - t_start
    summary = RunSummary(
        steps=final_step, train_loss=last["loss"], val_loss=val_loss, unigram_baseline=baseline,
        tokens_per_s=timed_tps, mfu=mfu_of(timed_tps, engine.model_config, tc.seq_len, n_dev,
                                           trainable_fraction=trained),
        seconds=seconds, out_dir=str(out), sample=sample,
    )
    if primary:
        (out / "summary.json").write_text(json.dumps(summary.__dict__, indent=2))
        _draw_curves(out)
    return summary


def _draw_curves(out: Path) -> None:
    """``out/curves.png`` when matplotlib is there; a picture never fails a finished run."""
    from jds.profiling.curves import have_matplotlib, plot_runs

    if not have_matplotlib():
        return
    try:
        plot_runs([out], out / "curves.png")
    except Exception as e:  # noqa: BLE001 - the run is done and saved; say why, go on
        warnings.warn(f"could not draw {out / 'curves.png'}: {e}", stacklevel=2)


def _sample(engine: TrainEngine, n_tokens: int, seed: int) -> str:
    """Generate ``n_tokens`` bytes from ``SAMPLE_PROMPT`` (byte-level models only)."""
    if n_tokens <= 0 or engine.vocab_size != 256:
        return ""
    from jds.models import generate

    prompt = list(SAMPLE_PROMPT.encode())
    # generate() itself stops at the model's maximum positions
    ids = generate(engine.model, prompt, n_tokens, temperature=0.8, top_k=40, seed=seed)
    return bytes(prompt + list(ids)).decode("utf-8", errors="replace")
