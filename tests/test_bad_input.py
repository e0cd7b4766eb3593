"""Bad input (issue #14): every case gives its documented exit code (2: bad input, 3: a run that stopped), exactly one
stderr line `opdkit: error: ...` (no traceback) and, for bad input, a file system left exactly as it was (every file
and directory under the test's tmp dir and the model dirs, with contents and modes, compared before and after).

Cases: config, data, checkers, models, checkpoints, run dirs (read-only, /proc, disk full), the other commands, and
the command line itself (a real child process started like `opdkit compare` starts its runs)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from opdkit import cli
from opdkit.checkpoint import MANIFEST_FILE, STATE_FILE, _manifest, list_checkpoints
from tests.train.tiny_run import base_overrides, make_pair

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------------------ harness
def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every path under `roots`: (kind, mode, size, sha256 of a file's bytes / a link's target)."""
    out: dict[str, tuple] = {}
    for root in roots:
        if not os.path.lexists(root):
            out[str(root)] = ("absent",)
            continue
        for p in [root, *sorted(root.rglob("*"))]:
            st = p.lstat()
            if p.is_symlink():
                out[str(p)] = ("link", os.readlink(p))
            elif p.is_dir():
                out[str(p)] = ("dir", st.st_mode)
            else:
                out[str(p)] = ("file", st.st_mode, st.st_size, hashlib.sha256(p.read_bytes()).hexdigest())
    return out


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    assert lines[0].startswith("opdkit: error: "), err
    return lines[0]


def expect(capsys, argv: list[str], match: str, *roots: Path, code: int = 2) -> str:
    """Run `opdkit <argv>` in this process: exit `code`, one error line matching `match`, `roots` unchanged."""
    capsys.readouterr()
    before = snapshot(*roots)
    with warnings.catch_warnings(record=True) as caught:  # a warning would be a second stderr line in a real run
        warnings.simplefilter("always")
        rc = cli.main(argv)
    err = capsys.readouterr().err
    shown = [w for w in caught if not issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning))]
    assert not shown, [f"{w.category.__name__}: {w.message}" for w in shown]
    assert rc == code, err
    line = one_error_line(err)
    assert re.search(match, line), line
    assert snapshot(*roots) == before
    return line


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture
def roots(pair, tmp_path, monkeypatch):
    """The dirs every case must leave unchanged; the test runs in tmp_path (relative paths land there)."""
    monkeypatch.chdir(tmp_path)
    return tmp_path, Path(pair["student"]).parent


def train(pair, tmp_path, *extra, steps: int = 2) -> list[str]:
    return ["train", *base_overrides(pair, tmp_path / "run", steps), *extra]


def jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


ROWS = [{"prompt": f"{i}+{i}=", "answer": str(2 * i)} for i in range(40)]


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("extra, match", [
    (["objective.nope=1"], r"unknown .*objective.nope|nope"),
    (["steps=abc"], r"steps"),
    (["optim.lr=-1"], r"optim.lr=-1"),
    (["objective.estimator=topk", "objective.top_k=1000"], r"objective.top_k=1000 is larger than the vocabulary \(22"),
    (["rollout.top_k=500"], r"rollout.top_k=500 is larger than the vocabulary"),
    (["resume=true", "overwrite=true"], r"exclude each other"),
    (["objective.estimator=full", "objective.pg=ppo"], r"objective.pg"),
    (["data.use_chat_template=true"], r"no chat template"),
    (["rollout.masked_tokens=[<think>]"], r"'<think>' is not a token"),
], ids=["unknown_key", "bad_type", "out_of_range", "objective_top_k_above_vocab", "rollout_top_k_above_vocab",
        "resume_and_overwrite", "knob_of_another_estimator", "chat_template_missing", "masked_token_unknown"])
def test_config(pair, roots, tmp_path, capsys, extra, match):
    expect(capsys, train(pair, tmp_path, *extra), match, *roots)


def test_a_corrected_rerun_after_a_refused_top_k_is_not_a_different_run(pair, roots, tmp_path, capsys):
    """top_k above the vocabulary used to fail at the first step, after the run dir was written: the corrected
    rerun was then refused as 'a different run'."""
    expect(capsys, train(pair, tmp_path, "objective.estimator=topk", "objective.top_k=23"), r"top_k=23", *roots)
    assert cli.main(train(pair, tmp_path, "objective.estimator=topk", "objective.top_k=4", steps=1)) == 0


