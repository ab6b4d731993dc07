"""``jds`` command line: thin argument parsing over library functions.

``jds train`` with no arguments trains the ``llama-tiny`` preset on the embedded byte-level
corpus (``jds.trainer.run``); ``--config`` takes a DeepSpeed-style ``ds_config.json`` (its
``train`` section, or the flags, choose model, steps and data).

``jds convert`` (``jds.checkpoint.convert.api``) moves checkpoints between jds (Orbax),
Hugging Face and DeepSpeed and prints the size written and the peak RSS it took.

``jds estimate`` and ``jds explain`` (``jds.profiling.memory_report``) compile for N
simulated CPU devices, which JAX can only be given before its first use in a process: a
fresh ``jds`` process sets them up before importing JAX; called from Python with JAX already
running and too few CPU devices, the command re-runs itself in a fresh process.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

# Whether JAX was imported before this module: if not, this process may choose JAX's
# platform and CPU device count (jds estimate / explain).
_FRESH_PROCESS = "jax" not in sys.modules


def _train(args: argparse.Namespace) -> int:
    from jds.config import Config
    from jds.trainer import run

    cfg = Config.load(args.config) if args.config else Config.default_train()
    overrides = {k: v for k, v in {"model": args.model, "steps": args.steps,
                                   "data": args.data}.items() if v is not None}
    lora = {}
    if args.lora is not None:
        from jds.lora import parse_lora_flag

        try:
            lora = {"lora": {**cfg.lora.model_dump(), **parse_lora_flag(args.lora)}}
        except ValueError as e:
            print(f"jds train: {e}", file=sys.stderr)
            return 2
    if overrides or lora:
        source = cfg._source
        cfg = Config.load({**cfg.to_dict(), "train": {**cfg.train.model_dump(), **overrides},
                           **lora})
        cfg._source = source  # errors found later still name the file
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
    elif int(os.environ.get("JDS_NUM_PROCESSES") or os.environ.get("SLURM_NTASKS") or 1) > 1:
        # each process would stamp its own folder; the run must share one
        print("jds train: a multi-process run needs --out RUN_DIR (shared by every process)",
              file=sys.stderr)
        return 2
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


def _serve(args: argparse.Namespace) -> int:
    from jds.inference.engine import init_inference
    from jds.inference.server import CompletionServer, require_serve_extra, tokenizer_for

    require_serve_extra()
    t0 = time.perf_counter()
    config = {"dtype": args.dtype, "tensor_parallel": {"tp_size": args.tp},
              "max_tokens": args.max_tokens, "kv_block_size": args.kv_block_size,
              "max_batch_tokens": args.max_batch_tokens, "max_seqs": args.max_seqs,
              "decode_steps": args.decode_steps, "attention": args.attention,
              "prefix_caching": args.prefix_caching}
    chat_template = None
    if args.chat_template is not None:
        try:
            chat_template = open(args.chat_template, encoding="utf-8").read()
        except OSError as e:
            raise SystemExit(f"jds serve: --chat-template {args.chat_template}: {e}") from None
    api_key = args.api_key or os.environ.get("JDS_API_KEY") or None
    model = args.model
    if args.lora is not None:
        from jds.inference.engine import load_model

        model = load_model(args.model, adapter=args.lora)
    engine = init_inference(model, config)
    if args.warmup == "all":
        n = engine.warmup()
        print(f"jds serve: compiled {n} pass shapes in {time.perf_counter() - t0:.0f} s",
              flush=True)
    name = args.served_model_name or os.path.basename(os.path.normpath(args.model))
    server = CompletionServer(engine, host=args.host, port=args.port, model_name=name,
                              tokenizer=tokenizer_for(args.model, engine.vocab_size),
                              api_key=api_key, chat_template=chat_template,
                              max_queue=args.max_queue, request_timeout=args.request_timeout,
                              max_body_bytes=args.max_body_bytes,
                              shutdown_timeout=args.shutdown_timeout,
                              warm=args.warmup == "background")
    print(f"jds serve: {name} ({engine.dtype_name}, tensor parallel {args.tp}) on "
          f"http://{args.host}:{server.port}/v1 (chat/completions, completions, models), "
          f"ready {time.perf_counter() - t0:.1f} s after start"
          + (", API key required" if api_key else ""), flush=True)
    server.serve_forever()  # SIGINT / SIGTERM: finish in-flight requests, then return
    return 0


def _simulated_devices(args: argparse.Namespace, argv: list[str]) -> list | int:
    """``args.devices`` simulated CPU devices, or the exit code of a re-run in a fresh process
    (when JAX already runs here with fewer CPU devices)."""
    if args.devices < 1:
        raise ValueError(f"--devices {args.devices}: need at least one device")
    fresh = _FRESH_PROCESS and "jax" not in sys.modules
    from jds.profiling.memory_report import (
        SUBPROCESS_ENV,
        configure_cpu_devices,
        cpu_devices,
        simulated_env,
    )

    if fresh:
        configure_cpu_devices(args.devices)

    devices = cpu_devices(args.devices)
    if devices is not None:
        return devices
    if os.environ.get(SUBPROCESS_ENV):
        # a re-run that still lacks the devices must not re-run again
        raise RuntimeError(f"jds {args.command}: JAX did not start with the {args.devices} "
                           "simulated CPU devices asked for (JAX_NUM_CPU_DEVICES)")
    proc = subprocess.run([sys.executable, "-m", "jds.cli", *argv], capture_output=True,
                          text=True, env=simulated_env(args.devices))
    sys.stdout.write(proc.stdout)
    sys.stderr.write(proc.stderr)
    return proc.returncode


def _layout_model(args: argparse.Namespace) -> str:
    """``--model``, else the config's ``train.model`` (as ``jds train`` reads it)."""
    if args.model:
        return args.model
    from jds.config import Config

    return (Config.load(args.config) if args.config else Config()).train.model


