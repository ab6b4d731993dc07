"""Training curves as a picture: ``jds plot RUN`` and the ``curves.png`` a run writes.

A run's ``metrics.jsonl`` holds one JSON object per logged step (``loss``, ``lr``,
``tokens_per_s``, ... ; eval rows carry ``val_loss``). This module reads it back and draws
four panels — train and validation loss (with the unigram baseline when the run logged one),
learning rate, throughput, gradient norm — into a PNG, so a person can look at a run instead
of reading numbers. Several runs can share one figure (one colour each) to compare them.

matplotlib is optional (``pip install 'jds[plot]'``): everything here imports it lazily, and
only its object-oriented API is used (``Figure`` + the Agg canvas, no ``pyplot``), so drawing
never touches a global figure state or needs a display. TensorBoard users get the same
scalars from the event files under ``<run>/tb``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

PANELS = (  # (title, metric keys drawn in it, log-scale y)
    ("loss", ("loss", "val_loss"), False),
    ("learning rate", ("lr",), False),
    ("tokens / s", ("tokens_per_s",), False),
    ("gradient norm", ("grad_norm",), True),
)


def read_metrics(path: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """``{metric: [(step, value), ...]}`` sorted by step, from a run folder or its
    ``metrics.jsonl``.

    A resumed run appends to the same file and may log a step twice (the steps after its
    last checkpoint run again): the later row wins, as it is the one the checkpoint chain
    continues from. NaN and non-numeric values are left out (the first throughput figure
    of a run is NaN: it is the compile step).

    Raises:
      FileNotFoundError: no ``metrics.jsonl`` there.
      ValueError: a line is not JSON (the file and line are named).
    """
    p = Path(path)
    if p.is_dir():
        p = p / "metrics.jsonl"
    if not p.is_file():
        raise FileNotFoundError(f"{p}: no such file; pass a run folder written by jds train "
                                "(it holds metrics.jsonl) or the metrics.jsonl itself")
    series: dict[str, dict[int, float]] = {}
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                step = int(row["step"])
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
                if not line.endswith("\n"):  # a run killed mid-write: the last line is cut
                    break
                raise ValueError(f"{p}, line {n}: not a metrics row ({e})") from None
            for k, v in row.items():
                if k == "step" or isinstance(v, bool) or not isinstance(v, int | float):
                    continue
                if math.isfinite(v):
                    series.setdefault(k, {})[step] = float(v)
    return {k: sorted(d.items()) for k, d in series.items()}


def _import_matplotlib():
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("drawing curves needs matplotlib: pip install 'jds[plot]' "
                          "(or pip install matplotlib)") from e
    return Figure, FigureCanvasAgg


def plot_runs(runs: Sequence[str | os.PathLike], out: str | os.PathLike,
              labels: Sequence[str] | None = None, title: str | None = None) -> Path:
    """Draw the curves of one or more runs into the PNG ``out``.

    Args:
      runs: run folders (or ``metrics.jsonl`` files).
      out: the PNG to write (written to a temporary name, then renamed into place).
      labels: one legend label per run (default: each run folder's name).
      title: the figure title (default: the run's folder for one run).

    Returns:
      The path written.

    Raises:
      ImportError: matplotlib is not installed (the message says how to install it).
      FileNotFoundError / ValueError: as ``read_metrics``; ValueError also when no run
        has a single logged value.
    """
    if labels and len(labels) != len(runs):
        raise ValueError(f"{len(labels)} labels for {len(runs)} runs: give one label per run "
                         "(--label once per RUN, in order), or none")
    Figure, FigureCanvasAgg = _import_matplotlib()
    data = [read_metrics(r) for r in runs]
    if not any(data):
        raise ValueError(f"{', '.join(map(str, runs))}: no logged values to draw yet")
    names = list(labels) if labels else [_run_name(r) for r in runs]
    fig = Figure(figsize=(11, 7), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2).ravel()
    colours = [f"C{i % 10}" for i in range(len(data))]
    for ax, (panel, keys, log_y) in zip(axes, PANELS, strict=True):
        drawn = False
        for series, name, colour in zip(data, names, colours, strict=True):
            for key in keys:
                pts = series.get(key)
                if not pts:
                    continue
                steps, values = zip(*pts, strict=True)
                val = key == "val_loss"
                short = "val" if val else "train" if key == "loss" else key
                label = (f"{name} " if len(data) > 1 else "") + short
                ax.plot(steps, values, color=colour, linestyle="--" if val else "-",
                        marker="o" if val else None, markersize=3, label=label)
                drawn = True
            if panel == "loss" and series.get("unigram_baseline"):
                ax.axhline(series["unigram_baseline"][-1][1], color=colour, linestyle=":",
                           linewidth=1, label=(f"{name} " if len(data) > 1 else "")
                           + "unigram baseline")
        ax.set_title(panel)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes,
                    color="0.5")
            continue
        if log_y:
            ax.set_yscale("log")
        if panel == "loss" or len(data) > 1:
            ax.legend(fontsize=8)
    if title or len(data) == 1:
        fig.suptitle(title or names[0])
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    fig.savefig(tmp, format="png", dpi=100)
    os.replace(tmp, out)
    return out


def _run_name(run: str | os.PathLike) -> str:
    p = Path(run).resolve()
    return (p.parent if p.is_file() else p).name


def have_matplotlib() -> bool:
    """Whether ``plot_runs`` can draw (matplotlib importable)."""
    try:
        _import_matplotlib()
    except ImportError:
        return False
    return True
