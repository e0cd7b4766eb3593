"""PNG plots of one run (`plot_run`) and of several methods x seeds (`plot_compare`), from `metrics.jsonl`.

Plots are drawn on bare `matplotlib.figure.Figure` objects (the Agg canvas; pyplot and its global state are never
touched), 8 x 4.5 in at 110 dpi. A plot whose data is absent is skipped; NaN / "nan" values are dropped.

`HIST_EDGES` are the fixed bin edges of the per-step reward histogram `reward/hist` (`reward_histogram(values)`):
roughly log-spaced on both sides of 0, from -50 (the log-ratio bound) to 50, fine enough on [-1, 1] for bounded
rewards (PowerOPD's q^a - p^a). The plot's x range follows the data: the bins that hold any token (a power-reward run
whose rewards stay in [-1, 1] is drawn on [-1, 1], not on +-50).

`opdkit plot <run_dir> [out=DIR]` redraws the plots of a run (also a killed or an `opdkit sft` run) from its
metrics.jsonl.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from opdkit.metrics_log import read_metrics

HIST_EDGES: tuple[float, ...] = (
    -50.0, -30.0, -20.0, -15.0, -10.0, -7.0, -5.0, -3.0, -2.0, -1.5, -1.0, -0.75, -0.5, -0.3, -0.2, -0.1, -0.05, 0.0,
    0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 5.0, 7.0, 10.0, 15.0, 20.0, 30.0, 50.0,
)
FIGSIZE = (8.0, 4.5)
DPI = 110
PLOTS_DIR = "plots"
_TRAIN_COLOR, _EVAL_COLOR, _START_COLOR, _END_COLOR = "#1f77b4", "#d62728", "#7f7f7f", "#ff7f0e"
_WARN_COLOR = "#c44e52"


# ----------------------------------------------------------------------------------------------------------- data


def reward_histogram(values: Any, mask: Any = None) -> list[int]:
    """Counts of `values` (a tensor, array or list; `mask` selects the valid ones) over the bins of HIST_EDGES
    ([a, b) except the last, [a, b]). Values outside the edges are clamped into the end bins; NaN is dropped."""
    arr = _to_numpy(values).reshape(-1)
    if mask is not None:
        arr = arr[_to_numpy(mask).reshape(-1).astype(bool)]
    arr = np.clip(arr[~np.isnan(arr)], HIST_EDGES[0], HIST_EDGES[-1])
    counts, _ = np.histogram(arr, bins=np.asarray(HIST_EDGES, dtype=np.float64))
    return [int(c) for c in counts]


def _to_numpy(x: Any) -> np.ndarray:
    if hasattr(x, "detach"):  # torch tensor (any dtype, any device)
        x = x.detach().cpu()
        return (x.double() if x.is_floating_point() else x).numpy()
    return np.asarray(x, dtype=np.float64) if not isinstance(x, np.ndarray) else x.astype(np.float64)


def _f(v: Any) -> float:
    """A metric value as a float; NaN for anything that is not a number (None, lists, bad strings)."""
    if isinstance(v, bool) or v is None:
        return math.nan
    try:
        return float(v)
    except (TypeError, ValueError):
        return math.nan


def _records(run: str | os.PathLike | Sequence[Mapping]) -> list[Mapping]:
    return list(run) if isinstance(run, (list, tuple)) else read_metrics(run)


def _is_train(rec: Mapping) -> bool:
    return any(not (k == "step" or k == "warnings" or k.startswith("eval/")) for k in rec)


def _series(recs: Sequence[Mapping], key: str, train_only: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of `key` over the records (training rows only by default), non-finite values dropped; a
    repeated step keeps its last value."""
    d: dict[int, float] = {}
    for r in recs:
        if key in r and (not train_only or _is_train(r)):
            x = _f(r[key])
            if math.isfinite(x):
                d[int(_f(r.get("step", 0)))] = x
    steps = np.array(sorted(d), dtype=np.int64)
    return steps, np.array([d[s] for s in steps], dtype=np.float64)


def _vector_row(recs: Sequence[Mapping], key: str, last: bool) -> tuple[int, Mapping] | None:
    rows = [r for r in recs if isinstance(r.get(key), (list, tuple)) and len(r[key]) > 0]
    if not rows:
        return None
    r = rows[-1] if last else rows[0]
    return int(_f(r.get("step", 0))), r


