"""Per-step progress from inside the compiled denoising scan.

With `SamplerSettings(progress=True)` the scan body calls `jax.debug.callback(emit, i)` once per
step. `emit` is one module-level function, so the compiled program never changes (no retrace, no
recompile) when a different listener is installed: the listener is looked up on the host at call
time. Without a listener `emit` does nothing. The callback is not ordered and returns nothing, so
the device never waits on the host for a result; benchmarks keep `progress=False` (the default),
which leaves the callback out of the program entirely.

    with progress.listen(progress.StepBar(total=20, desc="photo.png")):
        sampler(inputs)             # the bar advances step by step, with tqdm's rate and ETA
"""

from __future__ import annotations

import contextlib
import sys
import threading
from typing import Callable, Iterator, Optional

import numpy as np
from tqdm import tqdm

_lock = threading.Lock()
_listener: Optional[Callable[[int], None]] = None


def emit(step) -> None:
    """Host side of the in-scan callback: tell the current listener that step `step` (0-based) ran."""
    listener = _listener
    if listener is not None:
        listener(int(np.asarray(step)))


@contextlib.contextmanager
def listen(listener: Callable[[int], None]) -> Iterator[Callable[[int], None]]:
    """Install `listener(step)` for the compiled calls made inside the block (one at a time)."""
    global _listener
    with _lock:
        previous, _listener = _listener, listener
    try:
        yield listener
    finally:
        with _lock:
            _listener = previous
        close = getattr(listener, "close", None)
        if close is not None:
            close()


class StepBar:
    """A tqdm bar of `total` denoising steps (rate and ETA from tqdm); `leave=False` so that a folder
    run keeps one line per image. Steps may arrive from several tile/batch calls: the bar shows the
    highest step seen, so it never runs backwards."""

    def __init__(self, total: int, desc: str = "", file=sys.stderr, disable: bool = False):
        self.total = total
        self._bar = tqdm(total=total, desc=desc, unit="step", leave=False, file=file, disable=disable)

    def __call__(self, step: int) -> None:
        done = min(step + 1, self.total)
        if done > self._bar.n:
            self._bar.update(done - self._bar.n)

    @property
    def steps_done(self) -> int:
        return self._bar.n

    def close(self) -> None:
        self._bar.close()
