"""`opdkit train` under torchrun (FSDP2, gloo on CPU) against one process: the same weights, batch-global
statistics, entropy selection independent of the micro-batch split, sharded checkpoints resumed at the same and at
another world size, and two "nodes" on one machine."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from opdkit.train import loop
from tests.train.tiny_run import make_pair

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return make_pair(tmp_path_factory.mktemp("pair"))


def _args(pair, run, *extra, steps=2):
    # float64 everywhere: the sums of 2 ranks and of 1 process then agree to ~1e-15 (fp32: ~1e-5 after AdamW)
    return [f"model.student={pair['student']}", f"model.teacher={pair['teacher']}", "data.prompts=task:addition",
            "data.eval_prompts=5", "rollout.prompts_per_step=3", "rollout.n_samples=2", "rollout.max_new_tokens=12",
            "optim.micro_batch_size=4", "optim.lr=1e-3", f"steps={steps}", "progress=false", "save_every=0",
            "model.dtype=float64", "teacher.dtype=float64", f"run_dir={run}", *extra]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(args, nproc=2, extra_launch=()):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", *extra_launch,
           "-m", "opdkit.cli", "train", *args]
    if not extra_launch:
        cmd[3:3] = ["--master_addr=127.0.0.1", f"--master_port={_free_port()}"]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def _weights(run):
    return load_file(str(Path(run) / "final" / "model.safetensors"))


def _max_diff(a, b):
    assert a.keys() == b.keys()
    return max((a[k].double() - b[k].double()).abs().max().item() for k in a)


def _records(run):
    return [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", [
    # z-score over the whole batch; 3 prompts on 2 ranks: 4 and 2 rows, unequal token counts
    ["objective.estimator=sampled", "objective.transform=zscore"],
    ["objective.estimator=sampled", "objective.transform=signmaxabs", "objective.entropy_keep_fraction=0.5"],
    ["objective.estimator=full", "objective.entropy_keep_fraction=0.6", "optim.micro_batch_size=1"],
])
def test_two_ranks_equal_one_process(pair, tmp_path, objective):
    one, two = tmp_path / "one", tmp_path / "two"
    assert loop.main(_args(pair, one, "rollout.seed_per_prompt=true", *objective)) == 0
    res = _torchrun(_args(pair, two, *objective))
    assert res.returncode == 0, res.stderr[-3000:]
    assert _max_diff(_weights(one), _weights(two)) < 1e-6
    r1, r2 = _records(one), _records(two)
    assert [r["step"] for r in r2] == [0, 1, 2]  # rank 0 logs, once per step
    for a, b in zip(r1[1:], r2[1:]):  # batch-global metrics, not rank 0's share
        for k in ("loss", "teacher_tokens", "train/accuracy", "response_length/mean", "kl"):
            if k in a:
                assert abs(a[k] - b[k]) < 1e-9, k
    assert r1[-1]["eval/accuracy"] == r2[-1]["eval/accuracy"]


def test_entropy_selection_does_not_depend_on_the_micro_batch_split(pair, tmp_path):
    runs = {}
    for mb in (1, 12):
        run = tmp_path / f"mb{mb}"
        assert loop.main(_args(pair, run, "objective.estimator=sampled", "objective.entropy_keep_fraction=0.3",
                               f"optim.micro_batch_size={mb}", steps=1)) == 0
        runs[mb] = _weights(run)
    assert _max_diff(runs[1], runs[12]) < 1e-10


def test_a_sharded_checkpoint_resumes_at_the_same_and_at_another_world_size(pair, tmp_path):
    const = ["optim.schedule=constant", "save_every=2", "objective.estimator=sampled", "objective.transform=zscore"]
    straight = tmp_path / "straight"
    assert _torchrun(_args(pair, straight, *const, steps=4)).returncode == 0
    part = tmp_path / "part"
    assert _torchrun(_args(pair, part, *const, steps=2)).returncode == 0
    assert (part / "checkpoints" / "step_000002" / "dcp" / ".metadata").is_file()
    at1 = tmp_path / "at1"
    shutil.copytree(part, at1)
    res = _torchrun(_args(pair, part, *const, "resume=true", steps=4))  # 2 ranks again
    assert res.returncode == 0, res.stderr[-3000:]
    assert _max_diff(_weights(straight), _weights(part)) < 1e-6
    assert loop.main(_args(pair, at1, *const, "resume=true", "rollout.seed_per_prompt=true", steps=4)) == 0
    assert _max_diff(_weights(straight), _weights(at1)) < 1e-6  # 1 process resumes the 2-rank checkpoint
    assert [r["step"] for r in _records(at1)] == [0, 1, 2, 3, 4]
    from opdkit.eval.run import load_eval_model

    load_eval_model(str(part / "checkpoints" / "step_000004"))  # opdkit eval reads a sharded checkpoint


def test_two_nodes_on_one_machine(pair, tmp_path):
    ref = tmp_path / "ref"
    assert _torchrun(_args(pair, ref, "objective.estimator=sampled")).returncode == 0
    run = tmp_path / "nodes"
    port = _free_port()
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    procs = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes=2", f"--node_rank={n}",
                               "--nproc_per_node=1", "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}",
                               "--rdzv-id=opdkit-test", "-m", "opdkit.cli", "train",
                               *_args(pair, run, "objective.estimator=sampled")],
                              cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for n in (0, 1)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs[0][-2000:] + outs[1][-2000:]
    assert _max_diff(_weights(ref), _weights(run)) < 1e-9
