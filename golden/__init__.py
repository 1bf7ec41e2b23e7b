"""Golden-vector harnesses (tooling, outside the core `pasd_jax` package).

`golden.harness`: the PASD ControlNet + UNet on a golden set; `golden.e2e`: end-to-end sampling
with every random draw supplied; `golden.stablesr`: the StableSR contract (`--stablesr`). Both read PyTorch-format folders through the converter
(`convert`), which is why they live here: `pasd_jax` itself never imports `convert`, while
`convert` imports `pasd_jax.assembly`. Run as `python -m golden [--e2e] …`, or as before
`python -m pasd_jax.golden [--e2e] …` (a forwarder).
"""
