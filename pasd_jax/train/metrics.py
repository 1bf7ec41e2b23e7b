"""Training metrics to the log (one line per logged step), a JSONL file in the workdir, and
TensorBoard when installed.

One JSON object per step: {"step", "loss", "mse", "dr_l1", …, "lr"} and, on logged steps,
"step_time_s", "images_per_s", "data_wait_share". Only process 0 writes. TensorBoard uses
`tensorboardX` or `torch.utils.tensorboard` if either imports (neither is a dependency);
otherwise one log line says it is off and why.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import jax

log = logging.getLogger(__name__)


def _summary_writer(logdir: str):
    """A TensorBoard SummaryWriter, or None after one log line saying why."""
    reasons = []
    for module in ("tensorboardX", "torch.utils.tensorboard"):
        try:
            mod = __import__(module, fromlist=["SummaryWriter"])
            return mod.SummaryWriter(logdir)
        except Exception as err:  # noqa: BLE001 - absent or broken (torch without tensorboard)
            reasons.append(f"{module}: {type(err).__name__}")
    log.info("TensorBoard logging is off (%s); `pip install tensorboardX` turns it on; metrics.jsonl has "
             "every logged step", "; ".join(reasons))
    return None


class MetricWriter:
    """Appends metrics to `workdir/metrics.jsonl`, prints a line, mirrors to TensorBoard."""

    def __init__(self, workdir: str, tensorboard: bool = True):
        self.active = jax.process_index() == 0
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._tb = _summary_writer(os.path.join(workdir, "tb")) if (self.active and tensorboard) else None

    def write(self, step: int, values: dict[str, Any], echo: bool = True) -> None:
        """Append the row of `step`; `echo` also logs it (the loop echoes only the logged step)."""
        if not self.active:
            return
        row = {"step": int(step), **{k: float(v) for k, v in values.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
        shown = " ".join(f"{k}={row[k]:.4g}" for k in ("loss", "mse", "dr_l1", "lr", "step_time_s", "images_per_s",
                                                        "data_wait_share") if k in row)
        if echo:
            log.info("step %d %s", step, shown)
        if self._tb is not None:
            for k, v in row.items():
                if k != "step":
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


def read_metrics(workdir: str) -> dict[int, dict]:
    """step -> the last row logged for it (a resumed run may log a step twice)."""
    out = {}
    path = os.path.join(workdir, "metrics.jsonl")
    if os.path.isfile(path):
        with open(path) as f:
            for line in f:
                if line.strip():
                    row = json.loads(line)
                    out[row["step"]] = row
    return out
