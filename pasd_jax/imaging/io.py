"""Reading, listing and writing images for the sampling pipeline (host side, numpy + PIL).

Mirrors what PASD's `test_pasd.py` does with `Image.open(path).convert("RGB")`, but handles the
cases that call gets wrong or silently mangles:

* EXIF orientation is applied (`ImageOps.exif_transpose`), so phone photos come out upright.
* Transparency (RGBA, LA, PA, palette images with a `transparency` entry) is **composited on
  white**: `convert("RGB")` would drop alpha and expose whatever colour sits under transparent
  pixels (often black), which the SR model would then treat as content.
* 16-bit grayscale PNG/TIFF (`I;16*`, `I`) is scaled to 8 bit with `round(v / 257)`
  (65535 / 255 = 257 exactly) instead of being clipped at 255, which turns most pixels white.
* CMYK JPEGs go through PIL's CMYK → RGB conversion (no ICC colour management).
* Grayscale sources (`1`, `L`, `LA`, `I*`, `F`) are expanded to RGB and flagged, so a caller can
  pick the colorization mode (PASD_REFERENCE §7.8).

Everything returns / takes `uint8 [H, W, 3]` RGB arrays. Writes are atomic (temp file in the same
folder + `os.replace`) and never clobber an existing file unless asked to.
"""

from __future__ import annotations

import dataclasses
import os
import uuid
from pathlib import Path
from typing import Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

PathLike = Union[str, os.PathLike]

#: Suffixes `list_images` picks up in a folder (compared case-insensitively).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")

_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16L", "I;16B", "I;16N", "F"}
_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
# Keyword arguments for `Image.save`, by PIL format name. PIL's JPEG default (quality 75, 4:2:0
# chroma) visibly degrades an SR result, so lossy formats are written at high quality.
_SAVE_OPTIONS = {"JPEG": {"quality": 95, "subsampling": 0}, "WEBP": {"quality": 95}}