def _explain(args: argparse.Namespace, argv: list[str]) -> int:
    args.model = _layout_model(args)
    devices = _simulated_devices(args, argv)
    if isinstance(devices, int):
        return devices
    from jds.profiling import memory_report as mr

    over = {"stages": args.pipeline_stages, "schedule": args.schedule,
            "virtual_stages": args.virtual_stages, "micro_batches": args.micro_batches}
    engine = mr.shapes_engine(args.model, args.config, devices, stage=args.stage, pipeline=over)
    report = mr.explain_report(engine, args.model)
    sched = engine.schedule_table
    if args.pipeline and sched is None:
        raise ValueError("jds explain --pipeline: this layout has no pipeline (mesh.stage is 1); "
                         "give --pipeline-stages N, or set mesh.stage / pipeline.stages in "
                         "--config")
    if args.json:
        if args.pipeline:
            report["pipeline"] = {
                "schedule": sched.name, "stages": sched.stages,
                "micro_batches": sched.micro_batches, "virtual_stages": sched.virtual_stages,
                "ticks": [[str(a) if a else None for a in row] for row in sched.ticks],
                "bubble_fraction": sched.bubble_fraction,
                "theoretical_bubble": sched.theoretical_bubble,
                "in_flight": sched.in_flight(),
            }
        sys.stdout.write(json.dumps(report) + "\n")
    else:
        sys.stdout.write(mr.explain_text(report))
        if args.pipeline:
            sys.stdout.write("\n" + sched.report() + "\n")
    return 0


def _estimate(args: argparse.Namespace, argv: list[str]) -> int:
    args.model = _layout_model(args)
    devices = _simulated_devices(args, argv)
    if isinstance(devices, int):
        return devices
    from jds.profiling import memory_report as mr

    memory = _size(args.device_memory or "80GiB")
    if args.target is not None:  # XLA:GPU's compile for these cards (jds.partitioning.targets)
        from jds.partitioning.targets import compile_only_devices, device_memory

        devices = compile_only_devices(args.target, args.devices)
        if args.device_memory is None:
            memory = device_memory(args.target)
    if args.fit:
        report = mr.fit_report(args.config, devices, memory,
                               seq_len=args.seq_len, candidates=args.candidates,
                               nodes=args.nodes, offload_optimizer=args.offload_optimizer)
        sys.stdout.write(json.dumps(report) + "\n" if args.json else mr.fit_text(report))
        return 0
    engine = mr.shapes_engine(args.model, args.config, devices, stage=args.stage,
                              offload_optimizer=args.offload_optimizer)
    seq_len = args.seq_len or engine.config.train.seq_len
    report = mr.estimate_report(engine, args.model, seq_len, compile=not args.no_compile,
                                nodes=args.nodes)
    sys.stdout.write(json.dumps(report) + "\n" if args.json else mr.estimate_text(report))
    return 0


