"""Restore images with PASD (JAX/Flax). `python sample.py --help`; `python sample.py --demo` for a smoke run.

The logic lives in `pasd_jax.sampling.cli` so tests and notebooks can import it. This script sits on
top of both packages and hands the converter's LoRA reader to it (`--lcm-lora`), since `pasd_jax`
never imports `convert`.
"""

import sys

from convert.lora import fuse_lora_file
from pasd_jax.sampling.cli import main

if __name__ == "__main__":
    sys.exit(main(lora_fuser=fuse_lora_file))
