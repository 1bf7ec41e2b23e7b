"""Single-file (original LDM layout) checkpoints: the same tiny SD pipeline saved as a diffusers
folder and as a single file converts to identical Flax params, whichever way it is stored.

The LDM file is built by the inverse of our key tables and checked against diffusers' own
`single_file_utils.convert_ldm_*` functions (the oracle) before anything of ours reads it.
"""

import json
import os
import pickle
import zipfile

import jax
import numpy as np
import pytest

from convert import ldm
from convert.__main__ import main
from pasd_jax.assembly.paths import flatten
from pasd_jax.assembly.registry import load_model
from pasd_jax.assembly.weights import load_converted
from tests.convert import sd_fixtures as F

torch = pytest.importorskip("torch")

COMPONENTS = ("unet", "vae", "text_encoder")


@pytest.fixture(scope="module")
def pipelines(tmp_path_factory):
    """model type -> (model type, torch modules, diffusers folder, converted folder, fp32 LDM state),
    each built once per module."""
    cache = {}

    def get(model_type):
        if model_type not in cache:
            root = tmp_path_factory.mktemp(model_type)
            modules = F.make_torch_pipeline(model_type)
            folder = F.save_diffusers_folder(modules, root / "diffusers")
            assert main([folder, str(root / "converted"), "-q"]) == 0
            cache[model_type] = (model_type, modules, folder, root / "converted",
                                 F.ldm_single_file_state(modules, model_type))
        return cache[model_type]

    return get


@pytest.fixture(params=["sd1", "sd2"])
def sd(request, pipelines):
    return pipelines(request.param)


def _flat(folder, name):
    return flatten(load_converted(os.path.join(folder, name))[1])


def _assert_same_params(got_folder, want_folder, cast=None):
    for name in COMPONENTS:
        got, want = _flat(got_folder, name), _flat(want_folder, name)
        assert got.keys() == want.keys(), name
        for path, value in want.items():
            expected = value if cast is None else value.astype(cast).astype(np.float32)
            np.testing.assert_array_equal(got[path], expected, err_msg=f"{name}: {'/'.join(path)}")


def test_ldm_file_matches_diffusers_single_file_converters(sd):
    model_type, modules, _, _, state = sd
    back = F.ldm_roundtrip_via_diffusers(state, model_type)
    for name in COMPONENTS:
        want = {k: v for k, v in F.diffusers_state(modules[name]).items() if ".Conv2d_0." not in k}
        assert set(back[name]) == set(want), name
        for key, value in want.items():
            np.testing.assert_array_equal(back[name][key], value, err_msg=key)


# SD2 differs from SD1 in keys, not in storage formats: one format suffices there.
@pytest.mark.parametrize("sd, fmt", [("sd1", f) for f in ("fp32.safetensors", "fp16.safetensors", "bf16.safetensors",
                                                          "fp32.ckpt")] + [("sd2", "fp16.safetensors")],
                         indirect=["sd"])
def test_single_file_converts_like_the_diffusers_folder(sd, tmp_path, fmt, capsys):
    model_type, _, folder, converted, state = sd
    kind, ext = fmt.split(".")
    path = tmp_path / f"model.{ext}"
    if kind == "bf16":
        from safetensors.torch import save_file

        save_file({k: torch.from_numpy(v).to(torch.bfloat16) for k, v in state.items()}, path)
    else:
        F.save_single_file({k: v.astype(np.float16 if kind == "fp16" else np.float32) for k, v in state.items()},
                           path, extras={"epoch": 0})
    out = tmp_path / "out"
    assert main([str(path), str(out), "--template", folder]) == 0
    printed = capsys.readouterr().out
    assert f"{model_type.upper()} single file" in printed and "unet" in printed
    cast = {"fp16": np.float16, "bf16": jax.numpy.bfloat16}.get(kind)
    _assert_same_params(out, converted, cast)
    assert sorted(os.listdir(out)) == ["pasd_jax.json", "scheduler", "text_encoder", "tokenizer", "unet", "vae"]
    manifest = json.loads((out / "pasd_jax.json").read_text())
    assert manifest["model_type"] == model_type and manifest["prediction_type"] == "epsilon"


