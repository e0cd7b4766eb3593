"""Metrics jsonl/TensorBoard, the progress display, run-dir refusal rules."""

from __future__ import annotations

import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from opdkit.config import config_hash, h, load_config
from opdkit.errors import UserError
from opdkit.train.logging import Progress, prepare_run_dir, read_run_hash
from opdkit.metrics_log import MetricsLogger, read_metrics


def test_metrics_jsonl_and_tensorboard(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path / "run") as log:
        log.log(1, {"loss": torch.tensor(0.5), "acc": np.float32(0.25), "n": np.int64(3), "bad": float("nan"),
                    "big": math.inf, "per_pos": torch.tensor([1.0, float("-inf")]), "reward": {"mean": 0.1},
                    "flag": True, "name": "x"})
        log.log(2, {"loss": 0.4})
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    first = json.loads(lines[0], parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert first["step"] == 1 and first["loss"] == 0.5 and first["acc"] == 0.25 and first["n"] == 3
    assert first["bad"] == "nan" and first["big"] == "inf" and first["per_pos"] == [1.0, "-inf"]
    assert first["reward/mean"] == 0.1 and first["flag"] is True and first["name"] == "x"
    recs = read_metrics(tmp_path / "run")
    assert math.isnan(recs[0]["bad"]) and recs[0]["big"] == math.inf and recs[0]["per_pos"][1] == -math.inf
    assert recs[1] == {"step": 2, "loss": 0.4}
    events = list((tmp_path / "run" / "tb").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss", "acc", "n", "bad", "big", "reward/mean"} <= tags
    assert not tags & {"per_pos", "flag", "name", "step"}
    assert [e.value for e in acc.Scalars("loss")] == pytest.approx([0.5, 0.4])


def test_resume_truncates_and_torn_line(tmp_path: Path) -> None:
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for s in range(1, 6):
            log.log(s, {"loss": s})
    with open(tmp_path / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 6, "lo')  # crash mid-write
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    with MetricsLogger(tmp_path, tensorboard=False, resume_step=3) as log:
        log.log(4, {"loss": 40})
    assert [(r["step"], r["loss"]) for r in read_metrics(tmp_path)] == [(1, 1), (2, 2), (3, 3), (4, 40)]
    assert not (tmp_path / "tb").exists()


def test_progress_plain_lines() -> None:
    buf = io.StringIO()
    with Progress(10, every=5, stream=buf) as prog:
        for s in range(1, 11):
            prog.update(s, {"loss": 1.0 / s, "reward_mean": 0.5, "other": 3, "per_pos": [1, 2]})
    lines = buf.getvalue().splitlines()
    assert len(lines) == 3  # step 1, 5, 10
    assert lines[0].startswith("train step 1/10 (10%) | loss 1 | reward_mean 0.5 |") and "eta" in lines[0]
    assert lines[-1].startswith("train step 10/10 (100%) | loss 0.1 |") and "other" not in lines[-1]
    buf = io.StringIO()
    prog = Progress(4, every=1, stream=buf, keys=["other"], start_step=2)
    prog.update(3, {"loss": 1.0, "other": 7})
    assert buf.getvalue().startswith("train step 3/4 (75%) | other 7 |")
    buf = io.StringIO()
    Progress(4, enabled=False, stream=buf).update(4, {"loss": 1})
    assert buf.getvalue() == ""


def test_progress_rich_on_a_terminal() -> None:
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    buf = Tty()
    with Progress(3, stream=buf) as prog:
        assert prog.interactive
        for s in range(1, 4):
            prog.update(s, {"loss": 0.123456, "acc": 0.5})
        prog.print("hello")
    out = buf.getvalue()
    assert "3/3" in out and "loss 0.1235" in out and "acc 0.5" in out and "hello" in out


@dataclass
class RunCfg:
    run_dir: str = h("where", default="runs/x")
    lr: float = h("lr", default=1e-3)
    resume: bool = h("resume", default=False)


def test_run_dir_rules(tmp_path: Path) -> None:
    cfg = load_config(RunCfg, None, [f"run_dir={tmp_path / 'r'}"])
    hsh = config_hash(cfg, exclude=("resume",))
    run = tmp_path / "r"
    # fresh (missing) dir: created, config written with its hash
    assert prepare_run_dir(run, hsh, config=cfg) == run
    assert read_run_hash(run) == hsh and load_config(RunCfg, str(run / "config.yaml"), []) == cfg
    (run / "metrics.jsonl").write_text("{}\n")
    # same run, neither resume nor overwrite: refuse (would clobber)
    with pytest.raises(UserError, match="already holds this run; pass resume=true"):
        prepare_run_dir(run, hsh)
    # same run, resume: fine and keeps files
    prepare_run_dir(run, hsh, resume=True, config=load_config(RunCfg, None, [f"run_dir={run}", "resume=true"]))
    assert (run / "metrics.jsonl").exists()
    # a different run: refuse, and write nothing
    other = config_hash(load_config(RunCfg, None, ["lr=1"]))
    before = sorted(p.name for p in run.iterdir()), (run / "config.yaml").read_text()
    for resume in (False, True):
        with pytest.raises(UserError, match="already holds a different run.*overwrite=true to replace") as exc:
            prepare_run_dir(run, other, resume=resume)
        assert "\n" not in str(exc.value)
    assert (sorted(p.name for p in run.iterdir()), (run / "config.yaml").read_text()) == before
    # overwrite replaces it
    prepare_run_dir(run, other, overwrite=True)
    assert run.is_dir() and [p.name for p in run.iterdir()] == [".opdkit_run"]
    with pytest.raises(UserError, match="exclude each other"):
        prepare_run_dir(run, other, resume=True, overwrite=True)
    # an empty existing dir is fine; a non-empty non-run dir is never deleted
    prepare_run_dir(run, other)
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "data.txt").write_text("keep")
    for kw in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(UserError, match="holds no opdkit run"):
            prepare_run_dir(junk, hsh, **kw)
    assert (junk / "data.txt").read_text() == "keep"
    (tmp_path / "file").write_text("")
    with pytest.raises(UserError, match="not a directory"):
        prepare_run_dir(tmp_path / "file", hsh)


def test_progress_eta_leaves_out_excluded_time(monkeypatch) -> None:
    """An evaluation before/between steps is not folded into s/step and the ETA (issue #15: `29.6 s/step | eta
    5h34m` after an initial eval)."""
    import opdkit.train.logging as lg

    now = [100.0]
    monkeypatch.setattr(lg.time, "monotonic", lambda: now[0])
    buf = io.StringIO()
    prog = Progress(101, every=1, stream=buf).start()
    now[0] += 30.0  # the initial eval
    prog.exclude(30.0)
    now[0] += 0.5  # one step
    prog.update(1, {})
    line = buf.getvalue().splitlines()[-1]
    assert "0.5 s/step" in line and "eta 50s" in line and "elapsed 30s" in line
    prog.exclude(float("nan"))
    prog.exclude(-5)
    now[0] += 0.5
    prog.update(2, {})
    assert "0.5 s/step" in buf.getvalue().splitlines()[-1]


def test_saved_config_header_names_a_command_the_cli_accepts(tmp_path: Path) -> None:
    """config.yaml's header suggests `opdkit train <file> resume=true` (the file as first argument), which the CLI
    parses, and not `--config`; `--config FILE` is accepted too."""
    from opdkit.config import config_file_flag
    from opdkit.presets import config_args
    from opdkit.train.config import TrainConfig
    from opdkit.train.logging import create_run_dir
    from opdkit.train.sft import SFTConfig

    for cls, cmd in ((TrainConfig, "train"), (SFTConfig, "sft")):
        run = tmp_path / cmd
        cfg = load_config(cls, None, [f"run_dir={run}"])
        create_run_dir(run, "abc", config=cfg)
        header = [l for l in (run / "config.yaml").read_text().splitlines() if l.startswith("#")]
        text = " ".join(header)
        assert f"`opdkit {cmd} {run / 'config.yaml'} resume=true`" in text and "--config" not in text
        suggested = text.split("`")[1].split()[2:]  # the arguments after `opdkit <cmd>`
        yaml_path, overrides = config_args(suggested)
        again = load_config(cls, yaml_path, overrides)
        assert again.resume and again.run_dir == str(run)
    assert config_file_flag(["--config", "a.yaml", "x=1"]) == ["a.yaml", "x=1"]
    assert config_file_flag(["--config=a.yaml"]) == ["a.yaml"]
    with pytest.raises(UserError, match="--config needs a file"):
        config_file_flag(["--config"])


def test_create_run_dir_tolerates_a_parent_made_meanwhile(tmp_path, monkeypatch):
    """Two runs under one new parent (opdkit compare's parallel sweep runs): the parent appearing between the
    check and the mkdir is not an error, and a failed run does not remove the other run's parent."""
    from pathlib import Path

    from opdkit.train import logging as L

    real = Path.mkdir
    parent = tmp_path / "sweep"

    def racing_mkdir(self, *a, **k):
        if self == parent and not parent.exists():
            real(parent)  # the other run got there first
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "mkdir", racing_mkdir)
    run = L.create_run_dir(parent / "a" / "seed0", "abc")
    assert (run / L.RUN_MARKER).is_file()
