"""CLIP tokenizer: a thin offline wrapper over transformers `CLIPTokenizer`.

The SD1.x/2.x `tokenizer/` folder holds `vocab.json` and `merges.txt` (BPE). Loading never touches
the network, and a missing file is reported by name before transformers gets a chance to guess
that the path is a Hub repo id.
"""

from __future__ import annotations

import os
import pathlib
from collections.abc import Sequence
from typing import Union

import numpy as np

# Files the BPE tokenizer is built from; a `tokenizer.json` alone also suffices.
REQUIRED_FILES = ("vocab.json", "merges.txt")
FAST_TOKENIZER_FILE = "tokenizer.json"


def load_tokenizer(path: Union[str, os.PathLike]):
    """Load a `transformers.CLIPTokenizer` from a local folder, offline.

    Args:
      path: folder with `vocab.json` and `merges.txt` (e.g. `<sd15>/tokenizer`), or `tokenizer.json`.

    Raises:
      FileNotFoundError naming the folder and the missing file(s).
    """
    from transformers import CLIPTokenizer  # imported lazily: transformers is slow to import

    folder = pathlib.Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"tokenizer folder {str(folder)!r} does not exist (expected {', '.join(REQUIRED_FILES)})")
    missing = [name for name in REQUIRED_FILES if not (folder / name).is_file()]
    if missing and not (folder / FAST_TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"tokenizer folder {str(folder)!r} is missing {', '.join(missing)}")
    return CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)


def tokenize(tokenizer, prompts: Union[str, Sequence[str]], max_length: int = 77) -> np.ndarray:
    """Prompts -> token ids int32 [B, max_length]: BOS, tokens, EOS, then padding; long prompts truncated.

    Matches diffusers `encode_prompt` (padding="max_length", truncation=True). The padding id is
    the tokenizer's `pad_token` (EOS 49407 for SD1.x, "!" = 0 for SD2.x).
    """
    if isinstance(prompts, str):
        prompts = [prompts]
    encoded = tokenizer(
        list(prompts),
        padding="max_length",
        max_length=max_length,
        truncation=True,
        return_tensors="np",
    )
    return np.asarray(encoded["input_ids"], dtype=np.int32)
