"""The image side of the sampling pipeline (no models): I/O, pre/post-processing, colour fixes, tiling.

* `io`: `load_image` / `read_image` (EXIF, alpha on white, 16-bit, CMYK), `list_images`,
  atomic `write_image`.
* `preprocess`: `test_pasd.py`'s resizes (`prepare_input`, `finalize_output`) and the
  colorization variant (`prepare_grayscale_input`, `merge_chroma`).
* `color_fix`: jit-able `wavelet_color_fix` / `adain_color_fix` and the 8-bit conversions.
* `tiling`: latent tile grid, Gaussian blending weights and a numpy blending oracle.
"""

from pasd_jax.imaging.color_fix import (adain_color_fix, to_uint8_round, to_uint8_truncate,
                                        wavelet_color_fix)
from pasd_jax.imaging.io import (IMAGE_EXTENSIONS, ImageReadError, LoadedImage, list_images,
                                 load_image, read_image, write_image)
from pasd_jax.imaging.preprocess import (PreprocessInfo, finalize_output, merge_chroma,
                                         prepare_grayscale_input, prepare_input)
from pasd_jax.imaging.tiling import (blend, effective_tile, gaussian_weights, needs_tiling,
                                     tile_origins)

__all__ = [
    "IMAGE_EXTENSIONS", "ImageReadError", "LoadedImage", "PreprocessInfo", "adain_color_fix",
    "blend", "effective_tile", "finalize_output", "gaussian_weights", "list_images", "load_image",
    "merge_chroma", "needs_tiling", "prepare_grayscale_input", "prepare_input", "read_image",
    "tile_origins", "to_uint8_round", "to_uint8_truncate", "wavelet_color_fix", "write_image",
]
