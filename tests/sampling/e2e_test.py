"""End-to-end parity of PASD sampling against a PyTorch pipeline with all noises supplied.

The oracle is the reference procedure (PASD_REFERENCE §7.3–7.4) written with the PyTorch pieces
themselves: transformers `CLIPTextModel`, diffusers `AutoencoderKL` (posterior sample, decode) and
`DDIMScheduler` (`add_noise` twice for ANS, `step`), with the ControlNet + PASD UNet noise
prediction from our Flax nets (proven against the PyTorch PASD goldens in tests/models). Our side
is `python -m pasd_jax.golden --e2e` on a tiny e2e folder laid out as the hidden contract says.
"""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from golden import harness as golden
from tests.e2e_case import build_e2e_dir, torch_reference
from tests.torch_oracle import assert_close

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

NUM_STEPS = 3


@pytest.fixture(scope="module")
def e2e_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden")
    vae, clip, sched, inputs = build_e2e_dir(root, NUM_STEPS, note="tiny e2e folder built by tests/sampling/e2e_test.py")
    want = torch_reference(root, vae, clip, sched, inputs)
    out_dir = tmp_path_factory.mktemp("out")
    assert golden.main(["--e2e", str(root / "e2e"), str(out_dir)]) == 0
    return want, load_file(str(out_dir / "outputs.safetensors"))


def test_e2e_matches_pytorch_pipeline(e2e_run):
    want, got = e2e_run
    expected = {"prompt_embeds", "vae_latent_z0", "init_latents", "final_latents", "decoded", "image"}
    expected |= {f"step{i}.latents" for i in range(NUM_STEPS)}
    assert set(got) == expected
    for name in sorted(expected):
        assert got[name].shape == want[name].shape, name
        assert_close(got[name], want[name])  # compare.py's rule: 1e-5 + 1e-4·max|ref|
    # the run is not degenerate: guidance and ANS moved the latents
    assert np.abs(got["final_latents"] - got["init_latents"]).max() > 1e-2


def test_e2e_accepts_root_and_reports_missing_inputs(e2e_run, tmp_path, capsys):
    assert golden.main(["--e2e", str(tmp_path), str(tmp_path / "out")]) == 2
    assert "inputs.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
