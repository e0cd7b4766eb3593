"""opdkit.report: plots of one run and of methods x seeds from metrics.jsonl, the reward histogram helper, and the
self-contained HTML report."""

import math
import random
import re
import struct
import zlib

import numpy as np
import pytest
import torch

from opdkit.diagnostics import FailureDetector
from opdkit.report.plots import accuracy_source
from opdkit.report import (HIST_EDGES, markdown_table, markdown_to_html, method_colors, plot_compare, plot_run,
                           reward_histogram, write_html)
from opdkit.metrics_log import MetricsLogger

PNG = b"\x89PNG\r\n\x1a\n"
T = 24


def synthetic_run(run_dir, kind: str = "vanilla", seed: int = 0, steps: int = 30, eval_every: int = 10):
    """A metrics.jsonl like the trainer's: step-0 eval, training steps (sampled token rewards -> percentiles,
    by-position stats and reward/hist, detector warnings), eval rows, final eval."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    det = FailureDetector(objective={"reward": "power" if kind == "power" else "divergence"}, max_new_tokens=T)
    with MetricsLogger(run_dir, tensorboard=False) as log:
        log.log(0, {"eval/accuracy": 0.1, "eval/response_length": 20.0})
        for s in range(1, steps + 1):
            B = 16
            if kind == "power":
                r = torch.rand(B, T, generator=gen) ** 2 - torch.rand(B, T, generator=gen) ** 2
            else:  # heavy negative tail, worst at the first positions
                scale = torch.linspace(6.0, 1.0, T)
                r = -torch.distributions.Exponential(1.0).sample((B, T)) ** 2 * scale * 0.3 + 0.2
                r = r.clamp(min=-50)
            n = torch.randint(T // 2, T + 1, (B,), generator=gen)
            m = torch.arange(T)[None] < n[:, None]
            v = r[m].double()
            q = torch.quantile(v, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64))
            rec = {
                "loss": 0.5, "kl": -v.mean().item(), "reward/mean": v.mean().item(), "reward/std": v.std().item(),
                "reward/min": v.min().item(), "reward/max": v.max().item(), "reward/p05": q[0].item(),
                "reward/p50": q[1].item(), "reward/p95": q[2].item(),
                "reward_by_position/mean": ((r * m).sum(0) / m.sum(0).clamp(min=1)).tolist(),
                "reward_by_position/min": r.masked_fill(~m, 1e9).amin(0).tolist(),
                "reward_by_position/max": r.masked_fill(~m, -1e9).amax(0).tolist(),
                "reward_by_position/count": m.sum(0).tolist(),
                "reward/hist": reward_histogram(r, m),
                "grad_norm": (0.3 if kind == "power" else 5.0) * math.exp(rng.gauss(0, 0.3)) * (40 if s == 20 else 1),
                "train/accuracy": min(1.0, 0.1 + (0.6 if kind == "power" else 0.3) * s / steps + rng.gauss(0, 0.05)),
                "response_length/mean": n.double().mean().item(), "response_length/max": int(n.max()),
                "finished_frac": 0.9, "lr": 1e-4,
            }
            if eval_every and s % eval_every == 0 and s < steps:
                rec["eval/accuracy"] = 0.1 + (0.5 if kind == "power" else 0.25) * s / steps
            rec["warnings"] = [w.to_dict() for w in det.update(s, rec)]
            log.log(s, rec)
        log.log(steps, {"eval/accuracy": 0.6 if kind == "power" else 0.35, "eval/response_length": 18.0})
    return run_dir


def tiny_png() -> bytes:
    """A valid 1x1 grey PNG, built by hand (no figure needed)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return PNG + chunk(b"IHDR", struct.pack(">IIBBBBB", 1, 1, 8, 0, 0, 0, 0)) + \
        chunk(b"IDAT", zlib.compress(b"\x00\x80")) + chunk(b"IEND", b"")


def is_png(p) -> bool:
    return p.is_file() and p.stat().st_size > 1000 and p.read_bytes()[:8] == PNG


# ----------------------------------------------------------------------------------------------------------- histogram