def _profile(args: argparse.Namespace) -> int:
    import numpy as np

    import jds
    from jds.config import Config
    from jds.trainer import _model_arg

    cfg = Config.load(args.config) if args.config else Config()
    d = cfg.to_dict()
    accumulation = cfg.gradient_accumulation_steps or 1
    d.update(train_batch_size=args.batch, train_micro_batch_size_per_gpu=None,
             gradient_accumulation_steps=accumulation)
    d["flops_profiler"] = {**d.get("flops_profiler", {}), "enabled": True,
                           "profile_step": args.warmup_steps, "module_depth": args.module_depth,
                           "top_modules": args.top_modules, "detailed": not args.no_detailed,
                           "output_file": args.output_file}
    engine = jds.initialize(_model_arg(args.model or cfg.train.model), d)
    if engine.vocab_size is None:
        raise ValueError(f"jds profile feeds random token ids; {args.model!r} is not a language "
                         "model (profile your own model with jds.profiling.get_model_profile)")
    seq = args.seq or cfg.train.seq_len
    rng = np.random.default_rng(cfg.seed)
    for _ in range(args.warmup_steps + 1):
        ids = rng.integers(0, engine.vocab_size, (args.batch, seq), dtype=np.int32)
        engine.train_batch({"input_ids": ids})
    return 0


def _size(text: str) -> int:
    """``2GB`` / ``500MB`` / ``1000000`` -> bytes."""
    units = {"KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    for unit, mult in sorted(units.items(), key=lambda kv: -len(kv[0])):
        if t.endswith(unit):
            return int(float(t[: -len(unit)]) * mult)
    return int(t)


def _convert(args: argparse.Namespace) -> int:
    import resource

    from jds.checkpoint.convert import api

    t0 = time.perf_counter()
    d = args.direction
    if d == "hf-to-orbax":
        out = api.hf_to_orbax(args.src, args.out)
    elif d == "orbax-to-hf":
        out = api.orbax_to_hf(args.src, args.out, step=args.step, dtype=args.dtype,
                              max_shard_bytes=_size(args.max_shard_size), model=args.model,
                              architecture=args.architecture,
                              tokenizer=args.tokenizer, merge_lora=args.merge_lora)[0].parent
    elif d == "orbax-to-safetensors":
        out = api.orbax_to_safetensors(args.src, args.out, step=args.step, dtype=args.dtype,
                                       names=args.names, model=args.model)
    else:
        if not args.model:
            raise ValueError("deepspeed-to-orbax needs --model: the transformers model "
                             "directory (its config.json) or a jds preset the weights fit")
        out = api.deepspeed_to_orbax(args.src, args.out, model=args.model, tag=args.tag,
                                     optimizer=args.optimizer, config=args.config)
    out = Path(out)
    files = [out] if out.is_file() else [p for p in out.rglob("*") if p.is_file()]
    size = sum(p.stat().st_size for p in files)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"jds convert {d}: wrote {out} ({size / 1e6:,.1f} MB) in "
          f"{time.perf_counter() - t0:.1f} s; peak RSS {rss:,.0f} MiB")
    return 0


