"""sample.py refuses wrong flags, unusable outputs and corrupt model files with one line, before
any model loads (issue #13, sampling half). No test here runs the networks: `load_models` is
replaced by a function that fails the test, except where corrupt files must be read."""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import pathlib

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from pasd_jax.assembly import defaults as assembly_defaults
from pasd_jax.assembly import loader, weights
from pasd_jax.fixtures import tiny
from pasd_jax.sampling import cli, defaults, demo
from pasd_jax.sampling.pipeline import RestoreOptions

REPO = pathlib.Path(__file__).resolve().parents[2]


@pytest.fixture
def no_load(monkeypatch):
    """Make any model load (or smoke-model build) fail the test."""
    def boom(*args, **kwargs):
        raise AssertionError("a model was loaded before the flags were checked")
    monkeypatch.setattr(cli, "load_models", boom)
    monkeypatch.setattr(demo, "demo_model_dir", boom)


@pytest.fixture
def setup(tmp_path):
    """A checkpoint folder that has only a scheduler config (enough for every check; loading it fails),
    a folder with one image and a regular file."""
    ckpt = tmp_path / "ckpt"
    (ckpt / "scheduler").mkdir(parents=True)
    (ckpt / "scheduler" / "scheduler_config.json").write_text(json.dumps(assembly_defaults.SCHEDULER))
    photos = tmp_path / "photos"
    photos.mkdir()
    from PIL import Image
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(photos / "a.png")
    (tmp_path / "file.txt").write_text("x")
    return tmp_path, ["--ckpt", str(ckpt), "--input", str(photos), "--output", str(tmp_path / "out")]


def _one_error_line(capsys, *needles):
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    for needle in needles:
        assert needle in err[0], err[0]
    return err[0]


BAD_FLAGS = [
    (["--steps", "0"], "--steps"), (["--steps", "-1"], "--steps"), (["--steps", "2.5"], "--steps"),
    (["--tile-size", "0"], "--tile-size"), (["--tile-overlap", "-1"], "--tile-overlap"),
    (["--tile-size", "64", "--tile-overlap", "64"], "--tile-overlap"),
    (["--tiles-per-call", "0"], "--tiles-per-call"),
    (["--guidance-scale", "nan"], "--guidance-scale"), (["--guidance-scale", "inf"], "--guidance-scale"),
    (["--guidance-scale", "-2"], "--guidance-scale"), (["--conditioning-scale", "nan"], "--conditioning-scale"),
    (["--added-noise-level", "2000"], "--added-noise-level"), (["--added-noise-level", "1000"], "--added-noise-level"),
    (["--added-noise-level", "-1"], "--added-noise-level"),
    (["--eta", "nan"], "--eta"), (["--eta", "1.5"], "--eta"), (["--seed", "-1"], "--seed"),
    (["--seed", str(2**32)], "--seed"), (["--upscale", "0"], "--upscale"), (["--upscale", "x"], "--upscale"),
    (["--process-size", "0"], "--process-size"), (["--process-size", "100000"], "--process-size"),
    (["--steps", "1001"], "--steps"), (["--demo"], "--demo"), (["--no-such-flag"], "--no-such-flag"),
]


@pytest.mark.parametrize("extra, flag", BAD_FLAGS, ids=[" ".join(b[0]) for b in BAD_FLAGS])
def test_bad_flag_is_one_line_exit_2_before_loading(setup, no_load, capsys, extra, flag):
    tmp_path, base_args = setup
    assert cli.main(base_args + extra) == 2
    _one_error_line(capsys, flag)
    assert not (tmp_path / "out").exists()


def test_noise_level_checked_against_the_schedule_length(setup, no_load, capsys):
    tmp_path, base_args = setup
    short = dict(assembly_defaults.SCHEDULER, num_train_timesteps=500)
    (tmp_path / "ckpt" / "scheduler" / "scheduler_config.json").write_text(json.dumps(short))
    assert cli.main(base_args + ["--added-noise-level", "600"]) == 2
    _one_error_line(capsys, "--added-noise-level", "[0, 499]", "scheduler_config.json")
    sched = tmp_path / "s.json"
    sched.write_text(json.dumps(dict(assembly_defaults.SCHEDULER, num_train_timesteps=50)))
    assert cli.main(base_args + ["--scheduler-config", str(sched), "--steps", "60", "--added-noise-level", "10"]) == 2
    _one_error_line(capsys, "--steps", "≤ 50", "s.json")


