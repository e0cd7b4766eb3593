"""Safety of runs (issue #9): overwrite never deletes user files, non-finite steps are skipped and never saved,
resumed runs count teacher compute exactly, checkpoints are verified, every step is logged once, SIGTERM and
SIGKILL leave a resumable run that ends bitwise equal to an uninterrupted one."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from opdkit.train import loop
from opdkit.checkpoint import (MANIFEST_FILE, MODEL_FILE, STATE_FILE, latest_checkpoint, list_checkpoints,
                                     load_model_state, save_checkpoint, verify_checkpoint)
from opdkit.metrics_log import read_metrics
from tests.train.test_trainer import _metrics, _run, _weights
from tests.train.tiny_run import base_overrides, make_pair

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair"))


def _listing(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def _equal_weights(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ overwrite
def test_overwrite_never_deletes_user_files(pair, tmp_path, capsys):
    user = tmp_path / "P"
    (user / "src").mkdir(parents=True)
    (user / "config.yaml").write_text("db: x\n")
    (user / "src" / "important.py").write_text("print(1)\n")
    before = _listing(user)
    assert loop.main(base_overrides(pair, user, 1) + ["overwrite=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("opdkit: error: ") and "\n" not in err and "config.yaml has no opdkit header" in err
    assert _listing(user) == before  # nothing deleted, nothing written

    from opdkit.train import sft

    assert sft.main([f"run_dir={user}", "overwrite=true", "steps=1", "data.task=addition"]) == 2
    assert "holds no opdkit run" in capsys.readouterr().err and _listing(user) == before

    # an opdkit run dir that also holds a user's file: refused, naming the file; nothing deleted
    run = tmp_path / "R"
    _run(pair, run, steps=1)
    (run / "notes.txt").write_text("mine")
    before = _listing(run)
    assert loop.main(base_overrides(pair, run, 1) + ["overwrite=true", "optim.lr=2e-3"]) == 2
    err = capsys.readouterr().err
    assert f"{run / 'notes.txt'} was not written by opdkit" in err and _listing(run) == before
    # without it, overwrite replaces the run (only opdkit's own entries existed)
    (run / "notes.txt").unlink()
    assert loop.main(base_overrides(pair, run, 1) + ["overwrite=true", "optim.lr=2e-3"]) == 0
    assert "lr: 0.002" in (run / "config.yaml").read_text()


def test_different_run_message_names_the_knob_and_a_moved_run_resumes(pair, tmp_path, capsys):
    run = tmp_path / "a"
    _run(pair, run, "save_every=1", steps=1)
    assert loop.main(base_overrides(pair, run, 1) + ["optim.lr=0.01", "resume=true"]) == 2
    assert "optim.lr: 0.001 -> 0.01" in capsys.readouterr().err
    moved = tmp_path / "b"
    run.rename(moved)  # a run dir copied or moved elsewhere still resumes (run_dir is not part of its identity)
    assert loop.main(base_overrides(pair, moved, 2) + ["resume=true", "save_every=1"]) == 0
    assert [r["step"] for r in read_metrics(moved)] == [0, 1, 2]


# ------------------------------------------------------------------------------------------------ non-finite steps
def _break_grad_norm(monkeypatch, bad_calls):
    """Make the trainer's gradient norm infinite on the given calls (1-based) of clip_grad_norm_."""
    real = torch.nn.utils.clip_grad_norm_
    calls = {"n": 0}

    def fake(params, max_norm, *a, **k):
        calls["n"] += 1
        norm = real(params, max_norm, *a, **k)
        return torch.tensor(float("inf")) if (bad_calls == "all" or calls["n"] in bad_calls) else norm

    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", fake)


def test_a_non_finite_step_is_skipped_logged_and_printed_without_progress(pair, tmp_path, monkeypatch, capsys):
    _break_grad_norm(monkeypatch, {2})
    run = tmp_path / "r"
    _run(pair, run, "save_every=1", "keep_last=10", steps=4)
    rows = {r["step"]: r for r in _metrics(run) if "loss" in r}
    assert [rows[s]["skipped"] for s in (1, 2, 3, 4)] == [0.0, 1.0, 0.0, 0.0]
    assert rows[2]["skipped_grad_norm"] == "inf" and rows[4]["skipped_total"] == 1
    err = capsys.readouterr().err
    assert "step 2: non-finite loss" in err and "optimizer step skipped" in err  # progress=false: still printed
    ck = {s: p for s, p in list_checkpoints(run)}
    w1, w2, w3 = (load_file(str(ck[s] / MODEL_FILE)) for s in (1, 2, 3))
    assert _equal_weights(w1, w2) and not _equal_weights(w2, w3)  # step 2 left the weights untouched
    o1, o2 = (torch.load(ck[s] / "optimizer.pt", weights_only=True) for s in (1, 2))
    assert all(torch.equal(o1["state"][i]["exp_avg"], o2["state"][i]["exp_avg"]) for i in o1["state"])


