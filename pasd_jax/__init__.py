"""pasd-jax: a JAX/Flax port of PASD (Pixel-Aware Stable Diffusion, ECCV 2024).

Sub-packages: `nn` (building blocks mirroring diffusers), `models` (UNet, ControlNet, VAE, CLIP text),
`diffusion` (schedules and samplers), `train` and `data`. PyTorch checkpoints are ported by the
top-level `convert` package.

Importing the package sets the project's XLA:CPU defaults (`pasd_jax.perf.xla_cpu`; opt out with
PASD_JAX_XLA_DEFAULTS=0).
"""

from pasd_jax.perf import xla_cpu as _xla_cpu

_xla_cpu.apply_defaults()

__version__ = "0.1.0"
