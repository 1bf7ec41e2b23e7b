"""LoRA merging: kohya (diffusers and LDM module names), LoCon convs and PEFT files, several at
once with their own multipliers, equal the same merges computed on the torch modules.

Oracle: `W += m · (alpha / rank) · up @ down` applied with torch ops to the diffusers/transformers
modules, saved as a diffusers folder and converted by the (separately tested) folder converter.
"""

import os

import numpy as np
import pytest

from convert import lora
from convert.__main__ import main
from pasd_jax.assembly.paths import flatten
from pasd_jax.assembly.weights import load_converted
from tests.convert import sd_fixtures as F

torch = pytest.importorskip("torch")

# (file, key style, component, diffusers module name, LDM name or None, kind, rank, alpha)
ATTN = "down_blocks.0.attentions.0.transformer_blocks.0"
LORAS = {
    "kohya.safetensors": [
        ("unet", f"{ATTN}.attn1.to_q", None, "linear", 4, 2.0),
        ("unet", "down_blocks.0.attentions.0.proj_in", None, "conv1x1", 2, None),
        ("unet", "down_blocks.0.resnets.0.conv1", None, "conv3x3", 3, 1.0),  # LoCon
        ("unet", "time_embedding.linear_1", None, "linear", 2, 4.0),
        ("text_encoder", "text_model.encoder.layers.0.self_attn.q_proj", None, "linear", 4, 8.0),
    ],
    "kohya_ldm.safetensors": [
        ("unet", f"{ATTN}.attn2.to_k", "input_blocks.1.1.transformer_blocks.0.attn2.to_k", "linear", 2, 1.0),
        ("unet", "up_blocks.1.resnets.0.conv1", "output_blocks.2.0.in_layers.2", "conv3x3", 2, None),
        ("unet", "mid_block.attentions.0.proj_out", "middle_block.1.proj_out", "conv1x1", 2, 2.0),
    ],
    "peft.safetensors": [
        ("unet", "up_blocks.1.attentions.0.transformer_blocks.0.ff.net.2", None, "linear", 3, None),
        ("unet", f"{ATTN}.attn1.to_q", None, "linear", 2, None),  # stacks on kohya's update
        ("text_encoder", "text_model.encoder.layers.1.mlp.fc1", None, "linear", 2, None),
    ],
}
MULTIPLIERS = {"kohya.safetensors": 0.7, "kohya_ldm.safetensors": 1.0, "peft.safetensors": -0.5}


def _pair(module, kind, rank, rng):
    w = module.weight
    out_f, in_f = w.shape[0], w.shape[1]
    if kind == "linear":
        return rng.standard_normal((rank, in_f)), rng.standard_normal((out_f, rank))
    k = 3 if kind == "conv3x3" else 1
    return rng.standard_normal((rank, in_f, k, k)), rng.standard_normal((out_f, rank, 1, 1))


def _submodule(model, name):
    """transformers >= 5 CLIPTextModel has no `text_model` attribute (its keys still say it)."""
    try:
        return model.get_submodule(name)
    except AttributeError:
        return model.get_submodule(name.removeprefix("text_model."))


def _write_loras(modules, folder):
    """Write the three LoRA files; return [(torch module, down, up, scale)] for the oracle."""
    from safetensors.numpy import save_file

    rng, updates = np.random.default_rng(0), []
    for name, entries in LORAS.items():
        state = {}
        for component, module_name, ldm_name, kind, rank, alpha in entries:
            module = _submodule(modules[component], module_name)
            down, up = (0.05 * a.astype(np.float32) for a in _pair(module, kind, rank, rng))
            if name.startswith("kohya"):
                prefix = "lora_unet_" if component == "unet" else "lora_te_"
                key = prefix + (ldm_name or module_name).replace(".", "_")
                state.update({f"{key}.lora_down.weight": down, f"{key}.lora_up.weight": up})
                if alpha is not None:
                    state[f"{key}.alpha"] = np.array(alpha, np.float32)
            else:
                key = f"{component}.{module_name}"
                state.update({f"{key}.lora_A.weight": down, f"{key}.lora_B.weight": up})
            scale = MULTIPLIERS[name] * (alpha if alpha is not None else rank) / rank
            updates.append((module, down, up, scale))
        save_file(state, os.path.join(folder, name))
    return updates


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    modules = F.make_torch_pipeline("sd1")
    folder = F.save_diffusers_folder(modules, root / "diffusers")
    single = F.save_single_file(F.ldm_single_file_state(modules, "sd1"), root / "model.safetensors")
    updates = _write_loras(modules, root)
    with torch.no_grad():  # the oracle: merge in torch, save, convert
        for module, down, up, scale in updates:
            delta = torch.from_numpy(up).flatten(1) @ torch.from_numpy(down).flatten(1)
            module.weight += scale * delta.reshape(module.weight.shape)
    merged = F.save_diffusers_folder(modules, root / "merged_torch")
    assert main([merged, str(root / "want"), "-q"]) == 0
    args = [a for name, m in MULTIPLIERS.items() for a in ("--lora", f"{root / name}:{m}")]
    return root, folder, single, args


