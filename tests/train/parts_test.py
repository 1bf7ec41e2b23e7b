"""Fast unit tests of the training parts: losses vs torch, trainable split, sharding rules, optimiser."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import common, realisr
from pasd_jax.train import losses, sharding
from pasd_jax.train.optim import make_optimizer
from pasd_jax.train.state import merge, split, trainable_mask


def test_dr_resize_matches_torch_bilinear_without_antialias():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).standard_normal((2, 16, 12, 3)).astype(np.float32)
    for hw in ((8, 6), (4, 3), (2, 2)):
        ours = np.asarray(losses.resize_bilinear_no_aa(jnp.asarray(x), hw))
        ref = torch.nn.functional.interpolate(torch.from_numpy(x).permute(0, 3, 1, 2), size=hw, mode="bilinear",
                                              align_corners=False).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(ours, ref, atol=1e-6)


def test_dr_l1_sums_scales():
    hq = jnp.zeros((1, 8, 8, 3))
    rgbs = [jnp.ones((1, 4, 4, 3)), 2 * jnp.ones((1, 2, 2, 3))]
    total, parts = losses.dr_l1(rgbs, hq)
    assert float(total) == pytest.approx(3.0) and [float(p) for p in parts] == [1.0, 2.0]


def test_colorfulness_matches_reference_formula():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(1).uniform(-1, 1, (2, 5, 6, 3)).astype(np.float32)
    t = torch.from_numpy(x).permute(0, 3, 1, 2)  # the reference works on NCHW
    r, g, b = t[:, 0], t[:, 1], t[:, 2]
    rg, yb = (r - g).abs(), (0.5 * (r + g) - b).abs()
    std = torch.sqrt(rg.flatten(1).std(1) ** 2 + yb.flatten(1).std(1) ** 2)
    mean = torch.sqrt(rg.flatten(1).mean(1) ** 2 + yb.flatten(1).mean(1) ** 2)
    ref = (1 - (std + 0.3 * mean)).sum().item()
    assert float(losses.colorfulness(jnp.asarray(x))) == pytest.approx(ref, rel=1e-5)


def test_split_merge_and_trainable_patterns():
    params = {"unet": {"up_blocks_1": {"pixel_attentions_0": {"kernel": np.ones(2)}, "resnets_0": {"k": np.ones(2)}},
                       "conv_in": {"kernel": np.ones(3)}},
              "controlnet": {"conv_in": {"kernel": np.zeros(3)}}, "vae": {"k": np.ones(1)}}
    patterns = realisr.get_config().train.trainable
    trainable, frozen = split(params, patterns)
    assert set(trainable) == {"unet", "controlnet"}
    assert list(trainable["unet"]) == ["up_blocks_1"] and list(trainable["unet"]["up_blocks_1"]) == ["pixel_attentions_0"]
    assert "vae" in frozen and "controlnet" not in frozen
    assert jax.tree.structure(merge(trainable, frozen)) == jax.tree.structure(params)
    light = trainable_mask({"unet": {"attn2_plus": {"k": 1}, "norm2_plus": {"k": 1}, "attn2": {"k": 1}}}, patterns)
    assert light == {"unet/attn2_plus/k": True, "unet/norm2_plus/k": True, "unet/attn2/k": False}
    with pytest.raises(ValueError, match="matches no parameter"):
        split(params, ("^nothing/",))


def test_sharding_rules():
    spec = sharding.spec_for
    assert spec("unet/conv/kernel", (3, 3, 320, 640), 4, (), 100) == jax.sharding.PartitionSpec(None, None, None, "fsdp")
    assert spec("unet/conv/bias", (640,), 4, (), 1000) == jax.sharding.PartitionSpec()  # too small
    assert spec("text_encoder/x/kernel", (768, 768), 4, (("^text_encoder/", "replicate"),), 1) == \
        jax.sharding.PartitionSpec()
    assert spec("unet/odd", (7, 9), 4, (), 1) == jax.sharding.PartitionSpec()  # nothing divisible
    assert spec("unet/a", (8, 8), 1, (), 1) == jax.sharding.PartitionSpec()  # no fsdp axis
    mesh = sharding.make_mesh(-1, 1)
    assert dict(mesh.shape) == {"data": jax.device_count(), "fsdp": 1}
    with pytest.raises(ValueError):
        sharding.make_mesh(3, 5)


def test_optimizer_matches_recipe():
    cfg = realisr.get_config()
    assert (cfg.optim.lr, cfg.optim.weight_decay, cfg.optim.clip_norm) == (5e-5, 1e-2, 1.0)
    tx, lr_fn = make_optimizer(cfg.optim)
    assert float(lr_fn(0)) == pytest.approx(5e-5) and float(lr_fn(10**6)) == pytest.approx(5e-5)
    params = {"w": jnp.ones(3)}
    updates, _ = tx.update({"w": jnp.full(3, 100.0)}, tx.init(params), params)
    # First AdamW step: -lr·(sign(g) + wd·w) regardless of the (clipped) gradient scale.
    np.testing.assert_allclose(updates["w"], -5e-5 * (1 + 1e-2), rtol=1e-4)


def test_config_variants_and_locking():
    base = realisr.get_config()
    assert base.model.family == "pasd" and base.data.null_prompt_prob == 0.5 and base.data.resolution == 512
    assert base.data.batch_per_device == 4 and base.train.dr_loss_weight == 1.0
    assert realisr.get_config("light").model.family == "pasd_light"
    assert realisr.get_config("rrdb").model.use_rrdb
    color = realisr.get_config("color")
    assert (color.model.prediction_type, color.model.zero_terminal_snr, color.data.mode) == \
        ("v_prediction", True, "grayscale")
    tiny = realisr.get_config("tiny,light")
    assert tiny.base == "tiny" and tiny.data.resolution == 64 and tiny.model.family == "pasd_light"
    with pytest.raises(ValueError, match="unknown config variant"):
        realisr.get_config("huge")
    with pytest.raises(AttributeError):
        base.optim.lrr = 1.0  # locked: typos are errors
    assert common.realesrgan_degradation().blur1.kernel_prob[0] == 0.45


def test_sigterm_is_remembered_not_fatal():
    import os
    import signal

    from pasd_jax.train.loop import _Stop

    with _Stop() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.requested
    assert signal.getsignal(signal.SIGTERM) is not stop._handle


def test_initial_params_from_base_and_pasd_checkpoint(micro_base, tmp_path):
    import os

    from pasd_jax.assembly import weights
    from pasd_jax.train.checkpoint import load_initial_params

    configs, params = load_initial_params(micro_base, family="pasd", use_rrdb=False)
    _, base_unet = weights.load_converted(os.path.join(micro_base, "unet"))
    np.testing.assert_array_equal(params["unet"]["conv_in"]["kernel"], base_unet["conv_in"]["kernel"])
    # A "PASD checkpoint" holding only PACA weights (+ a ControlNet): those win, the rest stays base.
    paca = {k: v for k, v in weights.flatten_params(params["unet"]).items() if "pixel_attentions" in k}
    assert paca
    paca = {k: v + 1.0 for k, v in paca.items()}
    ckpt = tmp_path / "pasd_ckpt"
    weights.save_converted(ckpt / "unet", dict(configs["unet"]), weights.unflatten_params(paca), component="unet")
    cn = jax.tree.map(lambda x: x * 0 + 0.5, params["controlnet"])
    weights.save_converted(ckpt / "controlnet", configs["controlnet"], cn, component="controlnet")
    _, tuned = load_initial_params(micro_base, family="pasd", use_rrdb=False, init_from=str(ckpt))
    flat = weights.flatten_params(tuned["unet"])
    for k, v in paca.items():
        np.testing.assert_array_equal(flat[k], v)
    np.testing.assert_array_equal(tuned["unet"]["conv_in"]["kernel"], base_unet["conv_in"]["kernel"])
    assert float(tuned["controlnet"]["conv_in"]["bias"][0]) == 0.5
    with pytest.raises(ValueError, match="pasd_light"):
        load_initial_params(micro_base, family="pasd_light", use_rrdb=False, init_from=str(ckpt))
