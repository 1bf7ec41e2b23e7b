"""End-to-end training on the tiny model (CPU): learning, freezing, exact resume, 2×4 mesh parity.

One compiled step (global batch 8, 64 px) is shared by every in-process run through the
persistent compilation cache; the mesh run happens in a subprocess with 8 fake CPU devices.
"""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from pasd_jax.assembly import weights
from pasd_jax.assembly.loader import load_models
from pasd_jax.train.loop import train
from pasd_jax.train.metrics import read_metrics
from pasd_jax.train.state import trainable_mask
from tests.train.conftest import tiny_config

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def reference_run(image_folder, micro_base, tmp_path_factory):
    """30 uninterrupted steps (validation at the end); returns (workdir, train() result, {step: row})."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    config = tiny_config(image_folder, micro_base, **{"train.total_steps": 30, "train.ckpt_every": 30,
                                                       "train.validate_every": 30, "train.val_steps": 2})
    result = train(config, workdir)
    return workdir, result, read_metrics(workdir)


def test_loss_decreases_and_logs(reference_run):
    workdir, result, rows = reference_run
    assert result["step"] == 30 and sorted(rows) == list(range(1, 31))
    losses = np.array([rows[s]["loss"] for s in range(1, 31)])
    assert np.all(np.isfinite(losses))
    assert losses[-10:].mean() < 0.9 * losses[:10].mean(), losses
    last = rows[30]
    for key in ("mse", "dr_l1", "dr_l1_0", "lr", "grad_norm", "step_time_s", "images_per_s"):
        assert key in last
    assert last["lr"] == pytest.approx(1e-3)
    grid = np.asarray(Image.open(os.path.join(workdir, "val", "step_0000030.png")))
    assert grid.shape == (2 * 32, 3 * 32, 3)  # two validation rows of LQ | SR | HQ


def test_frozen_bit_identical_trainable_moved(reference_run, image_folder, micro_base):
    workdir, result, _ = reference_run
    export, base = result["export"], micro_base
    patterns = tiny_config(image_folder).train.trainable
    moved = 0
    for part in ("unet", "controlnet"):
        _, before = weights.load_converted(os.path.join(base, part))
        _, after = weights.load_converted(os.path.join(export, part))
        mask = trainable_mask({part: before}, patterns)
        flat_b, flat_a = weights.flatten_params(before), weights.flatten_params(after)
        assert flat_b.keys() == flat_a.keys()
        for key, value in flat_b.items():
            if mask[f"{part}/{key}"]:
                moved += int(not np.array_equal(value, flat_a[key]))
            else:
                np.testing.assert_array_equal(value, flat_a[key], err_msg=f"frozen {part}/{key} changed")
    assert moved > 50  # nearly every trainable leaf moves (zero convs included)
    for part in ("vae", "text_encoder"):  # frozen components are copied, not retrained
        _, before = weights.load_converted(os.path.join(base, part))
        _, after = weights.load_converted(os.path.join(export, part))
        for key, value in weights.flatten_params(before).items():
            np.testing.assert_array_equal(value, weights.flatten_params(after)[key])
    assert os.path.isdir(os.path.join(export, "tokenizer")) and os.path.isdir(os.path.join(export, "scheduler"))
    loaded = load_models(export)  # the sampler's loader reads the export as a PASD checkpoint
    assert loaded.family == "pasd"


def test_kill_and_resume_reproduces_losses(reference_run, image_folder, micro_base, tmp_path):
    _, _, ref = reference_run
    config = tiny_config(image_folder, micro_base, **{"train.total_steps": 8, "train.ckpt_every": 4})
    first = train(config, str(tmp_path), stop_after=6)  # "killed" after step 6; last checkpoint: 4
    assert first["step"] == 6 and first["export"] is None
    steps = sorted(int(d) for d in os.listdir(tmp_path / "checkpoints") if d.isdigit())
    assert 4 in steps
    second = train(config, str(tmp_path))  # the same command again resumes
    assert second["step"] == 8
    rows = read_metrics(str(tmp_path))
    for s in range(1, 9):
        assert rows[s]["loss"] == ref[s]["loss"], (s, rows[s]["loss"], ref[s]["loss"])
        assert rows[s]["grad_norm"] == ref[s]["grad_norm"]


_MESH_SCRIPT = textwrap.dedent("""
    import json, sys
    import jax
    jax.config.update("jax_disable_most_optimizations", True)
    sys.path.insert(0, {repo!r})
    from pasd_jax.train.loop import train
    from pasd_jax.train.metrics import read_metrics
    from tests.train.conftest import tiny_config
    assert jax.device_count() == 8, jax.devices()
    config = tiny_config({images!r}, {base!r}, **{{"train.total_steps": 3, "train.ckpt_every": 3,
                                        "mesh.data": 2, "mesh.fsdp": 4}})
    result = train(config, {workdir!r})
    leaves = jax.tree_util.tree_leaves(result["state"].params) + jax.tree_util.tree_leaves(result["frozen"])
    sharded = sum(1 for x in leaves if x.addressable_shards[0].data.shape != x.shape)
    mesh_shape = dict(leaves[0].sharding.mesh.shape)
    rows = read_metrics({workdir!r})
    print("RESULT" + json.dumps({{"losses": [rows[s]["loss"] for s in (1, 2, 3)], "sharded": sharded,
                                 "leaves": len(leaves), "mesh": mesh_shape}}))
""")


def test_mesh_2x4_matches_single_device(reference_run, image_folder, micro_base, compilation_cache, tmp_path):
    _, _, ref = reference_run
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
               JAX_COMPILATION_CACHE_DIR=compilation_cache,
               JAX_DEFAULT_MATMUL_PRECISION="highest")
    script = _MESH_SCRIPT.format(repo=REPO, images=image_folder, base=micro_base, workdir=str(tmp_path / "mesh"))
    proc = subprocess.run([sys.executable, "-c", script], env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT")][-1]
    out = json.loads(line[len("RESULT"):])
    assert out["mesh"] == {"data": 2, "fsdp": 4}
    assert out["sharded"] > 20, out  # large kernels (and their Adam moments) are split over fsdp
    np.testing.assert_allclose(out["losses"], [ref[s]["loss"] for s in (1, 2, 3)], rtol=2e-5, atol=1e-6)
