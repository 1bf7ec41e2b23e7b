"""`pasd_jax.assembly.home`: models home location, base lookup and the PASD/base UNet merge."""

import numpy as np
import pytest

from pasd_jax.assembly import home


def _make_base(folder, parts=home.BASE_PARTS):
    for part in parts:
        (folder / part).mkdir(parents=True)
    return folder


def test_models_home_env_and_default(monkeypatch, tmp_path):
    monkeypatch.setenv(home.HOME_ENV, str(tmp_path))
    assert home.models_home() == tmp_path and home.bases_dir() == tmp_path / "bases"
    monkeypatch.delenv(home.HOME_ENV)
    assert str(home.models_home()).endswith(".cache/pasd_jax")


def test_resolve_and_list(monkeypatch, tmp_path):
    monkeypatch.setenv(home.HOME_ENV, str(tmp_path / "home"))
    assert home.list_bases() == []
    with pytest.raises(FileNotFoundError, match=r"available: none.*python -m convert base SRC --name NAME"):
        home.resolve_base("majicmix")
    _make_base(tmp_path / "home" / "bases" / "majicmix")
    _make_base(tmp_path / "home" / "bases" / "broken", parts=("unet",))
    (tmp_path / "home" / "bases" / ".toon.partial-x").mkdir()
    assert home.list_bases() == ["majicmix"]
    assert home.resolve_base("majicmix") == tmp_path / "home" / "bases" / "majicmix"
    with pytest.raises(FileNotFoundError, match="available: majicmix"):
        home.resolve_base("toonyou")
    folder = _make_base(tmp_path / "elsewhere")
    assert home.resolve_base(folder) == folder  # a path is taken as is
    with pytest.raises(ValueError, match="no vae/, text_encoder/, tokenizer/"):
        home.resolve_base(home.bases_dir() / "broken")
    with pytest.raises(ValueError, match="invalid base name"):
        home.check_base_name("../x")


def _tree(seed, paca=True, shape=(2, 3)):
    rng = np.random.default_rng(seed)
    tree = {"conv_in": {"kernel": rng.standard_normal(shape).astype(np.float32),
                        "bias": rng.standard_normal(3).astype(np.float32)},
            "up_blocks_1": {"resnets_0": {"conv1": {"kernel": rng.standard_normal((4,)).astype(np.float32)}}}}
    if paca:
        tree["up_blocks_1"]["pixel_attentions_0"] = {"proj_in": {"kernel": rng.standard_normal(5).astype(np.float32)}}
        tree["up_blocks_1"]["attentions_0"] = {"attn2_plus": {"to_q": {"kernel": np.ones(2, np.float32)}}}
    return tree


def test_merge_base_unet_keeps_pasd_only_leaves():
    pasd, base = _tree(0), _tree(1, paca=False)
    merged = home.merge_base_unet(pasd, base)
    np.testing.assert_array_equal(merged["conv_in"]["kernel"], base["conv_in"]["kernel"])
    np.testing.assert_array_equal(merged["up_blocks_1"]["resnets_0"]["conv1"]["kernel"],
                                  base["up_blocks_1"]["resnets_0"]["conv1"]["kernel"])
    np.testing.assert_array_equal(merged["up_blocks_1"]["pixel_attentions_0"]["proj_in"]["kernel"],
                                  pasd["up_blocks_1"]["pixel_attentions_0"]["proj_in"]["kernel"])
    assert "attn2_plus" in merged["up_blocks_1"]["attentions_0"]
    other_pasd = _tree(2)  # a PASD model used as the base: its PACA weights are not taken
    merged = home.merge_base_unet(pasd, other_pasd)
    np.testing.assert_array_equal(merged["up_blocks_1"]["pixel_attentions_0"]["proj_in"]["kernel"],
                                  pasd["up_blocks_1"]["pixel_attentions_0"]["proj_in"]["kernel"])
    np.testing.assert_array_equal(merged["conv_in"]["kernel"], other_pasd["conv_in"]["kernel"])


def test_merge_base_unet_architecture_mismatch():
    with pytest.raises(ValueError, match=r"shape mismatch \(1\):\n    conv_in/kernel: base \(3, 3\), PASD \(2, 3\)"):
        home.merge_base_unet(_tree(0), _tree(1, paca=False, shape=(3, 3)), what="x")
    base = _tree(1, paca=False)
    base["extra"] = {"bias": np.zeros(1)}
    with pytest.raises(ValueError, match="in the base but not in PASD"):
        home.merge_base_unet(_tree(0), base)
    del base["extra"], base["conv_in"]["bias"]
    with pytest.raises(ValueError, match="stock weights in PASD that the base lacks"):
        home.merge_base_unet(_tree(0), base)
