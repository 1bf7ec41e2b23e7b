"""Weights-only reading of PyTorch zip pickles (`.bin` / `.pt` / `.pth` / `.ckpt`) without torch.

Part of the torch-free checkpoint reader (`convert.torch_io` is the entry point). A torch >= 1.6
zip archive holds `<archive>/data.pkl` plus one record per storage. Every global the pickle names
is checked against a short allow list *before* unpickling starts (`scan_pickle_globals`), and
allowed names resolve to stand-ins defined here (never to torch or to the named module), so
nothing from the file is executed; anything else raises `UnsafeCheckpointError`. With `lazy`,
tensors are `LazyArray`s read from their stored zip record on `np.asarray`. The reader's error
types live here too, so both halves raise the same `CheckpointReadError`.
"""

from __future__ import annotations

import codecs
import collections
import io
import os
import pickle
import pickletools
import zipfile

import ml_dtypes
import numpy as np


class CheckpointReadError(ValueError):
    """A checkpoint file cannot be read (truncated, corrupt, empty, unknown format)."""


class UnsafeCheckpointError(CheckpointReadError):
    """A pickle names a global outside the weights-only allow list; nothing was executed."""


class _StorageType:
    """Stand-in for `torch.FloatStorage` & co.: only carries the element dtype."""

    def __init__(self, name: str, dtype):
        self.name, self.dtype = name, np.dtype(dtype)

    def __repr__(self):
        return f"<{self.name}>"


_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "HalfStorage": np.float16, "BFloat16Storage": ml_dtypes.bfloat16,
    "DoubleStorage": np.float64, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float16": np.float16, "half": np.float16,
    "bfloat16": ml_dtypes.bfloat16, "float64": np.float64, "double": np.float64, "int64": np.int64,
    "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16, "int8": np.int8,
    "uint8": np.uint8, "bool": np.bool_,
}
_TENSOR_TYPE = object()  # stand-in for torch.Tensor / nn.Parameter in `_rebuild_from_type_v2`


class LazyStorage:
    """An uncompressed storage record of a torch zip (torch.save writes them stored, not deflated),
    read from the file only when a tensor on it is materialised."""

    def __init__(self, path: str, offset: int, dtype: np.dtype, numel: int):
        self.path, self.offset, self.dtype, self.size = path, offset, np.dtype(dtype), int(numel)

    def read(self, start: int = 0, count: int | None = None) -> np.ndarray:
        count = self.size - start if count is None else count
        return np.fromfile(self.path, dtype=self.dtype, count=count, offset=self.offset + start * self.dtype.itemsize)


class LazyArray:
    """A checkpoint tensor read on `np.asarray(...)`; `shape` and `dtype` are known up front."""

    def __init__(self, shape: tuple[int, ...], dtype: np.dtype, load):
        self.shape, self.dtype, self._load = tuple(shape), np.dtype(dtype), load

    def __array__(self, dtype=None, copy=None):
        array = self._load()
        return array if dtype is None else array.astype(dtype)


