"""FailureDetector: each failure mode fires on its synthetic pattern at the right step, once per episode; a noisy but
healthy stream stays quiet; thresholds are validated; docs/diagnostics.md lists the current defaults."""

import json
import math
import random
from dataclasses import replace
from pathlib import Path

import pytest

from opdkit.config import load_config
from opdkit.config_help import markdown_table
from opdkit.diagnostics import CODES, DetectorConfig, FailureDetector, Warning, detect
from opdkit.errors import UserError
from opdkit.objectives import ObjectiveConfig

ROOT = Path(__file__).resolve().parents[2]
T = 32


def healthy(step: int, rng: random.Random, n_steps: int = 200) -> dict:
    """One step of a stable run: noisy log-ratio rewards with a moderate tail, stable grad norm, stable length,
    slowly rising accuracy."""
    p50 = -0.3 + rng.gauss(0, 0.05)
    counts = [max(8, T - i) for i in range(T)]
    acc_p = 0.2 + 0.3 * step / n_steps
    return {
        "loss": 0.4 + rng.gauss(0, 0.05), "kl": 0.5 + rng.gauss(0, 0.05),
        "reward/mean": -0.5 + rng.gauss(0, 0.05), "reward/std": 1.5 + rng.gauss(0, 0.1),
        "reward/p05": p50 - 2.5 + rng.gauss(0, 0.3), "reward/p50": p50, "reward/p95": p50 + 1.2 + rng.gauss(0, 0.1),
        "reward/min": -9 + rng.gauss(0, 1.5), "reward/max": 4 + rng.gauss(0, 0.5),
        "reward_by_position/min": [-6 + rng.gauss(0, 1.2) for _ in range(T)],
        "reward_by_position/max": [3 + rng.gauss(0, 0.6) for _ in range(T)],
        "reward_by_position/mean": [-0.5 + rng.gauss(0, 0.1) for _ in range(T)],
        "reward_by_position/count": counts,
        "grad_norm": math.exp(rng.gauss(0, 0.3)),
        "response_length/mean": 40 + rng.gauss(0, 3), "response_length/max": 64,
        "finished_frac": min(1.0, 0.95 + rng.gauss(0, 0.03)),
        "train/accuracy": sum(rng.random() < acc_p for _ in range(32)) / 32,
    }


def stream(n: int = 200, seed: int = 0, edit=None, eval_every: int = 20) -> list[tuple[int, dict]]:
    """(step, metrics) records: step-0 eval, n training steps (edit(step, m) may change them), final eval."""
    rng = random.Random(seed)
    out = [(0, {"eval/accuracy": 0.2, "eval/response_length": 38.0})]
    for s in range(1, n + 1):
        m = healthy(s, rng, n)
        if eval_every and s % eval_every == 0 and s < n:
            m["eval/accuracy"] = 0.2 + 0.3 * s / n + rng.gauss(0, 0.02)
        if edit is not None:
            edit(s, m)
        out.append((s, m))
    out.append((n, {"eval/accuracy": 0.5, "eval/response_length": 40.0}))
    return out


def run(records, **kw) -> list[Warning]:
    det = FailureDetector(**kw)
    return [w for s, m in records for w in det.update(s, m)]


def fired(ws, code):
    return [w.step for w in ws if w.code == code]


# ----------------------------------------------------------------------------------------------------------- quiet


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_healthy_noisy_stream_is_quiet(seed):
    assert run(stream(seed=seed), max_new_tokens=64, objective=ObjectiveConfig()) == []


def test_eval_only_and_empty_records_are_fine():
    det = FailureDetector()
    assert det.update(0, {"eval/accuracy": 0.3}) == []
    assert det.update(1, {}) == []
    assert det.update(2, {"loss": "not a number", "reward_by_position/min": "x"}) == []


# ----------------------------------------------------------------------------------------------------------- each mode


def test_heavy_negative_tail_fires_at_the_step_with_the_documented_line():
    def edit(s, m):
        if s >= 12:
            m.update({"reward/p05": -14.2, "reward/p50": -0.3, "reward/p95": 1.0, "reward/min": -48.0})

    ws = run(stream(60, edit=edit))
    assert fired(ws, "heavy_negative_tail") == [12]
    w = ws[0]
    assert w.figure == pytest.approx(-14.2)
    assert w.line().startswith("[step 12] heavy_negative_tail: reward p05 = -14.2 vs median -0.3")
    assert "objective.reward=power objective.power_a=1" in w.line() and "objective.transform=clip" in w.line()


