"""The table, the opdkit/TRL ratio lines and the one-line summary of `opdkit bench`."""

from __future__ import annotations

import statistics

COLUMNS = ("case", "s/step", "generate", "score", "update", "gen tok/s", "update tok/s", "update GFLOP/s (% of peak)",
           "peak RSS", "threads", "load before/after")


def medians(res: dict) -> dict:
    """Median of each per-step figure; the first (warm-up) step is left out when there are two or more."""
    steps = res["steps"][1:] if len(res["steps"]) > 1 else res["steps"]
    keys = sorted({k for s in steps for k, v in s.items() if isinstance(v, (int, float))})
    return {k: statistics.median(s[k] for s in steps if s.get(k) is not None) for k in keys
            if any(s.get(k) is not None for s in steps)}


def table_header() -> str:
    return "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS)


def _gb(n: float | None) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


def _s(x: float | None) -> str:
    return "-" if x is None else f"{x:.3f}" if x < 1 else f"{x:.2f}"


def label(res: dict) -> str:
    side = "TRL " + res["variant"] if res["kind"] == "trl" else "opdkit " + res["variant"]
    return f"{res['workload']} {side} #{res['name'].rsplit('-', 1)[1]}"


def case_row(res: dict) -> str:
    if "error" in res:
        return f"| {label(res)} | failed: {res['error']} |"
    m = medians(res)
    flops = "-"
    if "flops_update" in m and m.get("update"):
        rate = m["flops_update"] / m["update"]
        flops = f"{rate / 1e9:.1f} ({100 * rate / res['peak']['peak']:.1f}% of {res['peak']['peak'] / 1e9:.0f})"
    tok = m.get("tokens")
    gen_tps = f"{tok / m['generate']:.0f}" if tok and m.get("generate") else "-"
    upd_tps = f"{tok / m['update']:.0f}" if tok and m.get("update") else "-"
    load = f"{res['load_before'][0]:.2f}/{res['load_after'][0]:.2f}"
    cells = (label(res), _s(m.get("step")), _s(m.get("generate")), _s(m.get("score")), _s(m.get("update")), gen_tps,
             upd_tps, flops, _gb(res.get("rss_bytes")), str(res["threads"]), load)
    return "| " + " | ".join(cells) + " |"


def _per(results: list[dict], workload: str, kind: str, variant: str) -> list[dict]:
    return [r for r in results if r["workload"] == workload and r["kind"] == kind and r["variant"] == variant
            and "error" not in r]


def comparisons(results: list[dict]) -> list[dict]:
    """For each workload with TRL cases: opdkit's full estimator (the identical work: JSD over the whole vocabulary)
    against each TRL trainer, as ratios of the medians over repeats of each run's median s/step, and of peak RSS."""
    out = []
    for w in dict.fromkeys(r["workload"] for r in results):
        mine = _per(results, w, "opdkit", "full")
        for t in dict.fromkeys(r["variant"] for r in results if r["workload"] == w and r["kind"] == "trl"):
            theirs = _per(results, w, "trl", t)
            if not mine or not theirs:
                continue
            s_o = statistics.median(medians(r)["step"] for r in mine)
            s_t = statistics.median(medians(r)["step"] for r in theirs)
            r_o = statistics.median(r["rss_bytes"] for r in mine)
            r_t = statistics.median(r["rss_bytes"] for r in theirs)
            out.append({"workload": w, "trainer": t, "opdkit_s": s_o, "trl_s": s_t, "s_ratio": s_o / s_t,
                        "opdkit_rss": r_o, "trl_rss": r_t, "rss_ratio": r_o / r_t, "runs": (len(mine), len(theirs))})
    return out


def ratio_lines(results: list[dict]) -> list[str]:
    lines = []
    for c in comparisons(results):
        lines.append(f"{c['workload']}: opdkit full / TRL {c['trainer']}: s/step {c['opdkit_s']:.3f} / "
                     f"{c['trl_s']:.3f} = {c['s_ratio']:.2f}x, peak RSS {_gb(c['opdkit_rss'])} / "
                     f"{_gb(c['trl_rss'])} = {c['rss_ratio']:.2f}x (medians of {c['runs'][0]} / {c['runs'][1]} runs)")
    return lines


def summary_line(results: list[dict], threads: int) -> str:
    """One line: per workload, each opdkit estimator's median s/step, and the ratio to the faster TRL trainer."""
    ok = [r for r in results if "error" not in r]
    parts = []
    for w in dict.fromkeys(r["workload"] for r in results):
        ests = dict.fromkeys(r["variant"] for r in ok if r["workload"] == w and r["kind"] == "opdkit")
        s = ", ".join(f"{e} {statistics.median(medians(r)['step'] for r in _per(ok, w, 'opdkit', e)):.3f}"
                      for e in ests)
        s = f"{w}: {s} s/step"
        cmp = [c for c in comparisons(results) if c["workload"] == w]
        if cmp:  # against the faster TRL trainer
            best = min(cmp, key=lambda c: c["trl_s"])
            s += (f"; full vs TRL {best['trainer']} {best['trl_s']:.3f}: {best['s_ratio']:.2f}x time, "
                  f"{best['rss_ratio']:.2f}x RSS")
        parts.append(s)
    failed = len(results) - len(ok)
    loads = [r["load_after"][0] for r in ok] or [0.0]
    return (f"opdkit bench: {' | '.join(parts) or 'no case ran'}; {threads} thread(s), load "
            f"{min(loads):.2f}-{max(loads):.2f}" + (f"; {failed} case(s) FAILED" if failed else ""))
