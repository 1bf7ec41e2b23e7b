"""convert.torch_io: safetensors and torch zip pickles read into numpy, without torch's loader and
without running code from the file. torch only writes the fixtures."""

import collections
import json
import os
import pickle
import sys
import zipfile

import ml_dtypes
import numpy as np
import pytest

from convert import torch_io, torch_pickle
from convert.torch_io import CheckpointReadError, UnsafeCheckpointError, load_component_weights, load_state_dict

torch = pytest.importorskip("torch")


def _numpy(t):
    """torch tensor -> numpy, bf16 via float32 then ml_dtypes."""
    if t.dtype == torch.bfloat16:
        return t.float().numpy().astype(ml_dtypes.bfloat16)
    return t.numpy()


def _tensors():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(4, 6, generator=gen)
    return {
        "f32": torch.randn(3, 4, generator=gen),
        "f16": torch.randn(5, generator=gen).half(),
        "bf16": torch.randn(2, 3, generator=gen).to(torch.bfloat16),
        "conv.weight": torch.randn(8, 4, 3, 3, generator=gen),
        "i64": torch.arange(7),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(1.5),
        "empty": torch.zeros(0, 3),
        "base": base,
        "column_view": base[:, 2],  # shares `base`'s storage, offset 2, stride 6
        "transposed": base.t(),  # non-contiguous
    }


def _assert_equal(got: dict, want: dict):
    assert set(got) == set(want)
    for key, t in want.items():
        expected = _numpy(t)
        assert got[key].dtype == expected.dtype, key
        assert got[key].shape == expected.shape, key
        np.testing.assert_array_equal(np.asarray(got[key], np.float64), np.asarray(expected, np.float64), err_msg=key)


def test_safetensors_round_trip_all_float_dtypes(tmp_path):
    from safetensors.torch import save_file

    tensors = {k: v.contiguous() for k, v in _tensors().items() if k not in ("column_view", "transposed")}
    path = tmp_path / "w.safetensors"
    save_file(tensors, str(path))
    _assert_equal(load_state_dict(path), tensors)
    _assert_equal(torch_io.read_safetensors_raw(str(path)), tensors)  # the fallback reader agrees


def test_bin_written_by_torch_save_reads_equal_without_torch(tmp_path, monkeypatch):
    tensors = _tensors()
    path = tmp_path / "pytorch_model.bin"
    torch.save({**tensors, "param": torch.nn.Parameter(tensors["f32"] * 2)}, path)
    monkeypatch.setitem(sys.modules, "torch", None)  # `import torch` now fails: the reader must not need it
    got = load_state_dict(path)
    _assert_equal({k: v for k, v in got.items() if k != "param"}, tensors)
    np.testing.assert_array_equal(got["param"], tensors["f32"].numpy() * 2)


def test_lazy_ckpt_reads_tensors_on_demand(tmp_path):
    """`load_checkpoint(lazy=True)`: same values, read from the file only when asked for."""
    tensors = _tensors()
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": tensors, "global_step": 7}, path)
    state, extras = torch_io.load_checkpoint(path, lazy=True)
    assert extras == {"global_step": 7}
    assert all(isinstance(v, torch_pickle.LazyArray) for k, v in state.items() if k != "empty")
    assert state["conv.weight"].shape == (8, 4, 3, 3) and state["bf16"].dtype == ml_dtypes.bfloat16
    _assert_equal({k: np.asarray(v) for k, v in state.items()}, tensors)
    data = path.read_bytes()
    (tmp_path / "trunc.ckpt").write_bytes(data[: len(data) - 200])
    with pytest.raises(CheckpointReadError):
        state, _ = torch_io.load_checkpoint(tmp_path / "trunc.ckpt", lazy=True)


def test_module_state_dict_with_metadata(tmp_path):
    module = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    torch.save(module.state_dict(), tmp_path / "m.pt")  # OrderedDict carrying `_metadata`
    got = load_state_dict(tmp_path / "m.pt")
    want = {k: v.numpy() for k, v in module.state_dict().items()}
    assert list(got) == list(want)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key])


def test_ckpt_state_dict_wrapper_is_flattened(tmp_path):
    inner = {"model.diffusion_model.conv.weight": torch.randn(2, 2), "first_stage_model.bias": torch.ones(3)}
    torch.save({"state_dict": inner, "global_step": 12, "epoch": 3}, tmp_path / "v1.ckpt")
    got = load_state_dict(tmp_path / "v1.ckpt")
    assert set(got) == set(inner)
    np.testing.assert_array_equal(got["first_stage_model.bias"], np.ones(3, np.float32))


def test_non_tensor_entries_are_refused(tmp_path):
    torch.save({"weight": torch.ones(2), "step": 3}, tmp_path / "mixed.bin")
    with pytest.raises(CheckpointReadError, match=r"mixed\.bin.*not a flat state dict.*'step'"):
        load_state_dict(tmp_path / "mixed.bin")
    torch.save([torch.ones(2)], tmp_path / "list.bin")
    with pytest.raises(CheckpointReadError, match=r"list\.bin.*holds a list"):
        load_state_dict(tmp_path / "list.bin")


