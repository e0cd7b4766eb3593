"""optim.fused_loss in the trainer: the fused full-vocabulary update (objectives/fused.py) gives the generic path's
training run, `auto` picks it only where it pays, and `on` that cannot be honoured is refused before anything is
written."""

from __future__ import annotations

import json

import pytest
import torch

from opdkit.checkpoint import save_model_dir
from opdkit.config import load_config
from opdkit.errors import UserError
from opdkit.models import tiny_llama
from opdkit.objectives import ObjectiveConfig
from opdkit.tasks import Addition, build_char_tokenizer
from opdkit.train import loop
from opdkit.train.config import TrainConfig
from opdkit.train.student_pass import FUSED_MIN_VOCAB, use_fused, why_not_fused
from tests.train.tiny_run import base_overrides, make_pair

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def wide_pair(tmp_path_factory):
    """Student and teacher over a vocabulary of FUSED_MIN_VOCAB + 76 (the char tokenizer's ids plus unused ones)."""
    root = tmp_path_factory.mktemp("wide")
    tok = build_char_tokenizer([Addition.alphabet], save_dir=None)
    paths = {"tokenizer": str(root / "tok")}
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    for name, seed in (("student", 0), ("teacher", 1)):
        paths[name] = str(save_model_dir(tiny_llama(FUSED_MIN_VOCAB + 76, seed=seed, **ids), tok, root / name))
    return paths


def _losses(run_dir):
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["loss"], r["kl"], r["entropy/student"], r["grad_norm"]) for r in rows if "loss" in r]


@pytest.mark.parametrize("objective", [[], ["objective.divergence=jsd", "objective.beta=0.5"],
                                       ["objective.divergence=forward_kl"]])
def test_auto_fused_run_matches_the_generic_run(wide_pair, tmp_path, objective):
    runs = {}
    for setting in ("auto", "off"):
        cfg = load_config(TrainConfig, None, base_overrides(wide_pair, tmp_path / setting, 3)
                          + ["objective.estimator=full", f"optim.fused_loss={setting}"] + objective)
        summary = loop.train(cfg)
        assert summary["fused_loss"] is (setting == "auto")
        runs[setting] = _losses(tmp_path / setting)
    assert len(runs["auto"]) == 3
    for a, b in zip(runs["auto"], runs["off"], strict=True):
        for x, y in zip(a, b, strict=True):
            assert abs(x - y) <= 1e-4 * max(1.0, abs(y)), (a, b)


def test_auto_takes_the_fused_path_only_where_it_pays(tmp_path):
    obj = ObjectiveConfig(estimator="full")
    small, wide = tiny_llama(20, seed=0), tiny_llama(FUSED_MIN_VOCAB, seed=0)
    assert not use_fused("auto", obj, small, False)     # the embedded default's vocabulary: generic path
    assert use_fused("auto", obj, wide, False)
    assert use_fused("on", obj, small, False)           # on: whatever the vocabulary
    assert not use_fused("off", obj, wide, False)
    assert not use_fused("auto", obj, wide, True)       # not under torchrun
    assert "torchrun" in why_not_fused(obj, wide, True)
    assert not use_fused("auto", ObjectiveConfig(estimator="sampled"), wide, False)
    assert not use_fused("auto", ObjectiveConfig(estimator="full", divergence="tv"), wide, False)


def test_on_that_cannot_run_is_refused_before_the_run_dir_is_written(tmp_path):
    pair = make_pair(tmp_path / "pair")
    cfg = load_config(TrainConfig, None, base_overrides(pair, tmp_path / "run", 1)
                      + ["objective.estimator=sampled", "optim.fused_loss=on"])
    with pytest.raises(ValueError, match=r"optim.fused_loss=on: .*estimator=full.* use optim.fused_loss=auto or off"):
        loop.train(cfg)
    assert not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="optim.fused_loss='fast' is not one of auto, on, off"):
        load_config(TrainConfig, None, ["optim.fused_loss=fast"])