@pytest.mark.parametrize("sd", ["sd1"], indirect=True)
def test_text_encoder_output_matches_torch(sd, tmp_path):
    """Params equal to the folder conversion imply equal outputs; one end-to-end check anyway."""
    model_type, modules, folder, _, state = sd
    path = F.save_single_file(state, tmp_path / "m.safetensors")
    assert main([path, str(tmp_path / "out"), "--template", folder, "-q"]) == 0
    text, text_params = load_model(tmp_path / "out" / "text_encoder")
    ids = np.random.default_rng(0).integers(0, 500, (1, 77)).astype(np.int32)
    got = text.apply({"params": text_params}, ids).last_hidden_state
    with torch.no_grad():
        want = modules["text_encoder"](torch.from_numpy(ids).long()).last_hidden_state
    np.testing.assert_allclose(np.asarray(got), want.numpy(), atol=1e-4)


@pytest.mark.parametrize("sd", ["sd1"], indirect=True)  # EMA handling does not depend on the SD version
def test_ema_copies(sd, tmp_path):
    model_type, modules, folder, converted, _ = sd
    state = F.ldm_single_file_state(modules, model_type, ema=True)
    path = F.save_single_file(state, tmp_path / "ema.safetensors")
    assert main([path, str(tmp_path / "plain"), "--template", folder, "-q"]) == 0
    _assert_same_params(tmp_path / "plain", converted)  # default: the regular (non-EMA) weights
    assert main([path, str(tmp_path / "ema"), "--template", folder, "-q", "--extract-ema"]) == 0
    got, want = _flat(tmp_path / "ema", "unet"), _flat(converted, "unet")
    for key in want:
        np.testing.assert_array_equal(got[key], want[key] * np.float32(0.5))


@pytest.mark.parametrize("sd", ["sd1"], indirect=True)  # toy SD2 widths have no 64-wide heads to infer
def test_configs_inferred_without_template(sd, tmp_path):
    model_type, _, folder, converted, state = sd
    path = F.save_single_file(state, tmp_path / "m.safetensors")
    assert main([path, str(tmp_path / "out"), "-q"]) == 0
    _assert_same_params(tmp_path / "out", converted)
    for name in COMPONENTS:
        got = load_converted(tmp_path / "out" / name)[0]
        with open(os.path.join(folder, name, "config.json")) as f:
            want = json.load(f)
        for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                    "cross_attention_dim", "latent_channels", "hidden_size", "num_hidden_layers"):
            if key in want:
                assert got[key] == want[key], (name, key)
    assert not (tmp_path / "out" / "tokenizer").exists()  # no template, no stored base


def test_prediction_type_detection(sd, tmp_path):
    model_type, _, folder, _, state = sd
    if model_type == "sd2":
        # SD2 without flags: v-prediction (768 model), unless global_step says 512-base (as diffusers)
        assert ldm.detect_prediction_type(state, "sd2", {"global_step": 875000}) == "epsilon"
        assert ldm.detect_prediction_type(state, "sd2", {"global_step": 140000}) == "v_prediction"
        ckpt = F.save_single_file(state, tmp_path / "sd2.ckpt", extras={"global_step": 875000})
        assert main([ckpt, str(tmp_path / "out"), "-q", "--template", folder]) == 0
        assert json.loads((tmp_path / "out" / "pasd_jax.json").read_text())["prediction_type"] == "epsilon"
        return
    assert ldm.detect_prediction_type(state, "sd1", {}) is None  # then the template's / epsilon
    flagged = dict(state, v_pred=np.zeros(0, np.float32))
    assert ldm.detect_prediction_type(flagged, "sd1", {}) == "v_prediction"
    path = F.save_single_file(flagged, tmp_path / "v.safetensors")
    assert main([path, str(tmp_path / "out"), "-q", "--template", folder, "--prediction-type", "epsilon"]) == 0
    config = json.loads((tmp_path / "out" / "scheduler" / "scheduler_config.json").read_text())
    assert config["prediction_type"] == "epsilon" and config["beta_schedule"] == "scaled_linear"


