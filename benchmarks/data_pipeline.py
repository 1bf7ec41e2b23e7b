"""Input-pipeline throughput: images/s per worker of the Real-ESRGAN degradation pipeline.

Host path (`data.degrade_on = "host"`): runs `pasd_jax.data.pipeline.make_example` (decode,
enlarge-if-small + random crop, second-order degradation, tokenize) on real images at the
training resolution, one process, one thread, and prints images/s per worker with the share of
each stage (blur = `filter2d`, resize, noise, JPEG, the rest = decode/crop/tokenize). With
`--workers N` it also times the grain pipeline itself (`make_dataset`, N worker processes,
batches of `--batch`), which is what the trainer reads.

Device path (`data.degrade_on = "device"`): the same `make_example` with the pixels left out (crop,
parameter draws, tokenize) per worker, and the jitted `device_degrade.degrade_batch` on a batch of
`--device-batch` crops on JAX's default backend (whatever this machine has: on a CPU-only host it
times the CPU, not a GPU), after one compile.

    python benchmarks/data_pipeline.py                             # 512², images of ../shared/data
    python benchmarks/data_pipeline.py --images DIR --count 64 --workers 8
    python benchmarks/data_pipeline.py --path device --device-batch 8

The trainer logs the share of step time spent waiting for the next batch (`data_wait_share` in
metrics.jsonl). The feed target is 100 images/s per GPU on a 16-core host: the printed estimate
for 16 workers assumes linear scaling over physical cores (an upper bound; hyper-threads and
memory bandwidth make real scaling lower), so measure `--workers 16` on the GPU host itself.
"""

from __future__ import annotations

import argparse
import collections
import functools
import os
import pathlib
import sys
import tempfile
import time

import numpy as np

for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(var, "1")  # one worker = one core

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from configs import realisr  # noqa: E402
from pasd_jax.data import degrade, device_degrade, pipeline  # noqa: E402
from pasd_jax.fixtures.tiny import write_tiny_tokenizer  # noqa: E402

SHARED = pathlib.Path(__file__).resolve().parents[2] / "shared" / "data"
STAGES = ("filter2d", "resize", "add_noise", "jpeg")
TARGET_PER_GPU = 100.0


def _timed(stats: dict, name: str, fn):
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            stats[name] += time.perf_counter() - t0
    return wrapper


def per_worker(sources, cfg: dict, tokenizer_dir: str, count: int) -> tuple[float, dict]:
    """(images/s of one worker, {stage: seconds}) over `count` examples."""
    stats = collections.defaultdict(float)
    originals = {name: getattr(degrade, name) for name in STAGES}
    for name, fn in originals.items():
        setattr(degrade, name, _timed(stats, name, fn))
    try:
        pipeline.make_example(sources[0], np.random.default_rng(0), cfg, tokenizer_dir)  # warm-up (tokenizer)
        stats.clear()
        t0, c0 = time.perf_counter(), time.process_time()
        for i in range(count):
            pipeline.make_example(sources[i % len(sources)], np.random.default_rng([0, i]), cfg, tokenizer_dir)
        total = time.perf_counter() - t0
        stats["cpu"] = time.process_time() - c0
    finally:
        for name, fn in originals.items():
            setattr(degrade, name, fn)
    stats["decode/crop/tokenize"] = total - sum(v for k, v in stats.items() if k != "cpu")
    return count / total, dict(stats, total=total)


def device_host_side(sources, cfg: dict, tokenizer_dir: str, count: int) -> tuple[float, float]:
    """(images/s wall, images/s per CPU-second) of one worker's `make_example` in device mode."""
    cfg = dict(cfg, degrade_on="device")
    pipeline.make_example(sources[0], np.random.default_rng(0), cfg, tokenizer_dir)  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    for i in range(count):
        pipeline.make_example(sources[i % len(sources)], np.random.default_rng([0, i]), cfg, tokenizer_dir)
    return count / (time.perf_counter() - t0), count / (time.process_time() - c0)


def device_batch_time(sources, cfg: dict, tokenizer_dir: str, batch: int, reps: int) -> tuple[float, float, str]:
    """(compile seconds, seconds per batch, backend) of the jitted `degrade_batch` on `batch` crops
    (different draws per repetition; the first call compiles, the rest are timed)."""
    import jax

    cfg = dict(cfg, degrade_on="device")
    res = cfg["resolution"]
    canvas = device_degrade.canvas_for((res, res), cfg["degradation"])
    fn = jax.jit(functools.partial(device_degrade.degrade_batch, canvas=canvas))

    def host_batch(r):
        ex = [pipeline.make_example(sources[(r * batch + i) % len(sources)], np.random.default_rng([1, r, i]), cfg,
                                    tokenizer_dir) for i in range(batch)]
        hq = np.stack([(e["hq"] + 1.0) * 0.5 for e in ex])
        return jax.device_put(hq), jax.device_put({k: np.stack([e["degrade"][k] for e in ex]) for k in ex[0]["degrade"]})

    batches = [host_batch(r) for r in range(reps + 1)]
    t0 = time.perf_counter()
    fn(*batches[0]).block_until_ready()
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for hq, params in batches[1:]:
        fn(hq, params).block_until_ready()
    return compile_s, (time.perf_counter() - t0) / reps, jax.default_backend()