@pytest.mark.parametrize("content, match", [
    ("steps: [1, 2\n", r"cannot parse YAML config"),
    ("- steps\n", r"must hold a mapping"),
    (None, r"config file not found"),
], ids=["yaml_syntax", "yaml_not_a_mapping", "yaml_missing"])
def test_config_file(pair, roots, tmp_path, capsys, content, match):
    cfg = tmp_path / "c.yaml"
    if content is not None:
        cfg.write_text(content)
    expect(capsys, ["train", str(cfg), *base_overrides(pair, tmp_path / "run", 1)], match, *roots)


# ------------------------------------------------------------------------------------------------ data
def test_data_file_missing(pair, roots, tmp_path, capsys):
    expect(capsys, train(pair, tmp_path, f"data.prompts={tmp_path / 'nope.jsonl'}"), r"no such file", *roots)


@pytest.mark.parametrize("text, match", [
    ('{"prompt": "1+1=", "answer": "2"}\n{"prompt": \n', r"line 2"),
    ('{"question": "1+1="}\n', r"prompt"),
    ("", r"empty"),
    ('{"prompt": "1+1=", "answer": "2"}\n' * 3 + "\xff\n", r"UTF-8|utf-8"),
], ids=["malformed_line", "missing_field", "empty", "not_utf8"])
def test_data_file_content(pair, roots, tmp_path, capsys, text, match):
    f = tmp_path / "d.jsonl"
    f.write_bytes(text.encode("utf-8", "surrogateescape") if "\xff" not in text else text.encode("latin-1"))
    expect(capsys, train(pair, tmp_path, f"data.prompts={f}"), match, *roots)


def test_unknown_task(pair, roots, tmp_path, capsys):
    expect(capsys, train(pair, tmp_path, "data.prompts=task:nope"), r"unknown task 'nope'", *roots)


def test_every_prompt_over_max_prompt_tokens(pair, roots, tmp_path, capsys):
    """Refused at set-up (it was refused at the first step, after config.yaml, metrics.jsonl and tb/ were written)."""
    line = expect(capsys, train(pair, tmp_path, "data.max_prompt_tokens=3"),
                  r"every prompt is longer than data.max_prompt_tokens=3 .*fix: data.max_prompt_tokens=\d+ or "
                  r"data.on_too_long=truncate", *roots)
    f = jsonl(tmp_path / "d.jsonl", ROWS)
    expect(capsys, train(pair, tmp_path, f"data.prompts={f}", "data.max_prompt_tokens=2"),
           r"every prompt is longer .*all \d+ train prompts", *roots)
    assert "split" not in line