_CONVERT_HELP = """\
directions (every one streams a tensor at a time):
  hf-to-orbax SRC OUT           Hugging Face dir (config.json + safetensors) -> weights-only
                                jds checkpoint OUT/0; engine.load_checkpoint trains from it
  orbax-to-hf SRC OUT           jds checkpoint (root or step dir) -> Hugging Face dir that
                                transformers loads (sharded above --max-shard-size)
  orbax-to-safetensors SRC FILE jds checkpoint -> one consolidated .safetensors file
                                (zero_to_fp32's equivalent), --names jds|hf, --dtype
  deepspeed-to-orbax SRC OUT    DeepSpeed ZeRO-1/2/3 save_dir (or global_stepN) -> jds
                                checkpoint; --model gives the transformers config.json dir;
                                --optimizer maps Adam's moments and the step so the run
                                continues in jds (jds train --resume / engine.load_checkpoint)

examples:
  jds convert hf-to-orbax ./Llama-3.2-1B ./ckpt/llama
  jds convert orbax-to-hf runs/llama-tiny/20261123-101500/checkpoints ./hf-out --dtype bfloat16
  jds convert orbax-to-safetensors ./ckpt/llama ./llama.safetensors --names hf
  jds convert deepspeed-to-orbax ./ds_ckpt ./jds_ckpt --model ./hf-model --optimizer \\
      --config ds_config.json
"""


def _layout_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="preset name (jds.models.PRESETS) or Hugging Face folder "
                   "(default: the config's train.model, else llama-tiny)")
    p.add_argument("--config", help="ds_config.json-style JSON file (default: bf16, ZeRO off, "
                   "one sequence per device)")
    p.add_argument("--devices", type=int, default=8,
                   help="simulated CPU devices the mesh spans (default 8)")
    p.add_argument("--stage", type=int, choices=(0, 1, 2, 3),
                   help="override zero_optimization.stage")
    p.add_argument("--json", action="store_true", help="print one JSON object")


def _plot(args: argparse.Namespace) -> int:
    from jds.profiling.curves import plot_runs

    if args.out:
        out = args.out
    elif len(args.runs) == 1 and os.path.isdir(args.runs[0]):
        out = os.path.join(args.runs[0], "curves.png")
    else:
        out = "curves.png"
    try:
        path = plot_runs(args.runs, out, labels=args.label, title=args.title)
    except ImportError as e:
        print(f"jds plot: error: {e}", file=sys.stderr)
        return 2
    print(path)
    return 0


def _checkpoints(args: argparse.Namespace) -> int:
    from jds.checkpoint.recovery import checkpoint_root, scan

    root = checkpoint_root(args.dir)
    steps = scan(root)
    if not steps:
        print(f"jds checkpoints verify: no checkpoint steps in {root}", file=sys.stderr)
        return 2
    for st in steps:
        line = f"step {st.step}: {st.status}"
        if st.status == "unverified":
            line += " (no integrity manifest: written by something else; readable)"
        print(line)
        if st.detail:
            print("  " + st.detail.replace("\n", "\n  "))
    damaged = [st.step for st in steps if st.status == "damaged"]
    print(f"{len(steps)} steps in {root}: " + (f"damaged {damaged}" if damaged else "all intact"))
    return 1 if damaged else 0


class _Help(argparse.HelpFormatter):
    """Help that shows each option's default, unless it is None/False or already said."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        flag = isinstance(action, argparse._StoreTrueAction | argparse._StoreFalseAction)
        if flag or "default" in text or default in (None, argparse.SUPPRESS, []):
            return text
        return f"{text} (default: {default})"


class _RawHelp(_Help, argparse.RawDescriptionHelpFormatter):
    """``_Help`` for commands whose description and examples are laid out by hand."""


def _subcommands(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    """``{"train": parser, "checkpoints verify": parser, ...}``, nested ones included."""
    out: dict[str, argparse.ArgumentParser] = {}
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sp in action.choices.items():
                out[name] = sp
                out.update({f"{name} {k}": v for k, v in _subcommands(sp).items()})
    return out


def help_pages(width: int = 90) -> dict[str, str]:
    """Every command's ``--help`` text at a fixed width (``docs/cli/`` is made from it)."""
    p = build_parser()
    pages = {"jds": p, **_subcommands(p)}
    out = {}
    for name, parser in pages.items():
        cls = parser.formatter_class
        parser.formatter_class = lambda prog, _c=cls, _w=width: _c(prog, width=_w)
        out[name] = parser.format_help()
    return out


