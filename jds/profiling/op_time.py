"""Per-node latency for the flops profiler: XLA's per-op times from ``jax.profiler``, each
HLO op charged to the node its metadata ``op_name`` names (see ``model_profile``)."""

from __future__ import annotations

import glob
import os
import re
import tempfile
from collections.abc import Callable
from typing import Any

import jax

from jds.profiling.jaxpr_count import Count, resolve


def op_paths(hlo_text: str, count: Count) -> dict[str, tuple[str, ...]]:
    """HLO instruction name -> node path, from each instruction's metadata ``op_name``.

    XLA:CPU rewrites some dots (matrix-vector products) into instructions without metadata;
    such a dot or convolution is named by its output shape: the node of the program's
    matmuls of that shape, or their common ancestor when several nodes have one.
    """
    out = {}
    for line in hlo_text.splitlines():
        m = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = ", line)
        if m is None:
            continue
        meta = re.search(r'op_name="([^"]+)"', line)
        if meta is not None:
            parts = meta.group(1).split("/")[1:]  # drop "jit(fn)"
            out[m.group(1)] = resolve(parts[:-1], count.scopes)
            continue
        op = re.match(r"\s*(?:ROOT )?%[\w.\-]+ = \w+\[([\d,]*)\]\S* (dot|convolution)\(", line)
        if op is None:
            continue
        shape = tuple(int(d) for d in op.group(1).split(",") if d)
        paths = count.shapes.get((op.group(2), shape))
        if paths:
            common = min(paths, key=len)
            while not all(p[:len(common)] == common for p in paths):
                common = common[:-1]
            out[m.group(1)] = common
    return out


def op_times(run: Callable[[], Any], module_name: str) -> dict[str, float] | None:
    """Seconds of self time per HLO op name over one ``run()``, from ``jax.profiler``
    events (averaged over the devices that ran it); None when there are no such events."""
    from jax.profiler import ProfileData

    with tempfile.TemporaryDirectory() as tmp:
        try:
            jax.profiler.start_trace(tmp)
        except Exception:  # another trace is running (the user's): no per-op times
            return None
        try:
            run()
        finally:
            jax.profiler.stop_trace()
        files = glob.glob(os.path.join(tmp, "**", "*.xplane.pb"), recursive=True)
        if not files:
            return None
        data = ProfileData.from_file(files[0])
    times: dict[str, float] = {}
    devices: set[Any] = set()
    for plane in data.planes:
        for line in plane.lines:
            evs = []
            for e in line.events:
                stats = dict(e.stats)
                if stats.get("hlo_module") == module_name and "hlo_op" in stats:
                    evs.append((e.start_ns, e.start_ns + e.duration_ns, str(stats["hlo_op"])))
                    devices.add((plane.name, stats.get("device_ordinal")))
            evs.sort(key=lambda t: (t[0], -t[1]))
            stack: list[list[Any]] = []  # [end, name, self ns]
            for start, end, op in evs:
                while stack and stack[-1][0] <= start:
                    _, n, s = stack.pop()
                    times[n] = times.get(n, 0.0) + s
                if stack:
                    stack[-1][2] -= end - start
                stack.append([end, op, end - start])
            for _, n, s in stack:
                times[n] = times.get(n, 0.0) + s
    if not times:
        return None
    k = max(len({d for d in devices}), 1)
    return {n: max(s, 0.0) * 1e-9 / k for n, s in times.items()}


__all__ = ["op_paths", "op_times"]