# ---- refusals and bad inputs (SD1 only: the checks come before any version-specific work) ----
@pytest.fixture(scope="module")
def sd1_state():
    return F.ldm_single_file_state(F.make_torch_pipeline("sd1"), "sd1")


def _fails(args, capsys, *needles):
    assert main([str(a) for a in args]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: "), err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize("case, needle", [
    ("inpainting", "found an inpainting UNet (9 input channels"),
    ("sdxl", "found SDXL checkpoint"),
    ("unclip", "found a class-conditioned UNet"),
    ("lora", "this file is a LoRA"),
    ("diffusers", "diffusers-named weights"),
    ("unknown", "unknown checkpoint layout"),
    ("stray", "keys belong to no SD component: embedding_manager.x"),
])
def test_unsupported_model_types_are_named(sd1_state, tmp_path, capsys, case, needle):
    from safetensors.numpy import save_file

    state = dict(sd1_state)
    key = ldm.UNET_PREFIX + "input_blocks.0.0.weight"
    if case == "inpainting":
        state[key] = np.zeros((32, 9, 3, 3), np.float32)
    elif case == "sdxl":
        state["conditioner.embedders.1.model.positional_embedding"] = np.zeros((77, 8), np.float32)
    elif case == "unclip":
        state[ldm.UNET_PREFIX + "label_emb.0.0.weight"] = np.zeros((8, 8), np.float32)
    elif case == "lora":
        state = {"lora_unet_x.lora_down.weight": np.zeros((2, 2), np.float32)}
    elif case == "diffusers":
        state = {"down_blocks.0.resnets.0.conv1.weight": np.zeros((2, 2), np.float32)}
    elif case == "unknown":
        state = {"foo.bar": np.zeros(2, np.float32)}
    else:
        state["embedding_manager.x"] = np.zeros(2, np.float32)
    save_file(state, tmp_path / "m.safetensors")
    _fails([tmp_path / "m.safetensors", tmp_path / "out"], capsys, needle)
    assert sorted(os.listdir(tmp_path)) == ["m.safetensors"]