def cli_doc_pages() -> dict[str, str]:
    """``docs/cli/`` as ``{file name: markdown}``: one page per top-level command (its
    subcommands on the same page) and an index."""
    pages = help_pages()
    top = [n for n in pages if n != "jds" and " " not in n]
    note = "<!-- generated by scripts/make_cli_docs.py from jds/cli.py: do not edit -->\n\n"
    out = {}
    for name in top:
        body = [f"# jds {name}\n\n{note}```text\n{pages[name]}```\n"]
        for sub in (n for n in pages if n.startswith(name + " ")):
            body.append(f"\n## jds {sub}\n\n```text\n{pages[sub]}```\n")
        out[f"{name}.md"] = "".join(body)
    index = "".join(f"- [`jds {n}`]({n}.md)\n" for n in top)
    out["README.md"] = f"# The jds commands\n\n{note}```text\n{pages['jds']}```\n\n{index}"
    return out


def build_parser() -> argparse.ArgumentParser:
    """The ``jds`` argument parser (subcommands)."""
    from jds import __version__

    p = argparse.ArgumentParser(prog="jds", description="DeepSpeed on JAX/XLA")
    p.add_argument("--version", action="version", version=f"jds {__version__}")
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser(
        "train", help="train a model (default: llama-tiny on the embedded corpus)",
        description="Train a model. Flags override the config's train section; the config "
        "itself is a DeepSpeed ds_config.json with jds's mesh and train sections.")
    t.add_argument("--config", help="ds_config.json-style JSON file (default: jds's built-in "
                   "config: fp32 AdamW lr 3e-3, WarmupDecayLR, batch 32 x 128 tokens)")
    t.add_argument("--model", help="preset name or Hugging Face directory (default: the "
                   "config's train.model, llama-tiny)")
    t.add_argument("--steps", type=int, help="optimizer steps in all, resumed ones included "
                   "(default: the config's train.steps, 300)")
    t.add_argument("--data", help="folder of text files, a text file, or a .bin/.npy token file "
                   "(default: the config's train.data, else the embedded corpus)")
    t.add_argument("--out", help="run directory (default: runs/<model>/<timestamp>; with "
                   "--resume, the newest run of the model)")
    t.add_argument("--resume", action="store_true", help="continue from the newest intact "
                   "checkpoint in --out (default: start afresh)")
    t.add_argument("--no-progress", action="store_true",
                   help="no progress bar (default: a progress bar)")
    t.add_argument("--lora", metavar="SPEC", help="fine-tune LoRA adapters only, e.g. "
                   "r=16,alpha=32,target=q_proj|v_proj (keys: r, alpha, dropout, target, init, "
                   "rslora, quantize=int8 for QLoRA); the run writes a PEFT adapter folder "
                   "to OUT/adapter (default: the config's lora section)")
    t.set_defaults(func=_train)

    e = sub.add_parser("estimate", help="per-device memory: ZeRO formulas and the compiled step")
    _layout_args(e)
    e.add_argument("--seq-len", type=int, help="tokens per sequence (default train.seq_len)")
    e.add_argument("--nodes", type=int, default=1,
                   help="nodes the devices span, for DeepSpeed's per-node CPU estimate")
    e.add_argument("--no-compile", action="store_true",
                   help="formulas and state shardings only; skip compiling the train step")
    e.add_argument("--offload-optimizer", choices=("none", "cpu"),
                   help="override zero_optimization.offload_optimizer.device: \"cpu\" keeps "
                   "the master weights and optimizer state in host memory (ZeRO-Offload)")
    e.add_argument("--fit", action="store_true",
                   help="instead: the largest llama preset whose compiled train step fits "
                   "--device-memory, per ZeRO stage, beside the formulas' and DeepSpeed's "
                   "answers (--model is not used)")
    e.add_argument("--device-memory", default=None,
                   help="memory per device for --fit (e.g. 80GiB, 24GB; default: the "
                   "--target card's, else 80GiB)")
    e.add_argument("--target", metavar="GPU",
                   help="compile for --devices of these GPUs (h100, h200) with XLA:GPU instead "
                   "of for simulated CPU devices (no GPU needed: pip install 'jds[aot-gpu]')")
    e.add_argument("--candidates", nargs="+", metavar="PRESET",
                   help="presets --fit tries (default: every llama preset)")
    e.set_defaults(func=_estimate)

    f = sub.add_parser(
        "profile", help="the flops profiler on a train step: FLOPs, MACs, params and latency "
        "per module, step time, TFLOP/s and MFU",
        description="Train a few steps on random tokens and print the flops_profiler report of "
        "the step after the warm-up ones (DeepSpeed's flops profiler, for any jds model).")
    f.add_argument("--model", help="preset name or Hugging Face directory (default: the "
                   "config's train.model, llama-tiny)")
    f.add_argument("--config", help="ds_config.json-style JSON file (precision, ZeRO, mesh; "
                   "its batch size is replaced by --batch)")
    f.add_argument("--batch", type=int, default=8, help="global batch (sequences per step)")
    f.add_argument("--seq", type=int, help="tokens per sequence (default train.seq_len)")
    f.add_argument("--warmup-steps", type=int, default=1,
                   help="steps run before the profiled one (the first compiles)")
    f.add_argument("--module-depth", type=int, default=-1, help="deepest level printed; -1 = all")
    f.add_argument("--top-modules", type=int, default=1,
                   help="modules per depth in the aggregated profile")
    f.add_argument("--no-detailed", action="store_true", help="omit the per-module tree")
    f.add_argument("--output-file", help="write the report here (default: stdout)")
    f.set_defaults(func=_profile)

    x = sub.add_parser("explain", help="every parameter's sharding and bytes per device; "
                       "--pipeline: the pipeline schedule, tick by tick")
    _layout_args(x)
    x.add_argument("--pipeline", action="store_true",
                   help="also print the pipeline schedule table and its bubble fraction")
    x.add_argument("--pipeline-stages", type=int, help="override mesh.stage")
    x.add_argument("--schedule", choices=("gpipe", "1f1b", "interleaved"),
                   help="override pipeline.schedule")
    x.add_argument("--virtual-stages", type=int, help="override pipeline.virtual_stages")
    x.add_argument("--micro-batches", type=int,
                   help="override gradient_accumulation_steps (micro-batches per step)")
    x.set_defaults(func=_explain)

    from jds import launch  # standard library only: no JAX import at parse time

    launch.add_parser(sub)

    g = sub.add_parser("plot", help="draw a run's loss, val loss, lr, tokens/s and gradient "
                       "norm curves into a PNG (needs matplotlib: pip install 'jds[plot]')")
    g.add_argument("runs", nargs="+", metavar="RUN",
                   help="run folders (jds train --out) or metrics.jsonl files; several "
                   "runs share one figure, a colour each")
    g.add_argument("--out", help="the PNG to write (default: RUN/curves.png for one run "
                   "folder, else ./curves.png)")
    g.add_argument("--label", action="append",
                   help="legend label, once per run in order (default: the folder names)")
    g.add_argument("--title", help="figure title (default: the run's folder name)")
    g.set_defaults(func=_plot)

    k = sub.add_parser("checkpoints", help="check checkpoint steps without restoring them")
    ksub = k.add_subparsers(dest="action", required=True)
    kv = ksub.add_parser("verify", help="list every step as intact or damaged (each damaged "
                         "file named); exit 1 if any is damaged")
    kv.add_argument("dir", help="a run folder (jds train --out) or its checkpoints folder")
    kv.set_defaults(func=_checkpoints)

    v = sub.add_parser("serve", help="serve a model over HTTP (OpenAI chat/completions API)",
                       description="Serve a model with continuous batching behind an "
                       "OpenAI-compatible API: POST /v1/chat/completions and /v1/completions "
                       "(streamed with \"stream\": true), GET /v1/models, /health, /metrics "
                       "(Prometheus). Needs the serve extra: pip install 'jds[serve]'.")
    v.add_argument("model", help="Hugging Face model folder, preset name, or a jds run / "
                   "checkpoint folder (jds train --out; newest intact step)")
    v.add_argument("--host", default="127.0.0.1", help="address to listen on")
    v.add_argument("--port", type=int, default=8000, help="0 = any free port")
    v.add_argument("--dtype", default="auto",
                   choices=("auto", "float32", "bfloat16", "float16", "int8"),
                   help="weights and compute: auto = the checkpoint's own dtype (a Hugging "
                   "Face folder's torch_dtype, a jds run's training precision); int8: "
                   "per-channel int8 layer matrices")
    v.add_argument("--tp", type=int, default=1, help="tensor-parallel devices")
    v.add_argument("--lora", metavar="ADAPTER_DIR", help="a PEFT LoRA adapter folder to serve "
                   "on the base model (merged into its weights at load)")
    v.add_argument("--max-tokens", type=int, default=1024, help="longest sequence")
    v.add_argument("--max-seqs", type=int, default=16, help="sequences batched at once")
    v.add_argument("--max-batch-tokens", type=int, default=256,
                   help="tokens per forward pass (SplitFuse budget)")
    v.add_argument("--kv-block-size", type=int, default=16, help="tokens per KV-cache block")
    v.add_argument("--decode-steps", type=int, default=4,
                   help="decode passes per compiled call when a pass holds only decodes "
                   "(fewer host round trips; tokens stream in groups of up to this many)")
    v.add_argument("--attention", default="reference",
                   choices=("reference", "pallas", "pallas_tpu"),
                   help="paged attention: XLA (any backend) or the Pallas kernel for GPU "
                   "(Triton) or TPU (Mosaic)")
    v.add_argument("--no-prefix-caching", dest="prefix_caching", action="store_false",
                   help="compute every prompt whole, even a prefix another request computed")
    v.add_argument("--warmup", default="background", choices=("background", "all", "none"),
                   help="pass shapes to compile: background = answer at once, each request "
                   "compiles what it needs and the rest compile while the server is idle; "
                   "all = every shape before serving; none = only on first use")
    v.add_argument("--served-model-name", help="the model id in /v1/models and answers "
                   "(default: the model folder's name)")
    v.add_argument("--chat-template", metavar="FILE", help="a Jinja chat template for "
                   "/v1/chat/completions (default: the tokenizer's own, else one "
                   "'role: content' line per message)")
    v.add_argument("--api-key", help="require 'Authorization: Bearer KEY' on /v1/* "
                   "(default: $JDS_API_KEY; none = open)")
    v.add_argument("--max-queue", type=int, default=256, help="requests that may wait beyond "
                   "--max-seqs; more get 503")
    v.add_argument("--request-timeout", type=float, default=600.0,
                   help="seconds a request may run before it is cancelled (504)")
    v.add_argument("--max-body-bytes", type=int, default=4 << 20,
                   help="largest request body (413 above)")
    v.add_argument("--shutdown-timeout", type=float, default=30.0,
                   help="on SIGTERM/SIGINT, seconds in-flight requests get to finish")
    v.set_defaults(func=_serve)

    c = sub.add_parser(
        "convert", help="convert checkpoints: Hugging Face / DeepSpeed <-> jds (Orbax)",
        description="Convert checkpoints between jds (Orbax), Hugging Face and DeepSpeed.",
        epilog=_CONVERT_HELP, formatter_class=argparse.RawDescriptionHelpFormatter)
    c.add_argument("direction", choices=("hf-to-orbax", "orbax-to-hf", "orbax-to-safetensors",
                                         "deepspeed-to-orbax"))
    c.add_argument("src", help="source: a Hugging Face or DeepSpeed checkpoint folder, or a "
                   "jds run folder (jds train --out), its checkpoints folder or one step")
    c.add_argument("out", help="output directory (a new file for orbax-to-safetensors)")
    c.add_argument("--step", type=int, help="jds checkpoint step (default: newest intact)")
    c.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype written by orbax-to-hf / orbax-to-safetensors")
    c.add_argument("--max-shard-size", default="2GB",
                   help="orbax-to-hf: largest safetensors shard (default 2GB)")
    c.add_argument("--names", default="jds", choices=("jds", "hf"),
                   help="orbax-to-safetensors: jds (stacked) or Hugging Face tensor names")
    c.add_argument("--model", help="transformers model dir or jds preset: the architecture "
                   "(needed by deepspeed-to-orbax; for jds checkpoints without a stored one)")
    c.add_argument("--architecture", help="orbax-to-hf: HF class, e.g. MistralForCausalLM")
    c.add_argument("--merge-lora", action="store_true",
                   help="orbax-to-hf of a LoRA/QLoRA run: fold the adapters into the weights")
    c.add_argument("--tokenizer", help="orbax-to-hf: copy the tokenizer files from this folder "
                   "(default: the Hugging Face folder the checkpoint came from, if it exists)")
    c.add_argument("--tag", help="deepspeed-to-orbax: DeepSpeed tag (default: 'latest')")
    c.add_argument("--optimizer", action="store_true",
                   help="deepspeed-to-orbax: also map Adam's moments and the step")
    c.add_argument("--config", help="deepspeed-to-orbax --optimizer: the config the run "
                   "continues with (default: the one stored in the DeepSpeed checkpoint)")
    c.set_defaults(func=_convert)
    for sp in _subcommands(p).values():
        raw = issubclass(sp.formatter_class, argparse.RawDescriptionHelpFormatter)
        sp.formatter_class = _RawHelp if raw else _Help
    return p


