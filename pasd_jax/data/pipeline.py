"""Grain input pipeline: image records -> random HQ crop -> degradation -> {hq, lq, prompt_ids} batches.

Mirrors PASD's `Text2ImageDataset` + Real-ESRGAN degradation (PASD_REFERENCE §8): images whose
short side is below the crop are enlarged (bicubic, ×(res/short + 0.02)), a random `res`×`res`
crop is flipped horizontally with p = 0.5, captions come from a sidecar file (or the record) and
are replaced by "" with `null_prompt_prob`, tokenized to 77 ids. One example is a pure function of
(seed, position in the global stream), so a run is reproducible and resumes from the saved
iterator state. Sources: image folders, array_record files of msgpack `{"image": bytes,
"caption": str}` records (`write_array_record`), or tfds datasets prepared as array_record (read
without TensorFlow, `tfds_source.py`).

Batches (host-local, numpy): hq float32 [b, res, res, 3] in [-1, 1]; lq float32 [b, res, res, 3]
in [0, 1]; prompt_ids int32 [b, 77]. With `data.degrade_on = "device"` the workers only draw the
degradation: "lq" is replaced by "degrade", the dict of `device_degrade.pack_params` arrays
stacked to [b, …], and the trainer computes lq on the device (`device_degrade.degrade_batch`).
"""

from __future__ import annotations

import io
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import msgpack
import numpy as np
from PIL import Image

from pasd_jax.data import degrade, device_degrade
from pasd_jax.imaging.io import IMAGE_EXTENSIONS, read_image

log = logging.getLogger(__name__)
MAX_PROMPT_TOKENS = 77


class BadRecordError(Exception):
    """A record that cannot become a training example (unreadable or too small)."""


class ImageFolderSource(grain.sources.RandomAccessDataSource):
    """Every image under `folders` (recursive, sorted) with its sidecar caption path.

    Record i -> {"path": str, "caption_path": str or ""}. Raises on a missing or image-less folder.
    """

    def __init__(self, folders: Sequence[str], caption_ext: str = ".txt"):
        if isinstance(folders, (str, os.PathLike)):
            folders = [folders]
        if not folders:
            raise ValueError("no training image folders: set --config.data.paths='(\"DIR\",)'")
        self._records = []
        for folder in folders:
            if not os.path.isdir(folder):
                raise FileNotFoundError(f"training image folder not found: {folder!r}")
            found = []
            for root, _, files in os.walk(folder):
                for name in files:
                    if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS:
                        path = os.path.join(root, name)
                        cap = os.path.splitext(path)[0] + caption_ext
                        found.append((path, cap if caption_ext and os.path.isfile(cap) else ""))
            if not found:
                raise ValueError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {folder!r}")
            self._records.extend(sorted(found))

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        path, cap = self._records[index]
        return {"path": path, "caption_path": cap}

    def __repr__(self) -> str:
        return f"ImageFolderSource({len(self)} images)"


class ArrayRecordSource(grain.sources.RandomAccessDataSource):
    """array_record files of msgpack `{"image": encoded bytes, "caption": str}` records."""

    def __init__(self, paths: Sequence[str]):
        self._source = grain.sources.ArrayRecordDataSource(list(paths))
        if len(self._source) == 0:
            raise ValueError(f"array_record files {list(paths)} hold no records")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        rec = msgpack.unpackb(self._source[index], raw=False)
        return {"image_bytes": rec["image"], "caption": rec.get("caption", "")}


def write_array_record(path: str, items: Sequence[tuple[bytes, str]]) -> None:
    """Write (encoded image bytes, caption) pairs as an array_record file `ArrayRecordSource` reads."""
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(path, "group_size:1")
    for image, caption in items:
        writer.write(msgpack.packb({"image": image, "caption": caption}, use_bin_type=True))
    writer.close()


def make_source(cfg: Mapping[str, Any]):
    """The random-access source named by `data.source`."""
    if cfg["source"] == "folders":
        return ImageFolderSource(cfg["paths"], cfg["caption_ext"])
    if cfg["source"] == "array_record":
        return ArrayRecordSource(cfg["paths"])
    if cfg["source"] == "tfds":  # read without TensorFlow (pasd_jax/data/tfds_source.py)
        from pasd_jax.data.tfds_source import TfdsSource

        return TfdsSource(cfg["tfds_name"], cfg["split"], data_dir=cfg.get("tfds_data_dir", ""))
    raise ValueError(f"unknown data.source {cfg['source']!r}; expected folders, array_record or tfds")