def grain_rate(cfg: dict, tokenizer_dir: str, workers: int, batch: int, batches: int) -> float:
    """Images/s of `make_dataset` with `workers` processes (after the first batch)."""
    ds = pipeline.make_dataset(dict(cfg, num_workers=workers), seed=0, local_batch=batch, tokenizer_dir=tokenizer_dir)
    it = iter(ds)
    next(it)
    t0 = time.perf_counter()
    for _ in range(batches):
        next(it)
    return batch * batches / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", default=str(SHARED / "RealSRSet"), help="image folder (default ../shared/data/RealSRSet)")
    ap.add_argument("--resolution", type=int, default=512)
    ap.add_argument("--count", type=int, default=24, help="examples timed per worker")
    ap.add_argument("--workers", type=int, default=0, help="also time the grain pipeline with N processes")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--batches", type=int, default=4)
    ap.add_argument("--host-cores", type=int, default=16, help="cores of the GPU host for the estimate")
    ap.add_argument("--gpus", type=int, default=8, help="GPUs that host feeds (estimate per GPU)")
    ap.add_argument("--path", choices=("host", "device", "both"), default="both", help="data.degrade_on to time")
    ap.add_argument("--device-batch", type=int, default=4, help="crops per timed degrade_batch call")
    ap.add_argument("--device-reps", type=int, default=3, help="timed degrade_batch calls (after the compile)")
    args = ap.parse_args()
    if not os.path.isdir(args.images):
        sys.exit(f"error: --images {args.images!r} is not a folder")
    cfg = realisr.get_config().data.to_dict()
    cfg.update(paths=(args.images,), resolution=args.resolution, num_workers=0)
    source = pipeline.ImageFolderSource([args.images])
    records = [source[i] for i in range(len(source))]
    with tempfile.TemporaryDirectory() as tok:
        write_tiny_tokenizer(tok)  # tokenizing cost is the same order as CLIP's BPE on short captions
        print(f"images: {len(records)} from {args.images}; crop {args.resolution}², Real-ESRGAN second-order degradation")
        if args.path in ("device", "both"):
            device_report(records, cfg, tok, args)
        if args.path == "device":
            return
        print("host path (data.degrade_on='host'):")
        rate, stats = per_worker(records, cfg, tok, args.count)
        cpu_rate = args.count / stats["cpu"]
        print(f"per worker (1 process, 1 thread, {os.cpu_count()} cores here): {rate:.2f} images/s wall "
              f"({1000 / rate:.0f} ms/image over {args.count}); {cpu_rate:.2f} images/s per CPU-second "
              f"(process time; what an uncontended core gives)")
        rate = max(rate, cpu_rate)
        for name, seconds in sorted(stats.items(), key=lambda kv: -kv[1]):
            if name not in ("total", "cpu"):
                print(f"  {name:22s} {100 * seconds / stats['total']:5.1f} %  ({1000 * seconds / args.count:.1f} ms/image)")
        est = rate * args.host_cores
        print(f"estimate for {args.host_cores} workers (linear, an upper bound): {est:.0f} images/s per host = "
              f"{est / args.gpus:.1f} images/s per GPU for {args.gpus} GPUs/host; target {TARGET_PER_GPU:.0f} per GPU: "
              f"{'met' if est / args.gpus >= TARGET_PER_GPU else 'NOT met'}; a single-GPU host needs "
              f"{TARGET_PER_GPU / rate:.0f} workers")
        if args.workers:
            got = grain_rate(cfg, tok, args.workers, args.batch, args.batches)
            print(f"grain pipeline, {args.workers} workers, batch {args.batch}: {got:.2f} images/s "
                  f"({got / args.workers:.2f} per worker)")


def device_report(records, cfg: dict, tok: str, args) -> None:
    """Print the device path's figures: host-side cost per worker, device time per batch."""
    wall, cpu = device_host_side(records, cfg, tok, args.count)
    print(f"device path (data.degrade_on='device'): host side per worker (crop, parameter draws, tokenize): "
          f"{wall:.1f} images/s wall, {cpu:.1f} images/s per CPU-second")
    compile_s, per_batch, backend = device_batch_time(records, cfg, tok, args.device_batch, args.device_reps)
    print(f"  degrade_batch on {backend} ({os.cpu_count()} cores here), batch {args.device_batch}: "
          f"{1000 * per_batch:.0f} ms/batch = {args.device_batch / per_batch:.2f} images/s "
          f"(compile {compile_s:.1f} s, mean of {args.device_reps} batches)")


if __name__ == "__main__":
    main()