class _WeightsUnpickler(pickle.Unpickler):
    """`pickle.Unpickler` whose `find_class` resolves only the globals a weights file needs, each
    to a local stand-in (torch's `weights_only` unpickler, reimplemented without torch)."""

    def __init__(self, data: bytes, path: str, read_record, big_endian: bool, locate_record=None):
        super().__init__(io.BytesIO(data))
        self._path, self._read_record, self._big_endian = path, read_record, big_endian
        self._locate_record = locate_record  # name -> file offset of stored bytes, or None: lazy mode
        self._storages: dict[str, np.ndarray | LazyStorage] = {}
        self._allowed = allowed_globals(self)

    def find_class(self, module, name):
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise UnsafeCheckpointError(_unsafe_message(self._path, f"{module}.{name}")) from None

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType) and isinstance(pid[2], str)):
            raise CheckpointReadError(f"{self._path}: unexpected persistent id {pid!r} in data.pkl")
        _, storage_type, key, _location, numel = pid
        if key not in self._storages and self._locate_record is not None and not self._big_endian:
            located = self._locate_record(f"data/{key}")
            if located is not None:
                offset, nbytes = located
                if nbytes != int(numel) * storage_type.dtype.itemsize:
                    raise CheckpointReadError(f"{self._path}: storage {key} holds {nbytes} bytes, the pickle "
                                              f"expects {numel} x {storage_type.dtype}; file is corrupt")
                self._storages[key] = LazyStorage(self._path, offset, storage_type.dtype, numel)
        if key not in self._storages:
            raw = self._read_record(f"data/{key}")
            if len(raw) != int(numel) * storage_type.dtype.itemsize:
                raise CheckpointReadError(f"{self._path}: storage {key} holds {len(raw)} bytes, the "
                                          f"pickle expects {numel} x {storage_type.dtype}; file is corrupt")
            array = np.frombuffer(raw, storage_type.dtype)
            self._storages[key] = array.byteswap() if self._big_endian else array
        return self._storages[key]

    # Stand-ins for torch._utils rebuild functions: storage (1-D numpy) -> strided copy.
    def rebuild_tensor(self, storage, offset, size, stride, *_ignored):
        size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
        offset = int(offset)
        if not isinstance(storage, (np.ndarray, LazyStorage)) or len(size) != len(stride) or offset < 0 \
                or any(s < 0 for s in size + stride):
            raise CheckpointReadError(f"{self._path}: malformed tensor record (size {size}, stride {stride})")
        if 0 in size:
            return np.empty(size, storage.dtype)
        last = offset + sum((n - 1) * s for n, s in zip(size, stride))
        if last >= storage.size:
            raise CheckpointReadError(f"{self._path}: tensor of size {size} reaches past its storage "
                                      f"({storage.size} elements); file is corrupt")
        numel = int(np.prod(size))
        contiguous = all(st == int(np.prod(size[i + 1:])) for i, st in enumerate(stride) if size[i] > 1)
        if isinstance(storage, LazyStorage):
            if contiguous:
                return LazyArray(size, storage.dtype, lambda: storage.read(offset, numel).reshape(size))
            return LazyArray(size, storage.dtype, lambda: self._strided(storage.read(), offset, size, stride))
        if contiguous:  # the usual case: a read-only view of the storage, no second copy in memory
            return storage[offset:offset + numel].reshape(size)
        return self._strided(storage, offset, size, stride)

    @staticmethod
    def _strided(storage: np.ndarray, offset: int, size: tuple, stride: tuple) -> np.ndarray:
        view = np.lib.stride_tricks.as_strided(storage[offset:], size,
                                               tuple(s * storage.itemsize for s in stride), writeable=False)
        return np.array(view)

    @staticmethod
    def rebuild_parameter(data, *_ignored):
        return data

    @staticmethod
    def rebuild_from_type(func, new_type, args, _state=None):
        if new_type is not _TENSOR_TYPE:
            raise CheckpointReadError(f"tensor subclass {new_type!r} is not supported")
        return func(*args)

    @staticmethod
    def codecs_encode(text, encoding="utf-8"):
        if encoding not in ("latin1", "latin-1", "utf-8", "utf8", "ascii") or not isinstance(text, str):
            raise CheckpointReadError(f"_codecs.encode with {encoding!r} is not allowed")
        return codecs.encode(text, encoding)


def allowed_globals(unpickler: _WeightsUnpickler | None = None) -> dict[tuple[str, str], object]:
    """The allow list: (module, name) -> stand-in. Without an unpickler, values are placeholders
    (used by the pre-scan, which only needs the names)."""
    u = unpickler
    allowed: dict[tuple[str, str], object] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("torch._utils", "_rebuild_tensor_v2"): u and u.rebuild_tensor,
        ("torch._utils", "_rebuild_tensor"): u and u.rebuild_tensor,
        ("torch._utils", "_rebuild_parameter"): u and u.rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): u and u.rebuild_parameter,
        ("torch._tensor", "_rebuild_from_type_v2"): u and u.rebuild_from_type,
        ("torch", "Tensor"): _TENSOR_TYPE,
        ("torch.nn.parameter", "Parameter"): _TENSOR_TYPE,
        ("torch", "Size"): tuple,
        ("_codecs", "encode"): u and u.codecs_encode,
        ("torch", "UntypedStorage"): _StorageType("UntypedStorage", np.uint8),
        ("torch.storage", "UntypedStorage"): _StorageType("UntypedStorage", np.uint8),
    }
    for name, dtype in _STORAGE_DTYPES.items():
        allowed[("torch", name)] = _StorageType(name, dtype)
    for name, dtype in _TORCH_DTYPES.items():
        allowed[("torch", name)] = np.dtype(dtype)
    return allowed


def _unsafe_message(path: str, global_name: str) -> str:
    return (f"{path}: refusing to load: the pickle references {global_name} (a plain weights file holds "
            f"only tensors, storages and dicts); nothing from the file was executed. Re-save the state "
            f"dict alone, ideally as .safetensors")


_STRING_OPS = {"SHORT_BINUNICODE", "BINUNICODE", "BINUNICODE8", "UNICODE", "SHORT_BINSTRING",
               "BINSTRING", "STRING"}


