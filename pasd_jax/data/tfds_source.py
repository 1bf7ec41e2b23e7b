"""A prepared TFDS dataset read without TensorFlow: array_record shards of `tf.train.Example` records.

`tfds build --file_format=array_record` (or `tfds.builder(...).download_and_prepare(
file_format="array_record")`) writes `DATA_DIR/NAME[/CONFIG]/VERSION/` with `dataset_info.json` and
shards `NAME-SPLIT.array_record-00000-of-0000N`; every record is a serialised `tf.train.Example`
whose image feature holds the encoded PNG/JPEG bytes and whose text feature holds UTF-8 bytes.
`TfdsSource` finds the newest version folder, opens the split's shards with grain's
`ArrayRecordDataSource` and decodes the Example protobuf with the small wire-format parser below,
so training needs neither TensorFlow nor tensorflow-datasets (only preparing a dataset does).

Record i -> {"image_bytes": bytes, "caption": str}, as `pasd_jax.data.pipeline.ArrayRecordSource`.
"""

from __future__ import annotations

import glob
import json
import os
import re
import struct

import grain


def _varint(buf: bytes, pos: int) -> tuple[int, int]:
    out, shift = 0, 0
    while True:
        b = buf[pos]
        pos += 1
        out |= (b & 0x7F) << shift
        if not b & 0x80:
            return out, pos
        shift += 7


def _fields(buf: bytes):
    """(field number, wire type, value) of a protobuf message; value is bytes for length-delimited."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = buf[pos:pos + 8], pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            value, pos = buf[pos:pos + size], pos + size
        elif wire == 5:
            value, pos = buf[pos:pos + 4], pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        yield number, wire, value


def _feature(buf: bytes):
    """A `tf.train.Feature`: list of bytes, floats or ints."""
    for number, _, value in _fields(buf):
        items = [v for n, _, v in _fields(value) if n == 1]
        if number == 1:  # BytesList
            return list(items)
        if number == 2:  # FloatList: packed or not
            raw = b"".join(items)
            return list(struct.unpack(f"<{len(raw) // 4}f", raw))
        if number == 3:  # Int64List: packed varints or single varints
            out = []
            for v in items:
                if isinstance(v, int):
                    out.append(v)
                else:
                    p = 0
                    while p < len(v):
                        x, p = _varint(v, p)
                        out.append(x)
            return out
    return []


def parse_example(buf: bytes) -> dict[str, list]:
    """A serialised `tf.train.Example` -> {feature name: list of values}."""
    out = {}
    for number, _, features in _fields(buf):
        if number != 1:
            continue
        for n, _, entry in _fields(features):
            if n != 1:
                continue
            key, value = None, b""
            for m, _, v in _fields(entry):
                if m == 1:
                    key = v.decode("utf-8")
                elif m == 2:
                    value = v
            if key is not None:
                out[key] = _feature(value)
    return out


def _version_key(name: str):
    return tuple(int(x) for x in re.findall(r"\d+", name))


def dataset_dir(name: str, data_dir: str = "") -> str:
    """DATA_DIR/NAME[/CONFIG]/VERSION of a prepared dataset ("name" or "name/config"; newest version)."""
    root = data_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
    base = os.path.join(root, *name.split(":")[0].split("/"))
    if os.path.isfile(os.path.join(base, "dataset_info.json")):
        return base
    versions = sorted((d for d in glob.glob(os.path.join(base, "*")) if os.path.isfile(os.path.join(d, "dataset_info.json"))),
                      key=lambda d: _version_key(os.path.basename(d)))
    if not versions:
        raise FileNotFoundError(f"no prepared tfds dataset {name!r} under {root!r} (expected "
                                f"{base}/VERSION/dataset_info.json; prepare it with file_format=array_record, or set "
                                f"data.tfds_data_dir / TFDS_DATA_DIR)")
    return versions[-1]


class TfdsSource(grain.sources.RandomAccessDataSource):
    """The `split` of a prepared tfds dataset (see module doc)."""

    def __init__(self, name: str, split: str = "train", data_dir: str = "", image_key: str = "image",
                 caption_keys: tuple[str, ...] = ("caption", "text", "label_text")):
        folder = dataset_dir(name, data_dir)
        dataset = json.load(open(os.path.join(folder, "dataset_info.json"))).get("name", name.split("/")[0])
        shards = sorted(glob.glob(os.path.join(folder, f"{dataset}-{split}.array_record*")))
        if not shards:
            found = sorted({os.path.basename(p).split(".array_record")[0] for p in glob.glob(os.path.join(folder, "*.array_record*"))})
            raise FileNotFoundError(f"{folder}: no array_record shards for split {split!r} (found: {', '.join(found) or 'none'}; "
                                    f"a dataset prepared as tfrecord must be re-prepared with file_format=array_record)")
        self.folder, self.image_key, self.caption_keys = folder, image_key, caption_keys
        self._source = grain.sources.ArrayRecordDataSource(shards)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        features = parse_example(self._source[index])
        if not features.get(self.image_key):
            raise KeyError(f"{self.folder} record {index} has no {self.image_key!r} feature (has {sorted(features)})")
        caption = next((features[k][0] for k in self.caption_keys if features.get(k)), b"")
        return {"image_bytes": features[self.image_key][0],
                "caption": caption.decode("utf-8") if isinstance(caption, bytes) else str(caption)}

    def __repr__(self) -> str:
        return f"TfdsSource({self.folder}, {len(self)} records)"
