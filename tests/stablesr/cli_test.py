"""sample.py with a converted StableSR model (the smoke model): auto-detection, folder restore
through the tile path (VQGAN patches + latent canvas), overwrite refusal, seed determinism, _old."""

import numpy as np
import pytest
from PIL import Image

from pasd_jax.sampling import cli, stablesr_cli
from pasd_jax.fixtures.stablesr_tiny import make_smoke_model

FAST = ["--ddpm-steps", "2", "--input-size", "64", "--tile-overlap", "4", "--vqgantile-size", "64",
        "--vqgantile-stride", "32", "--color-fix", "wavelet"]


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    return str(make_smoke_model(tmp_path_factory.mktemp("models") / "stablesr"))


def _write(folder, name, h, w, seed):
    folder.mkdir(exist_ok=True)
    rgb = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(folder / name)


def test_method_is_detected_from_the_folder(smoke, tmp_path):
    args = cli.build_parser().parse_args(["--ckpt", smoke])
    assert stablesr_cli.resolve_method(args) == "stablesr"
    args = cli.build_parser().parse_args(["--ckpt", str(tmp_path)])
    assert stablesr_cli.resolve_method(args) == "pasd"
    assert stablesr_cli.options_from_args(cli.build_parser().parse_args(["--ckpt", smoke])).ddpm_steps == 1000
    with pytest.raises(ValueError, match="--tile-overlap"):
        stablesr_cli.options_from_args(cli.build_parser().parse_args(["--tile-overlap", "64"]))


def test_folder_restore_tile_path(smoke, tmp_path, capsys):
    src, out = tmp_path / "lr", tmp_path / "sr"
    _write(src, "a.png", 24, 24, 0)
    _write(src, "b.png", 32, 24, 1)
    argv = ["--ckpt", smoke, "--input", str(src), "--output", str(out), "--upscale", "4", *FAST]
    assert cli.main(argv) == 0
    assert "loaded StableSR" in capsys.readouterr().err
    a = np.asarray(Image.open(out / "a.png"))
    assert a.shape == (96, 96, 3) and Image.open(out / "b.png").size == (96, 128)
    assert cli.main(argv) == 1  # outputs exist: refused before any work
    assert "pass --overwrite" in capsys.readouterr().err
    np.testing.assert_array_equal(np.asarray(Image.open(out / "a.png")), a)
    assert cli.main(argv + ["--overwrite"]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(out / "a.png")), a)  # same seed, same output
    assert cli.main(argv + ["--overwrite", "--seed", "7"]) == 0
    assert np.abs(np.asarray(Image.open(out / "a.png")).astype(int) - a).max() > 0


def test_old_script_and_bad_input(smoke, tmp_path, capsys):
    src, out = tmp_path / "lr", tmp_path / "sr"
    _write(src, "c.png", 64, 64, 2)
    (src / "broken.png").write_bytes(b"not a png")
    argv = ["--ckpt", smoke, "--method", "stablesr", "--sr-script", "old", "--input", str(src),
            "--output", str(out), *FAST]
    assert cli.main(argv) == 1  # the unreadable file is reported and makes the status 1
    err = capsys.readouterr().err
    assert "broken.png" in err and "FAILED 1" in err
    assert Image.open(out / "c.png").size == (64, 64) and not (out / "broken.png").exists()
