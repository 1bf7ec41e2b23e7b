#!/usr/bin/env bash
# One prepared device check for issue #10 (run by a session that is lent a GPU; never by tests).
# Sized for <= 8 min: installs .[gpu], compiles with a persistent cache under $OUT, prints the
# counted FLOPs, the top 15 ops of one 512² bf16 sampler call (jax.profiler trace), the sampler at
# batch 1 and the best batch with diffusers in the same run, and the bf16-vs-fp32 demo PSNR.
# Everything it writes goes to $OUT.
#   run: bash benchmarks/gpu_check.sh        (timeout_s ~480, leaving room for one rerun)
set -euo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export JAX_COMPILATION_CACHE_DIR="$OUT/jax_cache" PYTHONPATH="$PWD"
python -m pip install -q -e ".[gpu,test]" 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
timeout 60 python benchmarks/flops.py --no-train | tail -1 | tee "$OUT/flops.json"
timeout 150 python benchmarks/profile_top.py --dtype bfloat16 --trace-dir "$OUT/trace" 2>&1 \
    | grep -v "kept in float32" | tee "$OUT/profile_top.txt"
timeout 240 python benchmarks/sample.py --dtype bfloat16 --batches 1,4,8 --repeats 3 2>&1 \
    | grep -v "kept in float32" | tee "$OUT/sample_bf16.txt"
timeout 60 python benchmarks/bf16_parity.py --no-e2e 2>&1 | tail -4 | tee "$OUT/bf16_parity.txt"
