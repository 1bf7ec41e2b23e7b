"""Train PASD: `python train.py --config configs/realisr.py[:variant] --workdir runs/x [--config.a.b=v]`.

A thin absl entry point over `pasd_jax.train.loop.train`; rerunning the same command resumes from
the workdir's newest checkpoint. See the config file's docstring for the launch commands and
README "Training" for the workdir layout.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "Training config file (configs/realisr.py[:variant]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, config.json, metrics.jsonl, val/, export/.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    logging.set_verbosity(logging.INFO)
    from pasd_jax.train.loop import train  # imported after flag parsing (jax start-up is slow)

    result = train(_CONFIG.value, _WORKDIR.value)
    logging.info("finished at step %d; export: %s", result["step"], result["export"])


if __name__ == "__main__":
    app.run(main)