def _decode(record: Mapping[str, Any]) -> tuple[np.ndarray, str]:
    """A source record -> (uint8 [H, W, 3], caption). Raises BadRecordError naming the record."""
    try:
        if "path" in record:
            rgb = read_image(record["path"])
            caption = ""
            if record.get("caption_path"):
                with open(record["caption_path"], encoding="utf-8") as f:
                    caption = f.read().strip()
            return rgb, caption
        if "image_bytes" in record:
            rgb = np.asarray(Image.open(io.BytesIO(record["image_bytes"])).convert("RGB"))
            return rgb, record.get("caption", "")
        image = np.asarray(record["image"])  # tfds: decoded uint8
        if image.ndim == 2 or image.shape[-1] == 1:
            image = np.repeat(image.reshape(image.shape[:2] + (1,)), 3, axis=-1)
        caption = record.get("caption", record.get("text", b""))
        return image[..., :3], caption.decode() if isinstance(caption, bytes) else str(caption)
    except BadRecordError:
        raise
    except Exception as err:  # PIL raises a zoo of types for corrupt files
        raise BadRecordError(f"{record.get('path', '<record>')}: {err}") from err


def random_crop(rgb: np.ndarray, res: int, rng: np.random.Generator, min_side: int) -> np.ndarray:
    """PASD's enlarge-if-small (bicubic, ×(res/short + 0.02)) + RandomCrop(res) + horizontal flip p=0.5.

    The reference flips twice (RandomHorizontalFlip, then again before degrading); two independent
    p = 0.5 flips are one p = 0.5 flip in distribution, so we flip once. The HQ target and the LQ
    condition always come from the same (flipped) crop, as in the `Text2ImageDataset` path PASD
    trains with — not `WebImageDataset`'s mismatched pair (PASD_REFERENCE §9.15).
    """
    h, w = rgb.shape[:2]
    if min(h, w) < min_side:
        raise BadRecordError(f"image {w}×{h} is smaller than data.min_side={min_side}")
    if min(h, w) < res:
        s = res / min(h, w) + 0.02
        rgb = np.asarray(Image.fromarray(rgb).resize((max(int(w * s), res), max(int(h * s), res)),
                                                     Image.Resampling.BICUBIC))
        h, w = rgb.shape[:2]
    y, x = int(rng.integers(0, h - res + 1)), int(rng.integers(0, w - res + 1))
    crop = rgb[y:y + res, x:x + res]
    return crop[:, ::-1] if rng.uniform() < 0.5 else crop


_TOKENIZERS: dict = {}
_TOKENIZER_LOCK = threading.Lock()


def _tokenizer(folder: str):
    """The CLIP tokenizer of `folder`, loaded once per process. The lock matters: grain reads with
    several threads, and `transformers`' lazy imports fail when raced."""
    with _TOKENIZER_LOCK:
        if folder not in _TOKENIZERS:
            from pasd_jax.assembly.tokenizer import load_tokenizer

            _TOKENIZERS[folder] = load_tokenizer(folder)
        return _TOKENIZERS[folder]


def make_example(record: Mapping[str, Any], rng: np.random.Generator, cfg: Mapping[str, Any],
                 tokenizer_dir: str, keep_prompt: bool = False) -> dict:
    """One training example from a source record (see module doc for shapes)."""
    rgb, caption = _decode(record)
    hq = random_crop(rgb, cfg["resolution"], rng, cfg["min_side"]).astype(np.float32) / 255.0
    on_device = cfg.get("degrade_on", "host") == "device"
    if on_device and cfg["mode"] != "realesrgan":
        raise ValueError(f"data.degrade_on='device' needs data.mode='realesrgan', not {cfg['mode']!r}")
    if cfg["mode"] == "grayscale":
        cond = {"lq": degrade.to_grayscale_condition(hq)}
    elif cfg["mode"] == "realesrgan" and on_device:  # the same rng draws as the host path, no pixels
        cond = {"degrade": device_degrade.sample_params(rng, cfg["degradation"], hq.shape[:2])}
    elif cfg["mode"] == "realesrgan":
        cond = {"lq": degrade.degrade(hq, rng, cfg["degradation"])}
    else:
        raise ValueError(f"unknown data.mode {cfg['mode']!r}; expected realesrgan or grayscale")
    if not keep_prompt and rng.uniform() < cfg["null_prompt_prob"]:
        caption = ""
    from pasd_jax.assembly.tokenizer import tokenize

    ids = tokenize(_tokenizer(tokenizer_dir), [caption], MAX_PROMPT_TOKENS)[0]
    return {"hq": hq * 2.0 - 1.0, **cond, "prompt_ids": ids.astype(np.int32)}


