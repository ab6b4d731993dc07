#!/usr/bin/env bash
# Every GPU check and benchmark the open issues owe, in phases that each fit one 10-minute
# device call. Written for the lent H100/H200 (their image has jax with CUDA, flax, optax,
# orbax, torch, transformers, pytest; not pydantic or tensorboardX, which travel as wheels).
#
# Here, once per session (downloads into .whl/, which git ignores):
#     bash scripts/gpu_session.sh wheels
# On the device (the tool's `run`, with carry [".whl"]), one phase or several per call:
#     bash scripts/gpu_session.sh env tests          # ~3 min: versions, GPU-marked tests
#     bash scripts/gpu_session.sh attention          # ~5 min: issue 7, attention
#     bash scripts/gpu_session.sh int8               # ~2 min: issue 7, int8 matmuls
#     bash scripts/gpu_session.sh decode             # ~8 min: issue 8 (18 compiles of 1B first)
#     bash scripts/gpu_session.sh train125m          # ~6 min: issue 3, llama-125m
#     bash scripts/gpu_session.sh train1b            # ~7 min: issue 3, llama-1b
#     bash scripts/gpu_session.sh profile            # ~2 min: issue 20, the flops profiler
#     bash scripts/gpu_session.sh vsds               # ~6 min: issue 25, jds vs PyTorch/DeepSpeed
#     bash scripts/gpu_session.sh offload            # ~5 min: issue 21, ZeRO-Offload's step time (cpu, nvme)
#     bash scripts/gpu_session.sh lora               # ~6 min: issue 22, LoRA/QLoRA and PLD
#     bash scripts/gpu_session.sh accumulate         # ~4 min: issue 19, in-place accumulation
# Each phase writes $OUT/<phase>.jsonl (one JSON object per result) and $OUT/<phase>.log,
# and prints a short summary last. Record the figures, dated, in docs/benchmarks.md.
# A session has 15 device minutes in all (start-up, idle waits and every call counted), so
# one or two calls: the per-run limits below are ceilings and add up to far more. Priority,
# the open issues first: vsds (25), offload (21), accumulate (19); then the figures the
# resolved issues still owe: tests, train125m, attention, int8, decode, train1b, profile,
# lora. tests/test_gpu_session.py checks on CPU that every command here parses.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/jds_gpu_out}
mkdir -p "$OUT"
PY=${PY:-python3}

wheels() {
  mkdir -p .git/info
  grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
  $PY -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d .whl \
    "pydantic==2.13.4" "pydantic-core==2.46.4" "annotated-types==0.8.0" \
    "typing-inspection==0.4.5" "tensorboardx==2.6.5"
  ls -la .whl
}

setup() {
  if [ -d .whl ]; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
  else
    export PYTHONPATH=$PWD
  fi
  export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda} PYTHONUNBUFFERED=1
  # Keep XLA from grabbing 75% of the card up front only where a phase runs two programs.
  export XLA_PYTHON_CLIENT_PREALLOCATE=false
}

# run PHASE LIMIT_S COMMAND...: stdout lines that are JSON go to PHASE.jsonl, all to PHASE.log.
run() {
  local phase=$1 limit=$2
  shift 2
  echo "## $phase: $*" | tee -a "$OUT/$phase.log"
  timeout "$limit" "$@" 2>>"$OUT/$phase.log" | tee -a "$OUT/$phase.log" \
    | grep '^{' >> "$OUT/$phase.jsonl"
  local rc=${PIPESTATUS[0]}
  [ "$rc" = 0 ] || echo "!! $phase: exit $rc (timeout 124) for: $*" | tee -a "$OUT/$phase.log"
}

phase_env() {
  { nvidia-smi -L; nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
    $PY -c "import jax, jaxlib, flax, optax; print(jax.__version__, jaxlib.__version__, \
flax.__version__, optax.__version__, jax.devices())"
    $PY -c "import jds; print('jds imports')"; } 2>&1 | tee "$OUT/env.log"
}

phase_tests() {
  # GPU-marked parity tests (compiled Pallas/Triton kernels, cuDNN, paged attention) and the
  # lowering tests. conftest sets JAX_PLATFORMS=cpu only when unset.
  run tests 420 $PY -m pytest -q -m gpu -p no:cacheprovider \
    tests/test_flash_attention.py tests/test_quant.py tests/test_inference.py -x
  tail -5 "$OUT/tests.log"
}

phase_attention() {
  run attention 420 $PY scripts/bench_attention.py --seqs 1024,2048,4096,8192,16384 \
    --head-dims 64,128 --reps 10
}

phase_int8() {
  run int8 180 $PY scripts/bench_int8.py --ms 1,8,16,64,256,1024,4096 --ks 4096,8192
}

phase_decode() {
  run decode 300 $PY scripts/bench_decode.py --model llama-1b --max-tokens 1024 \
    --max-seqs 32 --requests 96 --dtypes bfloat16,int8
  run decode 240 $PY scripts/bench_decode.py --model llama-1b --max-tokens 1024 \
    --max-seqs 32 --requests 96 --dtypes bfloat16 --attention pallas
  # W8A8 (activation-quantized model: int8 x int8 layers) against W8A16, same engine setup
  run decode 240 $PY scripts/bench_decode.py --model llama-1b --max-tokens 1024 \
    --max-seqs 32 --requests 48 --w8a8
}

