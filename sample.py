"""Restore images with PASD (JAX/Flax). `python sample.py --help`; `python sample.py --demo` for a smoke run.

The logic lives in `pasd_jax.sampling.cli` so tests and notebooks can import it.
"""

import sys

from pasd_jax.sampling.cli import main

if __name__ == "__main__":
    sys.exit(main())
