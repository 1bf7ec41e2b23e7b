"""One process of the multi-process training tests (`multiprocess_test.py`).

    JAX_COORDINATOR_ADDRESS=127.0.0.1:PORT JAX_NUM_PROCESSES=2 JAX_PROCESS_ID=i \\
    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_PLATFORMS=cpu \\
        python -m tests.train.mp_worker '{"images": …, "base": …, "workdir": …, "out": …, "overrides": {…}}'

Without the JAX_* variables it is a plain single-process run (the reference). Runs `train()` on the
micro model via `tiny_config`, then writes `out` (with `{process}` filled in): the process index
and count, the device counts, the step reached, whether it stopped early, and per-row checksums of
the first two local batches of this host's data shard.
"""

import json
import logging
import os
import sys

import jax
import numpy as np

jax.config.update("jax_disable_most_optimizations", True)
if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)

from pasd_jax.data import pipeline  # noqa: E402
from pasd_jax.train import sharding  # noqa: E402
from pasd_jax.train.cli import setup_logging  # noqa: E402
from pasd_jax.train.loop import train  # noqa: E402
from tests.train.conftest import tiny_config  # noqa: E402


def shard_checksums(config, base: str, batches: int = 2) -> list[list[float]]:
    """Row checksums (sum of hq + 1e-3·sum of prompt ids) of this host's first local batches."""
    local = config.data.global_batch // jax.process_count()
    ds = pipeline.make_dataset(config.data, seed=config.seed, local_batch=local,
                               tokenizer_dir=os.path.join(base, "tokenizer"), process_index=jax.process_index(),
                               process_count=jax.process_count())
    it = iter(ds)
    out = []
    for _ in range(batches):
        b = next(it)
        out.append([float(np.sum(h, dtype=np.float64) + 1e-3 * np.sum(p)) for h, p in zip(b["hq"], b["prompt_ids"])])
    return out


def main() -> None:
    setup_logging(verbose=False)
    logging.info("worker started")
    args = json.loads(sys.argv[1])
    sharding.maybe_initialize_distributed()
    config = tiny_config(args["images"], args["base"], **args.get("overrides", {}))
    checks = shard_checksums(config, args["base"])
    result = train(config, args["workdir"], stop_after=args.get("stop_after"))
    out = {"process": jax.process_index(), "count": jax.process_count(), "local_devices": jax.local_device_count(),
           "devices": jax.device_count(), "step": result["step"], "stopped": bool(result.get("stopped")),
           "shard": checks}
    with open(args["out"].format(process=jax.process_index()), "w") as f:
        json.dump(out, f)
    print("WORKER-DONE", json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