def _by_position(rows: Sequence[Mapping]) -> dict[str, np.ndarray] | None:
    """Per-position mean/min/max/count combined over rows (seeds): count-weighted mean, min of mins, max of maxs;
    positions without tokens are NaN."""
    T = max((len(r.get("reward_by_position/mean") or []) for r in rows), default=0)
    if T == 0:
        return None
    tot = np.zeros(T)
    wsum = np.zeros(T)
    lo = np.full(T, np.inf)
    hi = np.full(T, -np.inf)
    for r in rows:
        mean = np.array([_f(x) for x in r.get("reward_by_position/mean") or []])
        n = len(mean)
        cnt = np.array([_f(x) for x in r.get("reward_by_position/count") or [1.0] * n])[:n]
        cnt = np.where(np.isfinite(cnt), cnt, 0.0)
        ok = np.isfinite(mean) & (cnt > 0)
        tot[:n] += np.where(ok, cnt, 0.0)
        wsum[:n] += np.where(ok, mean * cnt, 0.0)
        for key, acc, fn in (("min", lo, np.minimum), ("max", hi, np.maximum)):
            v = np.array([_f(x) for x in (r.get(f"reward_by_position/{key}") or [])][:n])
            if len(v) == n:
                acc[:n] = np.where(ok & np.isfinite(v), fn(acc[:n], v), acc[:n])
    has = tot > 0
    nan = np.full(T, np.nan)
    return {"mean": np.where(has, wsum / np.maximum(tot, 1), nan), "min": np.where(has & np.isfinite(lo), lo, nan),
            "max": np.where(has & np.isfinite(hi), hi, nan), "count": tot}


def _hist(recs: Sequence[Mapping], last: bool) -> tuple[int, np.ndarray] | None:
    got = _vector_row(recs, "reward/hist", last)
    if got is None:
        return None
    step, r = got
    h = np.array([_f(x) for x in r["reward/hist"]])
    if len(h) != len(HIST_EDGES) - 1:
        return None
    return step, np.where(np.isfinite(h), h, 0.0)


def _aggregate(series: Sequence[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, ...] | None:
    """Mean, min and max across runs at each step any run logged (runs missing a step are left out there)."""
    per: dict[int, list[float]] = {}
    for steps, vals in series:
        for s, v in zip(steps.tolist(), vals.tolist()):
            per.setdefault(s, []).append(v)
    if not per:
        return None
    steps = np.array(sorted(per))
    rows = [per[s] for s in steps]
    return (steps, np.array([np.mean(v) for v in rows]), np.array([min(v) for v in rows]),
            np.array([max(v) for v in rows]))


def _smooth(vals: np.ndarray, k: int) -> np.ndarray:
    if k <= 1 or len(vals) < 2:
        return vals
    c = np.cumsum(np.insert(vals, 0, 0.0))
    out = np.empty_like(vals)
    for i in range(len(vals)):  # trailing moving average (shorter at the start)
        j = max(0, i + 1 - k)
        out[i] = (c[i + 1] - c[j]) / (i + 1 - j)
    return out


def _warning_steps(recs: Sequence[Mapping]) -> list[tuple[int, str]]:
    out = []
    for r in recs:
        for w in r.get("warnings") or []:
            if isinstance(w, Mapping):
                out.append((int(_f(w.get("step", r.get("step", 0)))), str(w.get("code", "warning"))))
    return out


# ----------------------------------------------------------------------------------------------------------- drawing


def method_colors(methods: Sequence[str]) -> dict[str, str]:
    """One colour per method (tab10, then tab20), in the given order: the same method keeps its colour in every
    compare plot."""
    from matplotlib import colormaps

    pal = [colormaps["tab10"](i) for i in range(10)] + [colormaps["tab20"](i) for i in range(1, 20, 2)]
    from matplotlib.colors import to_hex

    return {m: to_hex(pal[i % len(pal)]) for i, m in enumerate(methods)}


def _figure(ncols: int = 1, figsize: tuple[float, float] = FIGSIZE):
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize, dpi=DPI)
    axes = fig.subplots(1, ncols, sharey=ncols > 1, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, alpha=0.3, linewidth=0.6)
        ax.spines["top"].set_visible(False)
        ax.spines["right"].set_visible(False)
    return fig, (axes[0] if ncols == 1 else list(axes))


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=DPI)
    except OSError as exc:  # disk full, read-only: one line (exit 3), the plots are redrawn by a rerun
        from opdkit.errors import RunFailed, write_error_message

        raise RunFailed(write_error_message(exc, path) + "; the plots are drawn again by the same command with "
                        "resume=true (a finished run only redraws them)") from None
    return path


