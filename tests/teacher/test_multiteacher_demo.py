"""What scripts/make_multiteacher.py (docs/multiteacher.md) relies on beyond tests/teacher/test_cache_route.py:
per-route metrics that account for every scored token in each step of a real `opdkit train` run, per-task
accuracies that make up the overall one, "one teacher on every route" being the single-teacher run, and the
routed teacher's backend counters summed over its routes."""

from __future__ import annotations

import json
import math


from opdkit.checkpoint import save_model_dir
from opdkit.teacher import HFTeacher
from opdkit.teacher.route import RoutedTeacher
from opdkit.train import loop
from tests.teacher.test_cache_route import REQUESTS, setting  # noqa: F401  (the module fixture)

TASKS = ("addition", "arith_chain")


def _records(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def _train(paths, run, routes: str | None, teacher: str | None = None):
    args = [f"model.student={paths['student']}", "data.prompts=task:addition+arith_chain", "data.eval_prompts=8",
            "rollout.prompts_per_step=6", "rollout.max_new_tokens=10", "steps=2", "save_every=0", "progress=false",
            "teacher.dtype=float32", f"run_dir={run}", "diagnostics.enabled=false"]
    args += [routes] if routes else [f"teacher.model={teacher}"]
    assert loop.main(args) == 0
    return _records(run)


def test_route_metrics_and_per_task_accuracy_in_a_two_step_run(setting, tmp_path):  # noqa: F811
    tok, student, t1, t2, _ = setting
    paths = {n: str(save_model_dir(m, tok, tmp_path / n)) for n, m in
             (("student", student), ("t_add", t1), ("t_chain", t2))}
    routed = _train(paths, tmp_path / "routed",
                    f"teacher.routes={{addition: {paths['t_add']}, arith_chain: {paths['t_chain']}}}")
    steps = [r for r in routed if "loss" in r]
    assert len(steps) == 2
    prev_tokens = 0
    for r in steps:
        # every row is scored by exactly one teacher: the routes' rows make up the batch, and their tokens are the
        # step's scored tokens (teacher_tokens is cumulative; no masked_tokens here, so response = eos mask)
        assert sum(r.get(f"route/{k}/rows", 0) for k in TASKS) == 6
        assert sum(r.get(f"route/{k}/tokens", 0) for k in TASKS) == r["teacher_tokens"] - prev_tokens
        prev_tokens = r["teacher_tokens"]
        for k in TASKS:
            if r.get(f"route/{k}/tokens", 0):
                assert math.isfinite(r[f"route/{k}/kl"])
    # held-out prompts split evenly between the tasks (4 + 4): the overall accuracy is the mean of the two
    for r in (routed[0], routed[-1]):
        per = [r[f"eval/accuracy/{k}"] for k in TASKS]
        assert abs(r["eval/accuracy"] - sum(per) / 2) < 1e-12

    # the demo's single-teacher configuration: the same teacher on both routes trains exactly like teacher.model
    # (the routed full signal is materialised as dense log-probs, the plain one chunked from hidden states: equal
    # up to float rounding)
    both = _train(paths, tmp_path / "both", f"teacher.routes={{addition: {paths['t_add']}, "
                                            f"arith_chain: {paths['t_add']}}}")
    plain = _train(paths, tmp_path / "plain", None, teacher=paths["t_add"])
    for a, b in zip(both, plain, strict=True):
        if "loss" in a:
            assert abs(a["loss"] - b["loss"]) < 1e-5 and a["teacher_tokens"] == b["teacher_tokens"]
        assert {k: v for k, v in a.items() if k.startswith("eval/")} == \
            {k: v for k, v in b.items() if k.startswith("eval/")}
    assert not any(k.startswith("route/") for r in plain for k in r)


class _Counting:
    """An HF teacher that reports a backend counter, as a server teacher does (teacher/requests per score call)."""

    def __init__(self, model):
        self.inner, self.kinds, self.n = HFTeacher(model), HFTeacher(model).kinds, 0

    def score(self, batch, request):
        self.n += 1
        return self.inner.score(batch, request)

    def stats(self):
        out, self.n = {"teacher/requests": self.n}, 0
        return out

    def identity(self):
        return self.inner.identity()

    def describe(self):
        return "counting"

    def close(self):
        pass


def test_backend_counters_are_summed_over_routes(setting):  # noqa: F811
    _, _, t1, t2, batch = setting
    routed = RoutedTeacher({"addition": _Counting(t1), "arith_chain": _Counting(t2)}, lambda r: r.meta["task"])
    routed.score(batch, REQUESTS[0])
    routed.score(batch, REQUESTS[0])
    # each route's teacher was asked twice; before the fix the last route's count (2) overwrote the first's
    assert routed.stats()["teacher/requests"] == 4
    assert routed.stats()["teacher/requests"] == 0  # counters since the last call
