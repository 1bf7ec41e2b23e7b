"""One StableSR training step on the smoke model: finite loss, only SFT + encoder parameters move."""

import jax
import jax.numpy as jnp
import numpy as np

from configs import stablesr as stablesr_config
from pasd_jax.assembly.stablesr import load_stablesr
from pasd_jax.fixtures.stablesr_tiny import make_smoke_model
from pasd_jax.train import stablesr_step
from pasd_jax.train.optim import make_optimizer
from pasd_jax.train.state import TrainState, flat, split


def test_one_step_updates_only_spade_and_encoder(tmp_path):
    config = stablesr_config.get_config("tiny")
    models = load_stablesr(make_smoke_model(tmp_path / "m"))
    params = {k: models.params[k] for k in ("unet", "struct_encoder", "first_stage")}
    trainable, frozen = split(params, config.train.trainable)
    paths = set(flat(trainable))
    assert any("/spade/" in p for p in paths) and any(p.startswith("struct_encoder/") for p in paths)
    assert not any(p.startswith(("first_stage/",)) for p in paths)
    assert all(p.startswith("struct_encoder/") or "/spade/" in p for p in paths)
    tx, lr_fn = make_optimizer(config.optim)
    state = TrainState.create(trainable, tx, seed=0)
    rng = np.random.default_rng(0)
    batch = {k: jnp.asarray(rng.uniform(-1, 1, (2, 64, 64, 3)).astype(np.float32)) for k in ("hq", "lq")}
    step = jax.jit(lambda s, f, b: stablesr_step.train_step(
        s, f, b, models=stablesr_step.SRModels(models.unet, models.struct_encoder, models.first_stage),
        tables=stablesr_step.noise_tables(), context=jnp.asarray(models.context), tx=tx, lr_fn=lr_fn))
    new, metrics = step(state, frozen, batch)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["finite"]) == 1.0
    assert int(new.step) == 1
    before, after = flat(state.params), flat(new.params)
    assert all(np.abs(np.asarray(after[k]) - np.asarray(before[k])).max() > 0 for k in before)