def test_a_dataset_without_a_train_split_names_opdkit_trains_knobs(pair, roots, tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    d = tmp_path / "dd"
    datasets.DatasetDict({"test": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(d))
    line = expect(capsys, train(pair, tmp_path, f"data.prompts={d}"), r"no 'train' split", *roots)
    assert "split=" not in line  # opdkit train has no `split` knob


def test_a_dataset_without_held_out_rows_suggests_eval_prompts_0(pair, roots, tmp_path, capsys):
    from opdkit.tasks import split_of

    rows = [r for r in ROWS if split_of(r["prompt"], "user") == "train"][:5]
    f = jsonl(tmp_path / "d.jsonl", rows)
    line = expect(capsys, train(pair, tmp_path, f"data.prompts={f}"), r"held-out split|heldout split", *roots)
    assert "data.eval_prompts=0" in line and "split=None" not in line


def test_gkd_without_reference_responses(pair, roots, tmp_path, capsys):
    f = jsonl(tmp_path / "d.jsonl", ROWS)
    expect(capsys, train(pair, tmp_path, f"data.prompts={f}", "rollout.gkd_lambda=0.5"), r"data.completion_field",
           *roots)


# ------------------------------------------------------------------------------------------------ checkers
def test_a_name_that_is_not_a_checker_imports_nothing(pair, roots, tmp_path, capsys, monkeypatch):
    """`data.checker=regex:x` used to import the installed `regex` package; now nothing is imported."""
    trap_dir = tmp_path / "lib"
    trap_dir.mkdir()
    (trap_dir / "trapmod.py").write_text(f"open({str(tmp_path / 'IMPORTED')!r}, 'w').write('x')\n")
    monkeypatch.syspath_prepend(str(trap_dir))
    f = jsonl(tmp_path / "d.jsonl", ROWS)
    for spec in ("trapmod:fn", "regex:x", "exact"):
        line = expect(capsys, train(pair, tmp_path, f"data.prompts={f}", f"data.checker={spec}"),
                      r"unknown checker .* math_verify, marker:<TEXT>.*py:<module>:<function>", *roots)
    assert "write py:" not in line  # 'exact' has no colon: no module:function hint
    assert not (tmp_path / "IMPORTED").exists() and "trapmod" not in sys.modules


@pytest.mark.parametrize("spec, match", [
    ("py:no_such_module_xyz:fn", r"no module 'no_such_module_xyz' on the import path .*py:./no_such_module_xyz.py:fn"),
    ("py:./missing.py:fn", r"no file .*missing.py"),
    ("py:./broken.py:fn", r"running .*broken.py failed \(ZeroDivisionError"),
    ("py:./ok.py:nope", r"has no attribute 'nope'"),
    ("py:./ok.py:VALUE", r"'VALUE' is not callable"),
], ids=["module_missing", "file_missing", "file_raises", "function_missing", "not_callable"])
def test_checker_module(pair, roots, tmp_path, capsys, spec, match):
    (tmp_path / "broken.py").write_text("1 / 0\n")
    (tmp_path / "ok.py").write_text("VALUE = 3\n")
    f = jsonl(tmp_path / "d.jsonl", ROWS)
    expect(capsys, train(pair, tmp_path, f"data.prompts={f}", f"data.checker={spec}"), match, *roots)


# ------------------------------------------------------------------------------------------------ models
def _damaged_model(pair, tmp_path, how: str) -> Path:
    d = tmp_path / f"model_{how}"
    shutil.copytree(pair["student"], d)
    cfg = json.loads((d / "config.json").read_text())
    if how == "config_truncated":
        (d / "config.json").write_text((d / "config.json").read_text()[:40])
    elif how == "weights_truncated":
        data = (d / "model.safetensors").read_bytes()
        (d / "model.safetensors").write_bytes(data[: len(data) // 3])
    elif how == "weights_missing":
        (d / "model.safetensors").unlink()
    elif how == "custom_code":
        cfg.update(model_type="mine", auto_map={"AutoConfig": "mine.MyConfig", "AutoModelForCausalLM": "mine.MyLM"})
        (d / "config.json").write_text(json.dumps(cfg))
        (d / "mine.py").write_text(f"open({str(tmp_path / 'RAN')!r}, 'w').write('x')\n")
    elif how == "unknown_architecture":
        cfg["model_type"] = "no_such_architecture"
        (d / "config.json").write_text(json.dumps(cfg))
    elif how == "nan_weights":
        sd = load_file(str(d / "model.safetensors"))
        sd["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
        save_file(sd, str(d / "model.safetensors"), metadata={"format": "pt"})
    elif how == "tokenizer_corrupt":
        (d / "tokenizer.json").write_text("{not json")
    return d


@pytest.mark.parametrize("how, match", [
    ("config_truncated", r"config.json is not valid JSON"),
    ("weights_truncated", r"weights cannot be read .*truncated or corrupt"),
    ("weights_missing", r"has no weights file"),
    ("custom_code", r"needs its own Python code .*model.trust_remote_code=true"),
    ("unknown_architecture", r"model type this transformers does not know"),
    ("nan_weights", r"holds NaN/inf"),
    ("tokenizer_corrupt", r"tokenizer .*tokenizer"),
])
def test_model_dir(pair, roots, tmp_path, capsys, how, match):
    d = _damaged_model(pair, tmp_path, how)
    expect(capsys, train(pair, tmp_path, f"model.student={d}"), match, *roots)
    assert not (tmp_path / "RAN").exists()  # a model dir's code never runs without trust_remote_code


def test_a_damaged_teacher_dir(pair, roots, tmp_path, capsys):
    d = _damaged_model(pair, tmp_path, "config_truncated")
    expect(capsys, train(pair, tmp_path, f"model.teacher={d}"), r"config.json is not valid JSON", *roots)


def test_model_path_problems(pair, roots, tmp_path, capsys):
    expect(capsys, train(pair, tmp_path, f"model.student={tmp_path / 'none'}"), r"does not exist", *roots)
    (tmp_path / "weights.bin").write_bytes(b"x")
    expect(capsys, train(pair, tmp_path, f"model.student={tmp_path / 'weights.bin'}"), r"not a .gguf", *roots)
    (tmp_path / "m.json").write_text('{"hidden_size": 8}')
    expect(capsys, train(pair, tmp_path, f"model.student={tmp_path / 'm.json'}",
                         f"model.tokenizer={pair['tokenizer']}"), r"model_type", *roots)


def test_a_teacher_with_another_vocabulary(pair, roots, tmp_path, capsys, tmp_path_factory):
    other = make_pair(tmp_path_factory.mktemp("other"), teacher_vocab_extra=3)
    expect(capsys, train(pair, tmp_path, f"model.teacher={other['teacher']}"), r"teacher/student mismatch", *roots)


# ------------------------------------------------------------------------------------------------ checkpoints
@pytest.fixture(scope="module")
def finished(pair, tmp_path_factory):
    """A 1-step run with its checkpoint (copied per test)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert cli.main(["train", *base_overrides(pair, run, 1), "save_every=1"]) == 0
    return run


def _resign(ckpt: Path) -> None:
    """Re-write the manifest: the damage is then only found by loading (a checkpoint written wrong, or by hand)."""
    step = json.loads((ckpt / MANIFEST_FILE).read_text())["step"]
    (ckpt / MANIFEST_FILE).write_text(json.dumps(_manifest(ckpt, step)))


def _malicious_pickle(path: Path, marker: Path) -> None:
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path.write_bytes(pickle.dumps(Evil()))


@pytest.mark.parametrize("damage, match", [
    ("optimizer_garbage", r"cannot read .*optimizer.pt"),
    ("scheduler_garbage", r"cannot read .*scheduler.pt"),
    ("rng_garbage", r"cannot read .*rng.pt"),
    ("optimizer_other_model", r"optimizer.pt does not fit this run"),
    ("optimizer_same_count_other_shapes", r"optimizer.pt does not fit this run .*an optimizer of another model"),
    ("optimizer_malicious_pickle", r"cannot read .*optimizer.pt"),
    ("weights_other_model", r"does not fit the model"),
])
def test_resume_from_a_bad_checkpoint(pair, finished, roots, tmp_path, capsys, damage, match):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (_, ck), = list_checkpoints(run)
    if damage.endswith("_garbage"):
        (ck / f"{damage.split('_')[0]}.pt").write_bytes(b"PK\x03\x04 not a zip at all")
    elif damage == "optimizer_other_model":
        torch.save(torch.optim.AdamW(torch.nn.Linear(2, 2).parameters()).state_dict(), ck / "optimizer.pt")
    elif damage == "optimizer_same_count_other_shapes":
        state = torch.load(ck / "optimizer.pt", weights_only=True)
        for s in state["state"].values():
            s["exp_avg"] = torch.zeros(3, 1)
        torch.save(state, ck / "optimizer.pt")
    elif damage == "optimizer_malicious_pickle":
        _malicious_pickle(ck / "optimizer.pt", tmp_path / "PWNED")
    elif damage == "weights_other_model":
        sd = load_file(str(ck / "model.safetensors"))
        sd["model.embed_tokens.weight"] = torch.zeros(5, 32)
        save_file(sd, str(ck / "model.safetensors"), metadata={"format": "pt"})
    _resign(ck)
    expect(capsys, ["train", *base_overrides(pair, run, 2), "save_every=1", "resume=true"], match, *roots)
    assert not (tmp_path / "PWNED").exists()  # the blocked pickle never ran


def test_a_checkpoint_with_a_non_integer_step(pair, finished, roots, tmp_path, capsys):
    """Through the API (a resumed run skips such a checkpoint: its manifest does not verify)."""
    from opdkit.checkpoint import load_checkpoint
    from opdkit.errors import run_cli
    from opdkit.models import load_causal_lm

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (_, ck), = list_checkpoints(run)
    st = json.loads((ck / STATE_FILE).read_text())
    st["step"] = "1.5"
    (ck / STATE_FILE).write_text(json.dumps(st))
    model, _ = load_causal_lm(pair["student"])
    before = snapshot(*roots)
    assert run_cli(lambda argv: load_checkpoint(ck, model), []) == 2
    assert re.search(r"step '1.5' is not a non-negative integer", one_error_line(capsys.readouterr().err))
    assert snapshot(*roots) == before


def test_eval_of_a_damaged_checkpoint(pair, finished, roots, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    (_, ck), = list_checkpoints(run)
    data = bytearray((ck / "model.safetensors").read_bytes())
    data[-5] ^= 0xFF
    (ck / "model.safetensors").write_bytes(bytes(data))
    expect(capsys, ["eval", f"model={ck}", "task=addition", "n=2"], r"checkpoint .* is damaged", *roots)


# ------------------------------------------------------------------------------------------------ run dirs
def test_run_dir_problems(pair, roots, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    expect(capsys, train(pair, tmp_path, f"run_dir={tmp_path / 'afile'}"), r"exists and is not a directory", *roots)
    expect(capsys, train(pair, tmp_path, f"run_dir={tmp_path / 'afile' / 'sub'}"), r"is not a directory", *roots)
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    expect(capsys, train(pair, tmp_path, f"run_dir={tmp_path / 'mine'}"), r"holds no opdkit run", *roots)
    expect(capsys, train(pair, tmp_path, "run_dir=/proc/opdkit-run"), r"cannot create run dir /proc/opdkit-run",
           *roots)


def test_a_run_dir_holding_a_run(pair, finished, roots, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished, run)
    expect(capsys, ["train", *base_overrides(pair, run, 1)], r"already holds this run; pass resume=true", *roots)
    expect(capsys, ["train", *base_overrides(pair, run, 1), "optim.lr=0.5"],
           r"already holds a different run \(optim.lr: 0.001 -> 0.5\)", *roots)


def test_a_read_only_run_dir(pair, roots, tmp_path, capsys, monkeypatch):
    """Root ignores chmod: the read-only file system is simulated (os.access / statvfs as on a `ro` mount)."""
    from opdkit.train import logging as run_logging

    ro = tmp_path / "ro"
    ro.mkdir()
    real_access, real_statvfs = os.access, os.statvfs

    class RoStat:
        def __init__(self, st):
            self._st = st
            self.f_flag = st.f_flag | os.ST_RDONLY

        def __getattr__(self, name):
            return getattr(self._st, name)

    monkeypatch.setattr(run_logging.os, "access", lambda p, m, **k: False if Path(p) == ro else real_access(p, m))
    monkeypatch.setattr(run_logging.os, "statvfs", lambda p: RoStat(real_statvfs(p)) if Path(p) == ro else
                        real_statvfs(p))
    expect(capsys, train(pair, tmp_path, f"run_dir={ro / 'run'}"), r"is on a read-only file system", *roots)


def test_a_real_read_only_mount(pair, roots, tmp_path, capsys):
    src, ro = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    ok = subprocess.run(["mount", "--bind", str(src), str(ro)], capture_output=True).returncode == 0
    if not ok:
        pytest.skip("no permission to bind-mount (the simulated read-only test above still runs)")
    try:
        assert subprocess.run(["mount", "-o", "remount,ro,bind", str(ro)], capture_output=True).returncode == 0
        expect(capsys, train(pair, tmp_path, f"run_dir={ro / 'run'}"), r"read-only file system", *roots)
    finally:
        subprocess.run(["umount", str(ro)], capture_output=True)


def test_disk_full_before_the_run(pair, roots, tmp_path, capsys, monkeypatch):
    """Less free space than one checkpoint plus the final weights: refused before anything is written."""
    from collections import namedtuple

    from opdkit.train import logging as run_logging

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 1000, 1000))
    line = expect(capsys, train(pair, tmp_path), r"disk full: .* has 0.0 MiB free but a checkpoint plus the final "
                                                 r"model needs at least", *roots)
    assert "choose another run_dir" in line and run_logging is not None


def test_disk_full_while_creating_the_run_dir(pair, roots, tmp_path, capsys, monkeypatch):
    """ENOSPC on the first write: what was created is removed again."""
    from opdkit.train import logging as run_logging

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "a" / "run" / "config.yaml"))

    monkeypatch.setattr(run_logging, "write_run_config", full)
    expect(capsys, ["train", *base_overrides(pair, tmp_path / "a" / "run", 1)],
           r"disk full: cannot write .*config.yaml", *roots)
    assert not (tmp_path / "a").exists()


def test_disk_full_in_a_checkpoint_is_one_line_exit_3(pair, roots, tmp_path, capsys, monkeypatch):
    """A real torch.save into a full device (/dev/full) mid-run: exit 3, 'disk full', no partial checkpoint."""
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    real_save = torch.save

    def save(obj, f, *a, **k):
        if str(f).endswith("optimizer.pt"):
            return real_save(obj, "/dev/full", *a, **k)
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    rc = cli.main(train(pair, tmp_path, "save_every=1", steps=2))
    line = one_error_line(capsys.readouterr().err)
    assert rc == 3 and re.search(r"disk full: cannot write .*step_000001 .*resume=true", line), line
    ckroot = tmp_path / "run" / "checkpoints"
    assert not list_checkpoints(tmp_path / "run") and not [p for p in ckroot.iterdir()]  # no partial checkpoint


def test_disk_full_in_the_metrics_is_one_line_exit_3(pair, roots, tmp_path, capsys, monkeypatch):
    from opdkit import metrics_log

    real_open = open

    def fake_open(path, mode="r", *a, **k):
        if str(path).endswith("metrics.jsonl") and "a" in mode:
            return real_open("/dev/full", "wb", buffering=0)
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr(metrics_log, "open", fake_open, raising=False)
    rc = cli.main(train(pair, tmp_path))
    line = one_error_line(capsys.readouterr().err)
    assert rc == 3 and re.search(r"disk full: cannot write .*metrics.jsonl.*stopped at step 0", line), line


# ------------------------------------------------------------------------------------------------ other commands
def test_other_commands(pair, roots, tmp_path, capsys):
    expect(capsys, ["nope"], r"unknown command 'nope'", *roots)
    expect(capsys, ["eval", "nosuchkey=1"], r"nosuchkey", *roots)
    expect(capsys, ["eval", f"model={pair['student']}", "task=addition", "n=2", "out=/proc/opdkit/e.json"],
           r"cannot create the directory of /proc/opdkit", *roots)
    expect(capsys, ["eval", f"model={pair['student']}", f"data={tmp_path / 'x.jsonl'}"], r"no such file", *roots)
    expect(capsys, ["sft", "data.task=nope", f"run_dir={tmp_path / 'sft'}"], r"task 'nope'", *roots)
    expect(capsys, ["sft", "data.task=addition", "run_dir=/proc/opdkit-sft", "steps=1"], r"cannot create run dir",
           *roots)
    expect(capsys, ["compare", str(tmp_path / "grid.yaml")], r"grid file not found", *roots)


# ------------------------------------------------------------------------------------------------ command line
def _child(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    from opdkit.compare import opdkit_command

    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    return subprocess.run([*opdkit_command(), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def test_the_command_line_in_a_child_process(pair, tmp_path):
    before = snapshot(tmp_path)
    res = _child(["train", *base_overrides(pair, tmp_path / "run", 1), "data.checker=regex:x",
                  f"data.prompts={jsonl(tmp_path / 'd.jsonl', ROWS)}"], tmp_path)
    before[str(tmp_path / "d.jsonl")] = snapshot(tmp_path)[str(tmp_path / "d.jsonl")]
    assert res.returncode == 2, res.stderr
    assert re.search(r"unknown checker 'regex:x'", one_error_line(res.stderr))
    assert snapshot(tmp_path) == before


def test_runs_never_import_code_from_the_working_directory(tmp_path):
    """`opdkit compare` starts its runs with `opdkit_command()`: a yaml.py in the working directory (which
    `python -m opdkit.cli` would import instead of PyYAML) is never executed."""
    (tmp_path / "yaml.py").write_text(f"open({str(tmp_path / 'IMPORTED')!r}, 'w').write('x')\n")
    res = _child(["train", "--help"], tmp_path)
    assert res.returncode == 0 and "usage: opdkit train" in res.stdout, res.stderr
    assert not (tmp_path / "IMPORTED").exists()
    from opdkit.compare import CompareConfig, Method, _sft_cmd, _train_cmd, opdkit_command
    from opdkit.train.config import TrainConfig

    cmd = _train_cmd(CompareConfig(), [], Method("m"), 0, tmp_path / "r")
    assert cmd[:3] == opdkit_command() and "-m" not in cmd[:3]
    sft = _sft_cmd(CompareConfig(), Method("s", "sft", match="m"), 0, tmp_path / "s", 10, TrainConfig())
    assert sft[:3] == opdkit_command()


# ------------------------------------------------------------------------------------------------ reported, not silent
def test_characters_outside_the_vocabulary_are_counted_and_reported(pair, tmp_path, capsys):
    """The addition tokenizer has no letters: 'é' and 'x' become <unk>; set-up says so and every step counts them."""
    rows = [{"prompt": f"{i}+{i}=é" if i % 2 else f"x{i}+{i}=", "answer": str(2 * i)} for i in range(40)]
    f = jsonl(tmp_path / "d.jsonl", rows)
    assert cli.main(train(pair, tmp_path, f"data.prompts={f}", "data.eval_prompts=0", steps=1)) == 0
    err = capsys.readouterr().err
    note = [line for line in err.splitlines() if "does not know" in line]
    assert len(note) == 1 and "'x'" in note[0] and "'é'" in note[0] and "prompts_unk_tokens" in note[0], err
    rec = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    assert rec[-1]["prompts_unk_tokens"] >= 1
