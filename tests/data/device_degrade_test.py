"""Device degradation (`device_degrade.py`, `device_jpeg.py`) against the host path `degrade.py`.

Blur and resize match the host numerics (PIL coefficients, reflect padding) to float32 rounding;
noise is deterministic per seed with the host's distributions; the DCT JPEG approximation stays
above a PSNR floor against PIL; different draws reuse one trace; a tiny train loop runs with
`data.degrade_on = "device"`. Compiles run with `jax_disable_most_optimizations` (CPU time).
"""

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from configs.common import realesrgan_degradation
from pasd_jax.data import degrade, device_degrade as dd, kernels, pipeline
from pasd_jax.data.device_jpeg import jpeg_batch

CFG = realesrgan_degradation().to_dict()
CANVAS32 = dd.canvas_for((32, 32), CFG)
_TRACES = []


@jax.jit
def _degrade32(hq, params):
    """degrade_batch on 32² crops, counting its traces (shared by the tests: one compile)."""
    _TRACES.append(1)
    return dd.degrade_batch(hq, params, canvas=CANVAS32)


@pytest.fixture(scope="module", autouse=True)
def fast_compile():
    old = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", old)


def _image(h, w, seed=0):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w] / 16.0
    base = 0.5 + 0.4 * np.sin(np.stack([yy, xx, yy + xx], -1) * rng.uniform(1, 3, 3))
    return np.clip(base + 0.05 * rng.standard_normal((h, w, 3)), 0, 1).astype(np.float32)


def _on_canvas(img, canvas_hw, fill=7.0):
    """img in the top-left of a canvas whose other pixels are garbage the device path must ignore."""
    out = np.full(tuple(canvas_hw) + (img.shape[-1],), fill, np.float32)
    out[:img.shape[0], :img.shape[1]] = img
    return out


def _psnr(a, b):
    return 10 * np.log10(1.0 / np.mean((np.asarray(a, np.float64) - b) ** 2))


@pytest.mark.parametrize("valid", [(40, 40), (23, 31), (7, 9)])
def test_blur_equals_host_blur(valid):
    rng = np.random.default_rng(sum(valid))
    img = _image(*valid)
    blur = jax.jit(dd.blur)
    for kernel in (kernels.random_blur_kernel(rng, CFG["blur1"]), kernels.bivariate_gaussian(21, 3.0, 1.0, 0.4),
                   kernels.circular_lowpass_kernel(np.pi / 4, 21)):
        out = np.asarray(blur(_on_canvas(img, (40, 40)), kernel, jnp.asarray(valid)))
        np.testing.assert_allclose(out[:valid[0], :valid[1]], degrade.filter2d(img, kernel), atol=2e-6)


@pytest.mark.parametrize("mode", degrade.RESIZE_MODES)
def test_resize_matches_host_resize(mode):
    img = _image(37, 45)
    resize = jax.jit(dd.resize, static_argnums=4)
    for out_hw in ((11, 13), (37, 45), (52, 60), (20, 67)):  # down, keep, up, mixed
        out = np.asarray(resize(_on_canvas(img, (48, 48)), jnp.asarray((37, 45)), jnp.asarray(out_hw),
                                degrade.RESIZE_MODES.index(mode), (72, 72)))
        ref = degrade.resize(img, out_hw, mode)
        diff = np.abs(out[:out_hw[0], :out_hw[1]] - ref)
        if mode == "area":  # exact ties of the box's half-open edge: PIL's double rounding decides
            assert np.mean(diff < 2e-6) > 0.9 and diff.mean() < 0.01, (out_hw, diff.mean())
        else:
            np.testing.assert_allclose(diff, 0, atol=2e-6)
        assert not out[out_hw[0]:].any() and not out[:, out_hw[1]:].any()  # zeros outside the region


