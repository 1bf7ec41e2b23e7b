"""Write safetensors files one tensor at a time (no whole-file buffer in memory).

`safetensors.numpy.save_file` first turns every array into `bytes` and then writes, which holds
a second copy of the model in RAM; converting an SD1.5 checkpoint must stay below ~2x the model
size, so the converter writes the same format itself: 8-byte little-endian header length, a JSON
header `{name: {dtype, shape, data_offsets}}` padded with spaces to a multiple of 8, then each
tensor's bytes in header order. Files are readable by `safetensors.safe_open` and torch.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping

import ml_dtypes
import numpy as np

from pasd_jax.assembly import paths, weights

_DTYPE_NAMES = {
    np.dtype(np.bool_): "BOOL", np.dtype(np.uint8): "U8", np.dtype(np.int8): "I8", np.dtype(np.uint16): "U16",
    np.dtype(np.int16): "I16", np.dtype(np.uint32): "U32", np.dtype(np.int32): "I32", np.dtype(np.uint64): "U64",
    np.dtype(np.int64): "I64", np.dtype(np.float16): "F16", np.dtype(np.float32): "F32",
    np.dtype(np.float64): "F64", np.dtype(ml_dtypes.bfloat16): "BF16",
}


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray], *,
                      metadata: Mapping[str, str] | None = None,
                      on_tensor: Callable[[str], None] | None = None) -> None:
    """Write `tensors` (name -> numpy array, any strides) to `path` in safetensors format.

    Tensors are written in sorted-name order, each made contiguous on its own; `on_tensor(name)`
    is called after each (progress). The file mode follows the umask like `open()`'s.
    """
    names = sorted(tensors)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in names:
        array = tensors[name]
        dtype = np.dtype(array.dtype)
        if dtype not in _DTYPE_NAMES:
            raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors")
        size = int(np.prod(array.shape)) * dtype.itemsize
        header[name] = {"dtype": _DTYPE_NAMES[dtype], "shape": [int(d) for d in array.shape],
                        "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name in names:
            array = np.ascontiguousarray(tensors[name])
            if array.dtype.byteorder == ">":
                array = array.astype(array.dtype.newbyteorder("<"))
            f.write(memoryview(array.reshape(-1).view(np.uint8)))
            if on_tensor is not None:
                on_tensor(name)


def save_converted_streaming(folder: str | os.PathLike, config: Mapping, params: Mapping, *, component: str,
                             on_tensor: Callable[[str], None] | None = None) -> None:
    """`pasd_jax.assembly.weights.save_converted` into a *new* folder (normally inside a staging
    folder), writing the parameters tensor by tensor. Same files, same metadata."""
    folder = os.fspath(folder)
    os.makedirs(folder)
    config = dict(config)
    config[weights.META_KEY] = {"format_version": weights.FORMAT_VERSION, "component": component}
    with open(os.path.join(folder, weights.CONFIG_NAME), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
        f.write("\n")
    flat = {"/".join(path): value for path, value in paths.flatten(params).items()}  # views, no copies
    write_safetensors(os.path.join(folder, weights.PARAMS_NAME), flat,
                      metadata={"format": "flax"}, on_tensor=on_tensor)
