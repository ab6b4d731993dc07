"""scripts/bench_vs_deepspeed.py's bookkeeping: round order and the summary rows (the timed
runs themselves are a benchmark, not a test)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "bench_vs_deepspeed.py"
spec = importlib.util.spec_from_file_location("bench_vs_deepspeed", SCRIPT)
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def test_rounds_rotate_so_each_framework_goes_first_equally_often():
    orders = bench.round_orders(["jds", "deepspeed", "torch"], 6)
    assert all(sorted(o) == ["deepspeed", "jds", "torch"] for o in orders)
    firsts = [o[0] for o in orders]
    assert {f: firsts.count(f) for f in set(firsts)} == {"jds": 2, "deepspeed": 2, "torch": 2}


def _run(times, losses, rss=100.0):
    return {"times": times, "losses": losses, "peak_rss_mb": rss, "device": "cpu:cpu",
            "impl": "x", "glibc_tunables": ""}


def test_summary_medians_skip_warmup_and_ratios_compare_to_deepspeed():
    results = {
        # warm-up steps (first 1 of each run) are slow and must not count
        "jds": [_run([9.0, 0.4, 0.6], [3.0, 2.0, 1.0], rss=200.0),
                _run([9.0, 0.5, 0.5], [3.0, 2.0, 1.0], rss=300.0)],
        "deepspeed": [_run([9.0, 0.2, 0.2], [3.0, 2.0, 1.5], rss=150.0)],
    }
    rows = bench.summarise(results, warmup=1, tokens_per_step=1000)
    by = {r.get("framework", "ratios"): r for r in rows}
    assert by["jds"]["median_s_per_step"] == pytest.approx(0.5)
    assert by["jds"]["timed_steps"] == 4
    assert by["jds"]["round_medians"] == pytest.approx([0.5, 0.5])
    assert by["jds"]["peak_rss_mb"] == 300.0
    assert by["deepspeed"]["tokens_per_s"] == pytest.approx(5000)
    ratios = by["ratios"]
    assert ratios["jds_tokens_per_s_vs_deepspeed"] == pytest.approx(0.4)
    assert ratios["jds_peak_rss_vs_deepspeed"] == pytest.approx(2.0)
    assert ratios["jds_max_loss_diff_vs_deepspeed"] == pytest.approx(0.5)


def test_jds_ops_are_sorted_into_parts_and_kinds():
    assert bench._jds_part("jit(train_step)/transpose(jvp(layers))/self_attn/attention/dot_general"
                           ) == "attention (scores, softmax, values)"
    assert bench._jds_part("jit(train_step)/jvp(layers)/self_attn/BTD,DNH->BTNH/dot_general"
                           ) == "attention projections + rope"
    assert bench._jds_part("jit(train_step)/adam/mul") == "loss, clipping, optimizer, scan plumbing"
    assert bench._jds_kind("ynn_fusion.3") == "matmul (+ fused element-wise)"
    assert bench._jds_kind("bitcast_dynamic-update-slice_fusion.2").startswith("layer-scan")
