"""Model assembly: from stored files to ready-to-run networks (below `sampling` and `train`).

* `weights`: converted-folder I/O (`config.json` + `flax_params.safetensors`, atomic writes);
* `paths`: the one parameter-tree flatten / unflatten helper;
* `registry`: a diffusers/transformers `config.json` -> our Flax module, UNet family detection;
* `home`: the models home (`$PASD_JAX_HOME`), named SD bases, the PASD/base UNet weight swap;
* `tokenizer`: the offline CLIP tokenizer;
* `bundle`: `PASDBundle`, the networks + schedule (+ params) that sampling, training,
  validation, the golden harnesses and the benchmarks all run;
* `loader`: `load_models`, a converted PASD checkpoint (+ base) -> `PASDBundle`;
* `init`: seeded fresh weights and zero convolutions (PACA / DR-net init, the smoke model);
* `defaults`: SD1.5 defaults (the DDIM scheduler config).

Depends on `pasd_jax.models` (networks only) and `pasd_jax.diffusion`; never on `convert`,
torch, `sampling` or `train`.
"""
