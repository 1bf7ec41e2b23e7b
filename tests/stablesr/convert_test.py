"""StableSR converter: strict mapping of the original key names, drops by name, layout refusals."""

import os
import subprocess
import sys

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from convert import stablesr, stablesr_layout
from convert.mapping import ConversionError

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _paths(golden_dir):
    w = golden_dir / "weights"
    return (str(w / "stablesr_sd.safetensors"), str(w / "vqgan_cfw_sd.safetensors"),
            str(w / "stablesr_config.yaml"), str(w / "vqgan_cfw_config.yaml"))


def _cli(*args, env_extra=None):
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    return subprocess.run([sys.executable, "-m", "convert", *args], capture_output=True, text=True, env=env,
                          cwd=ROOT, timeout=300)


def test_every_problem_listed_and_loss_keys_dropped(golden_dir, tmp_path):
    sr, cfw, sr_yaml, cfw_yaml = _paths(golden_dir)
    state = load_file(sr)
    del state["model.diffusion_model.input_blocks.1.0.spade.mlp_gamma.weight"]           # missing
    state["structcond_stage_model.input_blocks.1.0.extra.weight"] = np.zeros(3, np.float32)  # unexpected
    state["structcond_stage_model.fea_tran.0.skip_connection.bias"] = np.zeros(9, np.float32)  # mis-shaped
    state["mystery.weight"] = np.zeros(1, np.float32)                                       # no component
    save_file(state, tmp_path / "sr.safetensors")
    cfw_state = load_file(cfw)
    cfw_state["loss.discriminator.main.0.weight"] = np.zeros((4, 3, 3, 3), np.float32)
    cfw_state["loss.logvar"] = np.zeros((), np.float32)
    save_file(cfw_state, tmp_path / "cfw.safetensors")
    with pytest.raises(ConversionError) as err:
        stablesr.convert_models(str(tmp_path / "sr.safetensors"), str(tmp_path / "cfw.safetensors"),
                                sr_yaml=sr_yaml, cfw_yaml=cfw_yaml)
    msg = str(err.value)
    for needle in ("mystery.weight", "down_blocks_0/resnets_0/spade/mlp_gamma/kernel",
                   "structcond_stage_model.input_blocks.1.0.extra.weight",
                   "structcond_stage_model.fea_tran.0.skip_connection.bias"):
        assert needle in msg, needle
    assert "loss." not in msg  # dropped by name, not reported as unexpected

    save_file(load_file(sr), tmp_path / "sr_ok.safetensors")
    _, params, _, lines = stablesr.convert_models(str(tmp_path / "sr_ok.safetensors"), str(tmp_path / "cfw.safetensors"),
                                                  sr_yaml=sr_yaml, cfw_yaml=cfw_yaml)
    assert any("dropped 2 keys: training-only loss" in line for line in lines)
    assert set(params) == set(stablesr.COMPONENTS)


def test_layout_detection_names_what_it_found():
    sd = {"model.diffusion_model.input_blocks.0.0.weight": 0, "first_stage_model.encoder.conv_in.weight": 0}
    with pytest.raises(stablesr_layout.StableSRLayoutError, match="SD single-file checkpoint without StableSR"):
        stablesr_layout.require(sd, "stablesr", "sd.ckpt")
    cfw = {"decoder.fusion_layer_1.encode_enc_1.conv1.weight": 0, "encoder.conv_in.weight": 0}
    assert stablesr_layout.describe(cfw) == "stablesr_cfw"
    with pytest.raises(stablesr_layout.StableSRLayoutError, match="found a StableSR CFW autoencoder"):
        stablesr_layout.require(cfw, "stablesr", "x.ckpt")
    with pytest.raises(stablesr_layout.StableSRLayoutError, match="plain autoencoder without CFW"):
        stablesr_layout.require({"encoder.conv_in.weight": 0}, "stablesr_cfw", "vae.ckpt")
    from convert import ldm
    sr = {"model.diffusion_model.input_blocks.1.0.spade.mlp_beta.weight": 0, "structcond_stage_model.x": 0}
    with pytest.raises(ldm.UnsupportedCheckpointError, match="python -m convert stablesr"):
        ldm.detect_model_type(sr)