# Memory (jds estimate, XLA attention, compiled on CPU): llama-125m seq 2048 batch 16 without
# remat needs ~116 GiB (the T x T probabilities of every layer), batch 8 ~60 GiB, batch 16
# with remat dots ~29 GiB; llama-1b batch 4 with dots ~47 GiB, batch 8 ~68 GiB.
phase_train125m() {
  # Same layout as the hand-written baseline (no remat), then the flash kernels.
  run train125m 150 $PY scripts/bench_train.py --model llama-125m --batch 8 --seq 2048 \
    --steps 10 --precision bf16 --attention xla
  for attn in cudnn pallas; do
    run train125m 120 $PY scripts/bench_train.py --model llama-125m --batch 16 --seq 2048 \
      --steps 10 --precision bf16 --remat dots --attention $attn --skip-baseline
  done
}

phase_train1b() {
  for attn in xla cudnn; do
    run train1b 200 $PY scripts/bench_train.py --model llama-1b --batch 4 --seq 2048 \
      --steps 8 --precision bf16 --remat dots --attention $attn --skip-baseline
  done
  # No recomputation (MFU counts none of it): fits only if the flash kernel saves no T x T.
  run train1b 150 $PY scripts/bench_train.py --model llama-1b --batch 4 --seq 2048 \
    --steps 8 --precision bf16 --attention cudnn --skip-baseline
}

phase_profile() {
  # The flops profiler on a GPU: per-module latency from the device's per-op events (only
  # measured on CPU so far) and the train step's MFU; the report lands in $OUT/profile.txt.
  run profile 240 $PY -m jds profile --model llama-125m --batch 8 --seq 2048 \
    --module-depth 3 --output-file "$OUT/profile.txt"
}

phase_vsds() {
  # Issue 25 on a GPU: jds vs plain PyTorch (and DeepSpeed where the image has it) on the
  # same HF llama-125m step in bf16, processes alternating (target: jds >= 1.2x DeepSpeed).
  local fw=jds,torch
  $PY -c "import deepspeed" 2>/dev/null && fw=jds,deepspeed,torch
  run vsds 420 $PY scripts/bench_vs_deepspeed.py --device cuda --size 125m --precision bf16 \
    --batch 8 --seq 2048 --steps 20 --rounds 2 --frameworks "$fw"
}

phase_offload() {
  # Issue 21 on a GPU: ZeRO-2 with the optimizer state in pinned host memory vs in HBM, same
  # llama-125m bf16 step (target: within 1.3x), then the offload tests on the real host
  # memory space, and the largest preset that fits 80 GiB with and without offload.
  # The NVMe tier's swap files go to the machine's local disk ($OUT's file system).
  mkdir -p "${TMPDIR:-/tmp}/jds-nvme"
  run offload 300 $PY scripts/bench_offload.py --model llama-125m --batch 8 --seq 2048 \
    --stage 2 --steps 5 --rounds 2 --device-memory 80GiB --no-fit \
    --nvme-path "${TMPDIR:-/tmp}/jds-nvme"
  run offload_tests 240 $PY -m pytest -q -p no:cacheprovider tests/test_offload.py \
    tests/test_nvme.py -k "equals_the_device_run or round_trip or checkpoints_move_both"
}

phase_lora() {
  # Issue 22 on a GPU: full fine-tuning vs LoRA vs QLoRA (int8, NF4) step time and state
  # bytes on llama-125m, PLD at a mean keep probability of 0.5 (goal: towards 2x fewer
  # layer FLOPs), then the LoRA tests (kernels' W8A16 VJP under QLoRA included).
  run lora 360 $PY scripts/bench_lora.py --model llama-125m --batch 8 --seq 1024 \
    --devices 1 --steps 5 --rounds 2
  run lora_tests 180 $PY -m pytest -q -p no:cacheprovider tests/test_lora.py -k "not peft and not cli"
}

phase_accumulate() {
  # Issue 19 on a GPU: gradient accumulation in place (the layer scan's own backward adds
  # into the fp32 accumulator) vs JAX's own backward, same llama-125m bf16 step, compiled
  # temp bytes and step time (on CPU it saves a full gradient buffer and costs ~5-8%).
  run accumulate 240 $PY scripts/bench_accumulate.py --model llama-125m --precision bf16 \
    --batch 8 --seq 1024 --accumulation 4 --steps 6 --rounds 2
}

summary() {
  [ -f "$OUT/$1.jsonl" ] || return 0
  echo "== $1"
  $PY - "$OUT/$1.jsonl" <<'EOF'
import json, sys
keys = ("bench", "impl", "dtype", "attention", "seq", "head_dim", "causal", "pass", "M", "K",
        "model", "tflops", "speedup_vs_bf16", "speedup", "tokens_per_s", "mfu",
        "fraction_of_limit", "continuous_tokens_per_s", "static_tokens_per_s", "layout",
        "framework", "median_s_per_step", "peak_rss_mb", "setting", "s_per_step",
        "device_argument_bytes", "host_argument_bytes", "s_per_step_base", "s_per_step_pld",
        "frozen_bytes_per_param", "variant", "s_per_step_vs_baseline", "temp_bytes_per_param")
for line in open(sys.argv[1]):
    row = json.loads(line)
    print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()
           if k in keys or "_vs_" in k})
EOF
}

[ $# -gt 0 ] || { echo "usage: $0 wheels | {env,tests,attention,int8,decode,train125m,train1b,profile,vsds,offload,lora,accumulate}..."; exit 2; }
if [ "$1" = wheels ]; then wheels; exit; fi
for phase in "$@"; do
  declare -F "phase_$phase" >/dev/null || { echo "unknown phase $phase"; exit 2; }
done
setup
for phase in "$@"; do
  "phase_$phase"
done
for phase in "$@"; do summary "$phase"; done