def test_noise_deterministic_per_seed_with_host_statistics():
    x = jnp.asarray(_on_canvas(_image(48, 48) * 0.6 + 0.2, (64, 64)))
    hw = jnp.asarray((48, 48))
    noise = jax.jit(dd.add_noise)
    key = lambda s: jax.random.key(s)  # noqa: E731
    a = noise(x, 1, 10.0, 0, hw, key(3))
    np.testing.assert_array_equal(a, noise(x, 1, 10.0, 0, hw, key(3)))
    assert not np.array_equal(a, noise(x, 1, 10.0, 0, hw, key(4)))
    d = np.asarray(a - x)[:48, :48]
    assert np.std(d) == pytest.approx(10 / 255, rel=0.05) and abs(np.mean(d)) < 2e-3
    gray = np.asarray(noise(x, 1, 10.0, 1, hw, key(3)) - x)[:48, :48]
    np.testing.assert_allclose(gray[..., 0], gray[..., 1], atol=1e-6)  # one field for all channels
    # Poisson: same std as the host sampler at the same scale (different samples, same law).
    img = np.asarray(x)[:48, :48]
    host = degrade.add_noise(img, {"gaussian": False, "level": 1.5, "gray": False}, np.random.default_rng(0)) - img
    dev = np.asarray(noise(x, 0, 1.5, 0, hw, key(5)) - x)[:48, :48]
    np.testing.assert_array_equal(dev, np.asarray(noise(x, 0, 1.5, 0, hw, key(5)) - x)[:48, :48])
    assert np.std(dev) == pytest.approx(np.std(host), rel=0.1) and abs(np.mean(dev)) < 3e-3


def test_jpeg_approximation_psnr_vs_pil():
    """Device DCT JPEG vs PIL ≫ JPEG vs the source (the approximation error is far below the
    compression error); floor 40 dB at qualities 60…100 and on a partial valid region."""
    img = np.round(_image(40, 56, seed=2) * 255) / 255
    jpeg = jax.jit(jpeg_batch)
    for q in (60, 75, 95, 100):
        dev = np.asarray(jpeg(img[None], jnp.asarray([q], jnp.float32)))[0]
        ref = degrade.jpeg(img, q)
        assert _psnr(dev, ref) > 40.0, q
        assert _psnr(dev, ref) > _psnr(ref, img) + 5, q
        np.testing.assert_array_equal(np.round(dev * 255) / 255, dev)
    part = img[:27, :35]
    dev = np.asarray(jpeg(_on_canvas(part, (40, 56))[None],
                          jnp.asarray([70.0]), jnp.asarray([[27, 35]])))[0]
    assert _psnr(dev[:27, :35], degrade.jpeg(part, 70)) > 40.0


def _stack(draws):
    return {k: np.stack([d[k] for d in draws]) for k in draws[0]}


def test_one_compile_across_scale_draws_and_host_like_output():
    hw = (32, 32)
    hq = np.stack([_image(*hw, seed=i) for i in range(4)])
    sizes, outs = set(), []
    for batch in range(3):
        rngs = [np.random.default_rng([5, batch, i]) for i in range(4)]
        draws = [dd.sample_params(r, CFG, hw) for r in rngs]
        sizes |= {(tuple(d["size1"]), tuple(d["size2"])) for d in draws}
        lq = np.asarray(_degrade32(hq, _stack(draws)))
        assert lq.shape == hq.shape and lq.dtype == np.float32 and lq.min() >= 0 and lq.max() <= 1
        np.testing.assert_array_equal(np.round(lq * 255) / 255, lq)  # 8-bit grid like the host path
        host = [degrade.apply_degradation(hq[i], degrade.sample_params(np.random.default_rng([5, batch, i]), CFG), CFG)
                for i in range(4)]
        outs.append((np.abs(lq - hq).mean(), np.abs(np.stack(host) - hq).mean()))
    assert len(sizes) > 6 and len(_TRACES) == 1  # many resize shapes, one trace
    dev_err, host_err = np.mean(outs, axis=0)
    assert dev_err == pytest.approx(host_err, rel=0.25), outs  # same draws -> same degradation strength


