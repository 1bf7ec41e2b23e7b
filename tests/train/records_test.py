"""Training records across interruptions (issue #13, training items 8-11): metrics.jsonl one row
per step after kill -9 and SIGTERM, per-start configs and the resume config diff, fallback past a
corrupt newest checkpoint, the stop message and exit status, log hygiene.

All runs share one compiled step (the micro model, same step settings; only fields outside the
step's cache key change between runs)."""

import json
import logging
import os

import pytest

from pasd_jax.train import cli, loop
from pasd_jax.train.checkpoint import CheckpointError
from pasd_jax.train.config_check import ConfigError
from tests.train.conftest import tiny_config

STEPS = {"train.ckpt_every": 2, "train.keep_checkpoints": 5}


def _rows(workdir) -> list[int]:
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f if line.strip()]


def _checkpoints(workdir) -> list[str]:
    return sorted(os.listdir(os.path.join(workdir, "checkpoints")))


def _corrupt(workdir, step: int) -> None:
    for root, _, files in os.walk(os.path.join(workdir, "checkpoints", str(step), "state")):
        for name in files:
            with open(os.path.join(root, name), "wb") as f:
                f.write(b"\0garbage")


@pytest.fixture(scope="module")
def killed_and_resumed(image_folder, micro_base, tmp_path_factory):
    """A run "killed" after step 3 (last checkpoint 2), resumed to step 6 with a changed
    `train.log_every` (a field a resume may change)."""
    workdir = str(tmp_path_factory.mktemp("records"))
    first = loop.train(tiny_config(image_folder, micro_base, **STEPS, **{"train.total_steps": 6}), workdir,
                       stop_after=3)
    rows_after_kill = _rows(workdir)
    config = tiny_config(image_folder, micro_base, **STEPS, **{"train.total_steps": 6, "train.log_every": 2})
    second = loop.train(config, workdir)
    return workdir, first, second, rows_after_kill


def test_rows_unique_and_complete_after_kill_and_resume(killed_and_resumed):
    workdir, first, second, rows_after_kill = killed_and_resumed
    assert first["step"] == 3 and first["stopped"] and rows_after_kill == [1, 2, 3]
    assert second["step"] == 6 and not second["stopped"]
    assert _rows(workdir) == [1, 2, 3, 4, 5, 6]  # step 3 logged once, by the resumed run


def test_each_start_keeps_its_config(killed_and_resumed):
    workdir = killed_and_resumed[0]
    names = sorted(n for n in os.listdir(workdir) if n.startswith("config"))
    assert names == ["config.0.json", "config.2.json", "config.json"]
    first, second = (json.load(open(os.path.join(workdir, n))) for n in ("config.0.json", "config.2.json"))
    assert (first["train"]["log_every"], second["train"]["log_every"]) == (1, 2)
    assert json.load(open(os.path.join(workdir, "config.json"))) == second


def test_resume_reports_changes_and_refuses_incompatible_ones(killed_and_resumed, image_folder, micro_base, caplog):
    workdir = killed_and_resumed[0]
    config = tiny_config(image_folder, micro_base, **STEPS, **{"train.total_steps": 6, "model.family": "pasd_light",
                                                                "optim.lr": 0.5})
    before = sorted(os.listdir(workdir))
    with caplog.at_level(logging.WARNING), pytest.raises(ConfigError, match=r"changed model\.family.*--allow_config_change"):
        loop.train(config, workdir)
    assert "model.family: 'pasd' -> 'pasd_light'" in caplog.text and "optim.lr: 0.001 -> 0.5" in caplog.text
    assert sorted(os.listdir(workdir)) == before  # nothing written


def test_corrupt_newest_checkpoint_falls_back_with_a_warning(killed_and_resumed, image_folder, micro_base, caplog,
                                                             tmp_path):
    workdir = killed_and_resumed[0]
    assert "6" in _checkpoints(workdir)
    _corrupt(workdir, 6)
    config = tiny_config(image_folder, micro_base, **STEPS, **{"train.total_steps": 8, "train.log_every": 2})
    with caplog.at_level(logging.WARNING):
        result = loop.train(config, workdir)
    bad = os.path.join(workdir, "checkpoints", "6")
    assert f"checkpoint {bad} is unreadable" in caplog.text and "resuming from step 4" in caplog.text
    assert result["step"] == 8
    assert "corrupt-6" in _checkpoints(workdir) and "6" in _checkpoints(workdir)  # kept aside, 6 saved again
    assert _rows(workdir) == list(range(1, 9))