def test_demo_flags_checked_before_the_smoke_model_is_built(tmp_path, no_load, capsys):
    assert cli.main(["--demo", "--output", str(tmp_path / "d"), "--added-noise-level", "5000"]) == 2
    _one_error_line(capsys, "--added-noise-level")
    assert not (tmp_path / "d").exists()  # not even the generated input


def test_unusable_output_is_refused_before_loading(setup, no_load, capsys):
    tmp_path, base_args = setup
    args = base_args[:-1]  # everything up to --output's value
    a_file = str(tmp_path / "file.txt")
    for output, needle in [(a_file, "existing file"), (a_file + "/sub", "is a file, not a folder"),
                           (a_file + "/sub/deeper", "is a file, not a folder"),
                           (str(tmp_path / "x.png"), "looks like an image file")]:
        assert cli.main(args + [output]) == 2
        _one_error_line(capsys, "--output", needle)
    single = ["--ckpt", base_args[1], "--input", str(tmp_path / "photos" / "a.png"), "--output"]
    assert cli.main(single + [a_file]) == 2  # an existing non-image file for one input
    _one_error_line(capsys, "--output", "existing file")
    assert cli.main(single + [a_file + "/x.png"]) == 2
    _one_error_line(capsys, "--output", "is a file, not a folder")
    assert (tmp_path / "file.txt").read_text() == "x" and not (tmp_path / "x.png").exists()


def test_missing_input_and_scheduler_named_before_loading(setup, no_load, capsys):
    tmp_path, base_args = setup
    assert cli.main(base_args[:3] + [str(tmp_path / "nope")] + base_args[4:]) == 2
    _one_error_line(capsys, "--input", "nope")
    (tmp_path / "ckpt" / "scheduler" / "scheduler_config.json").write_text("{not json")
    assert cli.main(base_args) == 1
    _one_error_line(capsys, "scheduler_config.json", "not valid JSON")


def test_help_states_every_default_and_explains_options(capsys):
    assert cli.main(["--help"]) == 0
    out = " ".join(capsys.readouterr().out.split())  # undo argparse's line wrapping
    for default in (defaults.STEPS, defaults.GUIDANCE_SCALE, defaults.ADDED_NOISE_LEVEL, defaults.PROCESS_SIZE,
                    defaults.COLOR_FIX, defaults.TILE_SIZE, defaults.TILE_OVERLAP, defaults.TILES_PER_CALL,
                    defaults.VAE_TILING, defaults.UPSCALE, defaults.ETA, defaults.SEED,
                    defaults.CONDITIONING_SCALE):
        assert f"default: {default}" in out, default
    squeezed = out.replace(" ", "")  # argparse may also break lines after a hyphen
    assert defaults.NEGATIVE_PROMPT.replace(" ", "") in squeezed and defaults.ADDED_PROMPT.replace(" ", "") in squeezed
    assert "low-frequency colour from the input" in out      # --color-fix explained
    assert "bounds memory" in out and f"{defaults.DECODER_TILE} latent px" in out  # --vae-tiling explained


def _ns(**kw):
    base = dict(process_size=None, steps=defaults.STEPS, guidance_scale=defaults.GUIDANCE_SCALE,
                conditioning_scale=1.0, no_ans=False, added_noise_level=900, init_with_noise=False, eta=0.0,
                upscale=1, color_fix="wavelet", mode="realisr", added_prompt="", negative_prompt=None,
                tile_size=defaults.TILE_SIZE, tile_overlap=defaults.TILE_OVERLAP, tiles_per_call=1,
                vae_tiling="auto", scheduler=None, ans_compat=defaults.ANS_COMPAT)
    return argparse.Namespace(**{**base, **kw})


def test_smoke_models_run_small_and_cpu_runs_get_a_hint():
    assert cli.restore_options(_ns(), smoke=True).process_size == demo.SMOKE_PROCESS_SIZE
    assert cli.restore_options(_ns(), smoke=False).process_size == defaults.PROCESS_SIZE
    assert cli.restore_options(_ns(process_size=64), smoke=True).process_size == 64  # an explicit size wins
    real = cli.cpu_hint(RestoreOptions(), smoke=False, backend="cpu")
    assert "minutes per image" in real and "--process-size" in real and "--steps" in real
    assert cli.cpu_hint(RestoreOptions(process_size=demo.SMOKE_PROCESS_SIZE), smoke=True, backend="cpu") is None
    assert "--process-size 192" in cli.cpu_hint(RestoreOptions(), smoke=True, backend="cpu")
    assert cli.cpu_hint(RestoreOptions(), smoke=False, backend="gpu") is None