def compilation_cache() -> str | None:
    """Point XLA's persistent compilation cache at ``$JDS_COMPILATION_CACHE`` (default
    ``~/.cache/jds/xla``; ``0`` or ``off`` turns it off). A second ``jds train``, a resume or
    a restarted ``jds serve`` then loads its compiled programs instead of compiling them
    (``jds train --steps 3`` on llama-tiny: 11.6 s, then 7.2 s). JAX keys every entry by the
    program, devices, compile options and versions, and in multi-process runs one process
    writes. ``JAX_COMPILATION_CACHE_DIR``, when set, wins.

    Returns:
      The cache folder, or None when off.
    """
    import jax

    if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        return os.environ["JAX_COMPILATION_CACHE_DIR"]
    path = os.environ.get("JDS_COMPILATION_CACHE",
                          os.path.join(os.path.expanduser("~"), ".cache", "jds", "xla"))
    if path.strip().lower() in ("", "0", "off", "false", "no"):
        return None
    jax.config.update("jax_compilation_cache_dir", path)
    if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
        # JAX caches only programs that took >= 1 s to compile; a small model's passes take
        # less, so a restarted `jds serve` compiled them all again (first answer 4.7 s after
        # launch for a 2-layer model, 2.9 s with this)
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.1)
    return path


