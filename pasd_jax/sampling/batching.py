"""Folder runs in batches and over processes: which images go together, and who does which file.

`sample.py --batch-size N` streams a folder: each image is loaded and pre-processed, then waits in
the group of its processed size; a group that reaches N images is restored in one compiled call
(`Restorer.restore_batch`) and written. At the end the partial groups run padded to the same call
size, so a folder of same-size images compiles once whatever its length. The call size is N
rounded up to a multiple of the local device count, so the image axis splits evenly over the
"data" mesh axis (`Sampler.mesh_for`); padding images are dropped.

In a multi-process job (`jax.process_count() > 1`: SLURM, a TPU slice, or the JAX_COORDINATOR_ADDRESS
variables of README "Sampling on several processes") `process_share` gives process p the files
p, p + P, p + 2P, … of the sorted list: the shares are disjoint and cover every file, so no two
processes ever write the same output, and each process batches its own share on its own devices.

    batcher = SizeBatcher(batch_size=8)
    for item in items:
        for group in batcher.add(item.shape, item):
            run(group)
    for group in batcher.flush():
        run(group)
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, TypeVar

T = TypeVar("T")


def process_share(items: Sequence[T], index: int, count: int) -> list[T]:
    """Process `index` of `count`'s part of `items`: every count-th item starting at `index`."""
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"process index {index} is not in [0, {count})")
    return list(items[index::count])


def call_size(batch_size: int, n_devices: int) -> int:
    """Images per compiled call: `batch_size`, rounded up to a multiple of the device count when it
    is above 1 (a batch of 1 keeps all devices on one image's tiles)."""
    if batch_size < 1 or n_devices < 1:
        raise ValueError(f"batch size and device count must be ≥ 1, got {batch_size}, {n_devices}")
    if batch_size == 1:
        return 1
    return math.ceil(batch_size / n_devices) * n_devices


class SizeBatcher:
    """Groups items by a key (the processed image shape) into batches of at most `batch_size`,
    in arrival order within each group."""

    def __init__(self, batch_size: int):
        if batch_size < 1:
            raise ValueError(f"batch size must be ≥ 1, got {batch_size}")
        self.batch_size = batch_size
        self._groups: dict[Any, list] = {}

    def add(self, key: Any, item: T) -> Iterator[list[T]]:
        """Queue `item` under `key`; yields the group when it is full."""
        group = self._groups.setdefault(key, [])
        group.append(item)
        if len(group) >= self.batch_size:
            del self._groups[key]
            yield group

    def flush(self) -> Iterator[list[T]]:
        """The remaining (partial) groups, oldest key first."""
        groups, self._groups = self._groups, {}
        yield from groups.values()

    @property
    def pending(self) -> int:
        """Items queued and not yet yielded."""
        return sum(len(g) for g in self._groups.values())
