"""StableSR sampling: respaced schedule, torch bicubic, VQGAN tiling geometry, end-to-end goldens."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.numpy import load_file

from pasd_jax.diffusion.respaced_ddpm import RespacedSchedule, space_timesteps
from pasd_jax.imaging.torch_resize import reflect_pad_to_32, resize_bicubic, resize_bilinear
from pasd_jax.sampling.stablesr_pipeline import axis_starts, vqgan_patches
from tests.stablesr.conftest import compare_ok


def test_space_timesteps_reference_examples():
    assert space_timesteps(1000, 3) == [0, 500, 999]
    assert space_timesteps(1000, 4) == [0, 333, 666, 999]
    assert space_timesteps(1000, 5) == [0, 250, 500, 749, 999]
    assert space_timesteps(1000, 20)[:6] == [0, 53, 105, 158, 210, 263]
    assert space_timesteps(1000, 200)[:3] == [0, 5, 10] and space_timesteps(1000, 1000) == list(range(1000))


def test_respaced_buffers_equal_the_scripts(golden_dir):
    ref = load_file(golden_dir / "e2e_old/case0_outputs.safetensors")
    schedule = RespacedSchedule.build(4)
    for name, value in schedule.buffers().items():
        np.testing.assert_array_equal(value, ref[f"schedule.{name}"], err_msg=name)
    np.testing.assert_array_equal(schedule.timesteps, ref["schedule.ori_timesteps"])
    assert abs(schedule.sqrt_alphas_cumprod_full[999] ** 2 - 0.0046601) < 1e-6


@pytest.mark.parametrize("size", [(88, 116), (13, 17), (40, 29)])
def test_bicubic_and_bilinear_match_torch(size):
    x = np.random.default_rng(0).uniform(-1, 1, (1, 22, 29, 3)).astype(np.float32)
    t = torch.from_numpy(x).permute(0, 3, 1, 2)
    for ours, mode in ((resize_bicubic, "bicubic"), (resize_bilinear, "bilinear")):
        ref = F.interpolate(t, size=size, mode=mode, align_corners=False).permute(0, 2, 3, 1).numpy()
        np.testing.assert_allclose(ours(x, size), ref, atol=3e-6, err_msg=mode)


def test_reflect_pad_quirk_pads_an_aligned_side_too():
    x = np.zeros((1, 64, 40, 3), np.float32)
    padded, pads = reflect_pad_to_32(x)
    assert pads == (32, 24) and padded.shape == (1, 96, 64, 3)
    assert reflect_pad_to_32(np.zeros((1, 64, 32, 3)))[1] == (0, 0)


def test_vqgan_patch_order_is_column_major():
    assert axis_starts(96, 96, 32) == [0] and axis_starts(128, 96, 32) == [0, 32]
    assert axis_starts(200, 96, 64) == [0, 64, 104]
    assert vqgan_patches(128, 128, 96, 64) == [(0, 0, 96, 96), (32, 0, 96, 96), (0, 32, 96, 96), (32, 32, 96, 96)]


@pytest.mark.parametrize("variant", ["e2e_old", "e2e_tile"])
def test_end_to_end_scripts_match_golden(golden_dir, golden_manifest, golden_models, variant):
    import jax

    from golden.stablesr import run_e2e_old, run_e2e_tile, to_nchw

    case = golden_manifest["variants"][variant]["cases"]["case0"]
    inputs = load_file(golden_dir / case["inputs"])
    golden_models.context = inputs["context"]
    with jax.default_matmul_precision("highest"):
        out = to_nchw((run_e2e_old if variant == "e2e_old" else run_e2e_tile)(golden_models, inputs, case))
    ref = load_file(golden_dir / case["outputs"])
    bad = {k: compare_ok(out[k], ref[k])[1] for k in ref if not compare_ok(out[k], ref[k])[0]}
    assert set(ref) <= set(out) and not bad, bad