class _Example:
    """grain map-with-index: stream position i, source index -> example, skipping bad records.

    The rng is `default_rng([seed, i])`. A bad record is logged and replaced by the next source
    index (deterministically); `max_bad_in_a_row` failures in a row raise instead of spinning.
    """

    def __init__(self, source, cfg: Mapping[str, Any], seed: int, tokenizer_dir: str):
        self.source, self.cfg, self.seed, self.tokenizer_dir = source, dict(cfg), seed, tokenizer_dir

    def __call__(self, position: int, source_index: int) -> dict:
        n = len(self.source)
        errors = []
        for k in range(min(self.cfg["max_bad_in_a_row"], n)):
            rng = np.random.default_rng([self.seed, position, k])
            try:
                return make_example(self.source[(source_index + k) % n], rng, self.cfg, self.tokenizer_dir)
            except BadRecordError as err:
                log.warning("skipping bad training record: %s", err)
                errors.append(str(err))
        raise RuntimeError(f"{len(errors)} unusable training records in a row (data.max_bad_in_a_row); "
                           f"last: {errors[-1]}")


def _plain(cfg) -> dict:
    return cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)


class _HostBlock:
    """grain map: host-local position j -> the example at global stream position g(j).

    Host p of P takes, of every global batch of L·P positions, the contiguous block
    [p·L, (p+1)·L): g(j) = (j // L)·L·P + p·L + j % L. The hosts' local batches are then disjoint
    and, concatenated in process order (the order `make_array_from_process_local_data` lays them
    on the mesh), exactly the batch a single process would read.
    """

    def __init__(self, order, example: "_Example", local_batch: int, process_index: int, process_count: int):
        self.order, self.example = order, example
        self.local_batch, self.process_index, self.process_count = local_batch, process_index, process_count

    def global_position(self, j: int) -> int:
        lb = self.local_batch
        return (j // lb) * lb * self.process_count + self.process_index * lb + j % lb

    def __call__(self, j: int) -> dict:
        g = self.global_position(int(j))
        return self.example(g, self.order[g])


def make_dataset(data_cfg, *, seed: int, local_batch: int, tokenizer_dir: str, process_index: int = 0,
                 process_count: int = 1, source=None) -> grain.IterDataset:
    """The endless, shuffled, per-host sharded, batched training stream (an IterDataset).

    The global stream is shuffle(range(n), seed) repeated forever; the example rng keys on the
    global position; host p reads its contiguous block of every global batch (`_HostBlock`);
    `iter(ds).get_state()` / `.set_state()` checkpoint it.
    """
    cfg = _plain(data_cfg)
    source = source if source is not None else make_source(cfg)
    if len(source) == 0:
        raise ValueError("the training source is empty")
    _tokenizer(tokenizer_dir)  # load once here: lazy `transformers` imports race in grain's threads
    order = grain.MapDataset.range(len(source)).shuffle(seed=seed).repeat(None)
    host = _HostBlock(order, _Example(source, cfg, seed, tokenizer_dir), local_batch, process_index, process_count)
    ds = grain.MapDataset.range(2**62).map(host)
    ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=max(cfg.get("prefetch", 2), 1),
                                              prefetch_buffer_size=max(cfg.get("prefetch", 2), 1)))
    ds = ds.batch(local_batch, drop_remainder=True)
    if cfg["num_workers"] > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain 0.2.18 workers read absl flags
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg["num_workers"]))
    return ds


def validation_examples(data_cfg, *, seed: int, count: int, tokenizer_dir: str, source=None) -> dict:
    """A fixed validation batch: the first `count` good records, degraded with their own seeds,
    captions kept. Same dict layout as a host-degraded training batch (numpy, [count, …]): it is
    made once, so it is always degraded on the host, whatever `data.degrade_on` says."""
    cfg = dict(_plain(data_cfg), degrade_on="host")
    source = source if source is not None else make_source(cfg)
    out, index = [], 0
    while len(out) < count and index < len(source) + cfg["max_bad_in_a_row"]:
        rng = np.random.default_rng([seed, 2**31 - 1, index])
        try:
            out.append(make_example(source[index % len(source)], rng, cfg, tokenizer_dir, keep_prompt=True))
        except BadRecordError as err:
            log.warning("skipping bad validation record: %s", err)
        index += 1
    if not out:
        raise RuntimeError("no usable validation records")
    return {k: np.stack([e[k] for e in out]) for k in out[0]}
