"""PASD sampling: model loading, the compiled DDIM sampler (ANS, CFG, tiling), tiled VAE, the image pipeline."""