# ---- malicious pickles ---------------------------------------------------------------------
class _Exploit:
    """Pickles to `call(*args)` at load time (what a hostile checkpoint does)."""

    def __init__(self, call, args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def _write_torch_zip(path, payload: bytes, prefix="archive"):
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{prefix}/data.pkl", payload)
        z.writestr(f"{prefix}/version", "3\n")


@pytest.mark.parametrize("protocol", [2, 4])
@pytest.mark.parametrize("attack", ["system", "exec"])
def test_malicious_pickle_is_refused_before_running(tmp_path, attack, protocol):
    marker = tmp_path / "pwned"
    if attack == "system":
        exploit = _Exploit(os.system, (f"touch {marker}",))
        forbidden = (f"{os.system.__module__}.system",)
    else:
        exploit = _Exploit(exec, (f"open({str(marker)!r}, 'w').close()",))
        forbidden = ("builtins.exec", "__builtin__.exec")  # protocol 2 writes Python 2 names
    # A legitimate-looking tensor entry first, the exploit after it.
    payload = pickle.dumps({"weight": collections.OrderedDict(), "evil": exploit}, protocol=protocol)
    path = tmp_path / "diffusion_pytorch_model.bin"
    _write_torch_zip(path, payload)
    with pytest.raises(UnsafeCheckpointError) as info:
        load_state_dict(path)
    assert str(path) in str(info.value) and any(name in str(info.value) for name in forbidden)
    assert not marker.exists()


def test_unpickler_refuses_even_without_prescan(tmp_path):
    """Second line of defence: `find_class` itself refuses, the pre-scan is not the only guard."""
    marker = tmp_path / "pwned"
    payload = pickle.dumps(_Exploit(os.system, (f"touch {marker}",)), protocol=2)
    unpickler = torch_pickle._WeightsUnpickler(payload, "x.bin", read_record=None, big_endian=False)
    with pytest.raises(UnsafeCheckpointError, match="x.bin"):
        unpickler.load()
    assert not marker.exists()


def test_pickled_module_object_is_refused(tmp_path):
    torch.save(torch.nn.Linear(2, 2), tmp_path / "model.pt")
    with pytest.raises(UnsafeCheckpointError, match=r"model\.pt.*torch\.nn\.modules\.linear\.Linear"):
        load_state_dict(tmp_path / "model.pt")


# ---- broken files --------------------------------------------------------------------------
def test_truncated_safetensors(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "w.safetensors"
    save_file({"a": torch.randn(64, 64)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointReadError, match=r"w\.safetensors"):
        load_state_dict(path)
    with pytest.raises(CheckpointReadError, match="truncated or corrupt"):
        torch_io.read_safetensors_raw(str(path))


def test_garbage_safetensors_header(tmp_path):
    path = tmp_path / "g.safetensors"
    path.write_bytes((10).to_bytes(8, "little") + b"not json!!" + b"\0" * 16)
    with pytest.raises(CheckpointReadError, match=r"g\.safetensors"):
        load_state_dict(path)
    path.write_bytes(b"\xff" * 4)
    with pytest.raises(CheckpointReadError, match=r"g\.safetensors"):
        load_state_dict(path)


def test_empty_file_and_wrong_extension(tmp_path):
    (tmp_path / "e.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointReadError, match=r"e\.safetensors.*empty"):
        load_state_dict(tmp_path / "e.safetensors")
    (tmp_path / "w.txt").write_text("hello")
    with pytest.raises(CheckpointReadError, match=r"w\.txt.*unsupported extension"):
        load_state_dict(tmp_path / "w.txt")
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        load_state_dict(tmp_path / "missing.bin")


def test_truncated_bin_and_legacy_format(tmp_path):
    path = tmp_path / "t.bin"
    torch.save({"a": torch.randn(256)}, path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 600])
    with pytest.raises(CheckpointReadError, match=r"t\.bin"):
        load_state_dict(path)
    torch.save({"a": torch.randn(2)}, tmp_path / "old.bin", _use_new_zipfile_serialization=False)
    with pytest.raises(CheckpointReadError, match=r"old\.bin.*legacy"):
        load_state_dict(tmp_path / "old.bin")


# ---- component folders ---------------------------------------------------------------------
def test_component_folder_prefers_safetensors(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2)}, str(tmp_path / "diffusion_pytorch_model.safetensors"))
    torch.save({"a": torch.zeros(2)}, tmp_path / "diffusion_pytorch_model.bin")
    np.testing.assert_array_equal(load_component_weights(tmp_path)["a"], np.ones(2, np.float32))
    save_file({"a": torch.full((2,), 3.0)}, str(tmp_path / "diffusion_pytorch_model.fp16.safetensors"))
    np.testing.assert_array_equal(load_component_weights(tmp_path, variant="fp16")["a"], [3, 3])


def test_transformers_bin_and_sharded_index(tmp_path):
    torch.save({"x": torch.ones(1)}, tmp_path / "pytorch_model.bin")
    assert set(load_component_weights(tmp_path)) == {"x"}

    from safetensors.torch import save_file

    shards = tmp_path / "sharded"
    shards.mkdir()
    save_file({"a": torch.ones(2)}, str(shards / "model-00001-of-00002.safetensors"))
    save_file({"b": torch.zeros(3)}, str(shards / "model-00002-of-00002.safetensors"))
    index = {"metadata": {}, "weight_map": {"a": "model-00001-of-00002.safetensors",
                                            "b": "model-00002-of-00002.safetensors"}}
    (shards / "model.safetensors.index.json").write_text(json.dumps(index))
    assert set(load_component_weights(shards)) == {"a", "b"}
    index["weight_map"]["c"] = "model-00002-of-00002.safetensors"
    (shards / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointReadError, match="in no shard"):
        load_component_weights(shards)


def test_component_folder_without_weights_names_the_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=rf"{tmp_path}.*no weights file.*found: config\.json"):
        load_component_weights(tmp_path)


def test_missing_variant_is_hinted(tmp_path):
    from safetensors.torch import save_file

    save_file({"a": torch.ones(2)}, str(tmp_path / "diffusion_pytorch_model.fp16.safetensors"))
    with pytest.raises(FileNotFoundError, match=r"variants present: fp16"):
        load_component_weights(tmp_path)
