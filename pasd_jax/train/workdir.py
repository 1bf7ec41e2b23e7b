"""The workdir's records across starts: per-start configs, resume config diff, metrics rows.

* `record_start`: `config.json` is the config of the newest start; `config.<step>.json` keeps the
  config each start began with (step 0 for a fresh run) and is never overwritten (a second start
  at the same step with a different config gets `config.<step>.<n>.json`).
* `check_resume`: on resume, compares the new config with the previous start's, logs every
  changed field, and refuses (ConfigError) changes the checkpoint cannot follow — the model, the
  base weights, the trainable set, gradient accumulation, the seed (RESUME_FIXED) — unless
  `allow` (`train.py --allow_config_change`).
* `truncate_metrics`: on resume from step N, drops `metrics.jsonl` rows past N (steps a killed run
  logged after its last checkpoint, which the resumed run logs again) and duplicate rows, so the
  file has one row per step after any interruption.
"""

from __future__ import annotations

import json
import logging
import os
import re
from typing import Any

from pasd_jax.train.config_check import ConfigError

log = logging.getLogger(__name__)

#: Dotted config prefixes that a checkpoint cannot be resumed across.
RESUME_FIXED = ("model.", "base", "init_from", "train.trainable", "optim.grad_accum", "optim.clip_norm", "seed")
_START = re.compile(r"^config\.(\d+)(?:\.(\d+))?\.json$")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def config_changes(old: dict, new: dict) -> list[tuple[str, Any, Any]]:
    """[(dotted field, old value, new value)] for every field that differs (missing = None)."""
    a, b = _flat(old), _flat(new)
    norm = lambda v: json.loads(json.dumps(v))  # noqa: E731 - tuples vs lists
    return [(k, a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if norm(a.get(k)) != norm(b.get(k))]


def _starts(workdir: str) -> list[tuple[int, int, str]]:
    out = []
    for name in os.listdir(workdir) if os.path.isdir(workdir) else ():
        m = _START.match(name)
        if m:
            out.append((int(m.group(1)), int(m.group(2) or 0), os.path.join(workdir, name)))
    return sorted(out)


def previous_config(workdir: str) -> dict | None:
    """The config the previous start began with (newest `config.<step>.json`, else `config.json`)."""
    starts = _starts(workdir)
    path = starts[-1][2] if starts else os.path.join(workdir, "config.json")
    if not os.path.isfile(path):
        return None
    with open(path) as f:
        return json.load(f)


def check_resume(workdir: str, config_json: dict, step: int, *, allow: bool = False) -> list:
    """Log the fields changed since the previous start; ConfigError for RESUME_FIXED ones unless
    `allow`. Returns the changes."""
    old = previous_config(workdir)
    if old is None:
        return []
    changes = config_changes(old, config_json)
    for key, a, b in changes:
        log.warning("config changed since the previous start: %s: %r -> %r", key, a, b)
    fixed = [k for k, _, _ in changes if any(k == p.rstrip(".") or k.startswith(p) for p in RESUME_FIXED)]
    if fixed and not allow:
        raise ConfigError(f"cannot resume the checkpoint of step {step} in {workdir} with changed "
                          f"{', '.join(fixed)}; use a new --workdir, undo the change, or pass --allow_config_change")
    return changes


def record_start(workdir: str, config_json: dict, step: int) -> str:
    """Write `config.json` and this start's `config.<step>.json` (see module doc); returns the latter."""
    text = json.dumps(config_json, indent=2, sort_keys=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(text)
    path, n = os.path.join(workdir, f"config.{step}.json"), 0
    while os.path.exists(path):
        with open(path) as f:
            if f.read() == text:
                return path
        n += 1
        path = os.path.join(workdir, f"config.{step}.{n}.json")
    with open(path, "w") as f:
        f.write(text)
    return path


def truncate_metrics(workdir: str, step: int) -> int:
    """Keep the first row of each step ≤ `step` in `metrics.jsonl` (atomically); returns rows dropped."""
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return 0
    kept, seen, dropped = [], set(), 0
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            try:
                row_step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):  # a torn last line of a killed run
                dropped += 1
                continue
            if row_step > step or row_step in seen:
                dropped += 1
                continue
            seen.add(row_step)
            kept.append(line if line.endswith("\n") else line + "\n")
    if dropped:
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(kept)
        os.replace(tmp, path)
        log.info("metrics.jsonl: dropped %d rows past the resumed step %d", dropped, step)
    return dropped