def test_tail_needs_asymmetry_so_a_wide_symmetric_spread_is_quiet():
    def edit(s, m):
        m.update({"reward/p05": -8.0, "reward/p50": 0.0, "reward/p95": 8.0})

    assert fired(run(stream(40, edit=edit)), "heavy_negative_tail") == []


@pytest.mark.parametrize("div", ["forward_kl", "jsd"])
def test_stopgrad_forward_kl_and_jsd_are_told_to_use_the_corrected_advantage(div):
    def edit(s, m):
        if s >= 5:
            m.update({"reward/p05": -20.0, "reward/p50": 0.3, "reward/p95": 0.4})
            m["train/accuracy"] = 0.0 if s > 30 else 0.4

    for obj in ({"divergence": div, "gradient": "stopgrad"}, ObjectiveConfig(divergence=div)):
        ws = run(stream(60, edit=edit), objective=obj)
        tail = [w for w in ws if w.code == "heavy_negative_tail"]
        acc = [w for w in ws if w.code == "accuracy_collapse"]
        assert tail and acc
        for w in tail + acc:
            assert "objective.gradient=corrected" in w.advice and "OPD+" in w.advice
    corrected = run(stream(60, edit=edit), objective={"divergence": div, "gradient": "corrected"})
    assert all("gradient=corrected" not in w.advice for w in corrected)


def test_advice_follows_the_objective():
    clip = FailureDetector(objective={"transform": "clip"}).advice("heavy_negative_tail")
    assert "objective.reward=power" in clip and "§3.3" in clip
    assert "power_a" in FailureDetector(objective=ObjectiveConfig(reward="power")).advice("grad_norm_spike")
    full = FailureDetector(objective=ObjectiveConfig(estimator="full")).advice("grad_norm_spike")
    assert "optim.lr" in full and "power" not in full
    for code in CODES:
        assert FailureDetector().advice(code)
    with pytest.raises(KeyError):
        FailureDetector().advice("nope")


def test_dense_objectives_skip_the_sampled_reward_checks():
    def edit(s, m):
        m.update({"reward/p05": -20.0, "reward/p50": 0.0, "reward/p95": 0.1})

    assert fired(run(stream(30, edit=edit), objective={"estimator": "full"}), "heavy_negative_tail") == []


def test_early_position_extremes():
    def edit(s, m):
        if s >= 25:
            m["reward_by_position/min"][1] = -31.0

    ws = run(stream(60, edit=edit))
    assert fired(ws, "early_position_extremes") == [25]
    w = [w for w in ws if w.code == "early_position_extremes"][0]
    assert w.figure == pytest.approx(31.0) and "position 1" in w.message and "PowerOPD" in w.advice

    def late(s, m):  # the same extreme late in the response is not an early-position pattern
        if s >= 25:
            m["reward_by_position/min"][20] = -31.0
    assert fired(run(stream(60, edit=late)), "early_position_extremes") == []

    def sparse(s, m):  # positions with too few tokens are ignored
        if s >= 25:
            m["reward_by_position/min"][1] = -31.0
            m["reward_by_position/count"][1] = 2
    assert fired(run(stream(60, edit=sparse)), "early_position_extremes") == []


def test_grad_norm_spike_after_warmup_only():
    def edit(s, m):
        m["grad_norm"] = 1.0
        if s in (3, 30):
            m["grad_norm"] = 50.0

    ws = run(stream(60, edit=edit))
    assert fired(ws, "grad_norm_spike") == [30]  # step 3 is inside the warm-up (5 steps of history)
    assert "50x the median 1" in ws[0].message


def test_non_finite_values():
    def edit(s, m):
        if s == 12:
            m["loss"] = float("nan")
            m["grad_norm"] = float("inf")

    ws = run(stream(30, edit=edit))
    assert fired(ws, "non_finite") == [12]
    assert fired(ws, "grad_norm_spike") == []
    assert "optim.lr" in ws[0].advice