def entry() -> int:
    """The ``jds`` console script and ``python -m jds``: ``main`` in a process whose host
    allocator backs XLA:CPU's buffers with huge pages (``jds.host_env``; it may re-execute
    this process once, before JAX is imported)."""
    from jds.host_env import reexec_with_huge_pages

    reexec_with_huge_pages()
    return main()


def main(argv: list[str] | None = None) -> int:
    """The ``jds`` command on ``argv`` (default ``sys.argv[1:]``), in this process."""
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser().parse_args(argv)
    if args.command not in ("estimate", "plot"):  # estimate reads XLA's dump of a compile
        compilation_cache()
    try:
        if args.command in ("estimate", "explain"):
            return args.func(args, argv)
        return args.func(args)
    except Exception as e:
        if "jax" in sys.modules:  # only a JAX run can have lost a peer process
            from jds.distributed import PeerFailureError, exit_after_peer_failure

            if isinstance(e, PeerFailureError):  # another process died: say so, don't hang
                exit_after_peer_failure(e)
        if not isinstance(e, ValueError | FileNotFoundError | FileExistsError |
                          FloatingPointError | ImportError):
            raise
        # Config, data and checkpoint errors, and a missing optional dependency (its
        # message names the install), are written for people: show them plainly.
        print(f"jds {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
