"""Command line of `train.py`: flags, config checks, logging set-up, exit statuses.

    python train.py --config configs/realisr.py[:VARIANT,…] --workdir runs/NAME [--config.FIELD=VALUE …]

Behaviour (README "Training"):

* Mistakes in the command or the config (missing `--config`/`--workdir`, an unknown
  `--config.FIELD` with a did-you-mean, a bad value, missing data or base folders) print one
  `error:` line and exit 2 before anything is loaded or created; `--print_config` prints the
  resolved config and exits 0 without touching the workdir.
* A start that fails before its first checkpoint removes the workdir it created.
* SIGTERM (or a preemption notice) checkpoints the current step and ends with "stopped at step N,
  checkpoint saved, rerun the same command to resume" and exit status 3 (`EXIT_STOPPED`); a
  finished run exits 0; other expected failures print one `error:` line and exit 1.
* Orbax / absl INFO lines are hidden unless `--verbose`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import sys
from collections.abc import Sequence

from pasd_jax.train.config_check import ConfigError, check_overrides, validate

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_STOPPED = 0, 1, 2, 3

HELP = """\
usage: python train.py --config FILE[:VARIANTS] --workdir DIR [--config.FIELD=VALUE ...] [options]

Train PASD (ControlNet + PACA on a frozen SD1.5 UNet). Rerunning the same command resumes from the
workdir's newest intact checkpoint.

required:
  --config FILE[:VARIANTS]  training config, e.g. configs/realisr.py or configs/realisr.py:tiny
                            (variants: light, rrdb, color, tiny; combine with commas)
  --workdir DIR             run folder: config.json, config.<step>.json, metrics.jsonl, val/,
                            checkpoints/, export/

options:
  --config.FIELD=VALUE      override one config field, e.g. --config.optim.lr=1e-5
                            --config.data.paths='("data/hq",)'  (unknown fields are an error)
  --print_config            print the resolved config (after overrides) and exit
  --allow_config_change     resume even when fields that the checkpoint depends on changed
  --verbose                 also show orbax/absl INFO logs and full tracebacks
  -h, --help                this help

exit status: 0 finished; 1 failed (one error: line); 2 command or config mistake (nothing created);
3 stopped by SIGTERM/preemption after saving a checkpoint (rerun the same command to resume).
"""


def _config_spec(argv: Sequence[str]) -> str | None:
    for i, arg in enumerate(argv):
        if arg.startswith(("--config=", "-config=")):
            return arg.split("=", 1)[1]
        if arg in ("--config", "-config") and i + 1 < len(argv):
            return argv[i + 1]
    return None


def load_config_file(spec: str):
    """`FILE[:ARG]` -> `get_config(ARG)` of that file (ConfigError naming the file otherwise)."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"--config: config file {path!r} not found")
    try:
        module_spec = importlib.util.spec_from_file_location("pasd_train_config", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module.get_config(arg or None) if arg else module.get_config()
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - any mistake in the file or the variant string
        raise ConfigError(f"--config {spec}: {type(err).__name__}: {_first_line(err)}") from err


def _first_line(err: BaseException) -> str:
    text = str(err).strip() or type(err).__name__
    if len(text) > 1 and text[0] == text[-1] and text[0] in "'\"":  # KeyError/AttributeError reprs
        text = text[1:-1].replace("\\n", "\n")
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def parse_args(argv: Sequence[str]):
    """(config, workdir, options) from argv; ConfigError for every usage or config mistake."""
    from absl import flags
    from ml_collections import config_flags

    spec = _config_spec(argv[1:])
    if not spec:
        raise ConfigError("--config is required (e.g. --config configs/realisr.py:tiny); see --help")
    check_overrides(load_config_file(spec), argv[1:])
    fv = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "training config", flag_values=fv, lock_config=True,
                                    sys_argv=list(argv))
    flags.DEFINE_string("workdir", None, "run folder", flag_values=fv)
    flags.DEFINE_bool("print_config", False, "print the resolved config and exit", flag_values=fv)
    flags.DEFINE_bool("allow_config_change", False, "resume despite checkpoint-relevant changes", flag_values=fv)
    flags.DEFINE_bool("verbose", False, "orbax/absl INFO logs and tracebacks", flag_values=fv)
    try:
        rest = fv(list(argv))
    except Exception as err:  # noqa: BLE001 - absl / ml_collections parse errors of any type
        raise ConfigError(_first_line(err)) from err
    if len(rest) > 1:
        raise ConfigError(f"unexpected arguments: {' '.join(rest[1:])}")
    config = fv.config
    if fv.print_config:
        return config, fv.workdir, fv
    if not fv.workdir:
        raise ConfigError("--workdir is required (the run folder; rerunning with it resumes); see --help")
    if os.path.exists(fv.workdir) and not os.path.isdir(fv.workdir):
        raise ConfigError(f"--workdir {fv.workdir!r} exists and is not a folder")
    validate(config)
    return config, fv.workdir, fv


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is at the time (pytest swaps it)."""

    def __init__(self):
        super().__init__()
        self.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S"))

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


def setup_logging(verbose: bool) -> None:
    """One stream of `time level message` lines; orbax/absl INFO only with `verbose`."""
    from absl import logging as absl_logging

    root = logging.getLogger()
    root.removeHandler(absl_logging.get_absl_handler())  # absl's own handler would print every line twice
    for handler in list(root.handlers):  # and so would a `basicConfig` handler some library installed
        if type(handler) is logging.StreamHandler:
            root.removeHandler(handler)
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        root.addHandler(_StderrHandler())
    root.setLevel(logging.INFO)
    quiet = logging.INFO if verbose else logging.WARNING
    absl_logging.set_verbosity(quiet)
    for name in ("absl", "orbax", "jax", "grain"):
        logging.getLogger(name).setLevel(quiet)


def _has_checkpoint(workdir: str) -> bool:
    ckpt = os.path.join(workdir, "checkpoints")
    return os.path.isdir(ckpt) and any(d.isdigit() for d in os.listdir(ckpt))


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv if argv is None else argv)
    if any(a in ("-h", "--help", "-help", "--helpfull", "--helpshort") for a in argv[1:]):
        print(HELP, end="")
        return EXIT_OK
    try:
        config, workdir, opts = parse_args(argv)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if opts.print_config:
        print(config)
        return EXIT_OK
    setup_logging(opts.verbose)
    created = not os.path.exists(workdir)
    from pasd_jax.train.loop import train  # jax start-up is slow: only after the arguments are good

    try:
        result = train(config, workdir, allow_config_change=opts.allow_config_change)
    except (ConfigError, OSError, ValueError, RuntimeError, FloatingPointError, KeyboardInterrupt) as err:
        if created and not _has_checkpoint(workdir):
            shutil.rmtree(workdir, ignore_errors=True)  # a failed first start leaves nothing behind
        if opts.verbose:
            raise
        if isinstance(err, KeyboardInterrupt):
            print("error: interrupted", file=sys.stderr)
            return EXIT_FAILED
        if isinstance(err, ConfigError):
            print(f"error: {_first_line(err)}", file=sys.stderr)
            return EXIT_USAGE
        kind = "" if isinstance(err, OSError) else f"{type(err).__name__}: "
        print(f"error: {kind}{_first_line(err)} (--verbose shows the traceback)", file=sys.stderr)
        return EXIT_FAILED
    if result.get("stopped"):
        print(f"stopped at step {result['step']}, checkpoint saved, rerun the same command to resume", flush=True)
        return EXIT_STOPPED
    print(f"finished at step {result['step']}; export: {result['export']}", flush=True)
    return EXIT_OK
