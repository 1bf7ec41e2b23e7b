"""`python -m pasd_jax.golden [--e2e | --stablesr] GOLDEN_DIR OUT_DIR …`: forwards to the `golden` harness.

The golden harnesses read PyTorch-format folders through the converter, so they live in the
top-level `golden` package (`golden.harness`, `golden.e2e`); `convert` imports `pasd_jax`, and
`pasd_jax` must not import `convert` back. This module keeps the documented command working
without that import: run as `__main__` it executes `golden`'s `__main__` with `runpy` (same
arguments, output and exit status as `python -m golden`), and imported it does nothing at all —
`import pasd_jax.golden` loads neither `golden` nor `convert`. (A re-export such as
`from golden.harness import *` would recreate the pasd_jax → convert import; runpy does not.)
"""

import runpy

if __name__ == "__main__":
    runpy.run_module("golden", run_name="__main__", alter_sys=True)
