"""``jds`` command line: thin argument parsing over library functions.

``jds train`` with no arguments trains the ``llama-tiny`` preset on the embedded byte-level
corpus (``jds.trainer.run``); ``--config`` takes a DeepSpeed-style ``ds_config.json`` (its
``train`` section, or the flags, choose model, steps and data).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def _train(args: argparse.Namespace) -> int:
    from jds.config import Config
    from jds.trainer import run

    cfg = Config.load(args.config) if args.config else Config.default_train()
    overrides = {k: v for k, v in {"model": args.model, "steps": args.steps,
                                   "data": args.data}.items() if v is not None}
    if overrides:
        cfg = Config.load({**cfg.to_dict(), "train": {**cfg.train.model_dump(), **overrides}})
    model_tag = Path(cfg.train.model).name
    if args.out:
        out = Path(args.out)
    elif args.resume:
        runs = sorted((Path("runs") / model_tag).glob("*/checkpoints"))
        if not runs:
            print(f"jds train --resume: no run with checkpoints under runs/{model_tag}; "
                  "pass --out RUN_DIR", file=sys.stderr)
            return 2
        out = runs[-1].parent
    else:
        out = Path("runs") / model_tag / time.strftime("%Y%m%d-%H%M%S")
    s = run(cfg, out, resume=args.resume, progress=not args.no_progress)
    print(f"\nrun: {s.out_dir}")
    print(f"steps {s.steps} | train loss {s.train_loss:.4f} | val loss {s.val_loss:.4f} "
          f"(unigram baseline {s.unigram_baseline:.4f} nats/token) | "
          f"{s.tokens_per_s:,.0f} tokens/s | MFU {100 * s.mfu:.1f}% | {s.seconds:.0f} s")
    if s.sample:
        print("sample:\n" + s.sample)
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``jds`` argument parser (subcommands)."""
    p = argparse.ArgumentParser(prog="jds", description="DeepSpeed on JAX/XLA")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train a model (default: llama-tiny on the embedded corpus)")
    t.add_argument("--config", help="ds_config.json-style JSON file")
    t.add_argument("--model", help="preset name (e.g. llama-tiny) or Hugging Face directory")
    t.add_argument("--steps", type=int, help="optimizer steps to train (total, incl. resumed)")
    t.add_argument("--data", help="folder of text files, a text file, or a .bin/.npy token file")
    t.add_argument("--out", help="run directory (default runs/<model>/<timestamp>)")
    t.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)
    return p


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``jds`` console script."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        # Config, data and checkpoint errors are written for people: show them plainly.
        print(f"jds {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
