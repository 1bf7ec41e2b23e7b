"""Networks only: PASD UNet (stock / pasd / pasd_light, shared `sd_trunk`), PASD ControlNet + DR
net, AutoencoderKL, CLIP text encoder, and `configs` (how each network's `from_config` reads a
diffusers/transformers config dict). Loading, storage and defaults are in `pasd_jax.assembly`;
fixture configs (smoke model, SD1.5 sizes) in `pasd_jax.fixtures`."""
