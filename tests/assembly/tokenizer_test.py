"""CLIP tokenizer wrapper: offline loading, SD1.5 ids equal transformers', clear missing-file errors."""

import shutil

import numpy as np
import pytest

from pasd_jax.assembly.tokenizer import load_tokenizer, tokenize

BOS, EOS = 49406, 49407


@pytest.fixture
def sd15_tokenizer_dir(reference_dir):
    return reference_dir / "sd15" / "tokenizer"


def test_sd15_ids_match_transformers(sd15_tokenizer_dir):
    from transformers import CLIPTokenizer

    tok = load_tokenizer(sd15_tokenizer_dir)
    prompts = ["a photo of a cat", "", "word " * 100]
    ids = tokenize(tok, prompts)
    assert ids.shape == (3, 77) and ids.dtype == np.int32
    assert ids[0, 0] == BOS and ids[0, 6] == EOS and np.all(ids[0, 6:] == EOS)
    assert list(ids[1, :2]) == [BOS, EOS]
    assert ids[2, 0] == BOS and ids[2, -1] == EOS  # truncated to 77 with EOS kept

    oracle = CLIPTokenizer.from_pretrained(str(sd15_tokenizer_dir), local_files_only=True)
    want = oracle(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="np").input_ids
    np.testing.assert_array_equal(ids, want)


def test_single_prompt_and_custom_length(sd15_tokenizer_dir):
    ids = tokenize(load_tokenizer(sd15_tokenizer_dir), "a photo of a cat", max_length=10)
    assert ids.shape == (1, 10) and ids[0, 0] == BOS and ids[0, -1] == EOS


def test_missing_folder_is_a_clear_error(tmp_path):
    missing = tmp_path / "no_such_tokenizer"
    with pytest.raises(FileNotFoundError, match="no_such_tokenizer"):
        load_tokenizer(missing)


def test_missing_file_is_named(sd15_tokenizer_dir, tmp_path):
    folder = tmp_path / "tokenizer"
    shutil.copytree(sd15_tokenizer_dir, folder)
    (folder / "merges.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer.*merges\.txt"):
        load_tokenizer(folder)
