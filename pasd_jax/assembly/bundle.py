"""`PASDBundle`: the four PASD networks, their noise schedule and (when loaded) their weights.

One type for everything that runs the networks: the sampler (`pasd_jax.sampling`), the training
step and its validation sampler (`pasd_jax.train`), the golden harnesses and the benchmarks. It
mirrors what PASD's scripts hold after loading (PASD_REFERENCE §6, §7.1): `UNet2DConditionModel`
(PASD family), `ControlNetModel` with the DR net, `AutoencoderKL`, `CLIPTextModel`, a tokenizer
and a `DDIMScheduler`.

`params` maps "unet", "controlnet", "vae", "text_encoder" to bare Flax parameter trees, or is
None when the weights travel separately (training keeps them in its `TrainState` and passes
them to every call). Compared and hashed by identity, so a bundle can key caches and ride in
`functools.partial` around a jitted function.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Optional

from pasd_jax.diffusion.schedule import NoiseSchedule

COMPONENTS = ("unet", "controlnet", "vae", "text_encoder")


@dataclasses.dataclass(frozen=True, eq=False)
class PASDBundle:
    """Networks (static Flax modules) + schedule, optional params / tokenizer, and provenance.

    family: the UNet family ("pasd" / "pasd_light"; "stock" for a plain SD benchmark UNet).
    source: where it came from (a folder, "training", "random"). smoke: True for the tiny
    built-in model (random weights). scheduler_config: the raw diffusers scheduler config every
    sampler scheduler is built from (`pasd_jax.diffusion.make_scheduler`; None: DDIM from
    `schedule` only). default_scheduler: the CLI name of the scheduler the folders ask for.
    """

    unet: Any
    controlnet: Any
    vae: Any
    text_encoder: Any
    schedule: NoiseSchedule
    params: Optional[dict] = None
    tokenizer: Any = None
    family: str = ""
    source: str = ""
    smoke: bool = False
    scheduler_config: Optional[dict] = None
    default_scheduler: str = "ddim"

    @property
    def latent_downscale(self) -> int:
        """Image side / latent side (8 for SD)."""
        return self.vae.downscale

    @property
    def scaling_factor(self) -> float:
        """The VAE latent scaling factor (0.18215 for SD1.5)."""
        return float(self.vae.scaling_factor)
