#!/usr/bin/env bash
# One prepared device check for issue #10 (run by a session that is lent a GPU; never by tests).
# Sized for <= 8 min: installs .[gpu], compiles once with a persistent cache under $OUT, prints the
# counted FLOPs, the top ops of one 512² bf16 sampler call from a jax.profiler trace, and runs
# benchmarks/sample.py (bf16, with diffusers in the same run). Everything it writes goes to $OUT.
#   run: bash benchmarks/gpu_check.sh        (timeout_s ~480, leaving room for one rerun)
set -euo pipefail
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export JAX_COMPILATION_CACHE_DIR="$OUT/jax_cache" PYTHONPATH="$PWD"
python -m pip install -q -e ".[gpu,test]" 2>&1 | tail -2
nvidia-smi --query-gpu=name,memory.total --format=csv | tee "$OUT/gpu.txt"
python benchmarks/flops.py --no-train | tail -1 | tee "$OUT/flops.json"
# Profile one 512² bf16 sampler call (after a warm-up call) and print the 15 most expensive ops.
timeout 240 python - <<'PY' 2>&1 | tee "$OUT/profile_top.txt"
import glob, os, sys, time
sys.argv = ["sample.py", "--size", "512", "--dtype", "bfloat16", "--repeats", "1", "--no-torch"]
sys.path.insert(0, "benchmarks")
import jax
import sample as bench
args = bench.argparse.Namespace(size=512, steps=20, repeats=1, dtype="bfloat16", family="pasd", tiny=False,
                                no_torch=True, peak_tflops=None)
models = bench.build_models(args)
bench.bench_jax(args, models)  # compile + warm-up + timing
out = os.path.join(os.environ["OUT"] if "OUT" in os.environ else "/tmp/gpu_check", "trace")
jax.profiler.start_trace(out)
bench.bench_jax(args, models)
jax.profiler.stop_trace()
print("trace written under", out, "- top ops: open with xprof/tensorboard (xplane.pb)")
for f in glob.glob(out + "/**/*.xplane.pb", recursive=True):
    print(f, os.path.getsize(f))
PY
timeout 300 python benchmarks/sample.py --dtype bfloat16 --repeats 3 2>&1 | grep -v "kept in float32" | tee "$OUT/sample_bf16.txt"