def test_bad_files(sd1_state, tmp_path, capsys):
    from safetensors.numpy import save_file

    good = tmp_path / "good.safetensors"
    save_file(sd1_state, good)
    data = good.read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(data[: len(data) // 2])
    _fails([tmp_path / "trunc.safetensors", tmp_path / "o1"], capsys, "truncated")
    (tmp_path / "empty.safetensors").write_bytes(b"")
    _fails([tmp_path / "empty.safetensors", tmp_path / "o2"], capsys, "file is empty")
    (tmp_path / "model.txt").write_bytes(data)
    _fails([tmp_path / "model.txt", tmp_path / "o3"], capsys, "unsupported extension '.txt'")
    (tmp_path / "garbage.ckpt").write_bytes(b"\x00" * 64)
    _fails([tmp_path / "garbage.ckpt", tmp_path / "o4"], capsys, "not a torch zip checkpoint")
    assert not any(n.startswith("o") for n in os.listdir(tmp_path))


def test_nan_weights_warn(sd1_state, tmp_path, capsys):
    from safetensors.numpy import save_file

    key = ldm.UNET_PREFIX + "out.2.bias"
    save_file(dict(sd1_state, **{key: np.full(4, np.nan, np.float32)}), tmp_path / "m.safetensors")
    assert main([str(tmp_path / "m.safetensors"), str(tmp_path / "out"), "-q"]) == 0
    err = capsys.readouterr().err
    assert "warning: " in err and "NaN or Inf" in err and key in err


def test_malicious_ckpt_is_refused_unexecuted(tmp_path, capsys):
    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {tmp_path / 'pwned'}",)

    path = tmp_path / "model.ckpt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"state_dict": {}, "callbacks": Exploit()}, protocol=2))
        z.writestr("archive/version", "3\n")
    _fails([path, tmp_path / "out"], capsys, "refusing to load", "nothing from the file was executed")
    assert not (tmp_path / "pwned").exists() and not (tmp_path / "out").exists()


# ---- full-size layouts (keys only, meta tensors: no memory, no weights) ----------------------
SD15_UNET = {"block_out_channels": [320, 640, 1280, 1280], "layers_per_block": 2, "cross_attention_dim": 768,
             "attention_head_dim": 8, "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
             "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3}
SD21_UNET = dict(SD15_UNET, cross_attention_dim=1024, attention_head_dim=[5, 10, 20, 20], use_linear_projection=True)
SD_VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
          "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}


@pytest.mark.parametrize("model_type", ["sd1", "sd2"])
def test_full_size_layout_matches_diffusers(model_type):
    """SD1.5 / SD2.1 key layouts (2 layers per block, 24 OpenCLIP blocks): our LDM names for every
    diffusers key go back through diffusers' converters and through ours to the same keys."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from diffusers.loaders import single_file_utils as sfu

    unet_config = SD15_UNET if model_type == "sd1" else SD21_UNET
    with torch.device("meta"):
        unet = UNet2DConditionModel(**unet_config).state_dict()
        vae = AutoencoderKL(**SD_VAE).state_dict()
    unet = {k: v for k, v in unet.items() if ".Conv2d_0." not in k}
    ldm_unet = {ldm.UNET_PREFIX + ldm.map_key(k, ldm.invert(ldm.unet_table(unet_config))): v for k, v in unet.items()}
    ldm_vae = {}
    for key, value in vae.items():
        new = ldm.VAE_PREFIX + ldm.map_key(key, ldm.invert(ldm.vae_table(SD_VAE)))
        ldm_vae[new] = value[:, :, None, None] if ".mid.attn_1." in new and value.ndim == 2 else value
    assert set(sfu.convert_ldm_unet_checkpoint(ldm_unet, unet_config)) == set(unet)
    assert set(sfu.convert_ldm_vae_checkpoint(ldm_vae, SD_VAE)) == set(vae)
    assert set(ldm.plan_unet({k: k for k in ldm_unet}, unet_config)[0]) == set(unet)
    plan, left = ldm.plan_vae(ldm_vae, SD_VAE)
    assert set(plan) == set(vae) and not left
    # the keys real files are known to have
    for key in ("input_blocks.3.0.op.weight", "output_blocks.2.1.conv.weight", "output_blocks.5.2.conv.weight",
                "input_blocks.4.0.skip_connection.weight", "middle_block.1.proj_in.weight", "out.2.bias"):
        assert ldm.UNET_PREFIX + key in ldm_unet, key
    for key in ("decoder.up.3.upsample.conv.weight", "encoder.mid.attn_1.q.weight", "decoder.up.0.block.0.nin_shortcut.weight"):
        assert ldm.VAE_PREFIX + key in ldm_vae, key
    if model_type == "sd2":  # OpenCLIP-H: 24 resblocks, diffusers keeps 23
        from transformers import CLIPTextConfig, CLIPTextModel

        with torch.device("meta"):
            clip = CLIPTextModel(CLIPTextConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23,
                                                num_attention_heads=16, hidden_act="gelu"))
        text = {f"text_model.{k}" if not k.startswith("text_model.") else k: np.zeros((3,) + (1,) * (v.ndim - 1), np.float32)
                for k, v in clip.state_dict().items() if not k.endswith("position_ids")}  # keys matter here
        state = F.open_clip_state(text, 23)
        assert "cond_stage_model.model.transformer.resblocks.23.attn.in_proj_weight" in state
        assert set(ldm.plan_open_clip(state, 23)[0]) == set(text)
