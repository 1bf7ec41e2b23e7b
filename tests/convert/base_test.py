"""`python -m convert base/list` and the PASD/base swap: bases land in $PASD_JAX_HOME atomically,
resolve by name, and swapping one under a PASD model replaces exactly the stock UNet weights
(PACA and the whole ControlNet stay PASD's); an architecture mismatch is a clear error.
"""

import json
import os

import numpy as np
import pytest

from convert.__main__ import main
from pasd_jax.assembly import home, weights
from pasd_jax.assembly.init import init_params
from pasd_jax.assembly.paths import flatten
from pasd_jax.fixtures import tiny
from tests.convert import sd_fixtures as F

torch = pytest.importorskip("torch")


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    modules = F.make_torch_pipeline("sd1", seed=3)
    folder = F.save_diffusers_folder(modules, root / "diffusers")
    single = F.save_single_file(F.ldm_single_file_state(modules, "sd1"), root / "majicmix.safetensors")
    return root, folder, single


@pytest.fixture
def models_home(tmp_path, monkeypatch):
    monkeypatch.setenv(home.HOME_ENV, str(tmp_path / "home"))
    return tmp_path / "home"


def _home_entries(models_home):
    bases = models_home / "bases"
    return sorted(os.listdir(bases)) if bases.is_dir() else []


def test_base_list_resolve(sources, models_home, capsys):
    _, folder, single = sources
    assert main(["list"]) == 0
    assert "no bases stored" in capsys.readouterr().out
    # a single file has no tokenizer: the first base needs --template (nothing is left behind)
    assert main(["base", single, "--name", "majicmix", "-q"]) == 1
    assert "no tokenizer" in capsys.readouterr().err and _home_entries(models_home) == []
    assert main(["base", single, "--name", "majicmix", "--template", folder]) == 0
    assert "stored base 'majicmix' (sd1, epsilon)" in capsys.readouterr().out
    # later SD1 bases borrow the stored base's tokenizer
    assert main(["base", single, "--name", "toonyou", "-q"]) == 0
    manifest = json.loads((models_home / "bases" / "toonyou" / "pasd_jax.json").read_text())
    assert manifest["tokenizer_from"].endswith(os.path.join("majicmix", "tokenizer"))
    assert main(["base", folder, "--name", "sd15", "-q"]) == 0  # a diffusers folder works too
    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    assert "majicmix\tSD1\tepsilon" in listed and "toonyou" in listed and "sd15" in listed
    assert home.list_bases() == ["majicmix", "sd15", "toonyou"]
    assert home.resolve_base("majicmix") == models_home / "bases" / "majicmix"
    assert sorted(os.listdir(home.resolve_base("toonyou"))) == [
        "pasd_jax.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]


def test_base_errors_leave_home_clean(sources, models_home, tmp_path, capsys):
    root, folder, single = sources
    assert main(["base", single, "--name", "a", "--template", folder, "-q"]) == 0
    assert main(["base", single, "--name", "a", "--template", folder, "-q"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main(["base", single, "--name", "a", "--template", folder, "-q", "--overwrite"]) == 0
    assert main(["base", single, "--name", "../evil", "-q"]) == 1
    assert "invalid base name" in capsys.readouterr().err
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    assert main(["base", str(bad), "--name", "b", "--template", folder, "-q"]) == 1
    assert "error: " in capsys.readouterr().err
    empty = tmp_path / "nothing"
    empty.mkdir()
    assert main(["base", str(empty), "--name", "c", "-q"]) == 1
    assert _home_entries(models_home) == ["a"]
    with pytest.raises(FileNotFoundError, match="available: a"):
        home.resolve_base("b")


def _pasd_folder(dst, unet_config):
    """A converted PASD model (pasd UNet with PACA + ControlNet) of the tiny SD1 architecture."""
    configs = {"unet": dict(unet_config, _class_name="UNet2DConditionModel", _pasd_family="pasd")}
    configs["controlnet"] = tiny.tiny_controlnet_config(configs["unet"])
    os.makedirs(dst)
    for i, (name, config) in enumerate(configs.items()):
        weights.save_converted(os.path.join(dst, name), config, init_params(config, 10 + i), component=name)
    with open(os.path.join(dst, weights.MANIFEST_NAME), "w") as f:
        json.dump({"components": list(configs)}, f)
    return dst


def test_base_swap_keeps_paca_and_controlnet(sources, models_home, tmp_path, capsys):
    _, folder, single = sources
    assert main(["base", single, "--name", "majicmix", "--template", folder, "-q"]) == 0
    pasd = _pasd_folder(tmp_path / "pasd", F.unet_config("sd1"))
    _, pasd_unet = weights.load_converted(pasd / "unet")
    _, base_unet = weights.load_converted(home.resolve_base("majicmix") / "unet")
    merged = flatten(home.merge_base_unet(pasd_unet, base_unet, what="test"))
    pasd_flat, base_flat = flatten(pasd_unet), flatten(base_unet)
    assert merged.keys() == pasd_flat.keys()
    paca = [p for p in merged if "pixel_attentions" in "/".join(p)]
    assert paca and len(merged) == len(base_flat) + len(paca)
    for path, value in merged.items():
        np.testing.assert_array_equal(value, pasd_flat[path] if path in paca else base_flat[path])

    # export with --base: UNet merged, ControlNet untouched, VAE / text encoder from the base
    assert main(["export", str(pasd), str(tmp_path / "torch"), "--base", "majicmix", "-q"]) == 0
    from safetensors.numpy import load_file

    from convert.export import torch_state

    exported = load_file(tmp_path / "torch" / "unet" / "diffusion_pytorch_model.safetensors")
    want = torch_state(home.merge_base_unet(pasd_unet, base_unet))
    assert exported.keys() == want.keys()
    assert all(np.array_equal(exported[k], want[k]) for k in want)
    controlnet = load_file(tmp_path / "torch" / "controlnet" / "diffusion_pytorch_model.safetensors")
    want = torch_state(weights.load_converted(pasd / "controlnet")[1])
    assert all(np.array_equal(controlnet[k], want[k]) for k in want)
    assert sorted(os.listdir(tmp_path / "torch")) == [
        "controlnet", "model_index.json", "pasd_jax_export.json", "scheduler", "text_encoder", "tokenizer",
        "unet", "vae"]


def test_architecture_mismatch_is_a_clear_error(sources, models_home, tmp_path, capsys):
    _, folder, single = sources
    assert main(["base", single, "--name", "majicmix", "--template", folder, "-q"]) == 0
    wider = dict(F.unet_config("sd1"), block_out_channels=[32, 64, 64, 64])
    pasd = _pasd_folder(tmp_path / "pasd", wider)
    assert main(["export", str(pasd), str(tmp_path / "torch"), "--base", "majicmix", "-q"]) == 1
    err = capsys.readouterr().err
    assert "different architectures" in err and "shape mismatch" in err and "down_blocks_1" in err
    assert not (tmp_path / "torch").exists()
    assert main(["export", str(pasd), str(tmp_path / "torch"), "--base", "nope", "-q"]) == 1
    assert "no base model 'nope'" in capsys.readouterr().err