def test_cli_refuses_swapped_and_damaged_files_with_one_line(golden_dir, tmp_path):
    sr, cfw, _, _ = _paths(golden_dir)
    dst = tmp_path / "out"
    swapped = _cli("stablesr", cfw, sr, str(dst))
    assert swapped.returncode == 1
    assert swapped.stderr.strip().count("\n") == 0, swapped.stderr
    assert "found a StableSR CFW autoencoder" in swapped.stderr and not dst.exists()
    damaged = tmp_path / "stablesr_000117.safetensors"
    damaged.write_bytes(open(sr, "rb").read()[:100_000])  # truncated download
    broken = _cli("stablesr", str(damaged), cfw, str(dst))
    assert broken.returncode == 1 and broken.stderr.strip().count("\n") == 0, broken.stderr
    assert str(damaged) in broken.stderr and not dst.exists()
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]  # no partial output


def test_converted_folder_round_trip(golden_dir, tmp_path):
    from pasd_jax.assembly.stablesr import is_stablesr_folder, load_stablesr, write_folder

    sr, cfw, sr_yaml, cfw_yaml = _paths(golden_dir)
    configs, params, context, _ = stablesr.convert_models(sr, cfw, sr_yaml=sr_yaml, cfw_yaml=cfw_yaml)
    assert context is None  # the dev weights carry no text tower
    write_folder(str(tmp_path / "m"), configs, params, context, sampling=configs["sampling"])
    assert is_stablesr_folder(tmp_path / "m")
    with pytest.raises(ValueError, match="no empty-prompt context"):
        load_stablesr(tmp_path / "m")
    models = load_stablesr(tmp_path / "m", context=np.zeros((1, 7, 16), np.float32))
    assert models.sampling["image_size"] == 64
    a = params["unet"]["down_blocks_0"]["resnets_0"]["spade"]["mlp_gamma"]["kernel"]
    b = models.params["unet"]["down_blocks_0"]["resnets_0"]["spade"]["mlp_gamma"]["kernel"]
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(FileExistsError):
        write_folder(str(tmp_path / "m"), configs, params, context, sampling=configs["sampling"])


def test_other_architectures_round_trip_through_the_original_names(tmp_path):
    """A 4-level SFT UNet with channel changes and 2 res blocks, 48-wide features, context 24, a CFW
    with 2 RRDBs and fusion layers of different widths: written in the original names + yaml, our
    converter gives back exactly the parameters."""
    import yaml

    from pasd_jax.assembly.paths import flatten as flatten_tree
    from convert.stablesr_layout import cfw_config, sr_configs
    from tests.stablesr import ldm_writer

    unet = dict(in_channels=4, out_channels=4, model_channels=32, channel_mult=[1, 2, 2, 4], num_res_blocks=2,
                attention_resolutions=[4, 2, 1], num_head_channels=16, context_dim=24, semb_channels=48,
                use_linear_in_transformer=True)
    enc = dict(in_channels=4, model_channels=32, out_channels=48, num_res_blocks=2, attention_resolutions=[4, 2, 1],
               channel_mult=[1, 1, 2, 2], num_heads=4, num_head_channels=-1)
    ys = ldm_writer.yaml_configs(unet, enc, dict(ch=32, ch_mult=[1, 1, 2, 2], num_res_blocks=1),
                                 dict(ch=32, ch_mult=[1, 2, 2, 2], num_res_blocks=1, num_fuse_block=2), 64)
    configs = sr_configs(yaml.safe_load(ys[0])["model"])
    configs["cfw"] = cfw_config(yaml.safe_load(ys[1])["model"])
    params = {n: ldm_writer.random_params(n, configs[n], i) for i, n in enumerate(stablesr.COMPONENTS)}
    w = ldm_writer.write_weights(tmp_path, configs, params, ys)
    got_configs, got, _, _ = stablesr.convert_models(*(str(tmp_path / w[k]) for k in ("stablesr", "vqgan_cfw")),
                                                     sr_yaml=str(tmp_path / w["stablesr_config"]),
                                                     cfw_yaml=str(tmp_path / w["vqgan_cfw_config"]))
    assert got_configs["unet"]["attention_head_dim"] == [2, 4, 4, 8]
    assert got_configs["cfw"]["num_fuse_block"] == 2
    for name in stablesr.COMPONENTS:
        ref, out = flatten_tree(params[name]), flatten_tree(got[name])
        assert set(ref) == set(out), name
        for path in ref:
            np.testing.assert_array_equal(out[path], ref[path], err_msg="/".join(path))
