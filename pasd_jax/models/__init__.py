"""Full models: PASD UNet, PASD ControlNet, AutoencoderKL, CLIP text encoder."""