def test_consecutive_non_finite_steps_stop_the_run_with_a_resumable_checkpoint(pair, tmp_path, monkeypatch, capsys):
    _break_grad_norm(monkeypatch, "all")
    run = tmp_path / "r"
    assert loop.main(base_overrides(pair, run, 5) + ["optim.max_skipped_steps=2"]) == 3
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("opdkit: error: 2 consecutive steps had a non-finite loss or gradient norm")
    assert not (run / "final").exists()
    ck = latest_checkpoint(run, verify=True)
    assert ck.name == "step_000002" and verify_checkpoint(ck) is None
    start = load_file(str(Path(pair["student"]) / "model.safetensors"))
    assert _equal_weights(start, load_file(str(ck / MODEL_FILE)))  # the last finite weights: the initial ones
    monkeypatch.undo()
    assert loop.main(base_overrides(pair, run, 5) + ["optim.max_skipped_steps=2", "resume=true"]) == 0
    assert [r["step"] for r in _metrics(run)] == [0, 1, 2, 3, 4, 5]


def test_non_finite_weights_are_refused_at_load_and_never_saved(pair, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    from opdkit.checkpoint import save_model_dir

    bad = AutoModelForCausalLM.from_pretrained(pair["student"])
    state = bad.state_dict()
    with pytest.raises(Exception, match="not finite"):
        with torch.no_grad():
            bad.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
        save_model_dir(bad, None, tmp_path / "nan_model")
    assert not (tmp_path / "nan_model").exists()
    with pytest.raises(Exception, match="not finite"):
        save_checkpoint(tmp_path / "run", 1, bad.state_dict())
    assert not list_checkpoints(tmp_path / "run")
    # a model dir with one NaN tensor (written by something else) is refused before anything is written
    nan_dir = tmp_path / "student_nan"
    import shutil

    shutil.copytree(pair["student"], nan_dir)
    sd = load_file(str(nan_dir / "model.safetensors"))
    sd["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    save_file(sd, str(nan_dir / "model.safetensors"), metadata={"format": "pt"})
    run = tmp_path / "r"
    assert loop.main(base_overrides(pair, run, 1) + [f"model.student={nan_dir}"]) == 2
    err = capsys.readouterr().err
    assert "model.layers.0.mlp.up_proj.weight holds NaN/inf" in err and not run.exists()
    del state


@pytest.mark.parametrize("knobs", [
    ["objective.estimator=sampled", "objective.divergence=alpha", "objective.alpha=50", "optim.grad_clip=0"],
    ["objective.estimator=sampled", "task_reward=true", "objective.task_reward_coef=1e30", "optim.grad_clip=0"],
])
def test_the_reported_reproducers_never_save_nan(pair, tmp_path, knobs, capsys):
    """The issue's reproducers: refused at config (exit 2, nothing written), or run with every saved tensor finite."""
    run = tmp_path / "r"
    code = loop.main(base_overrides(pair, run, 3) + knobs + ["save_every=1", "optim.max_skipped_steps=2"])
    assert code in (0, 2, 3), capsys.readouterr().err
    if code == 2:
        assert not run.exists()
        return
    saved = [p / MODEL_FILE for _, p in list_checkpoints(run)] + list(run.glob("final/*.safetensors"))
    assert saved and all(bool(torch.isfinite(t).all()) for f in saved for t in load_file(str(f)).values())


# ------------------------------------------------------------------------------------------------ checkpoints
def _two_checkpoints(tmp_path):
    model = torch.nn.Linear(3, 2)
    root = tmp_path / "run"
    for step in (1, 2):
        save_checkpoint(root, step, model.state_dict(), sidecar=lambda d: (d / "config.json").write_text("{}"))
    return root, model


@pytest.mark.parametrize("damage", ["flip", "truncate_config", "edit_step", "nan_tensor", "no_manifest"])
def test_a_damaged_checkpoint_is_skipped_with_a_notice(tmp_path, damage):
    root, model = _two_checkpoints(tmp_path)
    newest = root / "checkpoints" / "step_000002"
    assert verify_checkpoint(newest) is None and (newest / "config.json").is_file()  # sidecar inside the manifest
    assert "config.json" in json.loads((newest / MANIFEST_FILE).read_text())["files"]
    if damage == "flip":
        data = bytearray((newest / MODEL_FILE).read_bytes())
        data[-3] ^= 0xFF
        (newest / MODEL_FILE).write_bytes(bytes(data))
    elif damage == "truncate_config":
        (newest / "config.json").write_text("")
    elif damage == "edit_step":
        st = json.loads((newest / STATE_FILE).read_text())
        st["step"] = 5
        (newest / STATE_FILE).write_text(json.dumps(st))
    elif damage == "nan_tensor":
        sd = {k: v.clone() for k, v in model.state_dict().items()}
        sd["weight"][0, 0] = float("nan")
        save_file(sd, str(newest / MODEL_FILE), metadata={"format": "pt"})
    else:
        (newest / MANIFEST_FILE).unlink()
    notices = []
    assert latest_checkpoint(root, verify=True, notice=notices.append).name == "step_000001"
    assert len(notices) == 1 and "skipping checkpoint" in notices[0] and "\n" not in notices[0]
    if damage == "no_manifest":  # a checkpoint of an older opdkit: not resumed from, but still loadable for eval
        load_model_state(newest, torch.nn.Linear(3, 2))
        return
    with pytest.raises(Exception, match="damaged|non-finite"):
        load_model_state(newest, torch.nn.Linear(3, 2))


def test_a_crafted_nan_checkpoint_with_a_valid_manifest_is_refused(tmp_path):
    root, model = _two_checkpoints(tmp_path)
    newest = root / "checkpoints" / "step_000002"
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["bias"][0] = float("inf")
    save_file(sd, str(newest / MODEL_FILE), metadata={"format": "pt"})
    from opdkit.checkpoint import _manifest

    (newest / MANIFEST_FILE).write_text(json.dumps(_manifest(newest, 2)))  # re-signed: only the NaN check is left
    with pytest.raises(Exception, match="non-finite weights"):
        load_model_state(newest, torch.nn.Linear(3, 2))


# ------------------------------------------------------------------------------------------------ resume records
def test_resume_counts_teacher_tokens_and_logs_each_step_once(pair, tmp_path):
    const = ["optim.schedule=constant", "save_every=1"]
    _run(pair, tmp_path / "straight", *const, steps=4)
    run = tmp_path / "resumed"
    _run(pair, run, *const, steps=2)
    _run(pair, run, *const, "resume=true", steps=4)
    _run(pair, run, *const, "resume=true", steps=4)  # a rerun of the finished run adds no record
    a, b = _metrics(tmp_path / "straight"), _metrics(run)
    assert [r["step"] for r in b] == [0, 1, 2, 3, 4]
    assert b[-1]["teacher_tokens"] == a[-1]["teacher_tokens"] > 0
    assert _equal_weights(_weights(tmp_path / "straight"), _weights(run))
    # resume=true in a dir whose run never reached a checkpoint starts over: step 0 appears once
    fresh = tmp_path / "fresh"
    _run(pair, fresh, "save_every=0", steps=1)
    import shutil

    shutil.rmtree(fresh / "checkpoints")
    shutil.rmtree(fresh / "final")
    _run(pair, fresh, "save_every=0", "resume=true", steps=1)
    assert [r["step"] for r in _metrics(fresh)] == [0, 1]


def _fault(cmd_mode: str, arg: int, overrides: list[str]) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([sys.executable, "-m", "tests.train.fault_run", "train", cmd_mode, str(arg), "--",
                           *overrides], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)


def test_sigterm_stops_after_the_step_with_a_checkpoint(pair, tmp_path):
    over = ["optim.schedule=constant", "save_every=0"]
    _run(pair, tmp_path / "straight", *over, steps=4)
    run = tmp_path / "r"
    res = _fault("term_after_step", 2, base_overrides(pair, run, 4) + over)
    assert res.returncode == 143, res.stderr[-2000:]
    assert "SIGTERM received" in res.stderr and "stopped after step 2" in res.stderr
    assert latest_checkpoint(run, verify=True).name == "step_000002" and not (run / "final").exists()
    _run(pair, run, *over, "resume=true", steps=4)
    assert _equal_weights(_weights(tmp_path / "straight"), _weights(run))
    assert [r["step"] for r in _metrics(run)] == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_sigkill_loop_ends_bitwise_equal_to_an_uninterrupted_run(pair, tmp_path):
    """Five SIGKILLs (two inside checkpoint writes) and resumes: the same weights, records and teacher tokens."""
    over = ["save_every=2", "keep_last=2"]
    _run(pair, tmp_path / "straight", *over, steps=8)
    run = tmp_path / "r"
    args = base_overrides(pair, run, 8) + over
    kills = [("kill_after_step", 1), ("kill_in_save", 3), ("kill_after_step", 3), ("kill_in_save", 12),
             ("kill_after_step", 7)]
    for i, (mode, arg) in enumerate(kills):
        res = _fault(mode, arg, args + (["resume=true"] if i else []))
        assert res.returncode == -9, (mode, arg, res.returncode, res.stderr[-2000:])
    res = _fault("none", 0, args + ["resume=true"])
    assert res.returncode == 0, res.stderr[-2000:]
    assert _equal_weights(_weights(tmp_path / "straight"), _weights(run))
    a, b = _metrics(tmp_path / "straight"), _metrics(run)
    assert [r["step"] for r in b] == list(range(9))
    assert b[-1]["teacher_tokens"] == a[-1]["teacher_tokens"]
    assert [r.get("loss") for r in a] == [r.get("loss") for r in b]