def test_no_intact_checkpoint_is_one_clear_error(image_folder, micro_base, tmp_path, capsys, monkeypatch):
    workdir = str(tmp_path / "run")
    config = tiny_config(image_folder, micro_base, **STEPS, **{"train.total_steps": 2})
    loop.train(config, workdir)
    _corrupt(workdir, 2)
    with pytest.raises(CheckpointError, match=r"no intact checkpoint in .*checkpoints: step\(s\) 2 are unreadable"):
        loop.train(tiny_config(image_folder, micro_base, **STEPS, **{"train.total_steps": 4}), workdir)
    assert _checkpoints(workdir) == ["2"]  # nothing moved or overwritten when nothing is intact
    # Through train.py: one error line, exit 1.
    monkeypatch.setattr(cli, "parse_args", lambda argv: (config, workdir, type("O", (), dict(
        print_config=False, verbose=False, allow_config_change=False))()))
    monkeypatch.setattr(cli, "setup_logging", lambda verbose: None)
    assert cli.main(["train.py"]) == cli.EXIT_FAILED
    err = capsys.readouterr().err.splitlines()
    # (log lines from a handler an earlier cli.main installed may precede it; the error is one line)
    errors = [ln for ln in err if ln.startswith("error: ")]
    assert len(errors) == 1 and err[-1] == errors[0] and "no intact checkpoint" in errors[0], err
    assert not any("Traceback" in ln for ln in err), err


class _StopAtStep:
    """Stands in for `loop._Stop`: "SIGTERM" arrives during step `at`."""

    def __init__(self, install=True, at=3):
        self.calls, self.at = 0, at

    @property
    def requested(self):
        self.calls += 1
        return self.calls >= self.at

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_sigterm_saves_the_step_with_its_row_and_says_how_to_resume(image_folder, micro_base, tmp_path, monkeypatch,
                                                                   capsys, caplog):
    workdir = str(tmp_path / "run")
    config = tiny_config(image_folder, micro_base, **{"train.total_steps": 8, "train.ckpt_every": 100,
                                                      "train.log_every": 5})
    monkeypatch.setattr(loop, "_Stop", _StopAtStep)
    with caplog.at_level(logging.INFO):
        result = loop.train(config, workdir)
    assert result["stopped"] and result["step"] == 3
    assert _checkpoints(workdir) == ["3"] and _rows(workdir) == [1, 2, 3]  # the checkpointed step's row
    # log hygiene: compile start/end, the data found, one line per logged step
    assert "compiling the train step" in caplog.text and "train step compiled in" in caplog.text
    assert "training data: 6 records" in caplog.text
    assert sum(1 for r in caplog.records if r.getMessage().startswith("step 3 ")) == 1
    assert "step 3" not in capsys.readouterr().out  # not printed a second time
    monkeypatch.setattr(cli, "parse_args", lambda argv: (config, workdir, type("O", (), dict(
        print_config=False, verbose=False, allow_config_change=False))()))
    monkeypatch.setattr(cli, "setup_logging", lambda verbose: None)
    monkeypatch.setattr(loop, "train", lambda *a, **k: result)
    assert cli.main(["train.py"]) == cli.EXIT_STOPPED == 3
    assert "stopped at step 3, checkpoint saved, rerun the same command to resume" in capsys.readouterr().out


def test_export_records_base_relative_to_the_workdir(killed_and_resumed, micro_base):
    workdir = killed_and_resumed[0]
    from pasd_jax.assembly import weights

    with open(os.path.join(workdir, "export", weights.MANIFEST_NAME)) as f:
        manifest = json.load(f)
    assert not os.path.isabs(manifest["base"])
    assert os.path.samefile(os.path.join(workdir, manifest["base"]), micro_base)


def test_orbax_info_is_off_by_default_and_tensorboard_says_why(tmp_path, caplog, monkeypatch):
    from absl import logging as absl_logging

    from pasd_jax.train import metrics

    cli.setup_logging(verbose=False)
    assert logging.getLogger("absl").getEffectiveLevel() == logging.WARNING
    assert logging.getLogger("orbax").getEffectiveLevel() == logging.WARNING
    with caplog.at_level(logging.INFO):
        absl_logging.info("an orbax-style INFO line")
    assert "an orbax-style INFO line" not in caplog.text
    cli.setup_logging(verbose=True)
    assert logging.getLogger("absl").getEffectiveLevel() == logging.INFO
    cli.setup_logging(verbose=False)
    real_import = __import__

    def no_tb(name, *args, **kwargs):
        if name in ("tensorboardX", "torch.utils.tensorboard"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr("builtins.__import__", no_tb)
    with caplog.at_level(logging.INFO):
        writer = metrics.MetricWriter(str(tmp_path))
        writer.write(1, {"loss": 1.0})
        writer.write(2, {"loss": 0.5})
    assert caplog.text.count("TensorBoard logging is off") == 1 and "pip install tensorboardX" in caplog.text
