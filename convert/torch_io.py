"""Read PyTorch checkpoints into numpy without torch and without running code from the file.

Mirrors what `diffusers`/`transformers` `load_state_dict` do for a component folder, minus torch:

* `.safetensors` through `safetensors.safe_open(framework="numpy")`; bf16/fp8 tensors come back as
  `ml_dtypes` arrays (a raw header + buffer reader takes over where the installed safetensors
  cannot hand such dtypes to numpy);
* `.bin` / `.pt` / `.pth` / `.ckpt` pickles in torch's zip format (torch >= 1.6) through a
  restricted `pickle.Unpickler`. Every global the pickle names is checked against a short allow
  list *before* unpickling starts, and allowed names resolve to stand-ins defined here (never to
  torch or to the named module), so nothing from the file is executed. Anything else raises
  `UnsafeCheckpointError` naming the file and the global (`convert.torch_pickle`).

Tensors come back in PyTorch layout and dtype; `convert.mapping` does the layout change.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping

import ml_dtypes
import numpy as np

# The pickle half; its error types are this reader's (re-raised by every entry point here).
from convert.torch_pickle import CheckpointReadError, LazyArray, UnsafeCheckpointError, read_torch_pickle

PICKLE_EXTENSIONS = (".bin", ".pt", ".pth", ".ckpt")
SAFETENSORS_EXTENSION = ".safetensors"

# Preferred first: diffusers, transformers; safetensors before pickles; single file before shards.
WEIGHT_NAMES = ("diffusion_pytorch_model", "model")
PICKLE_NAMES = ("diffusion_pytorch_model", "pytorch_model")


# ---- safetensors ---------------------------------------------------------------------------
_SAFETENSORS_DTYPES = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "U16": np.uint16, "I16": np.int16,
    "U32": np.uint32, "I32": np.int32, "U64": np.uint64, "I64": np.int64,
    "F16": np.float16, "F32": np.float32, "F64": np.float64, "BF16": ml_dtypes.bfloat16,
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}
_MAX_HEADER = 100 * 1024 * 1024  # the limit the safetensors reference implementation enforces


def safetensors_index(path: str) -> dict[str, tuple[np.dtype, tuple[int, ...], int]]:
    """Parse the safetensors layout: 8-byte little-endian header length, a JSON header
    `{name: {dtype, shape, data_offsets}}`, then the byte buffer.

    Returns {name: (dtype, shape, absolute byte offset in the file)}, every entry checked to lie
    inside the file with the right byte size; no tensor data is read.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointReadError(f"{path}: truncated safetensors file ({size} bytes, no header)")
        n = int.from_bytes(head, "little")
        if n > _MAX_HEADER or 8 + n > size:
            raise CheckpointReadError(f"{path}: corrupt or truncated safetensors header "
                                      f"(header length {n}, file size {size})")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointReadError(f"{path}: safetensors header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise CheckpointReadError(f"{path}: safetensors header is not a JSON object")
    header.pop("__metadata__", None)
    buffer_size = size - 8 - n
    out = {}
    for name, info in header.items():
        try:
            dtype = np.dtype(_SAFETENSORS_DTYPES[info["dtype"]])
            shape = tuple(int(d) for d in info["shape"])
            begin, end = (int(o) for o in info["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointReadError(f"{path}: bad safetensors header entry for {name!r}: {info!r}") from None
        if not 0 <= begin <= end <= buffer_size or end - begin != int(np.prod(shape)) * dtype.itemsize:
            raise CheckpointReadError(f"{path}: tensor {name!r} lies outside the file or has the wrong "
                                      f"byte size (offsets {begin}..{end}, buffer {buffer_size} bytes); "
                                      f"the file is truncated or corrupt")
        out[name] = (dtype, shape, 8 + n + begin)
    return out


def read_safetensors_raw(path: str) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file (see `safetensors_index`) as read-only memmaps."""
    index = safetensors_index(path)
    if not index:
        return {}
    mapped = np.memmap(path, dtype=np.uint8, mode="r")
    return {name: mapped[offset:offset + int(np.prod(shape)) * dtype.itemsize].view(dtype).reshape(shape)
            for name, (dtype, shape, offset) in index.items()}


def _read_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as err:
        raise CheckpointReadError(f"{path}: not a readable safetensors file ({err})") from None
    except (TypeError, ValueError, KeyError):
        # Older safetensors cannot give numpy a bf16/fp8 array; read the buffer ourselves.
        return read_safetensors_raw(path)


def checkpoint_extras(obj: object) -> dict:
    """Top-level scalars beside a Lightning-style `state_dict` (`global_step`, `epoch`, ...)."""
    if not (isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping)):
        return {}
    return {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, (int, float, str, bool))}


def _as_state_dict(obj: object, path: str) -> dict[str, np.ndarray]:
    """Accept `{name: tensor}` or `{"state_dict": {name: tensor}, ...}` (Lightning-style .ckpt)."""
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise CheckpointReadError(f"{path}: holds a {type(obj).__name__}, expected a dict of tensors")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in obj.items()
           if not (isinstance(k, str) and isinstance(v, (np.ndarray, LazyArray)))]
    if bad:
        raise CheckpointReadError(f"{path}: not a flat state dict of tensors; {len(bad)} entries are not "
                                  f"name -> tensor: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}")
    return dict(obj)


def load_checkpoint(path: str | os.PathLike, *, lazy: bool = False) -> tuple[dict, dict]:
    """`load_state_dict` plus the checkpoint's top-level scalars (`checkpoint_extras`; always {}
    for safetensors files).

    With `lazy`, tensors of a pickle checkpoint are `LazyArray`s read from the file when
    `np.asarray` asks for them (stored zip records; deflated ones are read up front), so a large
    `.ckpt` can be converted tensor by tensor. The same allow list guards the unpickling.
    """
    path = os.fspath(path)
    check_checkpoint_file(path)
    if os.path.splitext(path)[1].lower() in PICKLE_EXTENSIONS:
        obj = read_torch_pickle(path, lazy)
        return _as_state_dict(obj, path), checkpoint_extras(obj)
    return load_state_dict(path), {}


def check_checkpoint_file(path: str) -> None:
    """Raise FileNotFoundError / CheckpointReadError for a missing, empty or unknown-type file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointReadError(f"{path}: file is empty (0 bytes)")
    ext = os.path.splitext(path)[1].lower()
    if ext != SAFETENSORS_EXTENSION and ext not in PICKLE_EXTENSIONS:
        raise CheckpointReadError(f"{path}: unsupported extension {ext or '(none)'!r}; expected "
                                  f"{SAFETENSORS_EXTENSION} or one of {', '.join(PICKLE_EXTENSIONS)}")


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A checkpoint file -> flat `{torch key: numpy array}` (PyTorch layout and dtype).

    Raises:
      FileNotFoundError: `path` does not exist.
      CheckpointReadError: empty, truncated or corrupt file, or an unsupported extension.
      UnsafeCheckpointError: a pickle that references anything besides tensors and dicts.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    if os.path.getsize(path) == 0:
        raise CheckpointReadError(f"{path}: file is empty (0 bytes)")
    ext = os.path.splitext(path)[1].lower()
    if ext == SAFETENSORS_EXTENSION:
        return _read_safetensors(path)
    if ext in PICKLE_EXTENSIONS:
        return _as_state_dict(read_torch_pickle(path), path)
    raise CheckpointReadError(f"{path}: unsupported extension {ext or '(none)'!r}; expected "
                              f"{SAFETENSORS_EXTENSION} or one of {', '.join(PICKLE_EXTENSIONS)}")


def find_weights_file(folder: str | os.PathLike, variant: str | None = None) -> str:
    """The weights file (or shard index) of a diffusers/transformers component folder.

    Order: `diffusion_pytorch_model`/`model` `.safetensors`, their `.safetensors.index.json`, then
    `diffusion_pytorch_model`/`pytorch_model` `.bin` and `.bin.index.json`. `variant` ("fp16")
    inserts itself before the extension, as diffusers' `variant=` does.
    """
    folder = os.fspath(folder)
    suffix = f".{variant}" if variant else ""
    candidates = [f"{n}{suffix}.safetensors" for n in WEIGHT_NAMES]
    candidates += [f"{n}{suffix}.safetensors.index.json" for n in WEIGHT_NAMES]
    candidates += [f"{n}{suffix}.bin" for n in PICKLE_NAMES] + [f"{n}{suffix}.bin.index.json" for n in PICKLE_NAMES]
    for name in candidates:
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"{folder} does not exist or is not a folder")
    present = sorted(n for n in os.listdir(folder) if n.endswith((".safetensors", ".bin", ".json")))
    variants = sorted({n.split(".")[1] for n in present if n.count(".") >= 2 and n.split(".")[0] in
                       WEIGHT_NAMES + PICKLE_NAMES and not n.endswith(".index.json")})
    hint = f" (variants present: {', '.join(variants)}; pick one with variant=/--variant)" if variants else ""
    singles = [f"{n}{suffix}.safetensors" for n in WEIGHT_NAMES] + [f"{n}{suffix}.bin" for n in PICKLE_NAMES]
    raise FileNotFoundError(f"{folder}: no weights file; expected {', '.join(singles[:-1])} or {singles[-1]} "
                            f"(or a sharded *.index.json); found: {', '.join(present) or 'nothing'}{hint}")


def _load_sharded(index_path: str) -> dict[str, np.ndarray]:
    """diffusers/transformers shard index `{"weight_map": {key: shard file}}` -> merged state dict."""
    try:
        with open(index_path) as f:
            weight_map = json.load(f)["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointReadError(f"{index_path}: not a valid shard index ({err})") from None
    folder, state = os.path.dirname(index_path), {}
    for shard in sorted(set(weight_map.values())):
        state.update(load_state_dict(os.path.join(folder, shard)))
    missing = sorted(set(weight_map) - set(state))
    if missing:
        raise CheckpointReadError(f"{index_path}: {len(missing)} keys listed in the index are in no shard, "
                                  f"e.g. {', '.join(missing[:5])}")
    return state


def load_component_weights(folder: str | os.PathLike, variant: str | None = None) -> dict[str, np.ndarray]:
    """State dict of a diffusers/transformers component folder (see `find_weights_file`)."""
    path = find_weights_file(folder, variant)
    return _load_sharded(path) if path.endswith(".index.json") else load_state_dict(path)