def _assert_close_params(got_dir, want_dir):
    for name in ("unet", "text_encoder", "vae"):
        got = flatten(load_converted(os.path.join(got_dir, name))[1])
        want = flatten(load_converted(os.path.join(want_dir, name))[1])
        assert got.keys() == want.keys()
        for path in want:
            np.testing.assert_allclose(got[path], want[path], rtol=0, atol=2e-6, err_msg="/".join(path))


def test_single_file_with_loras_equals_torch_merge(setup, tmp_path, capsys):
    root, folder, single, args = setup
    assert main([single, str(tmp_path / "out"), "--template", folder, *args]) == 0
    out = capsys.readouterr().out
    assert "merged LoRA: kohya.safetensors ×0.7 (5 modules), kohya_ldm.safetensors ×1 (3 modules)" in out
    _assert_close_params(tmp_path / "out", root / "want")


def test_diffusers_folder_with_loras_equals_torch_merge(setup, tmp_path):
    root, folder, _, args = setup
    assert main([folder, str(tmp_path / "out"), "-q", *args]) == 0
    _assert_close_params(tmp_path / "out", root / "want")


def test_unmatched_and_unsupported_loras(setup, tmp_path, capsys):
    from safetensors.numpy import save_file

    root, folder, single, _ = setup
    stray = {"lora_unet_no_such_layer.lora_down.weight": np.ones((2, 4), np.float32),
             "lora_unet_no_such_layer.lora_up.weight": np.ones((4, 2), np.float32)}
    save_file(stray, tmp_path / "stray.safetensors")
    assert main([single, str(tmp_path / "o1"), "--template", folder, "-q", "--lora", str(tmp_path / "stray.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "1 LoRA modules match no layer" in err and "stray.safetensors: no_such_layer" in err
    assert "--lora-allow-unmatched" in err and sorted(os.listdir(tmp_path)) == ["stray.safetensors"]
    assert main([single, str(tmp_path / "o2"), "--template", folder, "--lora", str(tmp_path / "stray.safetensors"),
                 "--lora-allow-unmatched"]) == 0
    assert "skipped 1 unmatched LoRA modules" in capsys.readouterr().out

    save_file({"lora_unet_x.hada_w1_a": np.ones((2, 2), np.float32)}, tmp_path / "loha.safetensors")
    assert main([single, str(tmp_path / "o3"), "--lora", str(tmp_path / "loha.safetensors")]) == 1
    assert "LoHa weights are not supported" in capsys.readouterr().err
    save_file({"lora_unet_x.lora_down.weight": np.ones((2, 2), np.float32)}, tmp_path / "half.safetensors")
    with pytest.raises(lora.LoraError, match="lack their down/up"):
        lora.read_lora(tmp_path / "half.safetensors")
    assert not (tmp_path / "o3").exists()


def test_lora_arg_and_delta_layouts():
    assert lora.parse_lora_arg("a/b.safetensors:0.25") == ("a/b.safetensors", 0.25)
    assert lora.parse_lora_arg("a/b.safetensors") == ("a/b.safetensors", 1.0)
    rng = np.random.default_rng(1)
    down, up = rng.standard_normal((2, 3, 3, 3)), rng.standard_normal((5, 2, 1, 1))
    module = lora.LoraModule("unet", "conv", down=down, up=up)
    delta = lora.lora_delta(module, (3, 3, 3, 5))  # Flax HWIO
    torch_delta = (up.reshape(5, 2) @ down.reshape(2, -1)).reshape(5, 3, 3, 3)
    np.testing.assert_allclose(delta, torch_delta.transpose(2, 3, 1, 0))
    with pytest.raises(lora.LoraError, match="does not fit"):
        lora.lora_delta(module, (3, 3, 4, 5))
