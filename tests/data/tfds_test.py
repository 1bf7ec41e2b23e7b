"""The tfds source reads a dataset prepared as array_record without TensorFlow.

The prepared folder is written here by hand in tfds's layout (`NAME/VERSION/dataset_info.json`,
`NAME-SPLIT.array_record-00000-of-00001`, serialised `tf.train.Example` records encoded with the
protobuf wire format below), so the test needs neither TensorFlow nor tensorflow-datasets; building
one with the real `tfds` would need TensorFlow, which this suite does not install."""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import realisr
from pasd_jax.data import pipeline
from pasd_jax.data.tfds_source import TfdsSource, parse_example
from pasd_jax.fixtures.tiny import write_tiny_tokenizer

pytest.importorskip("array_record")


def _varint(n: int) -> bytes:
    out = b""
    while True:
        b, n = n & 0x7F, n >> 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def _ld(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def example(features: dict) -> bytes:
    """tf.train.Example{features{feature{key: bytes_list | int64_list}}} wire bytes."""
    entries = b""
    for key, value in features.items():
        if isinstance(value, int):
            feature = _ld(3, _ld(1, _varint(value)))  # Int64List, packed
        else:
            feature = _ld(1, _ld(1, value))  # BytesList
        entries += _ld(1, _ld(1, key.encode()) + _ld(2, feature))
    return _ld(1, entries)


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    from array_record.python.array_record_module import ArrayRecordWriter

    root = tmp_path_factory.mktemp("tfds")
    folder = root / "toy_sr" / "1.0.0"
    folder.mkdir(parents=True)
    (folder / "dataset_info.json").write_text(json.dumps({"name": "toy_sr", "version": "1.0.0"}))
    writer = ArrayRecordWriter(str(folder / "toy_sr-train.array_record-00000-of-00001"), "group_size:1")
    for i in range(3):
        writer.write(example({"image": _png(i), "caption": f"photo {i}".encode(), "id": i}))
    writer.close()
    (root / "older" / "0.9.0").mkdir(parents=True)  # not a prepared version: ignored
    return str(root)


def test_parse_example_round_trip():
    got = parse_example(example({"image": b"\x89PNG..", "caption": "a b".encode(), "id": 300}))
    assert got == {"image": [b"\x89PNG.."], "caption": [b"a b"], "id": [300]}


def test_tfds_source_reads_records(prepared):
    source = TfdsSource("toy_sr", "train", data_dir=prepared)
    assert len(source) == 3
    rec = source[1]
    assert rec["caption"] == "photo 1"
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(rec["image_bytes"]))),
                                  np.asarray(Image.open(io.BytesIO(_png(1)))))
    with pytest.raises(FileNotFoundError, match="no array_record shards for split 'test'"):
        TfdsSource("toy_sr", "test", data_dir=prepared)
    with pytest.raises(FileNotFoundError, match="no prepared tfds dataset 'nope'"):
        TfdsSource("nope", data_dir=prepared)


def test_training_batches_from_tfds(prepared, tmp_path):
    tok = str(tmp_path / "tok")
    write_tiny_tokenizer(tok)
    cfg = realisr.get_config("tiny").data.to_dict()
    cfg.update(source="tfds", tfds_name="toy_sr", tfds_data_dir=prepared, resolution=32, num_workers=0,
               null_prompt_prob=0.0)
    batch = next(iter(pipeline.make_dataset(cfg, seed=0, local_batch=2, tokenizer_dir=tok)))
    assert batch["hq"].shape == (2, 32, 32, 3) and batch["lq"].shape == (2, 32, 32, 3)
    assert batch["prompt_ids"].shape == (2, 77) and (batch["prompt_ids"] > 0).sum() > 4