def _symlog(ax, axis: str = "y", linthresh: float = 1.0, **kw) -> None:
    """A symlog axis with plain tick labels (-10, -1, 0, 1, 10 rather than -10^1 ...)."""
    from matplotlib.ticker import FuncFormatter

    getattr(ax, f"set_{axis}scale")("symlog", linthresh=linthresh, **kw)
    getattr(ax, f"{axis}axis").set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))


def _symlog_if_wide(ax, *arrays: np.ndarray, bound: float = 10.0) -> None:
    vals = np.concatenate([a[np.isfinite(a)] for a in arrays if len(a)]) if arrays else np.array([])
    if len(vals) and np.abs(vals).max() > bound:
        _symlog(ax)


def _mark_warnings(ax, warns: Sequence[tuple[int, str]], max_labels: int = 8) -> None:
    """Dotted vertical lines at the steps where the detector warned, labelled with the codes when few."""
    by_step: dict[int, list[str]] = {}
    for step, code in warns:
        by_step.setdefault(step, [])
        if code not in by_step[step]:
            by_step[step].append(code)
    for i, (step, codes) in enumerate(sorted(by_step.items())):
        ax.axvline(step, color=_WARN_COLOR, linestyle=":", linewidth=1.0, alpha=0.7,
                   label="detector warning" if i == 0 else None)
        if len(by_step) <= max_labels:
            ax.text(step, 0.98, " " + ", ".join(codes), transform=ax.get_xaxis_transform(), rotation=90,
                    fontsize=7, color=_WARN_COLOR, ha="right", va="top", alpha=0.9)


def _legend(ax, outside: bool = False, **kw) -> None:
    """A legend inside the axes ("best" spot, translucent box) or, for busy plots, outside on the right."""
    if not ax.get_legend_handles_labels()[0]:
        return
    if outside:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False, fontsize=9, **kw)
    else:
        kw.setdefault("loc", "best")
        ax.legend(frameon=True, framealpha=0.85, edgecolor="none", fontsize=9, **kw)


_HIST_TICKS = (-50.0, -20.0, -5.0, -2.0, -1.0, -0.5, -0.2, -0.1, 0.0, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 20.0, 50.0)


def hist_range(hists: Sequence[np.ndarray]) -> tuple[int, int]:
    """(first, last + 1) bin index holding any count in `hists` (all bins when every one is empty): the x range of
    the histogram plot, so it is scaled to the data and not to the +-50 of the fixed edges."""
    nonzero = np.zeros(len(HIST_EDGES) - 1, dtype=bool)
    for h in hists:
        nonzero |= np.asarray(h) > 0
    idx = np.flatnonzero(nonzero)
    if not len(idx):
        return 0, len(HIST_EDGES) - 1
    return int(idx[0]), int(idx[-1]) + 1


