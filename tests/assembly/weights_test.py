"""pasd_jax.assembly.weights: converted folders round-trip, atomic saves, refusal to clobber."""

import json
import os

import numpy as np
import pytest

from pasd_jax.assembly import weights
from pasd_jax.assembly.weights import load_converted, save_converted

PARAMS = {
    "conv_in": {"kernel": np.arange(24, dtype=np.float32).reshape(1, 2, 3, 4), "bias": np.ones(4, np.float32)},
    "down_blocks_0": {"resnets_0": {"norm1": {"scale": np.full(3, 2, np.float32)}}},
}
CONFIG = {"_class_name": "UNet2DConditionModel", "block_out_channels": [32, 64], "_pasd_family": "pasd"}


def _assert_tree_equal(got, want):
    assert got.keys() == want.keys()
    for key in want:
        if isinstance(want[key], dict):
            _assert_tree_equal(got[key], want[key])
        else:
            np.testing.assert_array_equal(got[key], want[key])
            assert got[key].dtype == want[key].dtype


def _leftovers(parent):
    return [n for n in os.listdir(parent) if n.startswith(".")]


def test_round_trip(tmp_path):
    dst = tmp_path / "unet"
    save_converted(dst, CONFIG, PARAMS, component="unet")
    assert sorted(os.listdir(dst)) == ["config.json", "flax_params.safetensors"]
    config, params = load_converted(dst)
    assert config["block_out_channels"] == [32, 64] and config["_pasd_family"] == "pasd"
    assert config["_pasd_jax"] == {"format_version": 1, "component": "unet"}
    _assert_tree_equal(params, PARAMS)
    from safetensors.numpy import load_file

    assert "down_blocks_0/resnets_0/norm1/scale" in load_file(dst / "flax_params.safetensors")
    assert _leftovers(tmp_path) == []


def test_refuses_existing_destination_unless_overwrite(tmp_path):
    dst = tmp_path / "vae"
    save_converted(dst, CONFIG, PARAMS)
    with pytest.raises(FileExistsError, match=f"{dst} already exists"):
        save_converted(dst, CONFIG, {"x": {"bias": np.zeros(1, np.float32)}})
    save_converted(dst, {"_class_name": "AutoencoderKL"}, {"x": {"bias": np.zeros(1, np.float32)}}, overwrite=True)
    config, params = load_converted(dst)
    assert config["_class_name"] == "AutoencoderKL" and list(params) == ["x"]
    assert _leftovers(tmp_path) == []


def test_overwrite_never_replaces_a_folder_it_did_not_write(tmp_path):
    precious = tmp_path / "my_photos"
    precious.mkdir()
    (precious / "a.jpg").write_bytes(b"jpeg")
    with pytest.raises(FileExistsError, match="not a folder written by the pasd_jax converter"):
        save_converted(precious, CONFIG, PARAMS, overwrite=True)
    assert (precious / "a.jpg").read_bytes() == b"jpeg"


def test_failure_mid_save_leaves_nothing(tmp_path, monkeypatch):
    def broken_save_file(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(weights, "save_file", broken_save_file)
    with pytest.raises(OSError, match="disk full"):
        save_converted(tmp_path / "unet", CONFIG, PARAMS)
    assert os.listdir(tmp_path) == []


def test_failure_mid_overwrite_keeps_the_old_folder(tmp_path, monkeypatch):
    dst = tmp_path / "unet"
    save_converted(dst, CONFIG, PARAMS)
    monkeypatch.setattr(weights, "save_file", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        save_converted(dst, {"other": 1}, PARAMS, overwrite=True)
    assert load_converted(dst)[0]["_class_name"] == "UNet2DConditionModel"
    assert _leftovers(tmp_path) == []


def test_load_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_converted(tmp_path / "nowhere")
    (tmp_path / "diffusers_unet").mkdir()
    (tmp_path / "diffusers_unet" / "config.json").write_text(json.dumps(CONFIG))
    with pytest.raises(FileNotFoundError, match=r"diffusers_unet has no flax_params\.safetensors"):
        load_converted(tmp_path / "diffusers_unet")


def test_bad_parameter_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="contains '/'"):
        save_converted(tmp_path / "x", CONFIG, {"a/b": np.zeros(1)})
    assert os.listdir(tmp_path) == []