def test_length_runaway_by_growth_by_truncation_and_at_the_cap():
    def growth(s, m):
        m["response_length/mean"] = 40.0 if s <= 30 else 80.0

    # last-10 mean / previous-10 mean > 1.5 once 6 steps of the new window are at 80: (6*80+4*40)/10 = 64 > 60
    assert fired(run(stream(60, edit=growth)), "length_runaway") == [36]

    def trunc(s, m):
        m["finished_frac"] = 0.95 if s <= 20 else 0.1

    ws = run(stream(60, edit=trunc))
    assert fired(ws, "length_runaway") == [22]  # 3-step mean (0.95 + 0.1 + 0.1) / 3 < 0.5
    assert "end with EOS" in ws[0].message

    def start_truncated(s, m):  # a run that starts (and stays) mostly truncated is not a runaway
        m["finished_frac"] = 0.3
    assert fired(run(stream(60, edit=start_truncated)), "length_runaway") == []

    def cap(s, m):
        m["response_length/mean"] = 40.0 if s <= 20 else 63.0

    # 3-step mean reaches 0.95 * 64 = 60.8 once all three steps are at 63
    assert fired(run(stream(60, edit=cap), max_new_tokens=64), "length_runaway") == [23]
    # no cap known: the growth check, (63 k + 40 (10 - k)) / 10 > 60 at k = 9
    assert fired(run(stream(60, edit=cap)), "length_runaway") == [29]

    def verbose(s, m):  # issue #15: a base model that samples at the limit from step 1 has not run away
        m["response_length/mean"] = 62.0 if s % 2 else 64.0
    assert fired(run(stream(60, edit=verbose), max_new_tokens=64), "length_runaway") == []
    # ... but one that starts below it and gets there has: (40 + 40 + 63) / 3 < 60.8 at the start
    def late_cap(s, m):
        m["response_length/mean"] = 40.0 if s <= 2 else 63.0
    assert fired(run(stream(60, edit=late_cap), max_new_tokens=64), "length_runaway") == [5]


def test_length_collapse():
    def edit(s, m):
        m["response_length/mean"] = 40.0 if s <= 30 else 4.0

    ws = run(stream(60, edit=edit))
    assert fired(ws, "length_collapse") == [33]  # (40 + 4 + 4) / 3 = 16 >= 10 at 32; (4 + 4 + 4) / 3 < 10 at 33
    assert fired(ws, "length_runaway") == []


def test_accuracy_collapse_train_and_eval():
    def train(s, m):
        m["train/accuracy"] = 0.5 if s <= 40 else 0.0
        m.pop("eval/accuracy", None)

    ws = run(stream(80, edit=train))
    assert fired(ws, "accuracy_collapse") == [45]  # 10-step mean 0.5 * 5/10 <= 0.25 at the fifth 0
    assert "train accuracy" in ws[0].message

    recs = [(0, {"eval/accuracy": 0.6}), (10, {"eval/accuracy": 0.62}), (20, {"eval/accuracy": 0.55}),
            (30, {"eval/accuracy": 0.2}), (40, {"eval/accuracy": 0.25})]
    ws = run(recs)
    assert fired(ws, "accuracy_collapse") == [30]
    assert ws[0].message == "eval accuracy 20.0% vs best 62.0%"


def test_reward_collapse():
    def edit(s, m):
        m["reward/mean"] = -0.5 if s <= 50 else -2.0
        m["reward/std"] = 2.0

    # 10-step mean drops by 1.5 * k / 10; it must exceed 0.5 * 2.0 = 1.0: k = 7 -> step 57
    assert fired(run(stream(80, edit=edit)), "reward_collapse") == [57]


# ----------------------------------------------------------------------------------------------------------- episodes


def test_fires_once_per_episode_and_rearms_after_a_clear_spell():
    bad = {"reward/p05": -20.0, "reward/p50": 0.0, "reward/p95": 0.5}
    on = set(range(5, 30)) | set(range(45, 50)) | set(range(53, 60))  # clear 30..44 (15 >= 10), 50..52 (3 < 10)

    def edit(s, m):
        if s in on:
            m.update(bad)

    assert fired(run(stream(70, edit=edit)), "heavy_negative_tail") == [5, 45]
    cfg = DetectorConfig(rearm_steps=2)
    assert fired(run(stream(70, edit=edit), config=cfg), "heavy_negative_tail") == [5, 45, 53]


def test_missing_data_does_not_count_as_clear():
    det = FailureDetector(DetectorConfig(rearm_steps=2))
    bad = {"reward/p05": -20.0, "reward/p50": 0.0}
    assert [w.code for w in det.update(1, bad)] == ["heavy_negative_tail"]
    for s in range(2, 10):
        assert det.update(s, {"loss": 0.1}) == []  # no reward stats: no information
    assert det.update(10, bad) == []  # still the same episode


def test_disabled_detector_is_silent():
    def edit(s, m):
        m["grad_norm"] = 1.0 if s != 30 else 100.0

    assert run(stream(40, edit=edit), config=DetectorConfig(enabled=False)) == []


