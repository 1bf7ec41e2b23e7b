"""Checks of `sample.py`'s flags and output path, all done before any model loads.

Three stages, each cheap:

* parse time: every numeric flag has an argparse `type=` from `int_in` / `float_in` (finite, in
  range), so `--steps 0` or `--guidance-scale nan` is refused by argparse itself;
* after parsing (`check_args`): relations between flags (tile overlap < tile size, `--demo`
  against `--ckpt`, required flags);
* once the noise schedule's length T is known (`check_schedule_flags`, called with the
  scheduler config before the weights load): `--added-noise-level` in [0, T−1], `--steps` ≤ T.

`check_output` refuses an `--output` that cannot receive the planned files (an existing file
where a folder is needed, a path under a regular file, an unwritable folder) without creating
anything. Every refusal is a `UsageError` whose text is one line naming the flag; the CLI prints
it as `error: ...` and exits 2.
"""

from __future__ import annotations

import argparse
import math
import os
import pathlib
from typing import Callable, Optional

MAX_PROCESS_SIZE = 8192   # image px; far above what one accelerator holds at SD resolution
MAX_UPSCALE = 16
MAX_SEED = 2**32 - 1      # jax.random.key takes a uint32 seed without x64
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")


class UsageError(ValueError):
    """A flag value or flag combination that cannot work; the message is one line naming the flag."""


class SampleArgumentParser(argparse.ArgumentParser):
    """argparse with one-line errors: `error: argument --steps: must be an integer ≥ 1, got '0'`."""

    def error(self, message: str):
        self.exit(2, f"error: {message} (see {self.prog} --help)\n")


def _bounds(lo, hi) -> str:
    if lo is not None and hi is not None:
        return f"in [{lo}, {hi}]"
    return f"≥ {lo}" if lo is not None else f"≤ {hi}"


def int_in(lo: Optional[int] = None, hi: Optional[int] = None, hint: str = "") -> Callable[[str], int]:
    """argparse `type=`: an integer in [lo, hi] (either end optional)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer {_bounds(lo, hi)}, got {text!r}") from None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be an integer {_bounds(lo, hi)}, got {text!r}{hint}")
        return value

    parse.__name__ = "integer"
    return parse


def float_in(lo: Optional[float] = None, hi: Optional[float] = None, hint: str = "") -> Callable[[str], float]:
    """argparse `type=`: a finite number in [lo, hi] (either end optional; nan and inf refused)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            raise argparse.ArgumentTypeError(f"must be a number {_bounds(lo, hi)}, got {text!r}{hint}")
        return value

    parse.__name__ = "number"
    return parse


# argparse types of the numeric flags (cli.build_parser uses them).
STEPS = int_in(1)
GUIDANCE = float_in(0.0, hint=" (values ≤ 1 turn guidance off)")
CONDITIONING = float_in(0.0)
NOISE_LEVEL = int_in(0, hint=" (0 or --no-ans turns ANS off)")  # ≤ T−1: check_schedule_flags
ETA = float_in(0.0, 1.0)
SEED = int_in(0, MAX_SEED)
UPSCALE = int_in(1, MAX_UPSCALE)
PROCESS_SIZE = int_in(8, MAX_PROCESS_SIZE)
TILE_SIZE = int_in(1)
TILE_OVERLAP = int_in(0)
TILES_PER_CALL = int_in(1)
MAX_BATCH_SIZE = 1024
BATCH_SIZE = int_in(1, MAX_BATCH_SIZE)


def check_args(args: argparse.Namespace) -> None:
    """Relations between flags that no single `type=` can check. Raises UsageError."""
    if args.tile_overlap >= args.tile_size:
        raise UsageError(f"--tile-overlap ({args.tile_overlap}) must be smaller than --tile-size ({args.tile_size})")
    if args.demo and (args.ckpt or args.base):
        raise UsageError("--demo runs the built-in smoke model; drop --ckpt/--base (or drop --demo)")
    if not args.demo and not args.ckpt:
        raise UsageError("--ckpt is required (or --demo for the built-in smoke model)")
    if not args.demo and (not args.input or not args.output):
        raise UsageError("--input and --output are required")


def check_schedule_flags(args: argparse.Namespace, num_train_timesteps: int, source: str = "") -> None:
    """`--added-noise-level` in [0, T−1] and `--steps` ≤ T for a schedule of T training steps."""
    where = f" (T = {num_train_timesteps}{' from ' + source if source else ''})"
    if not args.no_ans and args.added_noise_level > num_train_timesteps - 1:
        raise UsageError(f"--added-noise-level must be in [0, {num_train_timesteps - 1}], got "
                         f"{args.added_noise_level}{where}")
    if args.steps is not None and args.steps > num_train_timesteps:
        raise UsageError(f"--steps must be ≤ {num_train_timesteps}, got {args.steps}{where}")


def _nearest_existing(path: pathlib.Path) -> pathlib.Path:
    path = path.absolute()
    while not os.path.lexists(path) and path != path.parent:
        path = path.parent
    return path


def _check_creatable_dir(folder: pathlib.Path) -> None:
    """`folder` is a writable directory or can be created (nothing is created here)."""
    if folder.is_dir():
        if not os.access(folder, os.W_OK | os.X_OK):
            raise UsageError(f"--output: folder {str(folder)!r} is not writable")
        return
    if os.path.lexists(folder):
        raise UsageError(f"--output: {str(folder)!r} is a file, not a folder")
    anchor = _nearest_existing(folder)
    if not anchor.is_dir():
        raise UsageError(f"--output: cannot create {str(folder)!r}: {str(anchor)!r} is a file, not a folder")
    if not os.access(anchor, os.W_OK | os.X_OK):
        raise UsageError(f"--output: cannot create {str(folder)!r}: folder {str(anchor)!r} is not writable")


def check_output(output: str, *, single_file: bool) -> None:
    """Refuse an `--output` that cannot receive the results, before any work; creates nothing.

    single_file: the input is one file (then `--output x.png` names the image itself).
    """
    out = pathlib.Path(output)
    names_image = out.suffix.lower() in IMAGE_SUFFIXES
    if single_file and names_image and not out.is_dir():
        _check_creatable_dir(out.parent if str(out.parent) else pathlib.Path("."))
        return
    if out.is_file():
        what = "one input file needs an image path (.png, .jpg, .webp) or a folder" if single_file \
            else "a folder input needs an output folder"
        raise UsageError(f"--output {str(out)!r} is an existing file; {what}")
    if names_image and not single_file and not out.exists():
        raise UsageError(f"--output {str(out)!r} looks like an image file, but --input is a folder; "
                         f"name an output folder")
    _check_creatable_dir(out)
