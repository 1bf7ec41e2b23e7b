"""pasd-jax: a JAX/Flax port of PASD (Pixel-Aware Stable Diffusion, ECCV 2024).

Sub-packages: `nn` (building blocks mirroring diffusers), `models` (UNet, ControlNet, VAE, CLIP text),
`diffusion` (schedules and samplers), `train` and `data`. PyTorch checkpoints are ported by the
top-level `convert` package.
"""

__version__ = "0.1.0"
