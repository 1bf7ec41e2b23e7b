"""Top ops of one compiled sampler call, from a `jax.profiler` trace (no TensorBoard needed).

Traces one call of the 512² sampler (after a warm-up call) with `create_perfetto_trace=True`,
reads the Chrome/Perfetto JSON it writes (`*.trace.json.gz`), sums the duration of every complete
event ("ph": "X") per op name on the device tracks (processes named `/device:GPU:*` or TPU; on a
CPU, where there are none, every host event but the Python tracer's, so nested host events count
more than once there), and prints the `--top` most expensive with their
share of the total. The last line is JSON.

    python benchmarks/profile_top.py --dtype bfloat16            # on a GPU: SD1.5 size, 512²
    python benchmarks/profile_top.py --tiny --size 64 --steps 2  # smoke run on a CPU
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import sys
import tempfile

import jax

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import sample as bench  # noqa: E402  (benchmarks/sample.py: model building and the timed call)


def device_pids(events: list) -> set:
    """Process ids of the accelerator tracks (`/device:GPU:N`, `/device:TPU:N`; none on a CPU)."""
    names = {e.get("pid"): str(e.get("args", {}).get("name", "")) for e in events
             if e.get("ph") == "M" and e.get("name") == "process_name"}
    return {pid for pid, name in names.items() if "/device:GPU" in name or "/device:TPU" in name}


def top_ops(trace_path: str, top: int = 15) -> list:
    """[(op name, total µs, count)] of the most expensive ops of a Perfetto JSON trace."""
    with gzip.open(trace_path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    pids = device_pids(events)
    total = collections.Counter()
    count = collections.Counter()
    for e in events:
        if e.get("ph") != "X" or "dur" not in e or (pids and e.get("pid") not in pids):
            continue
        if not pids and str(e.get("name", "")).startswith("$"):  # CPU: skip the Python tracer's frames
            continue
        total[e["name"]] += float(e["dur"])
        count[e["name"]] += 1
    return [(name, us, count[name]) for name, us in total.most_common(top)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", type=int, default=512)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--trace-dir", default=None, help="where the trace goes (default: a temporary folder)")
    args = ap.parse_args()
    bargs = argparse.Namespace(steps=args.steps, repeats=1, dtype=args.dtype, family="pasd", tiny=args.tiny,
                               tile_size=bench.sampling_defaults.TILE_SIZE, peak_tflops=None)
    models = bench.build_models(bargs)
    bench.bench_jax(bargs, models, args.size, args.batch)  # compile, warm up
    out = args.trace_dir or tempfile.mkdtemp(prefix="pasd_trace_")
    jax.profiler.start_trace(out, create_perfetto_trace=True)
    bench.bench_jax(bargs, models, args.size, args.batch)
    jax.profiler.stop_trace()
    traces = sorted(glob.glob(os.path.join(out, "**", "*.trace.json.gz"), recursive=True))
    if not traces:
        raise SystemExit(f"error: no Perfetto trace under {out}")
    ops = top_ops(traces[-1], args.top)
    whole = sum(us for _, us, _ in top_ops(traces[-1], 10**9))
    print(f"trace: {traces[-1]}; top {len(ops)} ops by total time ({jax.devices()[0].device_kind}, {args.dtype}, "
          f"{args.size}², batch {args.batch}, 2 timed calls + compile):")
    for name, us, n in ops:
        print(f"  {us / 1e3:10.2f} ms  {100 * us / whole:5.1f} %  x{n:<6d} {name[:100]}")
    print(json.dumps({"device": jax.devices()[0].device_kind, "total_ms": whole / 1e3,
                      "top": [{"op": name, "ms": us / 1e3, "count": n} for name, us, n in ops]}))


if __name__ == "__main__":
    main()