def test_summary_median_leaves_out_the_compiling_image_and_counts_ignored_files(tmp_path):
    line = cli._summary(3, [30.0, 1.0, 2.0], 0, [], [], 40.0)
    assert "median 2.00 s/image over all but the first" in line and "first took 30.00 s including compilation" in line
    assert "including compilation" in cli._summary(1, [5.0], 0, [], [], 6.0)
    (tmp_path / "a.png").write_bytes(b"")
    (tmp_path / "a.txt").write_text("caption")           # a sidecar prompt: read, not ignored
    (tmp_path / "notes.md").write_text("")
    (tmp_path / "raw.cr2").write_bytes(b"")
    (tmp_path / ".hidden").write_text("")
    ignored = cli.ignored_files(tmp_path, [tmp_path / "a.png"])
    assert [p.name for p in ignored] == ["notes.md", "raw.cr2"]
    assert "ignored 2 non-image files (notes.md, raw.cr2)" in cli._summary(1, [1.0], 0, ignored, [], 1.0)


def test_default_output_folders_are_git_ignored():
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    for path in (f"{demo.DEMO_OUTPUT}/demo_input.png", "out/x.png", "converted/pasd/pasd_jax.json"):
        assert subprocess.run(["git", "check-ignore", "-q", path], cwd=REPO).returncode == 0, path


# ---- corrupt converted weights ---------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    return tiny.make_tiny_pipeline(tmp_path_factory.mktemp("models") / "pasd", seed=0, levels=2)


def _truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _reshape_first(path):
    flat = load_file(path)
    key = sorted(flat)[0]
    flat[key] = np.zeros((3,) + flat[key].shape, flat[key].dtype)
    save_file(flat, path)


CORRUPTIONS = {
    "truncated": ("vae/flax_params.safetensors", _truncate, "truncated or corrupt"),
    "empty": ("unet/flax_params.safetensors", lambda p: p.write_bytes(b""), "truncated or corrupt"),
    "wrong shape": ("controlnet/flax_params.safetensors", _reshape_first, "do not fit"),
    "garbage json": ("unet/config.json", lambda p: p.write_text("{garbage"), "not valid JSON"),
    "json list": ("vae/config.json", lambda p: p.write_text("[1, 2]"), "expected a JSON object"),
    "missing config": ("controlnet/config.json", lambda p: p.unlink(), "no config.json"),
    "bad vocab": ("tokenizer/vocab.json", lambda p: p.write_text("{garb"), "tokenizer"),
    "bad manifest": ("pasd_jax.json", lambda p: p.write_text("{garb"), "not valid JSON"),
}


@pytest.mark.parametrize("name", list(CORRUPTIONS))
def test_corrupt_weight_file_is_named(tiny_ckpt, tmp_path, name):
    rel, damage, reason = CORRUPTIONS[name]
    broken = pathlib.Path(shutil.copytree(tiny_ckpt, tmp_path / "broken"))
    damage(broken / rel)
    with pytest.raises((ValueError, FileNotFoundError)) as info:
        loader.load_models(broken)
    message = str(info.value)
    assert "\n" not in message and reason in message
    assert str(broken / pathlib.Path(rel).parent) in message, message  # names the file (or its folder)


def test_corrupt_base_is_named_by_the_cli_without_traceback(tiny_ckpt, tmp_path, capsys):
    base = pathlib.Path(shutil.copytree(tiny_ckpt, tmp_path / "base"))
    _truncate(base / "unet" / weights.PARAMS_NAME)
    from PIL import Image
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "a.png")
    rc = cli.main(["--ckpt", str(tiny_ckpt), "--base", str(base), "--input", str(tmp_path / "a.png"),
                   "--output", str(tmp_path / "out")])
    assert rc == 1
    line = _one_error_line(capsys, str(base / "unet" / weights.PARAMS_NAME), "truncated or corrupt")
    assert "Traceback" not in line and not (tmp_path / "out").exists()
