"""One StableSR training step: finite loss, only the SFT + time-aware-encoder parameters move."""

import jax
import jax.numpy as jnp
import numpy as np

from configs import stablesr as stablesr_config
from pasd_jax.assembly.paths import flatten
from pasd_jax.assembly.stablesr import abstract_params, build_module
from pasd_jax.train import stablesr_step
from pasd_jax.train.optim import make_optimizer
from pasd_jax.train.state import TrainState, split

# Two-level networks (the step does not care about depth; compiling its gradient is the cost).
CONFIGS = {
    "unet": {"block_out_channels": [32, 32], "layers_per_block": 1, "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
             "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"], "attention_head_dim": [2, 2],
             "cross_attention_dim": 16, "use_linear_projection": True, "semb_channels": 8},
    "struct_encoder": {"model_channels": 32, "out_channels": 8, "num_res_blocks": 1, "attention_resolutions": [1],
                       "channel_mult": [1, 1], "num_heads": 2},
    "first_stage": {"block_out_channels": [32, 32], "layers_per_block": 1, "latent_channels": 4},
}


def _random(tree, rng):
    return jax.tree_util.tree_map(lambda s: (0.2 * rng.standard_normal(s.shape)).astype(np.float32), tree)


def test_one_step_updates_only_spade_and_encoder():
    config = stablesr_config.get_config("tiny")
    rng = np.random.default_rng(0)
    modules = {k: build_module(k, c) for k, c in CONFIGS.items()}
    params = {k: _random(abstract_params(m), rng) for k, m in modules.items()}
    trainable, frozen = split(params, config.train.trainable)
    paths = set(flatten(trainable, sep="/"))
    assert any("/spade/" in p for p in paths) and any(p.startswith("struct_encoder/") for p in paths)
    assert all(p.startswith("struct_encoder/") or "/spade/" in p for p in paths)
    tx, lr_fn = make_optimizer(config.optim)
    state = TrainState.create(trainable, tx, seed=0)
    batch = {k: jnp.asarray(rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)) for k in ("hq", "lq")}
    models = stablesr_step.SRModels(modules["unet"], modules["struct_encoder"], modules["first_stage"])
    step = jax.jit(lambda s, f, b: stablesr_step.train_step(
        s, f, b, models=models, tables=stablesr_step.noise_tables(), context=jnp.zeros((1, 7, 16)), tx=tx,
        lr_fn=lr_fn))
    new, metrics = step(state, frozen, batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["finite"]) == 1.0 and int(new.step) == 1
    before, after = flatten(state.params, sep="/"), flatten(new.params, sep="/")
    moved = [k for k in before if np.abs(np.asarray(after[k]) - np.asarray(before[k])).max() > 0]
    assert len(moved) == len(before), sorted(set(before) - set(moved))[:5]