class ImageReadError(Exception):
    """An input file could not be decoded as an image; names the file and the reason."""

    def __init__(self, path: PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot read image {str(self.path)!r}: {reason}")


@dataclasses.dataclass(frozen=True)
class LoadedImage:
    """A decoded image: `rgb` uint8 [H, W, 3], whether the source was grayscale, its PIL mode."""

    rgb: np.ndarray
    was_grayscale: bool
    source_mode: str
    path: Path


def _composite_on_white(img: Image.Image) -> Image.Image:
    """Straight-alpha composite over an opaque white background; returns mode RGB."""
    rgba = img.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _high_bit_depth_gray_to_uint8(img: Image.Image) -> np.ndarray:
    """`I;16*` / `I` (assumed 16-bit range) / `F` (assumed [0, 1] when max ≤ 1, else [0, 255]) → uint8 [H, W]."""
    arr = np.asarray(img)
    if img.mode == "F":
        a = arr.astype(np.float64)
        scale = 255.0 if a.size and np.nanmax(a) <= 1.0 else 1.0
        return np.clip(np.round(np.nan_to_num(a) * scale), 0, 255).astype(np.uint8)
    a = np.clip(arr.astype(np.int64), 0, 65535).astype(np.float64)
    return np.round(a / 257.0).astype(np.uint8)


def _to_rgb(img: Image.Image) -> np.ndarray:
    """Any PIL mode → uint8 [H, W, 3] RGB, compositing transparency on white."""
    mode = img.mode
    if mode == "P" and "transparency" in img.info:
        img, mode = img.convert("RGBA"), "RGBA"
    if mode in _ALPHA_MODES:
        out = _composite_on_white(img)
    elif mode.startswith("I") or mode == "F":
        out = Image.fromarray(_high_bit_depth_gray_to_uint8(img)).convert("RGB")
    elif mode == "RGB":
        out = img
    else:  # 1, L, P, CMYK, YCbCr, LAB, HSV, ...
        out = img.convert("RGB")
    rgb = np.array(out, dtype=np.uint8)  # a writable copy (np.asarray of a PIL image is read-only)
    if rgb.ndim != 3 or rgb.shape[-1] != 3:
        raise ValueError(f"conversion from mode {mode} gave shape {rgb.shape}")
    return rgb


def load_image(path: PathLike) -> LoadedImage:
    """Decode `path` (PNG/JPEG/WebP/BMP/TIFF) into an upright RGB `LoadedImage`.

    Only the first frame of animated / multi-page files is read. Raises `ImageReadError` for a
    missing, truncated, corrupt or non-image file.
    """
    path = Path(path)
    if not path.exists():
        raise ImageReadError(path, "no such file")
    if not path.is_file():
        raise ImageReadError(path, "not a regular file")
    try:
        with Image.open(path) as img:
            img.load()  # force the full decode here so truncated data raises now
            source_mode = img.mode
            img = ImageOps.exif_transpose(img)
            rgb = _to_rgb(img)
    except UnidentifiedImageError:
        raise ImageReadError(path, "not a recognised image format") from None
    except Exception as e:  # PIL plugins raise OSError, SyntaxError, struct.error, IndexError, ...
        raise ImageReadError(path, f"corrupt or unsupported image data ({type(e).__name__}: {e})") from e
    return LoadedImage(rgb=rgb, was_grayscale=source_mode in _GRAY_MODES, source_mode=source_mode, path=path)


def read_image(path: PathLike) -> np.ndarray:
    """`load_image(path).rgb`: uint8 [H, W, 3] RGB. Use `load_image` to learn if it was grayscale."""
    return load_image(path).rgb


def list_images(path: PathLike) -> list[Path]:
    """Input images named by `path`: `[path]` for a file, else the folder's image files.

    A folder is scanned non-recursively for `IMAGE_EXTENSIONS` (case-insensitive), hidden files
    (leading ".", e.g. macOS `._x.png` resource forks) are skipped, and the result is sorted by
    name. An explicitly named file is returned as is, whatever its suffix (`load_image` will
    complain if it is not an image). Raises FileNotFoundError if `path` does not exist or a
    folder holds no images.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"input path {str(path)!r} does not exist")
    if path.is_file():
        return [path]
    found = sorted(p for p in path.iterdir()
                   if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not found:
        raise FileNotFoundError(
            f"no images ({', '.join(e[1:] for e in IMAGE_EXTENSIONS)}) in folder {str(path)!r}")
    return found


def _format_for(path: Path) -> str:
    """PIL format name for the suffix of `path` (".jpg" → "JPEG"); ValueError if unknown."""
    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None or fmt not in Image.SAVE:
        raise ValueError(f"cannot tell an image format to write from the suffix of {str(path)!r}")
    return fmt


def write_image(path: PathLike, rgb: np.ndarray, *, overwrite: bool = False) -> Path:
    """Write uint8 [H, W, 3] RGB (or [H, W] gray) to `path`, format from the suffix.

    The image is written to a temporary file in the destination folder and moved into place, so a
    failure never leaves a partial `path` behind. Without `overwrite`, an existing `path` raises
    FileExistsError (checked before encoding and again, atomically where the filesystem supports
    hard links, when moving into place). JPEG / WebP are written at quality 95. Returns `path`.
    """
    path = Path(path)
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or not (rgb.ndim == 2 or (rgb.ndim == 3 and rgb.shape[-1] == 3)):
        raise ValueError(f"write_image wants uint8 [H, W, 3] or [H, W], got {rgb.dtype} {rgb.shape}")
    fmt = _format_for(path)
    if not overwrite and path.exists():
        raise FileExistsError(f"output {str(path)!r} already exists (pass overwrite=True to replace it)")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"output folder {str(path.parent)!r} does not exist")
    img = Image.fromarray(np.ascontiguousarray(rgb))  # mode L or RGB from the shape
    tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        # os.open with 0o666 lets the umask decide the final permissions (mkstemp would force 0600).
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            img.save(f, format=fmt, **_SAVE_OPTIONS.get(fmt, {}))
            f.flush()
            os.fsync(f.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            _move_no_clobber(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def _move_no_clobber(tmp: Path, path: Path) -> None:
    """Move `tmp` to `path`, raising FileExistsError if `path` exists (atomic via a hard link)."""
    try:
        os.link(tmp, path)
    except FileExistsError:
        raise FileExistsError(f"output {str(path)!r} already exists (pass overwrite=True to replace it)") from None
    except OSError:  # no hard links on this filesystem: check, then replace (tiny race window)
        if path.exists():
            raise FileExistsError(f"output {str(path)!r} already exists (pass overwrite=True to replace it)") from None
        os.replace(tmp, path)
    else:
        tmp.unlink()