def test_pipeline_device_mode_draws_what_the_host_path_draws(tmp_path):
    from pasd_jax.fixtures.tiny import write_tiny_tokenizer

    tok = str(tmp_path / "tok")
    write_tiny_tokenizer(tok)
    buf = io.BytesIO()
    Image.fromarray((_image(40, 48) * 255).astype(np.uint8)).save(buf, format="PNG")
    record = {"image_bytes": buf.getvalue(), "caption": "a cat"}
    cfg = dict(resolution=32, min_side=16, mode="realesrgan", null_prompt_prob=0.5, degradation=CFG)
    host = pipeline.make_example(record, np.random.default_rng(9), dict(cfg, degrade_on="host"), tok)
    dev = pipeline.make_example(record, np.random.default_rng(9), dict(cfg, degrade_on="device"), tok)
    assert set(dev) == {"hq", "degrade", "prompt_ids"} and "lq" in host
    np.testing.assert_array_equal(dev["hq"], host["hq"])
    np.testing.assert_array_equal(dev["prompt_ids"], host["prompt_ids"])  # rng stream stays in step
    rng = np.random.default_rng(9)
    pipeline.random_crop(np.zeros((40, 48, 3), np.uint8), 32, rng, 16)
    expected = dd.pack_params(degrade.sample_params(rng, CFG), CFG, (32, 32))
    for key, value in expected.items():
        np.testing.assert_array_equal(dev["degrade"][key], value, err_msg=key)


def test_tiny_train_loop_in_device_mode(tmp_path):
    from pasd_jax.train.loop import train
    from pasd_jax.train.metrics import read_metrics
    from tests.train.conftest import tiny_config, write_images, write_micro_pipeline

    images = write_images(tmp_path / "images", 4)
    base = write_micro_pipeline(str(tmp_path / "base"))
    config = tiny_config(images, base, **{"train.total_steps": 3, "train.ckpt_every": 100, "data.global_batch": 2,
                                          "data.degrade_on": "device"})
    result = train(config, str(tmp_path / "run"), stop_after=2)  # two steps; no checkpoint or export (time)
    rows = read_metrics(str(tmp_path / "run"))
    assert result["step"] == 2 and sorted(rows) == [1, 2]
    assert all(np.isfinite(rows[s]["loss"]) for s in (1, 2))


_MESH_SCRIPT = """
import functools, json, sys
import numpy as np, jax
jax.config.update("jax_disable_most_optimizations", True)
sys.path.insert(0, {repo!r})
from configs.common import realesrgan_degradation
from pasd_jax.data import device_degrade as dd
from pasd_jax.train import sharding
from pasd_jax.train.step import degrade_step
cfg = realesrgan_degradation().to_dict()
canvas = dd.canvas_for((32, 32), cfg)
draws = [dd.sample_params(np.random.default_rng([3, i]), cfg, (32, 32)) for i in range(4)]
params = {{k: np.stack([d[k] for d in draws]) for k in draws[0]}}
hq = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
mesh = sharding.make_mesh(2, 1)
fn = sharding.per_example(functools.partial(degrade_step, canvas=canvas), mesh)
out = fn(sharding.global_batch({{"hq": hq, "degrade": params, "prompt_ids": np.zeros((4, 77), np.int32)}}, mesh))
lq = out["lq"]
print("RESULT" + json.dumps({{"lq": np.asarray(lq).tolist(), "shards": [s.data.shape[0] for s in lq.addressable_shards]}}))
"""


def test_per_device_degradation_on_a_2_device_mesh_matches_one_device():
    import json
    import os
    import subprocess
    import sys

    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", _MESH_SCRIPT.format(repo=repo)], env=env, cwd=repo,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads([ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1][len("RESULT"):])
    assert out["shards"] == [2, 2]  # each device degraded its own two examples
    draws = [dd.sample_params(np.random.default_rng([3, i]), CFG, (32, 32)) for i in range(4)]
    hq = np.random.default_rng(0).uniform(-1, 1, (4, 32, 32, 3)).astype(np.float32)
    ref = np.asarray(_degrade32((hq + 1) / 2, _stack(draws)))  # one device, the shared compile
    diff = np.abs(np.asarray(out["lq"], np.float32) - ref)
    assert diff.max() <= 1 / 255 + 1e-6 and diff.mean() < 1e-3  # same pixels up to rare 8-bit rounding flips