def test_replay_of_logged_records_with_nan_strings_and_json_round_trip():
    recs = [{"step": s, **m} for s, m in stream(40)]
    recs[12]["loss"] = "nan"
    ws = detect(json.loads(json.dumps(recs)))
    assert [w.code for w in ws] == ["non_finite"]
    d = ws[0].to_dict()
    assert json.loads(json.dumps(d)) == d and set(d) == {"step", "code", "message", "figure", "advice"}
    assert d["figure"] == "nan" and math.isnan(Warning.from_dict(d).figure)
    assert Warning.from_dict(d).line() == ws[0].line()


# ----------------------------------------------------------------------------------------------------------- config


@pytest.mark.parametrize("kw", [
    {"rearm_steps": -1}, {"grad_window": 0}, {"grad_window": 2.5}, {"grad_window": True}, {"tail_gap": -1.0},
    {"tail_gap": float("nan")}, {"tail_gap": "5"}, {"finished_floor": 1.5}, {"acc_drop": 2.0},
    {"grad_spike_ratio": 0.5}, {"grad_warmup": 30, "grad_window": 20}, {"enabled": 1},
])
def test_config_validation(kw):
    with pytest.raises(ValueError, match="diagnostics."):
        DetectorConfig(**kw)


def test_config_defaults_inf_disables_and_load_config():
    assert DetectorConfig().grad_spike_ratio == 10.0 and DetectorConfig().rearm_steps == 10

    def edit(s, m):
        m["grad_norm"] = 1.0 if s != 30 else 1e6

    cfg = replace(DetectorConfig(), grad_spike_ratio=math.inf)
    assert fired(run(stream(40, edit=edit), config=cfg), "grad_norm_spike") == []
    assert load_config(DetectorConfig, None, ["tail_gap=3", "rearm_steps=4"]).tail_gap == 3.0
    with pytest.raises(UserError):
        load_config(DetectorConfig, None, ["acc_drop=3"])
    with pytest.raises(TypeError):
        FailureDetector(config={"tail_gap": 1.0})


def test_for_run_reads_objective_and_max_new_tokens():
    class Rollout:
        max_new_tokens = 64

    class Train:
        objective = ObjectiveConfig(divergence="jsd")
        rollout = Rollout()

    det = FailureDetector.for_run(Train())
    assert det.max_new_tokens == 64 and det.objective["divergence"] == "jsd"
    assert "gradient=corrected" in det.advice("accuracy_collapse")


def test_docs_list_the_current_defaults():
    text = (ROOT / "docs" / "diagnostics.md").read_text()
    assert markdown_table(DetectorConfig) in text, "docs/diagnostics.md knob table is stale"
    for code in CODES:
        assert f"`{code}`" in text


def test_early_failure_without_warmup_is_put_down_to_the_lr_first():
    """Issue #15: a walkthrough run wrecked in its first steps (lr 2e-3, no warm-up) was told to raise the length
    limit; the advice now leads with the lr and the warm-up, and only for failures in the first steps."""
    from opdkit.train.config import OptimConfig

    def runaway_from(start):
        def edit(s, m):
            if s >= start:
                m["finished_frac"], m["response_length/mean"] = 0.0, 64.0
        return edit

    early = run(stream(60, edit=runaway_from(5)), max_new_tokens=64, optim=OptimConfig(lr=2e-3, warmup_steps=0))
    w = [x for x in early if x.code == "length_runaway"][0]
    assert w.step <= 10 and "optim.warmup_steps=20" in w.advice and "optim.lr=0.002" in w.advice
    assert w.advice.index("warmup") < w.advice.index("max_new_tokens")  # the lr first, the length limit after
    warm = run(stream(60, edit=runaway_from(5)), max_new_tokens=64, optim={"lr": 2e-3, "warmup_steps": 20})
    assert "lengthen optim.warmup_steps" in [x for x in warm if x.code == "length_runaway"][0].advice
    late = run(stream(120, edit=runaway_from(80)), max_new_tokens=64, optim=OptimConfig(lr=2e-3, warmup_steps=0))
    w = [x for x in late if x.code == "length_runaway"][0]
    assert w.step >= 80 and "warm" not in w.advice  # a failure long after the start is not blamed on the lr
    assert "warm" not in FailureDetector(optim=OptimConfig()).advice("length_runaway")  # no step: as before
    assert "warm" not in FailureDetector().advice("length_runaway", step=3)  # no optim given: as before
