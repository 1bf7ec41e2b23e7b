"""Schedulers in the compiled sampler on the tiny smoke model: scheduler choice, UniPC/LCM scans,
the reference-compatible ANS start, LCM-LoRA fusing, and `sample.py --scheduler`."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from convert.lora import fuse_lora_file
from convert.mapping import torch_module_name
from pasd_jax.assembly import defaults
from pasd_jax.assembly.home import is_pasd_only
from pasd_jax.assembly.loader import load_models
from pasd_jax.assembly.paths import flatten as flatten_tree
from pasd_jax.fixtures import tiny
from pasd_jax.sampling import cli
from pasd_jax.sampling.pipeline import Restorer, RestoreOptions
from pasd_jax.sampling.sampler import Noises, Sampler, SamplerSettings, ans_init, latent_shape, make_inputs

pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny") / "pasd"
    return tiny.make_tiny_pipeline(folder, seed=0, levels=2)


@pytest.fixture(scope="module")
def models(ckpt):
    return load_models(ckpt)


def _inputs(models, seed=0, level=900):
    rng = np.random.default_rng(seed)
    lq = rng.random((1, 16, 16, 3), dtype=np.float32)
    text = rng.standard_normal((2, 77, 32)).astype(np.float32)
    noises = Noises.draw(jax.random.key(seed), latent_shape(models, lq.shape))
    return make_inputs(lq, text, noises, guidance_scale=7.5, added_noise_level=level)


def _write_scheduler(folder, cls, **extra):
    (folder / "scheduler").mkdir(exist_ok=True)
    cfg = dict(defaults.SCHEDULER, _class_name=cls, **extra)
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))


def test_default_scheduler_follows_the_config(ckpt, tmp_path):
    assert load_models(ckpt).default_scheduler == "ddim"  # the smoke model ships a DDIM config
    pasd = tmp_path / "pasd"
    tiny.make_tiny_pipeline(pasd, seed=0, levels=2)
    _write_scheduler(pasd, "UniPCMultistepScheduler")
    m = load_models(pasd)
    assert m.default_scheduler == "unipc" and m.scheduler_config["_class_name"] == "UniPCMultistepScheduler"
    _write_scheduler(pasd, "PNDMScheduler", skip_prk_steps=True)  # SD1.5's own: not implemented -> DDIM
    assert load_models(pasd).default_scheduler == "ddim"


@pytest.mark.parametrize("name", ["unipc", "lcm", "dpmpp_2m"])
def test_scan_equals_loop_and_traces_once(models, name):
    sampler = Sampler(models, SamplerSettings(num_steps=3, trajectory=True, scheduler=name))
    a = sampler(_inputs(models, seed=0))
    sampler(_inputs(models, seed=1))
    assert sampler.trace_count == 1
    loop = sampler.run_loop(_inputs(models, seed=0))
    for key in ("init_latents", "trajectory", "final_latents", "image"):
        np.testing.assert_allclose(loop[key], a[key], atol=1e-5, rtol=1e-5, err_msg=key)
    assert np.all(np.isfinite(a["final_latents"]))
    np.testing.assert_array_equal(np.asarray(sampler.timesteps), np.asarray(sampler.scheduler.timesteps))


def test_ans_reference_mode_uses_the_last_schedule_entry(models):
    """UniPC, 20 steps: a level that is not a timestep (900) makes test_pasd.py's second add_noise use
    the last timestep (§7.4); a level that is one gives the closed form."""
    ref = Sampler(models, SamplerSettings(num_steps=20, scheduler="unipc", ans_compat="reference"))
    closed = Sampler(models, SamplerSettings(num_steps=20, scheduler="unipc"))
    ts = [int(t) for t in ref.scheduler.timesteps]
    assert 900 not in ts
    ac = np.asarray(closed.scheduler.alphas_cumprod, np.float64)
    for level, t_used in ((900, ts[-1]), (ts[1], ts[1])):
        inputs = _inputs(models, level=level)
        nz = inputs.noises
        z0, got = jax.jit(ref.init_latents)(models.params, inputs)
        first = np.sqrt(ac[ts[0]]) * np.asarray(z0) + np.sqrt(1 - ac[ts[0]]) * np.asarray(nz.first_timestep)
        want = np.sqrt(ac[t_used]) * first + np.sqrt(1 - ac[t_used]) * np.asarray(nz.added_noise_level)
        np.testing.assert_allclose(np.asarray(got), want, atol=2e-6)
        _, closed_form = jax.jit(closed.init_latents)(models.params, inputs)
        np.testing.assert_allclose(np.asarray(closed_form), np.asarray(
            ans_init(closed.scheduler, z0, nz.first_timestep, nz.added_noise_level, ts[0], level)), atol=1e-6)
        assert (level != 900) == np.allclose(np.asarray(got), np.asarray(closed_form), atol=1e-5)


def _tiny_lora(models, path, rank=2, seed=0):
    """A kohya-format LoRA for two stock UNet layers (an attention projection and a resnet conv)."""
    rng = np.random.default_rng(seed)
    flat = flatten_tree(jax.device_get(models.params["unet"]))
    targets = [p for p in flat if p[-1] == "kernel" and not is_pasd_only(p)
               and (p[-2] == "to_q" or p[-2] == "conv1")][:2]
    tensors = {}
    for p in targets:
        kernel = flat[p]
        name = "lora_unet_" + torch_module_name(p[:-1]).replace(".", "_")
        if kernel.ndim == 4:  # conv [kh, kw, in, out]: LoCon down [r, in, kh, kw], up [out, r, 1, 1]
            kh, kw, cin, cout = kernel.shape
            down, up = rng.standard_normal((rank, cin, kh, kw)), rng.standard_normal((cout, rank, 1, 1))
        else:
            cin, cout = kernel.shape
            down, up = rng.standard_normal((rank, cin)), rng.standard_normal((cout, rank))
        tensors[f"{name}.lora_down.weight"] = (0.01 * down).astype(np.float32)
        tensors[f"{name}.lora_up.weight"] = (0.01 * up).astype(np.float32)
        tensors[f"{name}.alpha"] = np.asarray(float(rank), np.float32)
    save_file(tensors, str(path))
    return targets


def test_lcm_lora_fuses_into_stock_unet_only(ckpt, models, tmp_path):
    lora = tmp_path / "lcm_lora.safetensors"
    targets = _tiny_lora(models, lora)
    fused = load_models(ckpt, lcm_lora=lora, lora_fuser=fuse_lora_file)
    with pytest.raises(ValueError, match="sample.py"):  # pasd_jax alone cannot read LoRA files
        load_models(ckpt, lcm_lora=lora)
    assert fused.default_scheduler == "lcm"
    before = flatten_tree(jax.device_get(models.params["unet"]))
    after = flatten_tree(jax.device_get(fused.params["unet"]))
    changed = {p for p in before if not np.array_equal(before[p], after[p])}
    assert changed == set(targets)
    assert not any(is_pasd_only(p) for p in changed)
    for part in ("controlnet", "vae", "text_encoder"):
        same = jax.tree_util.tree_map(np.array_equal, jax.device_get(models.params[part]),
                                      jax.device_get(fused.params[part]))
        assert all(jax.tree_util.tree_leaves(same)), part
    # with a base swap the LoRA lands on the base's stock weights: same delta, PACA still the checkpoint's
    base_dir = tiny.make_tiny_pipeline(tmp_path / "base", seed=5, levels=2)
    base = flatten_tree(jax.device_get(load_models(base_dir).params["unet"]))
    swapped = flatten_tree(jax.device_get(load_models(ckpt, base_dir, lcm_lora=lora,
                                                      lora_fuser=fuse_lora_file).params["unet"]))
    for p in targets:
        np.testing.assert_allclose(swapped[p] - base[p], after[p] - before[p], atol=1e-6)
    assert all(np.array_equal(swapped[p], before[p]) for p in before if is_pasd_only(p))
    # a LoRA for layers this UNet does not have is an error, not a silent no-op
    save_file({"lora_unet_nope_proj.lora_down.weight": np.zeros((2, 4), np.float32),
               "lora_unet_nope_proj.lora_up.weight": np.zeros((4, 2), np.float32)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="match no layer"):
        load_models(ckpt, lcm_lora=tmp_path / "bad.safetensors", lora_fuser=fuse_lora_file)


def test_unipc_restorer_compiles_once_per_size(models):
    restorer = Restorer(models, RestoreOptions(steps=3, scheduler="unipc", process_size=16))
    rng = np.random.default_rng(0)
    for _ in range(2):
        restorer.restore(rng.integers(0, 255, (16, 24, 3), dtype=np.uint8), seed=0)
    assert restorer.sampler.trace_count == 1 and restorer.sampler.settings.scheduler == "unipc"


def test_cli_scheduler_and_lcm_lora(ckpt, models, tmp_path, capsys):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        Image.fromarray(rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)).save(src / f"{name}.png")
    base = ["--ckpt", str(ckpt), "--input", str(src), "--process-size", "16"]
    assert cli.main(base + ["--output", str(tmp_path / "u"), "--scheduler", "unipc", "--steps", "2"]) == 0
    assert "unipc, 2 steps" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "u").iterdir()) == ["a.png", "b.png"]
    lora = tmp_path / "lcm_lora.safetensors"
    _tiny_lora(models, lora)
    assert cli.main(base + ["--output", str(tmp_path / "l"), "--lcm-lora", str(lora)], lora_fuser=fuse_lora_file) == 0
    assert "lcm, 4 steps" in capsys.readouterr().err
    assert cli.main(base + ["--output", str(tmp_path / "e"), "--scheduler", "unipc", "--eta", "0.5"]) == 1
    assert "eta" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()
