"""Device mesh, parameter sharding by path rules, batch sharding, multi-host start-up.

Mirrors big_vision's `sharding.py`: models carry no sharding code; a list of (regex, spec) rules
on "component/…/leaf" paths decides each array's `PartitionSpec` (first match wins):

* "replicate": fully replicated;
* "fsdp": the largest dimension divisible by the `fsdp` axis size is split over it.

Unmatched arrays with at least `fsdp_min_size` elements get "fsdp", the rest are replicated.
Optimiser-state leaves (Adam's μ and ν) have the parameter path inside theirs, so the same
rules shard them like their parameter. The batch is split over ("data", "fsdp") together;
`per_example` runs a per-example batch function (the device degradation) on each device's slice.
The mesh uses Auto axis types (a plain `Mesh`), not the Explicit default of `jax.make_mesh`.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from pasd_jax.assembly import paths

log = logging.getLogger(__name__)
AXES = ("data", "fsdp")
BATCH_SPEC = P(AXES)


def maybe_initialize_distributed() -> None:
    """`jax.distributed.initialize()` when the environment describes a multi-process job.

    Triggers on a coordinator address (JAX_COORDINATOR_ADDRESS, with JAX_NUM_PROCESSES and
    JAX_PROCESS_ID for a hand-started local job, README "Training"), SLURM with >1 tasks, or a
    multi-host TPU slice (TPU_WORKER_HOSTNAMES with several hosts); otherwise a no-op. CPU
    collectives use gloo (`jax_cpu_collectives_implementation`), so a CPU-only multi-process run
    (the tests) can all-reduce across processes.
    """
    env = os.environ
    multi = (bool(env.get("JAX_COORDINATOR_ADDRESS"))
             or int(env.get("SLURM_NTASKS", "1") or 1) > 1
             or len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1)
    if not multi or jax.distributed.is_initialized():
        return
    if not jax.config.values.get("jax_cpu_collectives_implementation"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs = {}
    if env.get("JAX_COORDINATOR_ADDRESS") and env.get("JAX_NUM_PROCESSES"):
        kwargs = dict(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                      num_processes=int(env["JAX_NUM_PROCESSES"]), process_id=int(env.get("JAX_PROCESS_ID", "0")))
    jax.distributed.initialize(**kwargs)
    log.info("jax.distributed: process %d of %d, %d local / %d global devices", jax.process_index(),
             jax.process_count(), jax.local_device_count(), jax.device_count())


def barrier(name: str, timeout_s: float = 3600.0) -> None:
    """Wait until every process reaches `name` (the coordination service's barrier, no device
    collective); a no-op in a single-process run."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the client of `jax.distributed.initialize` (no public handle)

    distributed.global_state.client.wait_at_barrier(name, int(timeout_s * 1000))


def make_mesh(data: int = -1, fsdp: int = 1, devices: Sequence[Any] | None = None) -> Mesh:
    """A ("data", "fsdp") mesh over all devices; -1 for `data` takes what `fsdp` leaves."""
    devices = list(devices if devices is not None else jax.devices())
    n = len(devices)
    if data == -1:
        if n % fsdp:
            raise ValueError(f"mesh.fsdp={fsdp} does not divide the {n} devices")
        data = n // fsdp
    if data * fsdp != n:
        raise ValueError(f"mesh data×fsdp = {data}×{fsdp} != {n} devices")
    try:
        from jax.experimental import mesh_utils

        grid = mesh_utils.create_device_mesh((data, fsdp), devices)
    except Exception:  # noqa: BLE001 - fake CPU devices or odd topologies: plain order is fine
        grid = np.asarray(devices).reshape(data, fsdp)
    return Mesh(grid, AXES)


def spec_for(path: str, shape: tuple[int, ...], fsdp_size: int, rules: Sequence[tuple[str, str]],
             min_size: int) -> P:
    """The PartitionSpec of one array (see module doc)."""
    kind = None
    for pattern, rule in rules:
        if re.search(pattern, path):
            kind = rule
            break
    if kind is None:
        kind = "fsdp" if int(np.prod(shape, dtype=np.int64)) >= min_size else "replicate"
    if kind == "replicate" or fsdp_size == 1 or not shape:
        return P()
    if kind != "fsdp":
        raise ValueError(f"unknown sharding rule {kind!r} for {path}; expected 'fsdp' or 'replicate'")
    candidates = [i for i, d in enumerate(shape) if d % fsdp_size == 0]
    if not candidates:
        return P()
    axis = max(candidates, key=lambda i: (shape[i], i))
    return P(*[("fsdp" if i == axis else None) for i in range(len(shape))])


def tree_shardings(tree: Any, mesh: Mesh, rules: Sequence[tuple[str, str]] = (), min_size: int = 2**20) -> Any:
    """NamedShardings for every array leaf of `tree` (arrays or ShapeDtypeStructs)."""
    fsdp_size = mesh.shape["fsdp"]

    def one(path, leaf):
        return NamedSharding(mesh, spec_for(paths.key_path_str(path), tuple(getattr(leaf, "shape", ())), fsdp_size,
                                            rules, min_size))

    return jax.tree_util.tree_map_with_path(one, tree)


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis over ("data", "fsdp")."""
    return NamedSharding(mesh, BATCH_SPEC)


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, P())


def global_batch(local: dict, mesh: Mesh) -> dict:
    """Host-local numpy batch (nested dicts allowed) -> global jax.Arrays sharded over the batch
    axes (multi-host safe)."""
    sharding = batch_sharding(mesh)
    return jax.tree_util.tree_map(lambda v: jax.make_array_from_process_local_data(sharding, np.asarray(v)), local)


def per_example(fn, mesh: Mesh):
    """`fn(batch) -> batch` (pytrees whose leaves all lead with the batch axis, examples
    independent) jitted as a `shard_map` over the batch axes: each device transforms its own
    examples, no collective, and the output keeps the batch sharding."""
    sh = batch_sharding(mesh)
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=BATCH_SPEC, out_specs=BATCH_SPEC)
    return jax.jit(mapped, in_shardings=sh, out_shardings=sh)


def put(tree: Any, shardings: Any) -> Any:
    """Place a host tree (numpy) on devices with the given shardings."""
    return jax.tree_util.tree_map(lambda x, s: jax.make_array_from_callback(
        np.shape(x), s, lambda idx, x=x: np.asarray(x)[idx]), tree, shardings)