def test_reward_histogram_edges_clamping_and_mask():
    assert len(HIST_EDGES) >= 20 and list(HIST_EDGES) == sorted(HIST_EDGES) and 0.0 in HIST_EDGES
    assert HIST_EDGES[0] == -50 and HIST_EDGES[-1] == 50
    nb = len(HIST_EDGES) - 1
    h = reward_histogram([-1e9, -50.0, -float("inf"), 0.0, 0.01, 50.0, 123.0, float("inf"), float("nan")])
    assert len(h) == nb and sum(h) == 8  # NaN dropped
    zero = HIST_EDGES.index(0.0)
    assert h[0] == 3 and h[-1] == 3 and h[zero] == 2  # clamped into the end bins; [0, 0.05) holds 0 and 0.01
    x = torch.tensor([[-0.6, 0.6, 100.0], [2.5, -100.0, 0.0]], dtype=torch.bfloat16)
    mask = torch.tensor([[True, True, False], [True, False, True]])
    h = reward_histogram(x, mask)
    assert sum(h) == 4 and h[-1] == 0 and h[0] == 0
    assert h == reward_histogram(np.array([-0.6015625, 0.6015625, 2.5, 0.0]))
    assert reward_histogram([]) == [0] * nb


# ----------------------------------------------------------------------------------------------------------- plot_run


def test_plot_run_writes_every_png(tmp_path):
    run = synthetic_run(tmp_path / "run")
    paths = plot_run(run)
    names = {p.name for p in paths}
    assert names == {"accuracy.png", "loss.png", "reward.png", "grad_norm.png", "response_length.png",
                     "reward_by_position.png", "reward_hist.png"}
    assert all(p.parent == run / "plots" and is_png(p) for p in paths)


def test_plot_run_skips_absent_data_and_handles_nan_strings(tmp_path):
    with MetricsLogger(tmp_path / "r", tensorboard=False) as log:
        log.log(0, {"eval/accuracy": 0.2})
        for s in range(1, 6):
            log.log(s, {"loss": float("nan"), "train/accuracy": float("nan") if s == 3 else 0.1 * s,
                        "grad_norm": float("inf") if s == 2 else 1.0})
    assert '"nan"' in (tmp_path / "r" / "metrics.jsonl").read_text()
    paths = plot_run(tmp_path / "r", tmp_path / "out")
    assert sorted(p.name for p in paths) == ["accuracy.png", "grad_norm.png"]
    assert all(is_png(p) and p.parent == tmp_path / "out" for p in paths)
    with MetricsLogger(tmp_path / "empty", tensorboard=False) as log:
        log.log(0, {"eval/response_length": 3.0})
    assert plot_run(tmp_path / "empty") == []


# ----------------------------------------------------------------------------------------------------------- compare


def test_plot_compare_two_methods_two_seeds(tmp_path):
    runs = {m: [synthetic_run(tmp_path / f"{m}_{s}", m, seed=s) for s in (0, 1)] for m in ("vanilla", "power")}
    out = plot_compare(runs, tmp_path / "cmp")
    assert set(out) == {"accuracy", "grad_norm", "response_length", "reward_hist", "reward_by_position"}
    assert all(is_png(p) and p.parent == tmp_path / "cmp" for p in out.values())
    # train accuracy is used when a run has fewer than 3 eval points; absent data -> no plot
    for s in (0, 1):
        with MetricsLogger(tmp_path / f"t{s}", tensorboard=False) as log:
            log.log(0, {"eval/accuracy": 0.1})
            for step in range(1, 9):
                log.log(step, {"train/accuracy": 0.1 * step + 0.05 * s})
            log.log(8, {"eval/accuracy": 0.5})
    only = plot_compare({"a": [tmp_path / "t0", tmp_path / "t1"]}, tmp_path / "cmp2")
    assert list(only) == ["accuracy"] and is_png(only["accuracy"])
    # a method that never evaluates (compare's SFT baseline) does not push the others onto the train curve
    ev = [{"step": s, "eval/accuracy": 0.1 * s} for s in range(3)]
    noev = [{"step": s, "train/accuracy": 0.1, "grad_norm": 1.0} for s in range(1, 3)]
    assert accuracy_source({"opd": [ev, ev], "sft": [noev]}) == (True, {"opd"})
    assert accuracy_source({"opd": [ev, ev[:2]], "sft": [noev]}) == (False, {"opd"})
    assert accuracy_source({"sft": [noev]}) == (False, set())
    cols = method_colors(["a", "b", "c"])
    assert len(set(cols.values())) == 3 and method_colors(["a", "b"]) == {k: cols[k] for k in "ab"}


# ----------------------------------------------------------------------------------------------------------- html


