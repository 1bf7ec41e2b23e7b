"""Batched, device-sharded sampling: an image's result depends only on (seed, image), never on the
batch size, its position in the batch or the device count; a short last batch does not recompile;
processes split a folder into disjoint shares; `sample.py --batch-size` writes what batch 1 writes."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from PIL import Image

from pasd_jax.assembly.loader import load_models
from pasd_jax.fixtures import tiny
from pasd_jax.sampling import batching, cli
from pasd_jax.sampling.pipeline import RestoreOptions, Restorer
from pasd_jax.sampling.sampler import Noises, Sampler, SamplerSettings, latent_shape, make_inputs

pytestmark = pytest.mark.usefixtures("fast_compile")
ROOT = pathlib.Path(__file__).resolve().parents[2]
# eta > 0: the per-step noise is drawn too, so per-image step keys are checked as well
OPTIONS = dict(steps=2, eta=0.5, process_size=16)
PROMPTS = ["a red house", "", "a cat"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.make_tiny_pipeline(tmp_path_factory.mktemp("tiny") / "pasd", seed=0, levels=2)


@pytest.fixture(scope="module")
def models(model_dir):
    return load_models(model_dir)


def _images(n, shape=(16, 24, 3), seed=0):
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 255, shape, dtype=np.uint8) for _ in range(n)]


@pytest.fixture(scope="module")
def alone(models):
    """Each image restored on its own (batch 1), the reference of every other test."""
    restorer = Restorer(models, RestoreOptions(**OPTIONS))
    return [restorer.restore(rgb, prompt=p, seed=7).image for rgb, p in zip(_images(3), PROMPTS)]


def _close(a, b):
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= 1 and diff.mean() < 0.01, (diff.max(), diff.mean())


def test_batch_of_three_matches_batch_of_one_in_any_order(models, alone):
    restorer = Restorer(models, RestoreOptions(**OPTIONS))
    items = [restorer.prepare(rgb, prompt=p, seed=7) for rgb, p in zip(_images(3), PROMPTS)]
    batched = restorer.restore_batch(items)
    assert [r.batch for r in batched] == [3, 3, 3]
    for got, want in zip(batched, alone):
        _close(got.image, want)
    shuffled = restorer.restore_batch([items[2], items[0], items[1]])  # position in the batch
    _close(shuffled[0].image, alone[2])
    _close(shuffled[1].image, alone[0])
    short = restorer.restore_batch(items[1:], call_size=3)  # padded to the same call: no new trace
    assert len(short) == 2 and restorer.sampler.trace_count == 1
    _close(short[0].image, alone[1])
    with pytest.raises(ValueError, match="one processed size"):
        restorer.restore_batch(items[:1] + [restorer.prepare(_images(1, (24, 24, 3))[0])])


def test_sampler_batch_is_the_stack_of_single_runs(models):
    """Float level: latents of a batch of 3 equal the three single runs (per-image noises and keys)."""
    sampler = Sampler(models, SamplerSettings(num_steps=2, eta=0.5))
    rng = np.random.default_rng(1)
    lq = rng.random((3, 16, 16, 3), dtype=np.float32)
    neg, pos = rng.standard_normal((2, 3, 77, 32)).astype(np.float32)
    draws = [Noises.draw(jax.random.key(s), latent_shape(models, (1, 16, 16, 3))) for s in (3, 4, 5)]
    whole = sampler(make_inputs(lq, np.concatenate([neg, pos]), Noises.stack(draws), guidance_scale=7.5))
    for i in range(3):  # atol: float reassociation across batch sizes, amplified by CFG ×7.5
        one = sampler(make_inputs(lq[i:i + 1], np.stack([neg[i], pos[i]]), Noises.stack(draws[i:i + 1]),
                                  guidance_scale=7.5))
        np.testing.assert_allclose(whole["final_latents"][i], one["final_latents"][0], atol=1e-4, rtol=0)
        np.testing.assert_allclose(whole["image"][i], one["image"][0], atol=1e-4, rtol=0)


_DEVICES_CHILD = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    from pasd_jax.assembly.loader import load_models
    from pasd_jax.sampling.pipeline import RestoreOptions, Restorer
    from pasd_jax.sampling.sampler import Sampler
    assert jax.local_device_count() == 4, jax.devices()
    model_dir, out, options, prompts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3]), json.loads(sys.argv[4])
    models = load_models(model_dir)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (16, 24, 3), dtype=np.uint8) for _ in range(3)]
    restorer = Restorer(models, RestoreOptions(**options))
    items = [restorer.prepare(rgb, prompt=p, seed=7) for rgb, p in zip(images, prompts)]
    assert restorer.sampler.mesh_for(4).shape == {"data": 4, "tiles": 1}
    batch = restorer.restore_batch(items, call_size=4)       # 3 images + 1 pad over 4 devices
    tiled = Restorer(models, RestoreOptions(**options, tile_size=6, tile_overlap=2))
    assert tiled.sampler.mesh_for(2).shape == {"data": 2, "tiles": 2}
    tiles = tiled.restore_batch(items[:2])                   # 2 images x tiles on a 2x2 mesh
    np.savez(out, batch=np.stack([r.image for r in batch]), tiled=np.stack([r.image for r in tiles]))
""")


