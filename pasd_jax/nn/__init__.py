"""Flax building blocks mirroring diffusers' SD modules (NHWC, `setup()` names = torch names)."""
