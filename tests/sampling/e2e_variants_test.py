"""The e2e golden harness on "End-to-end variants" folders: UniPC, active latent tiling, colour fixes.

Builds two tiny `e2e_<name>/` folders laid out as `../shared/reference/golden/README.md` says
(nets under the root at `meta.json → unet_dir / controlnet_dir`, family in meta.json, the
scheduler class in `scheduler/scheduler_config.json`, tiling settings and `color_fix_outputs` in
meta.json), computes the expected outputs with a PyTorch pipeline written from PASD_REFERENCE
§7.3–7.7 (diffusers' own `UniPCMultistepScheduler` / `DDIMScheduler` with their `add_noise` and
`step`, the tile grid and Gaussian blending of §7.5 in numpy, the torch colour fixes of
tests/imaging), and scores `python -m pasd_jax.golden --e2e` with `compare.py --files` at its
default tolerance. As in e2e_test.py, the ControlNet + UNet forward of the oracle is our Flax pair
(proven against the PyTorch PASD goldens in tests/models).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from golden import harness as golden
from tests import e2e_case
from tests.conftest import REFERENCE
from tests.imaging.color_fix_test import _t_adain_fix, _t_wavelet_fix
from tests.torch_oracle import nchw, nhwc

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

SCALING = 0.18215
SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1)
VARIANTS = {
    # test_pasd.py's scheduler; level 749 is a UniPC timestep for 4 steps, so every diffusers version agrees
    "unipc": dict(scheduler="UniPCMultistepScheduler", config=dict(SD15), steps=4, added_noise_level=749,
                  tile=None, color_fix=True, guidance=7.5, cond_scale=0.9),
    # 16×16 latent, tiles of 10 with overlap 4: a 2×2 grid, origins 0 and 6 on both axes
    "tiled": dict(scheduler="DDIMScheduler", config=dict(SD15, clip_sample=False, set_alpha_to_one=False),
                  steps=2, added_noise_level=900, tile=(10, 4), color_fix=True, guidance=5.0, cond_scale=1.1),
}


def _tile_grid(length: int, tile: int, overlap: int) -> list[int]:
    """§7.5: R = smallest r ≥ 1 with (r − 1)(T − ov) + T ≥ length; origins r·(T − ov), the last length − T."""
    r = 1
    while (r - 1) * (tile - overlap) + tile < length:
        r += 1
    return [i * (tile - overlap) for i in range(r - 1)] + [length - tile]


def _tile_weights(tile: int) -> np.ndarray:
    """§7.5 Gaussian weights (float64, var 0.01): centre (T−1)/2 along x, T/2 along y."""
    var = 0.01
    i = np.arange(tile)
    wx = np.exp(-((i - (tile - 1) / 2) ** 2) / tile**2 / (2 * var)) / math.sqrt(2 * math.pi * var)
    wy = np.exp(-((i - tile / 2) ** 2) / tile**2 / (2 * var)) / math.sqrt(2 * math.pi * var)
    return np.outer(wy, wx)


def _build(root, name, spec):
    """Write `root/e2e_<name>/` (+ the nets under `root/nets_<name>/`) and return the torch parts."""
    unet_dir, cn_dir = f"nets_{name}/pasd/unet", f"nets_{name}/pasd/controlnet"
    e2e_case.copy_nets(root, unet_dir, cn_dir)
    e2e = root / f"e2e_{name}"
    vae, clip = e2e_case.write_vae_and_clip(e2e)
    sched = getattr(diffusers, spec["scheduler"]).from_config(spec["config"])
    sched.save_config(e2e / "scheduler")
    sched.set_timesteps(spec["steps"])
    inputs = e2e_case.write_inputs(e2e, sched, spec["guidance"], spec["cond_scale"], spec["added_noise_level"])
    tile, overlap = spec["tile"] or (320, 8)
    meta = {"family": "pasd", "unet_dir": unet_dir, "controlnet_dir": cn_dir, "latent_tiled_size": tile,
            "latent_tiled_overlap": overlap, "tiling_active": spec["tile"] is not None,
            "note": f"tiny e2e variant built by {__name__}"}
    if spec["color_fix"]:
        meta["color_fix_outputs"] = ["color_fix.wavelet", "color_fix.adain"]
    (e2e / "meta.json").write_text(json.dumps(meta))
    return e2e, vae, clip, sched, inputs


def _torch_reference(root, e2e, vae, clip, sched, inputs, spec) -> dict:
    meta = json.loads((e2e / "meta.json").read_text())
    unet, unet_p = golden.load_unet(str(root / meta["unet_dir"]))
    cn, cn_p = golden.load_controlnet(str(root / meta["controlnet_dir"]))
    cond_scale, guidance = float(spec["cond_scale"]), float(spec["guidance"])

    @jax.jit
    def eps_fn(x, t, text, cond):
        tb = jnp.full((x.shape[0],), t, jnp.int32)
        _, down, mid = cn.apply({"params": cn_p}, x, tb, text, cond, conditioning_scale=cond_scale)
        return unet.apply({"params": unet_p}, x, tb, text, down_block_additional_residuals=down,
                          mid_block_additional_residual=mid)

    def whole(x_in, t, text, cond):
        return torch.from_numpy(nchw(eps_fn(nhwc(x_in), t, text, nhwc(cond))).copy())

    def noise_pred(x_in, t, text, cond):  # NCHW torch in, NCHW torch out; §7.5 when tiling is on
        h, w = x_in.shape[2:]
        size = meta["latent_tiled_size"]
        if h * w <= size * size:
            return whole(x_in, t, text, cond)
        tile = min(size, h, w)
        weights = torch.from_numpy(_tile_weights(tile)).float()
        acc, norm = torch.zeros_like(x_in), torch.zeros_like(x_in)
        for y in _tile_grid(h, tile, meta["latent_tiled_overlap"]):
            for x in _tile_grid(w, tile, meta["latent_tiled_overlap"]):
                xt = x_in[:, :, y:y + tile, x:x + tile]
                ct = cond[:, :, 8 * y:8 * (y + tile), 8 * x:8 * (x + tile)]
                e = torch.from_numpy(nchw(eps_fn(nhwc(xt), t, text, nhwc(ct))).copy())
                acc[:, :, y:y + tile, x:x + tile] += e * weights
                norm[:, :, y:y + tile, x:x + tile] += weights
        return acc / norm

    out, side = {}, {}
    with torch.no_grad():
        text = clip(torch.cat([inputs["negative_input_ids"], inputs["input_ids"]])).last_hidden_state
        out["prompt_embeds"] = text.numpy()
        lq = inputs["lq_image"]
        dist = vae.encode(2 * lq - 1).latent_dist
        z0 = SCALING * (dist.mean + dist.std * inputs["noise.vae_posterior"])
        out["vae_latent_z0"] = z0.numpy()
        x = sched.add_noise(z0, inputs["noise.first_timestep"], sched.timesteps[:1])
        x = sched.add_noise(x, inputs["noise.added_noise_level"], torch.tensor([spec["added_noise_level"]]))
        out["init_latents"] = x.numpy()
        cond = torch.cat([lq, lq])
        for i, t in enumerate(sched.timesteps):
            eps = noise_pred(torch.cat([x, x]), int(t), text.numpy(), cond)
            if i == 0:  # how much the blending changes the prediction (0 without tiling)
                side["tiling_effect"] = float((eps - whole(torch.cat([x, x]), int(t), text.numpy(), cond)).abs().max())
            e_u, e_c = eps.chunk(2)
            x = sched.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
            out[f"step{i}.latents"] = x.numpy()
        out["final_latents"] = x.numpy()
        decoded = vae.decode(x / SCALING).sample
        out["decoded"] = decoded.numpy()
        image = (decoded / 2 + 0.5).clamp(0, 1)
        out["image"] = image.numpy()
        if "color_fix_outputs" in meta:
            out["color_fix.wavelet"] = _t_wavelet_fix(image, lq).clamp(0, 1).numpy()
            out["color_fix.adain"] = _t_adain_fix(image, lq).clamp(0, 1).numpy()
    return out, side


@pytest.fixture(scope="module")
def variants(tmp_path_factory, fast_compile):
    root, results = tmp_path_factory.mktemp("golden"), {}
    for name, spec in VARIANTS.items():
        e2e, vae, clip, sched, inputs = _build(root, name, spec)
        want_path = root / f"want_{name}.safetensors"
        want, side = _torch_reference(root, e2e, vae, clip, sched, inputs, spec)
        save_file(want, str(want_path))
        out = tmp_path_factory.mktemp("out") / f"e2e_{name}"
        assert golden.main(["--e2e", str(e2e), str(out)]) == 0
        results[name] = (want_path, out / "outputs.safetensors", spec, side)
    return results


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_harness_passes_compare_py(variants, name):
    want_path, got_path, spec, _ = variants[name]
    want, got = load_file(str(want_path)), load_file(str(got_path))
    assert set(got) == set(want)  # every contract name, colour fixes included
    assert {f"step{i}.latents" for i in range(spec["steps"])} <= set(got)
    compare = REFERENCE / "compare.py"
    if not compare.is_file():
        pytest.skip("../shared/reference/compare.py is not present")
    run = subprocess.run([sys.executable, str(compare), "--files", str(want_path), str(got_path)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stdout[-3000:]
    assert f"{len(want)} passed, 0 failed" in run.stdout


def test_tiled_variant_really_tiles(variants):
    """In the tiled folder the blended prediction differs from the whole-latent one far beyond the
    tolerance, so passing it proves the harness tiles as §7.5 says; the UniPC one is untiled."""
    assert _tile_grid(16, 10, 4) == [0, 6]
    assert variants["tiled"][3]["tiling_effect"] > 1e-2
    assert variants["unipc"][3]["tiling_effect"] == 0.0
