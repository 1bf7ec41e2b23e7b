"""`python -m convert`: errors leave nothing behind, existing outputs are protected, and a tiny
transformers CLIPTextModel / PASD checkpoint folder converts end to end.

Most tests call `convert.__main__.main` in-process (jax is already imported); one runs the module
as a subprocess to check the real exit code and stderr.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from convert.__main__ import main
from pasd_jax.assembly.registry import load_model
from pasd_jax.assembly.weights import load_converted

REPO = Path(__file__).resolve().parents[2]
FIXTURE_UNET = REPO / "tests" / "fixtures" / "golden" / "pasd" / "unet"
TINY_CLIP = dict(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                 max_position_embeddings=16, bos_token_id=98, eos_token_id=99, pad_token_id=1)


def _entries(folder) -> list[str]:
    return sorted(os.listdir(folder))


@pytest.fixture
def clip_folder(tmp_path):
    """A tiny transformers CLIPTextModel saved with `save_pretrained` -> (folder, torch model)."""
    torch = pytest.importorskip("torch")
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(**TINY_CLIP)).eval()
    folder = tmp_path / "clip"
    model.save_pretrained(folder)
    return folder, model


def _assert_clip_matches(dst, model):
    import torch

    module, params = load_model(dst)
    ids = np.random.default_rng(0).integers(2, 98, size=(2, 16)).astype(np.int32)
    got = module.apply({"params": params}, ids).last_hidden_state
    with torch.no_grad():
        want = model(torch.from_numpy(ids).long()).last_hidden_state.numpy()
    np.testing.assert_allclose(np.asarray(got), want, atol=1e-5)


# ---- usage and errors ----------------------------------------------------------------------
def test_help_and_usage(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "model_index.json" in out and "--overwrite" in out
    assert main([]) == 2
    assert "usage:" in capsys.readouterr().err


def test_folder_without_config_exits_1_and_creates_nothing(tmp_path):
    src, dst = tmp_path / "not_a_model", tmp_path / "out"
    src.mkdir()
    (src / "readme.txt").write_text("hi")
    result = subprocess.run([sys.executable, "-m", "convert", str(src), str(dst)], cwd=REPO,
                            capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert result.returncode == 1
    assert result.stderr.startswith("error: ")
    assert f"{src} has no config.json; expected a diffusers or transformers component folder" in result.stderr
    assert _entries(tmp_path) == ["not_a_model"]


def test_missing_source_and_unsupported_component(tmp_path, capsys):
    assert main([str(tmp_path / "nope"), str(tmp_path / "out")]) == 1
    assert "nope does not exist" in capsys.readouterr().err
    src = tmp_path / "unet2d"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    assert main([str(src), str(tmp_path / "out")]) == 1
    assert "_class_name='UNet2DModel'" in capsys.readouterr().err
    assert _entries(tmp_path) == ["unet2d"]


def test_unexpected_errors_keep_their_traceback(tmp_path, capsys, monkeypatch):
    """Expected errors are one line (above); a bug prints its traceback, exit 1, nothing written."""
    from convert import core

    def broken(*args, **kwargs):
        raise RuntimeError("simulated converter bug")

    monkeypatch.setattr(core, "convert_folder", broken)
    (tmp_path / "src").mkdir()
    assert main([str(tmp_path / "src"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "RuntimeError: simulated converter bug" in err
    assert err.strip().splitlines()[-1].startswith("error: unexpected failure")
    assert not (tmp_path / "out").exists()


def test_existing_destination_needs_overwrite(clip_folder, tmp_path, capsys):
    src, model = clip_folder
    dst = tmp_path / "out"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    assert main([str(src), str(dst), "-q"]) == 1
    assert "already exists" in capsys.readouterr().err
    assert main([str(src), str(dst), "-q", "--overwrite"]) == 1  # not ours: never replaced
    assert "refusing to overwrite" in capsys.readouterr().err
    assert _entries(dst) == ["keep.txt"]

    (dst / "keep.txt").unlink()  # an empty folder may be replaced, and a converted one too
    assert main([str(src), str(dst), "-q", "--overwrite"]) == 0
    assert main([str(src), str(dst), "-q"]) == 1
    assert main([str(src), str(dst), "-q", "--overwrite"]) == 0
    _assert_clip_matches(dst, model)
    assert [n for n in _entries(tmp_path) if n.startswith(".")] == []


def test_destination_under_a_file_is_one_line_before_reading_weights(clip_folder, tmp_path, capsys):
    src, _ = clip_folder
    (tmp_path / "file.txt").write_text("x")
    assert main([str(src), str(tmp_path / "file.txt" / "sub"), "-q"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: cannot create") and "is a file, not a folder" in err[0]
    assert (tmp_path / "file.txt").read_text() == "x"
    from convert import export
    with pytest.raises(ValueError, match="is a file, not a folder"):  # `python -m convert export` too
        export.check_export_destination(str(tmp_path / "file.txt" / "sub"), overwrite=False)
    assert main([str(src), str(tmp_path / "o"), "--lora", "x.safetensors:nan"]) == 1  # a LoRA multiplier
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--lora x.safetensors:nan" in err[0] and "finite" in err[0]
    assert not (tmp_path / "o").exists()


# ---- end to end ----------------------------------------------------------------------------
@pytest.mark.parametrize("safe_serialization", [True, False], ids=["safetensors", "bin"])
def test_clip_text_model_end_to_end(tmp_path, capsys, safe_serialization):
    torch = pytest.importorskip("torch")
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    model = CLIPTextModel(CLIPTextConfig(**TINY_CLIP)).eval()
    src = tmp_path / "text_encoder"
    model.save_pretrained(src, safe_serialization=safe_serialization)
    assert main([str(src), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "text_encoder: " in out and "converted 1 component" in out
    config, _ = load_converted(tmp_path / "out")
    assert config["_pasd_jax"]["component"] == "text_encoder" and config["hidden_size"] == 32
    _assert_clip_matches(tmp_path / "out", model)


def test_non_finite_weights_warn_with_key(clip_folder, tmp_path, capsys):
    from safetensors.numpy import load_file, save_file

    src, _ = clip_folder
    path = src / "model.safetensors"
    state = load_file(path)
    key = next(k for k in state if k.endswith("final_layer_norm.bias"))  # transformers 5 drops `text_model.`
    state[key] = np.full_like(state[key], np.nan)
    save_file(state, path, metadata={"format": "pt"})
    assert main([str(src), str(tmp_path / "out"), "-q"]) == 0
    err = capsys.readouterr().err
    assert err.startswith("warning: ") and key in err and "NaN or Inf" in err


def test_pipeline_folder(clip_folder, tmp_path, capsys):
    clip, model = clip_folder
    src = tmp_path / "sd"
    src.mkdir()
    os.rename(clip, src / "text_encoder")
    for name in ("tokenizer", "scheduler", "safety_checker"):
        (src / name).mkdir()
        (src / name / "config.json").write_text("{}")
    (src / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    dst = tmp_path / "converted"
    assert main([str(src), str(dst)]) == 0
    captured = capsys.readouterr()
    assert "not converted (not used by pasd_jax): safety_checker" in captured.err
    assert _entries(dst) == ["model_index.json", "pasd_jax.json", "scheduler", "text_encoder", "tokenizer"]
    manifest = json.loads((dst / "pasd_jax.json").read_text())
    assert list(manifest["components"]) == ["text_encoder"] and manifest["copied"] == ["tokenizer", "scheduler"]
    _assert_clip_matches(dst / "text_encoder", model)
    assert main([str(src), str(dst), "-q", "--overwrite"]) == 0  # a converted pipeline may be replaced


def test_pipeline_failure_leaves_no_partial_output(clip_folder, tmp_path, capsys):
    clip, _ = clip_folder
    src = tmp_path / "sd"
    src.mkdir()
    os.rename(clip, src / "text_encoder")  # converts fine ...
    (src / "vae").mkdir()  # ... but the VAE has no weights
    (src / "vae" / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    assert main([str(src), str(tmp_path / "converted"), "-q"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "vae: no weights file" in err
    assert _entries(tmp_path) == ["sd"]


def test_pasd_checkpoint_folder(tmp_path, capsys):
    """`checkpoint-N/` with unet/ (and controlnet/ where the shared reference is present)."""
    ckpt = tmp_path / "checkpoint-100"
    ckpt.mkdir()
    (ckpt / "unet").symlink_to(FIXTURE_UNET, target_is_directory=True)
    (ckpt / "optimizer.bin").write_bytes(b"never read")
    shared = REPO.parent / "shared" / "reference" / "golden" / "pasd" / "controlnet"
    if shared.is_dir():
        (ckpt / "controlnet").symlink_to(shared, target_is_directory=True)
    dst = tmp_path / "pasd"
    assert main([str(ckpt), str(dst)]) == 0
    assert "pasd unet: " in capsys.readouterr().out
    module, params = load_model(dst / "unet")
    assert module.family == "pasd"
    assert load_converted(dst / "unet")[0]["_pasd_family"] == "pasd"
    assert any("pixel_attentions" in "/".join(map(str, path))
               for path, _ in jax.tree_util.tree_flatten_with_path(params)[0])
    if shared.is_dir():
        assert load_converted(dst / "controlnet")[0]["_pasd_jax"]["component"] == "controlnet"