def _draw_hist(ax, hists: Sequence[tuple[str, np.ndarray, str]]) -> None:
    """Step histograms (fraction of tokens per bin) on a symlog x axis and a log y axis, over the bins that hold
    tokens (at least [-0.1, 0.1])."""
    edges = np.asarray(HIST_EDGES)
    lo_bin, hi_bin = hist_range([c for _, c, _ in hists])
    lo, hi = min(edges[lo_bin], -0.1), max(edges[hi_bin], 0.1)
    floor = top = None
    for label, counts, color in hists:
        total = counts.sum()
        if total <= 0:
            continue
        frac = counts / total
        pos = frac[frac > 0]
        floor = pos.min() if floor is None else min(floor, pos.min())
        ax.stairs(np.where(frac > 0, frac, np.nan), edges, color=color, label=label, linewidth=1.6)
        top = frac.max() if top is None else max(top, frac.max())
    _symlog(ax, "x", linthresh=0.1, linscale=0.6)
    ax.set_xlim(lo, hi)
    ticks = [t for t in _HIST_TICKS if lo <= t <= hi]
    if len(ticks) > 7:  # keep ends, 0 and a few in between
        keep = {ticks[0], ticks[-1], 0.0} | set(ticks[:: max(1, len(ticks) // 6)])
        ticks = [t for t in ticks if t in keep]

    def label(t: float) -> str:  # the end bins hold the clamped values
        return f"≤{t:g}" if t == edges[0] else f"≥{t:g}" if t == edges[-1] else f"{t:g}"

    ax.set_xticks(ticks)
    ax.set_xticklabels([label(t) for t in ticks])
    ax.set_yscale("log")
    if floor is not None:
        ax.set_ylim(floor / 2, min(1.0, top * 2.0))
    ax.set_xlabel("token reward (symlog x; end bins hold clamped values)", fontsize=9)


def _draw_position(ax, prof: Mapping[str, np.ndarray], color: str, label: str, band_alpha: float = 0.15) -> None:
    t = np.arange(len(prof["mean"]))
    ax.fill_between(t, prof["min"], prof["max"], color=color, alpha=band_alpha, linewidth=0)
    ax.plot(t, prof["mean"], color=color, linewidth=1.8, label=f"{label}: mean")
    ax.plot(t, prof["min"], color=color, linewidth=0.8, alpha=0.7, linestyle="--", label=f"{label}: min / max")
    ax.plot(t, prof["max"], color=color, linewidth=0.8, alpha=0.7, linestyle="--")


# ----------------------------------------------------------------------------------------------------------- plot_run


def plot_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """PNG plots of one run into `out_dir` (default `run_dir/plots/`): accuracy.png, loss.png, reward.png (percentile band),
    grad_norm.png, response_length.png, reward_by_position.png (first and last logged step), reward_hist.png
    (first vs last step, when `reward/hist` is logged). Detector warnings are marked as dotted lines. Returns the
    paths written; a plot whose data is absent is skipped."""
    run_dir = Path(run_dir)
    recs = _records(run_dir)
    out = Path(out_dir) if out_dir is not None else (run_dir if run_dir.is_dir() else run_dir.parent) / PLOTS_DIR
    name = run_dir.name if run_dir.is_dir() else run_dir.parent.name
    warns = _warning_steps(recs)
    paths: list[Path] = []

    s_tr, a_tr = _series(recs, "train/accuracy")
    s_ev, a_ev = _series(recs, "eval/accuracy", train_only=False)
    if len(s_tr) or len(s_ev):
        fig, ax = _figure()
        if len(s_tr):
            ax.plot(s_tr, a_tr, color=_TRAIN_COLOR, alpha=0.35, linewidth=0.9, label="train (batch)")
            k = max(1, len(s_tr) // 20)
            if k > 1:
                ax.plot(s_tr, _smooth(a_tr, k), color=_TRAIN_COLOR, linewidth=1.8, label=f"train ({k}-step mean)")
        if len(s_ev):
            ax.plot(s_ev, a_ev, "o-", color=_EVAL_COLOR, linewidth=1.5, markersize=5, label="held-out eval")
        _mark_warnings(ax, warns)
        ax.set(title=f"Accuracy — {name}", xlabel="step", ylabel="accuracy", ylim=(-0.02, 1.02))
        _legend(ax)
        paths.append(_save(fig, out / "accuracy.png"))

    q = {k: _series(recs, f"reward/{k}") for k in ("min", "p05", "p50", "p95", "max", "mean")}
    if len(q["p50"][0]):
        fig, ax = _figure()
        s = q["p50"][0]

        def at(key: str) -> np.ndarray:
            d = dict(zip(q[key][0].tolist(), q[key][1].tolist()))
            return np.array([d.get(i, np.nan) for i in s.tolist()])

        if len(q["min"][0]) and len(q["max"][0]):
            ax.fill_between(s, at("min"), at("max"), color="#bbbbbb", alpha=0.35, linewidth=0, label="min–max")
        if len(q["p05"][0]) and len(q["p95"][0]):
            ax.fill_between(s, at("p05"), at("p95"), color=_TRAIN_COLOR, alpha=0.35, linewidth=0, label="p05–p95")
        ax.plot(s, at("p50"), color=_TRAIN_COLOR, linewidth=1.8, label="median")
        if len(q["mean"][0]):
            ax.plot(s, at("mean"), color="black", linewidth=1.0, linestyle="--", label="mean")
        _symlog_if_wide(ax, at("min"), at("max"))
        _mark_warnings(ax, warns)
        ax.set(title=f"Token reward percentiles — {name}", xlabel="step", ylabel="reward")
        _legend(ax, outside=True)
        paths.append(_save(fig, out / "reward.png"))

    s, loss = _series(recs, "loss")
    if len(s):
        fig, ax = _figure()
        ax.plot(s, loss, color=_TRAIN_COLOR, alpha=0.35 if len(s) > 40 else 1.0, linewidth=0.9, label="loss")
        k = max(1, len(s) // 20)
        if k > 1:
            ax.plot(s, _smooth(loss, k), color=_TRAIN_COLOR, linewidth=1.8, label=f"{k}-step mean")
        if len(loss) and loss.min() > 0 and loss.max() / loss.min() > 20:
            ax.set_yscale("log")
        _mark_warnings(ax, warns)
        ax.set(title=f"Training loss — {name}", xlabel="step", ylabel="loss")
        _legend(ax)
        paths.append(_save(fig, out / "loss.png"))

    s, g = _series(recs, "grad_norm")
    g_ok = g > 0
    if g_ok.any():
        fig, ax = _figure()
        ax.plot(s[g_ok], g[g_ok], color=_TRAIN_COLOR, linewidth=1.2, label="grad norm (before clipping)")
        ax.set_yscale("log")
        _mark_warnings(ax, warns)
        ax.set(title=f"Gradient norm — {name}", xlabel="step", ylabel="grad norm (log)")
        _legend(ax)
        paths.append(_save(fig, out / "grad_norm.png"))

    s, L = _series(recs, "response_length/mean")
    if len(s):
        fig, ax = _figure()
        ax.plot(s, L, color=_TRAIN_COLOR, linewidth=1.6, label="mean (rollouts)")
        s_mx, mx = _series(recs, "response_length/max")
        if len(s_mx):
            ax.plot(s_mx, mx, color=_TRAIN_COLOR, linewidth=0.8, alpha=0.5, linestyle="--", label="max (rollouts)")
        s_e, e = _series(recs, "eval/response_length", train_only=False)
        if len(s_e):
            ax.plot(s_e, e, "o", color=_EVAL_COLOR, markersize=5, label="held-out eval (greedy)")
        _mark_warnings(ax, warns)
        ax.set(title=f"Response length — {name}", xlabel="step", ylabel="tokens")
        ax.set_ylim(bottom=0)
        s_f, fin = _series(recs, "finished_frac")
        if len(s_f):
            ax2 = ax.twinx()
            ax2.plot(s_f, fin, color="#2ca02c", linewidth=1.0, alpha=0.8, label="finished fraction (right)")
            ax2.set_ylim(-0.02, 1.02)
            ax2.set_ylabel("finished fraction")
            ax2.spines["top"].set_visible(False)
            h1, l1 = ax.get_legend_handles_labels()
            h2, l2 = ax2.get_legend_handles_labels()
            ax.legend(h1 + h2, l1 + l2, frameon=False, fontsize=9, loc="lower left")
        else:
            _legend(ax)
        paths.append(_save(fig, out / "response_length.png"))

    first, last = (_vector_row(recs, "reward_by_position/mean", last=b) for b in (False, True))
    if first is not None:
        fig, ax = _figure()
        profs = [(first, _START_COLOR, "first")] + ([(last, _END_COLOR, "last")] if last[0] != first[0] else [])
        arrays = []
        for (step, row), color, which in profs:
            prof = _by_position([row])
            _draw_position(ax, prof, color, f"step {step}")
            arrays += [prof["min"], prof["max"]]
        _symlog_if_wide(ax, *arrays)
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set(title=f"Token reward by position — {name}", xlabel="response token position", ylabel="reward")
        _legend(ax, outside=True)
        paths.append(_save(fig, out / "reward_by_position.png"))

    h0, h1 = _hist(recs, last=False), _hist(recs, last=True)
    if h0 is not None:
        fig, ax = _figure()
        hs = [(f"step {h0[0]}", h0[1], _START_COLOR)] + ([(f"step {h1[0]}", h1[1], _END_COLOR)] if h1[0] != h0[0]
                                                        else [])
        _draw_hist(ax, hs)
        ax.set(title=f"Token reward distribution — {name}", ylabel="fraction of tokens per bin (log)")
        _legend(ax, loc="upper left")
        paths.append(_save(fig, out / "reward_hist.png"))
    return paths


# ----------------------------------------------------------------------------------------------------------- compare


def accuracy_source(recs: dict[str, list[list[dict]]]) -> tuple[bool, set[str]]:
    """(plot held-out eval?, methods whose runs all evaluate) for the compare accuracy plot. Held-out curves when
    every run that evaluates has >= 3 points; methods without evals (e.g. compare's SFT baseline, evaluated only at
    the end) are then left out of that plot rather than forcing every method onto the noisy train curve."""
    n_eval = {m: [len(_series(r, "eval/accuracy", train_only=False)[0]) for r in rs] for m, rs in recs.items()}
    evaluated = {m for m, ns in n_eval.items() if ns and all(n > 0 for n in ns)}
    return bool(evaluated) and all(n >= 3 for m in evaluated for n in n_eval[m]), evaluated


def plot_compare(runs: Mapping[str, Sequence[str | os.PathLike]], out_dir: str | os.PathLike) -> dict[str, Path]:
    """Compare methods (each a list of run dirs, one per seed) in `out_dir`: accuracy.png (held-out eval when every
    evaluating run has >= 3 eval points — runs without evals are then left out —, else train accuracy as a moving
    average), grad_norm.png (log), response_length.png
    (mean line + min-max band over seeds), reward_hist.png (first vs last step, summed over seeds) and
    reward_by_position.png (last step). Returns {plot name: path} for the plots whose data exists."""
    out = Path(out_dir)
    recs = {m: [_records(r) for r in dirs] for m, dirs in runs.items()}
    colors = method_colors(list(recs))
    n_seeds = {m: len(v) for m, v in recs.items()}
    band = "mean over seeds; band = min–max"
    result: dict[str, Path] = {}

    def lbl(m: str) -> str:
        return f"{m} (n={n_seeds[m]})"

    use_eval, evaluated = accuracy_source(recs)
    acc = {}
    for m, rs in recs.items():
        if use_eval and m not in evaluated:
            continue
        if use_eval:
            acc[m] = _aggregate([_series(r, "eval/accuracy", train_only=False) for r in rs])
        else:
            ser = [_series(r, "train/accuracy") for r in rs]
            ser = [(s, _smooth(v, max(1, len(s) // 20))) for s, v in ser]
            acc[m] = _aggregate(ser)
    if any(a is not None for a in acc.values()):
        fig, ax = _figure()
        for m, a in acc.items():
            if a is not None:
                s, mean, lo, hi = a
                ax.fill_between(s, lo, hi, color=colors[m], alpha=0.18, linewidth=0)
                ax.plot(s, mean, "o-" if use_eval else "-", color=colors[m], linewidth=1.8, markersize=4,
                        label=lbl(m))
        what = "Held-out accuracy" if use_eval else "Train accuracy (moving average)"
        ax.set(title=f"{what} — {band}", xlabel="step", ylabel="accuracy", ylim=(-0.02, 1.02))
        _legend(ax)
        result["accuracy"] = _save(fig, out / "accuracy.png")

    for key, name, ylabel, log in (("grad_norm", "Gradient norm", "grad norm (log)", True),
                                   ("response_length/mean", "Response length", "mean tokens per response", False)):
        agg = {}
        for m, rs in recs.items():
            ser = [_series(r, key) for r in rs]
            if log:
                ser = [(s[v > 0], v[v > 0]) for s, v in ser]
            agg[m] = _aggregate(ser)
        if all(a is None for a in agg.values()):
            continue
        fig, ax = _figure()
        for m, a in agg.items():
            if a is not None:
                s, mean, lo, hi = a
                ax.fill_between(s, lo, hi, color=colors[m], alpha=0.18, linewidth=0)
                ax.plot(s, mean, color=colors[m], linewidth=1.5, label=lbl(m))
        if log:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.set(title=f"{name} — {band}", xlabel="step", ylabel=ylabel)
        _legend(ax)
        result["grad_norm" if log else "response_length"] = _save(fig, out / f"{key.split('/')[0]}.png")

    hists = {}
    for m, rs in recs.items():
        pairs = [(_hist(r, last=False), _hist(r, last=True)) for r in rs]
        pairs = [p for p in pairs if p[0] is not None]
        if pairs:
            hists[m] = (sum(p[0][1] for p in pairs), sum(p[1][1] for p in pairs),
                        min(p[0][0] for p in pairs), max(p[1][0] for p in pairs))
    if hists:
        fig, (ax0, ax1) = _figure(2)
        _draw_hist(ax0, [(m, h[0], colors[m]) for m, h in hists.items()])
        _draw_hist(ax1, [(m, h[1], colors[m]) for m, h in hists.items()])
        s0, s1 = min(h[2] for h in hists.values()), max(h[3] for h in hists.values())
        ax0.set(title=f"Token reward, start (step {s0})", ylabel="fraction of tokens per bin (seeds summed)")
        ax1.set(title=f"Token reward, end (step {s1})")
        ax1.tick_params(labelleft=True)
        _legend(ax0, loc="upper left")
        result["reward_hist"] = _save(fig, out / "reward_hist.png")

    profs = {}
    for m, rs in recs.items():
        rows = [got[1] for got in (_vector_row(r, "reward_by_position/mean", last=True) for r in rs) if got]
        prof = _by_position(rows) if rows else None
        if prof is not None:
            profs[m] = prof
    if profs:
        fig, ax = _figure()
        for m, prof in profs.items():
            _draw_position(ax, prof, colors[m], m, band_alpha=0.1)
        _symlog_if_wide(ax, *[p[k] for p in profs.values() for k in ("min", "max")])
        ax.axhline(0, color="black", linewidth=0.6)
        ax.set(title="Token reward by position, last step (seeds pooled)",
               xlabel="response token position", ylabel="reward")
        _legend(ax, outside=True)
        result["reward_by_position"] = _save(fig, out / "reward_by_position.png")
    return result


# ----------------------------------------------------------------------------------------------------------- CLI


def main(argv: Sequence[str] | None = None) -> int:
    """`opdkit plot <run_dir> [out=DIR]`: redraw the plots of a run (opdkit train or sft; finished, killed or still
    running) from its metrics.jsonl into run_dir/plots/ (or DIR). Bad input -> one line, exit code 2."""
    from opdkit.errors import UserError, run_cli

    def run(args: Sequence[str]) -> int:
        if any(a in ("-h", "--help") for a in args):
            print("usage: opdkit plot <run_dir> [out=DIR]\n\nredraws accuracy, loss, reward, grad_norm, "
                  "response_length, reward_by_position and reward_hist PNGs from run_dir/metrics.jsonl "
                  "(default: into run_dir/plots/)")
            return 0
        if not args or "=" in args[0]:
            raise UserError("opdkit plot needs a run dir first: opdkit plot <run_dir> [out=DIR]")
        run_dir, out_dir = Path(args[0]), None
        for a in args[1:]:
            key, sep, value = a.partition("=")
            if key != "out" or not sep or not value:
                raise UserError(f"unexpected argument {a!r}: opdkit plot takes <run_dir> and optionally out=DIR")
            out_dir = Path(value)
        metrics = run_dir / "metrics.jsonl" if run_dir.is_dir() else run_dir
        if not metrics.is_file():
            raise UserError(f"{run_dir}: no metrics.jsonl there; give the run_dir of an opdkit train or sft run")
        try:
            recs = read_metrics(metrics)
        except (OSError, UnicodeDecodeError, ValueError) as exc:
            raise UserError(f"{metrics}: cannot be read ({type(exc).__name__}: {exc})") from None
        from opdkit.paths import check_creatable

        check_creatable(out_dir if out_dir is not None else metrics.parent / PLOTS_DIR, "plots dir", "out")
        paths = plot_run(metrics.parent, out_dir) if recs else []
        if not paths:
            print(f"opdkit plot: {metrics} holds no plottable metrics yet ({len(recs)} records); nothing written")
            return 0
        print(f"opdkit plot: {len(paths)} plots in {paths[0].parent}: {', '.join(p.name for p in paths)}")
        return 0

    return run_cli(run, argv)