def test_four_devices_match_one_device(models, model_dir, alone, tmp_path):
    out = tmp_path / "four.npz"
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               PYTHONPATH=str(ROOT), JAX_DISABLE_MOST_OPTIMIZATIONS="1")
    run = subprocess.run([sys.executable, "-c", _DEVICES_CHILD, str(model_dir), str(out), json.dumps(OPTIONS),
                          json.dumps(PROMPTS)], env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    got = np.load(out)
    for i in range(3):
        _close(got["batch"][i], alone[i])
    tiled = Restorer(models, RestoreOptions(**OPTIONS, tile_size=6, tile_overlap=2))  # one device, alone
    for i, (rgb, p) in enumerate(zip(_images(2), PROMPTS)):
        _close(got["tiled"][i], tiled.restore(rgb, prompt=p, seed=7).image)


def test_process_shares_are_disjoint_and_complete():
    files = [f"img{i:02d}.png" for i in range(11)]
    for count in (1, 2, 3, 4):
        shares = [batching.process_share(files, p, count) for p in range(count)]
        assert sorted(sum(shares, [])) == files
        assert sum(len(s) for s in shares) == len(files)
    with pytest.raises(ValueError):
        batching.process_share(files, 2, 2)
    assert [batching.call_size(b, 4) for b in (1, 2, 4, 5, 8)] == [1, 4, 4, 8, 8]
    assert batching.call_size(3, 1) == 3


def test_size_batcher_groups_by_size_in_order():
    b = batching.SizeBatcher(2)
    out = []
    for key, item in [("s", 1), ("l", 2), ("s", 3), ("l", 4), ("s", 5), ("x", 6)]:
        out.extend(b.add(key, item))
    assert out == [[1, 3], [2, 4]] and b.pending == 2
    assert list(b.flush()) == [[5], [6]] and b.pending == 0


def test_cli_refuses_a_bad_batch_size(model_dir, tmp_path, capsys):
    args = ["--ckpt", str(model_dir), "--input", str(tmp_path), "--output", str(tmp_path / "x")]
    for bad in ("0", "-2", "many"):
        assert cli.main(args + ["--batch-size", bad]) == 2
        assert "--batch-size" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_split_a_folder(model_dir, tmp_path, capsys):
    """sample.py --batch-size 2 in 2 processes x 2 CPU devices joined by jax.distributed: disjoint
    shares that cover the folder, batches grouped by processed size (a short one padded), each
    image as a single-process batch-1 run writes it."""
    src = tmp_path / "in"
    src.mkdir()
    for i, rgb in enumerate(_images(5) + _images(1, (24, 24, 3), seed=5)):
        Image.fromarray(rgb).save(src / f"im{i}.png")
    common = ["--ckpt", str(model_dir), "--input", str(src), "--steps", "2", "--process-size", "16", "--no-progress"]
    port = _free_port()
    procs = []
    for p in (0, 1):
        env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu", JAX_DISABLE_MOST_OPTIMIZATIONS="1",
                   XLA_FLAGS="--xla_force_host_platform_device_count=2", JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
                   JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(p))
        procs.append(subprocess.Popen([sys.executable, str(ROOT / "sample.py"), *common, "--output", str(tmp_path / "mp"),
                                       "--batch-size", "2"], env=env, stderr=subprocess.PIPE, text=True))
    logs = []
    for proc in procs:
        try:
            logs.append(proc.communicate(timeout=600)[1])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            pytest.fail("a sample.py process timed out")
        assert proc.returncode == 0, logs[-1][-3000:]
    written = [sorted(line.split(" -> ")[0] for line in log.splitlines() if " -> " in line) for log in logs]
    assert written == [["im0.png", "im2.png", "im4.png"], ["im1.png", "im3.png", "im5.png"]]
    assert all("process %d of 2: restored 3 images" % p in log for p, log in enumerate(logs))
    assert "batch of 2" in logs[0] and "im4.png -> " in logs[0]  # im4 alone: a padded call of 2
    assert "processed at 24x24 px" in logs[1]
    assert cli.main(common + ["--output", str(tmp_path / "one"), "--batch-size", "1"]) == 0
    for i in range(6):
        _close(np.asarray(Image.open(tmp_path / "mp" / f"im{i}.png")),
               np.asarray(Image.open(tmp_path / "one" / f"im{i}.png")))