def scan_pickle_globals(data: bytes, path: str) -> set[str]:
    """Every `module.name` global the pickle stream refers to, found without unpickling.

    STACK_GLOBAL (protocol >= 4) takes its names from the stack; they are resolved when pushed as
    string literals or memo references to them, otherwise the file is refused.
    """
    found, memo, stack_strings = set(), {}, []
    try:
        for op, arg, _pos in pickletools.genops(data):
            name = op.name
            if name in ("GLOBAL", "INST"):
                found.add(arg.replace(" ", ".", 1))
            elif name == "STACK_GLOBAL":
                if len(stack_strings) < 2 or None in stack_strings[-2:]:
                    raise UnsafeCheckpointError(_unsafe_message(path, "a computed STACK_GLOBAL"))
                found.add(f"{stack_strings[-2]}.{stack_strings[-1]}")
            elif name in ("EXT1", "EXT2", "EXT4"):
                raise UnsafeCheckpointError(_unsafe_message(path, f"copyreg extension code {arg}"))
            if name in ("PUT", "BINPUT", "LONG_BINPUT"):
                memo[arg] = stack_strings[-1] if stack_strings else None
            elif name == "MEMOIZE":
                memo[len(memo)] = stack_strings[-1] if stack_strings else None
            elif name in _STRING_OPS:
                stack_strings.append(arg)
            elif name in ("GET", "BINGET", "LONG_BINGET"):
                stack_strings.append(memo.get(arg))
            elif name != "FRAME":
                stack_strings.append(None)
    except ValueError as err:
        raise CheckpointReadError(f"{path}: data.pkl is not a valid pickle ({err})") from None
    return found


def _stored_record_offset(path: str, info: zipfile.ZipInfo) -> int:
    """File offset of an uncompressed zip member's bytes (after its local header)."""
    with open(path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(30)
    if len(header) < 30 or header[:4] != b"PK\x03\x04":
        raise CheckpointReadError(f"{path}: bad zip local header for {info.filename}; file is corrupt")
    name_len, extra_len = int.from_bytes(header[26:28], "little"), int.from_bytes(header[28:30], "little")
    offset = info.header_offset + 30 + name_len + extra_len
    if offset + info.file_size > os.path.getsize(path):
        raise CheckpointReadError(f"{path}: {info.filename} reaches past the end of the file; it is truncated")
    return offset


def _read_torch_zip(path: str, lazy: bool = False) -> object:
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError) as err:
        raise CheckpointReadError(f"{path}: torch zip archive is corrupt or truncated ({err})") from None
    with archive:
        names = archive.namelist()
        pkls = [n for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
        if not pkls:
            kind = "a TorchScript archive" if any(n.endswith("/constants.pkl") for n in names) else "not a torch checkpoint"
            raise CheckpointReadError(f"{path}: {kind} (no <archive>/data.pkl); expected torch.save(state_dict)")
        prefix = pkls[0][: -len("data.pkl")]

        def read_record(name: str) -> bytes:
            try:
                return archive.read(prefix + name)
            except KeyError:
                raise CheckpointReadError(f"{path}: archive has no record {prefix + name}") from None
            except (zipfile.BadZipFile, OSError, EOFError) as err:
                raise CheckpointReadError(f"{path}: cannot read {prefix + name} ({err})") from None

        def locate_record(name: str) -> tuple[int, int] | None:
            try:
                info = archive.getinfo(prefix + name)
            except KeyError:
                raise CheckpointReadError(f"{path}: archive has no record {prefix + name}") from None
            if info.compress_type != zipfile.ZIP_STORED:
                return None  # deflated: read eagerly
            return _stored_record_offset(path, info), info.file_size

        data = read_record("data.pkl")
        big = prefix + "byteorder" in names and read_record("byteorder").strip() == b"big"
        allowed = {".".join(key) for key in allowed_globals()}
        forbidden = sorted(scan_pickle_globals(data, path) - allowed)
        if forbidden:
            raise UnsafeCheckpointError(_unsafe_message(path, ", ".join(forbidden)))
        try:
            return _WeightsUnpickler(data, path, read_record, big, locate_record if lazy else None).load()
        except CheckpointReadError:
            raise
        except Exception as err:  # malformed pickle content: report, never half-load
            raise CheckpointReadError(f"{path}: cannot unpickle data.pkl ({type(err).__name__}: {err})") from None


def read_torch_pickle(path: str, lazy: bool = False) -> object:
    """The object a torch zip checkpoint holds, unpickled with the allow list (see the module doc)."""
    if zipfile.is_zipfile(path):
        return _read_torch_zip(path, lazy)
    with open(path, "rb") as f:
        start = f.read(2)
    if start == b"\x80\x02":
        raise CheckpointReadError(f"{path}: legacy (torch < 1.6, non-zip) serialization is not supported; "
                                  f"re-save it with a current torch.save or as .safetensors")
    raise CheckpointReadError(f"{path}: not a torch zip checkpoint (corrupt, truncated, or another format)")
