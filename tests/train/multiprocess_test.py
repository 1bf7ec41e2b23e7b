"""Multi-process training on localhost: 2 processes × 2 CPU devices (jax.distributed, gloo).

One module fixture drives three runs of `tests/train/mp_worker.py` on the micro model, global
batch 8, 5 steps, checkpoint every 2:

* run A: the 2-process job, plus (at the same time) the single-process 4-device reference;
  after A logs step 2, SIGTERM goes to process 1 only: the preemption service makes both
  processes checkpoint the same step and stop;
* run B: the same 2-process command again resumes from that checkpoint and finishes.

What is checked: the two hosts' data shards are disjoint and, concatenated, the reference's
global batch; every process stops at the same step with one checkpoint for it; the resumed run's
losses equal the single-process run's at every step; metrics.jsonl has one row per step.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.train.conftest import write_images, write_micro_pipeline

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOTAL, CKPT_EVERY, SIGNAL_AFTER = 5, 2, 2
TIMEOUT_S = 900


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(cache: str, devices: int, port: int | None = None, process: int | None = None) -> dict:
    env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", JAX_COMPILATION_CACHE_DIR=cache,
               XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_DEFAULT_MATMUL_PRECISION="highest")
    for key in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
        env.pop(key, None)
    if port is not None:
        env.update(JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2", JAX_PROCESS_ID=str(process))
    return env


def _start(args: dict, env: dict, log_path: str) -> subprocess.Popen:
    log = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", "tests.train.mp_worker", json.dumps(args)], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT)


def _wait_all(procs, logs, deadline):
    for proc, log in zip(procs, logs):
        try:
            proc.wait(timeout=max(1.0, deadline - time.time()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            pytest.fail(f"worker timed out; log tail:\n{open(log).read()[-3000:]}")
        assert proc.returncode == 0, open(log).read()[-4000:]


def _metrics_steps(workdir: str) -> list[int]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if line.strip()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("mp")
    images = write_images(root / "images", 6)
    base = write_micro_pipeline(str(root / "base"))
    cache = str(root / "cache")
    overrides = {"train.total_steps": TOTAL, "train.ckpt_every": CKPT_EVERY}
    job = dict(images=images, base=base, workdir=str(root / "job"), overrides=overrides)
    ref = dict(job, workdir=str(root / "ref"), out=str(root / "ref_{process}.json"))
    deadline = time.time() + TIMEOUT_S

    # Run A (+ the reference in parallel), SIGTERM to process 1 once step 2 is logged.
    port = _free_port()
    logs = [str(root / f"a{i}.log") for i in (0, 1)] + [str(root / "ref.log")]
    a_args = dict(job, out=str(root / "a_{process}.json"))
    procs = [_start(a_args, _env(cache, 2, port, i), logs[i]) for i in (0, 1)]
    procs.append(_start(ref, _env(cache, 4), logs[2]))
    while SIGNAL_AFTER not in _metrics_steps(job["workdir"]):
        if time.time() > deadline or any(p.poll() not in (None, 0) for p in procs):
            for p in procs:
                p.kill()
            pytest.fail(f"run A did not reach step {SIGNAL_AFTER}:\n" + "\n".join(open(log).read()[-2000:] for log in logs))
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)
    _wait_all(procs, logs, deadline)
    a_out = [json.load(open(root / f"a_{i}.json")) for i in (0, 1)]
    ref_out = json.load(open(root / "ref_0.json"))
    stopped_checkpoints = sorted(int(d) for d in os.listdir(os.path.join(job["workdir"], "checkpoints")))
    a_rows = _metrics_steps(job["workdir"])

    # Run B: the same command resumes.
    port = _free_port()
    b_logs = [str(root / f"b{i}.log") for i in (0, 1)]
    b_args = dict(job, out=str(root / "b_{process}.json"))
    procs = [_start(b_args, _env(cache, 2, port, i), b_logs[i]) for i in (0, 1)]
    _wait_all(procs, b_logs, deadline)
    b_out = [json.load(open(root / f"b_{i}.json")) for i in (0, 1)]
    return dict(a=a_out, b=b_out, ref=ref_out, job=job["workdir"], ref_dir=ref["workdir"],
                stopped_checkpoints=stopped_checkpoints, a_rows=a_rows, b_log=open(b_logs[0]).read())


def test_two_processes_two_devices_each(runs):
    for out in runs["a"] + runs["b"]:
        assert (out["count"], out["local_devices"], out["devices"]) == (2, 2, 4)
    assert sorted(o["process"] for o in runs["a"]) == [0, 1]
    assert (runs["ref"]["count"], runs["ref"]["devices"]) == (1, 4)


def test_host_shards_are_disjoint_and_form_the_global_batch(runs):
    p0, p1 = sorted(runs["a"], key=lambda o: o["process"])
    for step, whole in enumerate(runs["ref"]["shard"]):
        assert len(p0["shard"][step]) == len(p1["shard"][step]) == len(whole) // 2
        assert not set(p0["shard"][step]) & set(p1["shard"][step])
        np.testing.assert_array_equal(p0["shard"][step] + p1["shard"][step], whole)


def test_sigterm_to_one_process_stops_all_at_the_same_step(runs):
    steps = {o["step"] for o in runs["a"]}
    assert len(steps) == 1, runs["a"]
    stop = steps.pop()
    assert SIGNAL_AFTER <= stop < TOTAL and all(o["stopped"] for o in runs["a"])
    assert stop in runs["stopped_checkpoints"]  # one checkpoint folder for the step, written by both
    assert runs["stopped_checkpoints"] == sorted({s for s in range(CKPT_EVERY, stop + 1, CKPT_EVERY)} | {stop})
    assert runs["a_rows"] == list(range(1, stop + 1))


def test_resume_finishes_with_the_single_process_losses(runs):
    assert [o["step"] for o in runs["b"]] == [TOTAL, TOTAL] and not any(o["stopped"] for o in runs["b"])
    rows = [json.loads(line) for line in open(os.path.join(runs["job"], "metrics.jsonl")) if line.strip()]
    assert [r["step"] for r in rows] == list(range(1, TOTAL + 1))  # unique and complete
    ref = {r["step"]: r for r in map(json.loads, open(os.path.join(runs["ref_dir"], "metrics.jsonl")))}
    for r in rows:
        np.testing.assert_allclose(r["loss"], ref[r["step"]]["loss"], rtol=2e-5, err_msg=f"step {r['step']}")
        np.testing.assert_allclose(r["grad_norm"], ref[r["step"]]["grad_norm"], rtol=1e-4)
    assert os.path.isdir(os.path.join(runs["job"], "export", "unet"))