def test_write_html_is_self_contained(tmp_path):
    pngs = {name: tmp_path / f"{name}.png" for name in ("accuracy", "grad_norm")}
    for p in pngs.values():
        p.write_bytes(tiny_png())
    images = {"Accuracy <vs> step": pngs["accuracy"], "Grad norm": pngs["grad_norm"]}
    sections = [("Summary", "PowerOPD **wins** on `acc`; see [the paper](https://arxiv.org/abs/2606.17199).\n\n"
                            "- item one\n- item *two*\n\n| a | b |\n|---|---|\n| 1 | x |\n\n```\nx < y\n```"),
                ("Raw", "<p>already <b>html</b></p>")]
    tables = [("Final accuracy", ["method", "acc", "n"], [["power", 0.61234567, 2], ["vanilla", None, 2]])]
    out = write_html(tmp_path / "rep" / "report.html", "Report <1>", sections, images, tables)
    text = out.read_text()
    assert text.count("data:image/png;base64,") == 2
    assert 'src="http' not in text and "src='http" not in text and str(tmp_path) not in text
    assert not re.search(r"<link|<script|@import|url\(", text)
    assert "<title>Report &lt;1&gt;</title>" in text and "Accuracy &lt;vs&gt; step" in text
    assert "<strong>wins</strong>" in text and "<code>acc</code>" in text and "<em>two</em>" in text
    assert '<a href="https://arxiv.org/abs/2606.17199">the paper</a>' in text
    assert "<li>item one</li>" in text and "<td>x</td>" in text and "x &lt; y" in text
    assert "<p>already <b>html</b></p>" in text
    assert "0.6123" in text and "—" in text


def test_markdown_table_and_markdown_subset():
    md = markdown_table(["method", "acc", "note"], [["power", 0.612345, "a|b"], ["vanilla", 0.5, None]])
    assert md.splitlines() == ["| method | acc | note |", "|---|---:|---|", "| power | 0.6123 | a\\|b |",
                               "| vanilla | 0.5 | — |"]
    assert markdown_to_html("1. one\n2. two") == "<ol><li>one</li><li>two</li></ol>"
    assert markdown_to_html("# Head\ntext & more") == "<h3>Head</h3>\n<p>text &amp; more</p>"


@pytest.mark.parametrize("suffix,mime", [(".png", "image/png"), (".svg", "image/svg+xml")])
def test_image_mime_by_suffix(tmp_path, suffix, mime):
    img = tmp_path / f"x{suffix}"
    img.write_bytes(PNG + b"0" * 10 if suffix == ".png" else b"<svg xmlns='http://www.w3.org/2000/svg'/>")
    text = write_html(tmp_path / "r.html", "t", [], {"x": img}, []).read_text()
    assert f"data:{mime};base64," in text


# ----------------------------------------------------------------------------------------------------------- issue 15


def test_reward_hist_range_follows_the_data(tmp_path):
    """A power-reward run (rewards in [-1, 1]) is drawn on about [-1, 1], not on the +-50 of the fixed edges."""
    from opdkit.report.plots import _draw_hist, _figure, hist_range

    power = np.array(reward_histogram(np.linspace(-0.9, 0.95, 200)), dtype=float)
    lo, hi = hist_range([power])
    assert HIST_EDGES[lo] == -1.0 and HIST_EDGES[hi] == 1.0
    fig, ax = _figure()
    _draw_hist(ax, [("power", power, "#000000")])
    assert ax.get_xlim() == (-1.0, 1.0)
    assert [t.get_text() for t in ax.get_xticklabels()][0] == "-1"
    wide = np.array(reward_histogram([-80.0, 0.3, 2.0]), dtype=float)
    fig, ax = _figure()
    _draw_hist(ax, [("a", power, "#000000"), ("b", wide, "#ff0000")])
    assert ax.get_xlim() == (-50.0, 3.0)
    assert [t.get_text() for t in ax.get_xticklabels()][0] == "≤-50"
    assert hist_range([np.zeros(len(HIST_EDGES) - 1)]) == (0, len(HIST_EDGES) - 1)
    run = synthetic_run(tmp_path / "power", kind="power", steps=4, eval_every=0)
    assert "reward_hist.png" in {p.name for p in plot_run(run)}


def test_opdkit_plot_command_redraws_a_run(tmp_path, capsys):
    """`opdkit plot <run_dir>` draws a run's plots (a killed one too: no final/ needed); bad input: one line, exit 2,
    nothing written."""
    from opdkit.cli import main

    run = synthetic_run(tmp_path / "run", steps=6, eval_every=3)
    assert main(["plot", str(run)]) == 0
    assert {p.name for p in (run / "plots").iterdir()} >= {"accuracy.png", "loss.png", "reward_hist.png"}
    assert main(["plot", str(run), f"out={tmp_path / 'elsewhere'}"]) == 0
    assert is_png(tmp_path / "elsewhere" / "accuracy.png")
    capsys.readouterr()
    for argv in (["plot"], ["plot", str(tmp_path / "nothing")], ["plot", str(run), "bogus=1"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("opdkit: error:")
    assert not (tmp_path / "nothing").exists()
