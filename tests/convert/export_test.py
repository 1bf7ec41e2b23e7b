"""`python -m convert export`: converted folders back to PyTorch diffusers folders.

torch -> ours -> torch is exact (same keys, bit-identical float32 tensors), and diffusers /
transformers load the exported folders with `from_pretrained` and give the original outputs.
"""

import os
import shutil

import numpy as np
import pytest

from convert.__main__ import main
from tests.convert import sd_fixtures as F

torch = pytest.importorskip("torch")
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURE_UNET = os.path.join(REPO, "tests", "fixtures", "golden", "pasd", "unet")
SHARED_CONTROLNET = os.path.join(os.path.dirname(REPO), "shared", "reference", "golden", "pasd", "controlnet")


def _saved(folder):
    from safetensors.numpy import load_file

    name = next(n for n in os.listdir(folder) if n.endswith(".safetensors"))
    return load_file(os.path.join(folder, name))


def _assert_exact(exported_dir, original_dir):
    got, want = _saved(exported_dir), _saved(original_dir)
    want = {k: v for k, v in want.items() if not k.endswith("position_ids") and ".Conv2d_0." not in k}
    if any(k.startswith("encoder.layers.") for k in want):  # transformers 5 saves CLIP without the
        want = {f"text_model.{k}": v for k, v in want.items()}  # `text_model.` prefix; we keep it
    assert got.keys() == want.keys(), sorted(set(got) ^ set(want))[:10]
    for key, value in want.items():
        assert got[key].dtype == value.dtype and np.array_equal(got[key], value), key


def test_sd_pipeline_round_trip_is_exact(tmp_path, capsys):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    modules = F.make_torch_pipeline("sd1", seed=5)
    src = F.save_diffusers_folder(modules, tmp_path / "sd")
    assert main([src, str(tmp_path / "converted"), "-q"]) == 0
    assert main(["export", str(tmp_path / "converted"), str(tmp_path / "torch")]) == 0
    assert "exported unet, vae, text_encoder" in capsys.readouterr().out
    for name in ("unet", "vae", "text_encoder"):
        _assert_exact(tmp_path / "torch" / name, os.path.join(src, name))
    assert sorted(os.listdir(tmp_path / "torch" / "tokenizer")) == sorted(os.listdir(os.path.join(src, "tokenizer")))

    unet = UNet2DConditionModel.from_pretrained(tmp_path / "torch" / "unet").eval()
    x, ctx = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)), torch.randn(1, 3, 768)
    with torch.no_grad():
        assert torch.equal(unet(x, 3, ctx).sample, modules["unet"](x, 3, ctx).sample)
        vae = AutoencoderKL.from_pretrained(tmp_path / "torch" / "vae").eval()
        assert torch.equal(vae.decode(x).sample, modules["vae"].decode(x).sample)
        text = CLIPTextModel.from_pretrained(tmp_path / "torch" / "text_encoder").eval()
        ids = torch.arange(10)[None]
        assert torch.equal(text(ids).last_hidden_state, modules["text_encoder"](ids).last_hidden_state)


def test_pasd_round_trip_is_exact(tmp_path):
    """A PASD checkpoint (UNet with PACA; ControlNet where the shared reference is present)."""
    ckpt = tmp_path / "checkpoint-1"
    ckpt.mkdir()
    shutil.copytree(FIXTURE_UNET, ckpt / "unet")
    if os.path.isdir(SHARED_CONTROLNET):
        shutil.copytree(SHARED_CONTROLNET, ckpt / "controlnet")
    assert main([str(ckpt), str(tmp_path / "converted"), "-q"]) == 0
    assert main(["export", str(tmp_path / "converted"), str(tmp_path / "torch"), "-q"]) == 0
    for name in os.listdir(ckpt):
        _assert_exact(tmp_path / "torch" / name, ckpt / name)
    # one component folder exports on its own too
    assert main(["export", str(tmp_path / "converted" / "unet"), str(tmp_path / "unet_only"), "-q"]) == 0
    _assert_exact(tmp_path / "unet_only", ckpt / "unet")


def test_export_destination_rules(tmp_path, capsys):
    assert main(["export", str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    assert "does not exist" in capsys.readouterr().err
    not_converted = tmp_path / "plain"
    not_converted.mkdir()
    assert main(["export", str(not_converted), str(tmp_path / "out")]) == 1
    assert "neither a converted component folder" in capsys.readouterr().err
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    shutil.copytree(FIXTURE_UNET, ckpt / "unet")
    assert main([str(ckpt), str(tmp_path / "converted"), "-q"]) == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "keep.txt").write_text("x")
    assert main(["export", str(tmp_path / "converted"), str(mine), "-q", "--overwrite"]) == 1
    assert "refusing to overwrite" in capsys.readouterr().err and os.listdir(mine) == ["keep.txt"]
    assert main(["export", str(tmp_path / "converted"), str(tmp_path / "out"), "-q"]) == 0
    assert main(["export", str(tmp_path / "converted"), str(tmp_path / "out"), "-q"]) == 1
    assert main(["export", str(tmp_path / "converted"), str(tmp_path / "out"), "-q", "--overwrite"]) == 0
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".")]
