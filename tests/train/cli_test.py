"""`train.py` command line: usage and config mistakes give one `error:` line, exit 2, and leave
nothing behind; --help and --print_config (issue #13, training item 7)."""

import os
import subprocess
import sys

import pytest

from pasd_jax.train import cli
from tests.train.conftest import write_images

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(REPO, "configs", "realisr.py") + ":tiny"


def _run(capsys, *args):
    code = cli.main(["train.py", *args])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("extra, expected", [
    (["--config.data.path=x"], "--config.data.path: no such config field (did you mean config.data.paths?)"),
    (["--config.paths=x"], "did you mean config.data.paths?"),
    (["--config.optim.lrr=1"], "did you mean config.optim.lr?"),
    ([], "config.data.paths is empty"),
    (["--config.data.paths=('/no/such/folder',)"], "config.data.paths: '/no/such/folder' is not a folder"),
    (["--config.data.paths=('{empty}',)"], "no images"),
    (["--config.train.total_steps=abc"], "--config.train.total_steps=abc"),
    (["--config.train.total_steps=0"], "config.train.total_steps=0 must be an integer ≥ 1"),
    (["--config.train.remat_policy=dot"], "config.train.remat_policy='dot' is not one of"),
    (["--config.base=/no/such/base"], "config.base: '/no/such/base' is not a folder"),
    (["--workdirr=x"], "Unknown command line flag 'workdirr'"),
    (["--config.data.degrade_on=gpu"], "config.data.degrade_on='gpu' is not one of host, device"),
    (["--config.data.degrade_on=device", "--config.data.mode=grayscale"],
     "data.mode='grayscale' needs data.degrade_on='host'"),
])
def test_config_mistakes_are_one_error_line_exit_2(capsys, tmp_path, extra, expected):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    workdir = tmp_path / "run"
    extra = [a.replace("{empty}", str(empty)) for a in extra]
    code, out, err = _run(capsys, "--config", TINY, f"--workdir={workdir}", *extra)
    assert code == 2, (out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert expected in lines[0], lines[0]
    assert "Traceback" not in err and not workdir.exists()


def test_required_flags_and_bad_variant(capsys, tmp_path):
    for args, expected in ([["--workdir", str(tmp_path / "w")], "--config is required"],
                           [["--config", TINY], "--workdir is required"],
                           [["--config", TINY + "x", "--workdir", str(tmp_path / "w")], "unknown config variant 'tinyx'"],
                           [["--config", "configs/nope.py", "--workdir", str(tmp_path / "w")], "'configs/nope.py' not found"]):
        code, _, err = _run(capsys, *args)
        assert code == 2 and err.startswith("error: ") and expected in err and err.count("\n") == 1, err
    assert not (tmp_path / "w").exists()


def test_help_and_print_config(capsys, tmp_path):
    code, out, _ = _run(capsys, "--help")
    assert code == 0
    assert "required:" in out and "--config FILE" in out and "--workdir DIR" in out and "--print_config" in out
    assert "exit status" in out
    images = write_images(tmp_path / "imgs", 1)
    code, out, err = _run(capsys, "--config", TINY, "--print_config", "--config.optim.lr=0.25",
                          f"--config.data.paths=('{images}',)")
    assert code == 0, err
    assert "lr: 0.25" in out and "remat_policy: none" in out
    assert sorted(os.listdir(tmp_path)) == ["imgs"]


def test_train_py_help_runs_without_jax_start(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "--help"], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
    assert proc.returncode == 0 and "--config FILE" in proc.stdout and "required" in proc.stdout
    proc = subprocess.run([sys.executable, "train.py", "--config", TINY, "--workdir", str(tmp_path / "w"),
                           "--config.data.path=x"], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=REPO), timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "did you mean config.data.paths?" in proc.stderr
    assert not (tmp_path / "w").exists()


def test_a_failed_first_start_removes_its_workdir(capsys, tmp_path, monkeypatch):
    """A failure after the checks (here: a base whose unet/ weights are unreadable) removes the
    workdir this start created, and keeps one that existed before."""
    images = write_images(tmp_path / "imgs", 1)
    base = tmp_path / "base"
    for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (base / part).mkdir(parents=True)
    workdir = tmp_path / "run"
    code, _, err = _run(capsys, "--config", TINY, f"--workdir={workdir}", f"--config.base={base}",
                        f"--config.data.paths=('{images}',)")
    assert code == 1 and err.startswith("error: ") and err.count("\n") == 1, err
    assert not workdir.exists()
    workdir.mkdir()
    (workdir / "keep.txt").write_text("mine")
    code, _, err = _run(capsys, "--config", TINY, f"--workdir={workdir}", f"--config.base={base}",
                        f"--config.data.paths=('{images}',)")
    assert code == 1 and (workdir / "keep.txt").exists()


def test_stablesr_config_is_refused_by_the_pasd_loop(capsys, tmp_path):
    """configs/stablesr.py has a tested step but no loop yet: one clear line, not a PASD run."""
    workdir = tmp_path / "sr"
    config = os.path.join(REPO, "configs", "stablesr.py")
    code, out, err = _run(capsys, "--config", config, f"--workdir={workdir}", "--config.base=tiny")
    assert code == 2, (out, err)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1 and "config.method='stablesr'" in lines[0], err
    assert not workdir.exists()
