"""StableSR networks through our converter against the original code's golden tensors (dev set)."""

import jax
import numpy as np
from safetensors.numpy import load_file

from golden.stablesr import run_cfw, run_colorfix, run_unet_sft, to_nchw
from tests.stablesr.conftest import compare_ok


def _check(out: dict, ref: dict):
    out = to_nchw(out)
    assert set(ref) <= set(out), sorted(set(ref) - set(out))
    bad = {k: compare_ok(out[k], ref[k])[1] for k in ref if not compare_ok(out[k], ref[k])[0]}
    assert not bad, bad


def test_encoder_and_sft_unet_match_golden_non_square(golden_dir, golden_models):
    # case1: batch 2, latent 8x20, timesteps [999, 1]: features keyed by width 20/10/5.
    inputs = load_file(golden_dir / "unet_sft/inputs/case1.safetensors")
    with jax.default_matmul_precision("highest"):
        out = jax.jit(lambda i: run_unet_sft(golden_models, i, {}))(inputs)
    _check(out, load_file(golden_dir / "unet_sft/case1_outputs.safetensors"))


def test_cfw_autoencoder_matches_golden_for_every_w(golden_dir, golden_models, golden_manifest):
    inputs = load_file(golden_dir / "cfw/inputs/case1.safetensors")
    variant = golden_manifest["variants"]["cfw"]
    with jax.default_matmul_precision("highest"):
        out = jax.jit(lambda i: run_cfw(golden_models, i, variant))(inputs)
    _check(out, load_file(golden_dir / "cfw/case1_outputs.safetensors"))


def test_cfw_w0_is_plain_decoder_and_w_matters(golden_models):
    cfw, p = golden_models.cfw, golden_models.params["cfw"]
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (1, 32, 32, 3)).astype(np.float32)

    @jax.jit
    def run(x):
        moments, feats = cfw.apply({"params": p}, x, method="encode")
        dec = lambda w, f: cfw.apply({"params": p}, moments[..., :4], f, w, method="decode")
        return dec(0.0, feats), dec(0.0, [f * 0 + 7.0 for f in feats]), dec(1.0, feats)

    plain, other_feats, fused = map(np.asarray, run(x))
    np.testing.assert_array_equal(plain, other_feats)  # w = 0 ignores the features
    assert np.abs(fused - plain).max() > 1e-3


def test_colorfix_matches_golden(golden_dir):
    for case in ("case0", "case1"):
        _check(jax.jit(run_colorfix)(load_file(golden_dir / f"colorfix/inputs/{case}.safetensors")),
               load_file(golden_dir / f"colorfix/{case}_outputs.safetensors"))
