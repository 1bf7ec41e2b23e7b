"""sample.py as a user runs it: folders, bad files, no overwriting, seeds, sidecar prompts, --demo,
and loading a PASD checkpoint over a swapped base."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pasd_jax.assembly import weights
from pasd_jax.assembly.loader import load_models
from pasd_jax.fixtures import tiny
from pasd_jax.sampling import cli

FAST = ["--steps", "2", "--process-size", "16"]


pytestmark = pytest.mark.usefixtures("fast_compile")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "pasd"
    return str(tiny.make_tiny_pipeline(folder, seed=0, levels=2))


@pytest.fixture
def photos(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)).save(src / "a.png")
    Image.fromarray(rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)).save(src / "b.jpg", quality=90)
    (src / "a.txt").write_text("a red house")
    (src / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    (src / "notes.md").write_text("not an image: ignored, and counted in the summary")
    return src


def test_folder_run_bad_file_overwrite_and_seed(ckpt, photos, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["--ckpt", ckpt, "--input", str(photos), "--output", str(out), *FAST]
    assert cli.main(args) == 1  # bad.png failed, the others were written
    err = capsys.readouterr().err
    assert "bad.png" in err and "FAILED 1" in err and "restored 2 images" in err
    assert "a.png -> " in err and "processed at 24x16 px, written 24x16 px" in err
    assert "ignored 1 non-image file (notes.md)" in err and "over all but the first" in err
    assert sorted(p.name for p in out.iterdir()) == ["a.png", "b.png"]
    assert Image.open(out / "a.png").size == (24, 16)
    first = (out / "a.png").read_bytes()

    assert cli.main(args) == 1  # existing outputs are refused before any work
    assert "output exists" in capsys.readouterr().err
    assert (out / "a.png").read_bytes() == first

    assert cli.main(args + ["--skip-existing"]) == 1
    assert "skipped 2 existing" in capsys.readouterr().err

    assert cli.main(args + ["--overwrite"]) == 1  # same seed: the same bytes
    assert (out / "a.png").read_bytes() == first
    assert cli.main(args + ["--overwrite", "--seed", "7"]) == 1
    assert (out / "a.png").read_bytes() != first
    assert not list(out.glob(".*tmp"))  # no temporary files left behind


def test_single_file_upscale_to_named_output(ckpt, photos, tmp_path, capsys):
    dst = tmp_path / "x" / "restored.png"
    assert cli.main(["--ckpt", ckpt, "--input", str(photos / "a.png"), "--output", str(dst), "--upscale", "2",
                     *FAST]) == 0
    assert Image.open(dst).size == (48, 32)
    assert "written 48x32 px" in capsys.readouterr().err


def test_usage_errors(ckpt, photos, tmp_path, capsys):
    assert cli.main(["--input", str(photos), "--output", str(tmp_path / "o")]) == 2
    assert "--ckpt is required" in capsys.readouterr().err
    assert cli.main(["--ckpt", ckpt, "--input", str(tmp_path / "nope"), "--output", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli.main(["--ckpt", str(tmp_path / "nockpt"), "--input", str(photos), "--output", str(tmp_path / "o")]) == 1
    assert "nockpt" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_read_prompt_joins_sidecar_and_cli(photos):
    assert cli.read_prompt(photos / "a.png", "old photo") == "a red house, old photo"
    assert cli.read_prompt(photos / "b.jpg", "") == ""


def test_demo_says_smoke_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PASD_JAX_HOME", str(tmp_path / "home"))
    assert cli.main(["--demo", "--output", str(tmp_path / "demo"), "--steps", "1"]) == 0
    err = capsys.readouterr().err
    assert "SMOKE MODEL" in err
    assert f"demo input: {tmp_path / 'demo' / 'input' / 'demo_input.png'}" in err  # the generated input is named
    assert "smoke model: processing at 192 px" in err
    img = np.asarray(Image.open(tmp_path / "demo" / "demo_input.png"))
    assert img.shape == (192, 192, 3) and img.std() > 1.0


def test_demo_runs_the_smoke_model_on_the_users_input(photos, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PASD_JAX_HOME", str(tmp_path / "home"))
    out = tmp_path / "mine"
    assert cli.main(["--demo", "--input", str(photos / "a.png"), "--output", str(out), *FAST]) == 0
    err = capsys.readouterr().err
    assert "SMOKE MODEL" in err and "demo input" not in err
    assert sorted(p.name for p in out.iterdir()) == ["a.png"]  # the user's image, not a generated one
    assert Image.open(out / "a.png").size == (24, 16)


def test_base_swap_keeps_paca_and_controlnet(ckpt, tmp_path):
    base = tiny.make_tiny_pipeline(tmp_path / "base", seed=100, levels=2, family="stock")
    m = load_models(ckpt, base=base)
    _, pasd_unet = weights.load_converted(f"{ckpt}/unet")
    _, base_unet = weights.load_converted(f"{base}/unet")
    _, pasd_cn = weights.load_converted(f"{ckpt}/controlnet")
    _, base_vae = weights.load_converted(f"{base}/vae")
    got = m.params["unet"]
    np.testing.assert_array_equal(got["conv_in"]["kernel"], base_unet["conv_in"]["kernel"])
    paca = got["up_blocks_0"]["pixel_attentions_0"]["proj_in"]["kernel"]
    np.testing.assert_array_equal(paca, pasd_unet["up_blocks_0"]["pixel_attentions_0"]["proj_in"]["kernel"])
    np.testing.assert_array_equal(m.params["controlnet"]["conv_in"]["kernel"], pasd_cn["conv_in"]["kernel"])
    np.testing.assert_array_equal(m.params["vae"]["decoder"]["conv_out"]["kernel"],
                                  base_vae["decoder"]["conv_out"]["kernel"])
    with pytest.raises(ValueError, match="PASD UNet"):
        load_models(base)  # a stock pipeline is not a PASD checkpoint


def test_colorize_keeps_the_original_luma(ckpt, tmp_path):
    gray = np.random.default_rng(3).integers(0, 255, (16, 24), dtype=np.uint8)
    Image.fromarray(gray, mode="L").save(tmp_path / "old.png")
    dst = tmp_path / "color.png"
    assert cli.main(["--ckpt", ckpt, "--input", str(tmp_path / "old.png"), "--output", str(dst), "--mode", "colorize",
                     *FAST]) == 0
    out = np.asarray(Image.open(dst).convert("RGB"), np.float64)
    luma = out @ np.array([0.299, 0.587, 0.114])
    assert out.shape == (16, 24, 3)
    inside = ((out > 0) & (out < 255)).all(-1)  # random chroma may clip a channel, which moves the luma
    assert inside.mean() > 0.2, inside.mean()
    assert np.abs(luma - gray)[inside].max() <= 2.5  # YUV round trip of 8-bit values
