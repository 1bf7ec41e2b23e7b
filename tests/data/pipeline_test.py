"""Grain pipeline: shapes, determinism and resume, captions/null prompts, bad data, sources, sharding."""

import io
import logging
import os

import numpy as np
import pytest
from PIL import Image

from configs import realisr
from pasd_jax.data import pipeline
from pasd_jax.fixtures.tiny import write_tiny_tokenizer
from tests.train.conftest import write_images


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("tok"))
    write_tiny_tokenizer(folder)
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("imgs"), 5, size=(40, 56))


def data_config(paths, **overrides):
    cfg = realisr.get_config("tiny").data.to_dict()
    cfg.update(paths=tuple(paths), resolution=32, num_workers=0)
    cfg.update(overrides)
    return cfg


def take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)], it


def test_batches_shapes_ranges_and_determinism(images, tokenizer_dir):
    cfg = data_config([images])
    ds = pipeline.make_dataset(cfg, seed=3, local_batch=2, tokenizer_dir=tokenizer_dir)
    (b1, b2), _ = take(ds, 2)
    assert b1["hq"].shape == (2, 32, 32, 3) and b1["hq"].dtype == np.float32
    assert b1["lq"].shape == (2, 32, 32, 3) and b1["prompt_ids"].shape == (2, 77)
    assert b1["prompt_ids"].dtype == np.int32
    assert -1 <= b1["hq"].min() and b1["hq"].max() <= 1 and 0 <= b1["lq"].min() and b1["lq"].max() <= 1
    again, _ = take(pipeline.make_dataset(cfg, seed=3, local_batch=2, tokenizer_dir=tokenizer_dir), 2)
    for x, y in zip((b1, b2), again):
        for k in x:
            np.testing.assert_array_equal(x[k], y[k])
    other, _ = take(pipeline.make_dataset(cfg, seed=4, local_batch=2, tokenizer_dir=tokenizer_dir), 1)
    assert not np.array_equal(other[0]["lq"], b1["lq"])


def test_iterator_state_resumes_exactly(images, tokenizer_dir):
    cfg = data_config([images])
    ds = pipeline.make_dataset(cfg, seed=0, local_batch=2, tokenizer_dir=tokenizer_dir)
    first, it = take(ds, 2)
    state = it.get_state()
    expected = next(it)
    fresh = iter(pipeline.make_dataset(cfg, seed=0, local_batch=2, tokenizer_dir=tokenizer_dir))
    fresh.set_state(state)
    got = next(fresh)
    for k in expected:
        np.testing.assert_array_equal(expected[k], got[k])


def test_captions_and_null_prompts(images, tokenizer_dir):
    empty = pipeline.make_example({"path": os.path.join(images, "img_001.png"), "caption_path": ""},
                                  np.random.default_rng(0), data_config([images]), tokenizer_dir)["prompt_ids"]
    src = pipeline.ImageFolderSource([images])
    assert src[0]["caption_path"].endswith("img_000.txt") and src[1]["caption_path"] == ""
    keep = pipeline.make_example(src[0], np.random.default_rng(0), data_config([images], null_prompt_prob=0.0),
                                 tokenizer_dir)["prompt_ids"]
    drop = pipeline.make_example(src[0], np.random.default_rng(0), data_config([images], null_prompt_prob=1.0),
                                 tokenizer_dir)["prompt_ids"]
    assert not np.array_equal(keep, empty)
    np.testing.assert_array_equal(drop, empty)
    half = [pipeline.make_example(src[0], np.random.default_rng([0, i]), data_config([images], mode="grayscale"),
                                  tokenizer_dir)["prompt_ids"] for i in range(40)]
    assert 0.25 < np.mean([np.array_equal(h, empty) for h in half]) < 0.75


def test_bad_records_are_logged_and_skipped(tmp_path, tokenizer_dir, caplog):
    folder = write_images(tmp_path / "mixed", 3, size=(40, 40))
    (tmp_path / "mixed" / "corrupt.png").write_bytes(b"not an image at all")
    Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / "mixed" / "tiny.png")
    cfg = data_config([folder])
    with caplog.at_level(logging.WARNING, logger="pasd_jax.data.pipeline"):
        batches, _ = take(pipeline.make_dataset(cfg, seed=0, local_batch=5, tokenizer_dir=tokenizer_dir), 2)
    assert batches[1]["hq"].shape == (5, 32, 32, 3)
    text = caplog.text
    assert "corrupt.png" in text and "smaller than data.min_side" in text


def test_all_bad_data_raises_instead_of_hanging(tmp_path, tokenizer_dir):
    folder = tmp_path / "bad"
    folder.mkdir()
    for i in range(3):
        (folder / f"x{i}.jpg").write_bytes(b"garbage")
    ds = pipeline.make_dataset(data_config([str(folder)]), seed=0, local_batch=2, tokenizer_dir=tokenizer_dir)
    with pytest.raises(Exception, match="unusable training records"):
        next(iter(ds))


def test_missing_and_empty_folders_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        pipeline.ImageFolderSource([str(tmp_path / "nope")])
    with pytest.raises(ValueError, match="data.paths"):
        pipeline.ImageFolderSource([])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images"):
        pipeline.ImageFolderSource([str(tmp_path / "empty")])


def test_host_sharding_splits_the_stream(images, tokenizer_dir):
    """Each host reads its contiguous block of every global batch: disjoint, and together (in
    process order) exactly the single-process batch."""
    cfg = data_config([images], null_prompt_prob=0.0)
    whole, _ = take(pipeline.make_dataset(cfg, seed=1, local_batch=4, tokenizer_dir=tokenizer_dir), 2)
    hosts = [take(pipeline.make_dataset(cfg, seed=1, local_batch=2, tokenizer_dir=tokenizer_dir,
                                        process_index=p, process_count=2), 2)[0] for p in (0, 1)]
    for step in range(2):
        for key in ("hq", "lq", "prompt_ids"):
            joined = np.concatenate([hosts[0][step][key], hosts[1][step][key]])
            np.testing.assert_array_equal(joined, whole[step][key])


def test_array_record_source(tmp_path, tokenizer_dir):
    pytest.importorskip("array_record")
    items = []
    for i in range(3):
        buf = io.BytesIO()
        Image.fromarray(np.full((40, 40, 3), 60 * i, np.uint8)).save(buf, format="PNG")
        items.append((buf.getvalue(), f"caption {i}"))
    path = str(tmp_path / "train.array_record")
    pipeline.write_array_record(path, items)
    src = pipeline.ArrayRecordSource([path])
    assert len(src) == 3 and src[2]["caption"] == "caption 2"
    cfg = data_config([path], source="array_record")
    batches, _ = take(pipeline.make_dataset(cfg, seed=0, local_batch=3, tokenizer_dir=tokenizer_dir), 1)
    assert batches[0]["hq"].shape == (3, 32, 32, 3)


def test_multiprocessing_workers_match_in_process(images, tokenizer_dir):
    cfg = data_config([images])
    ref, _ = take(pipeline.make_dataset(cfg, seed=5, local_batch=2, tokenizer_dir=tokenizer_dir), 2)
    mp = pipeline.make_dataset(dict(cfg, num_workers=1), seed=5, local_batch=2, tokenizer_dir=tokenizer_dir)
    got, _ = take(mp, 2)
    for x, y in zip(ref, got):
        np.testing.assert_array_equal(x["lq"], y["lq"])
