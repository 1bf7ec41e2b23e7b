"""Train PASD: `python train.py --config configs/realisr.py[:variant] --workdir runs/x [--config.a.b=v]`.

A thin entry point over `pasd_jax.train.cli.main` (flags, config checks, exit statuses) and
`pasd_jax.train.loop.train`; rerunning the same command resumes from the workdir's newest intact
checkpoint. `python train.py --help` lists the flags; README "Training" describes the workdir.
"""

import sys

from pasd_jax.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
