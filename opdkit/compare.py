"""`opdkit compare`: a grid of methods x seeds, each a normal `opdkit train` (or `opdkit sft`) run, then a
paper-style table, plots and a self-contained HTML report.

CPU:    opdkit compare                      (the default grid on the embedded task; see docs/results.md)
        opdkit compare --quick              (a smaller grid: minutes)
        opdkit compare my_grid.yaml parallel=2 out_dir=runs/cmp
1 GPU / N GPUs: the same commands; each run uses the trainer's device settings (CPU in this version).

Grid YAML:
    base: [steps=60, rollout.prompts_per_step=16]      # overrides for every train run
    seeds: 3
    methods:
      - {name: vanilla, overrides: [objective.divergence=reverse_kl]}
      - {name: sft_teacher_samples, kind: sft, match: vanilla}   # off-policy SFT, equal teacher tokens
      - {name: sft_init, kind: none}                             # the starting student, not trained
    A method may add `sweep: {optim.lr: [1e-3, 3e-4, 1e-4]}`: seed 0 per value, the best on a validation split
    (held-out problems that are not the test problems) is chosen for every seed (compare_sweep.py).
Runs live in out_dir/runs/<method>/seed<k>/ and are resumable: a finished run (final/ exists) is reused, an
unfinished one continues with resume=true. Each run's eval result is cached in its eval.json.
"""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from opdkit.compare_sweep import (Sweep, candidate_dir, choose, describe, parse_sweep, read_choice, TEST_SEED,
                                  validation_examples)
from opdkit.config import h, load_config
from opdkit.config_help import help_text
from opdkit.errors import UserError, run_cli

KINDS = ("train", "sft", "none")
# Student-t 97.5% quantiles for a 95% CI of a mean over n seeds (df = n - 1).
_T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def default_grid(quick: bool) -> dict:
    """The seeds' methods (OPD+, PowerOPD, full-vocab, top-K, SFT baselines) on the embedded task.

    Every method shares one budget (300 steps x 32 rollouts at temperature 1, AdamW lr 1e-3 with the trainer's
    cosine schedule) so the table compares objectives, not tuning; `sampled` methods name their
    estimator because the trainer's default is the full-vocabulary one. The quick grid: 4 methods, 120 steps."""
    sampled = ["objective.estimator=sampled"]
    m = [
        ("vanilla", sampled),
        ("opd+_rkl", sampled + ["objective.gradient=corrected"]),
        ("opd+_fkl", sampled + ["objective.divergence=forward_kl", "objective.gradient=corrected"]),
        ("opd+_jsd", sampled + ["objective.divergence=jsd", "objective.gradient=corrected"]),
        ("stopgrad_fkl", sampled + ["objective.divergence=forward_kl"]),
        ("stopgrad_jsd", sampled + ["objective.divergence=jsd"]),
        ("full_rkl", ["objective.estimator=full"]),
        ("topk_rkl", ["objective.estimator=topk", "objective.top_k=4"]),
        ("power_a0.5", sampled + ["objective.reward=power", "objective.power_a=0.5"]),
        ("power_a1", sampled + ["objective.reward=power", "objective.power_a=1"]),
        ("power_a5", sampled + ["objective.reward=power", "objective.power_a=5"]),
        ("clip", sampled + ["objective.transform=clip"]),
        ("tanh", sampled + ["objective.transform=tanh"]),
        ("zscore", sampled + ["objective.transform=zscore"]),
    ]
    if quick:
        keep = {"vanilla", "full_rkl", "power_a1", "stopgrad_fkl"}
        m = [x for x in m if x[0] in keep]
    methods = [{"name": n, "overrides": o} for n, o in m]
    # The off-policy baseline gets its own learning-rate sweep, chosen on validation problems (issue #15: at the
    # OPD lr it fell from 42.4 to 13.1 avg@4, below its own start).
    methods.append({"name": "sft_teacher_samples", "kind": "sft", "match": "vanilla",
                    "sweep": {"optim.lr": [1e-3, 3e-4, 1e-4]}})
    methods.append({"name": "sft_init", "kind": "none"})
    base = ["rollout.prompts_per_step=32", "rollout.temperature=1.0", "optim.lr=1e-3",
            f"steps={120 if quick else 300}", f"eval_every={40 if quick else 100}", "data.eval_prompts=200",
            "save_every=100",
            # the failure detector warns but does not act: its lr backoff would change the method under test (it
            # halved the stop-gradient runs' lr and stopped them), and the grid compares objectives as configured
            "diagnostics.backoff_factor=1",
            # fp32 teacher on every machine, so the table in docs/results.md is what this grid gives anywhere
            "model.teacher_dtype=float32"]
    return {"base": base, "seeds": 3, "methods": methods}


@dataclass
class CompareConfig:
    """opdkit compare: methods x seeds -> results.md/.csv, plots, report.html."""

    grid: str | None = h("grid YAML (base, seeds, methods); default: the built-in grid", default=None)
    quick: bool = h("use the small built-in grid (ignored when grid is given)", default=False)
    out_dir: str = h("output directory", default="runs/compare")
    seeds: int | None = h("number of seeds (overrides the grid's)", default=None)
    steps: int | None = h("training steps of every train run (overrides the grid's base)", default=None)
    parallel: int = h("runs in parallel (processes); each uses `threads` torch threads", default=2)
    threads: int = h("torch threads per run", default=1)
    eval_n: int = h("held-out problems per evaluation", default=200)
    eval_k: int = h("samples per problem for avg@k / pass@k", default=4)
    eval_temperature: float = h("sampling temperature for avg@k / pass@k", default=1.0)
    teacher_cache: bool = h("one teacher-score cache (teacher.cache_dir) in out_dir/teacher_cache shared by every "
                            "train run of the grid: rows scored before are reused (hit rates in results.md)",
                            default=False)

    def __post_init__(self) -> None:
        for name in ("parallel", "threads", "eval_n", "eval_k"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"compare.{name}={v!r} must be an integer >= 1")
        for name in ("seeds", "steps"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise ValueError(f"compare.{name}={v!r} must be an integer >= 1")


@dataclass
class Method:
    name: str
    kind: str = "train"
    overrides: list[str] = field(default_factory=list)
    match: str | None = None  # sft: match this train method's teacher tokens
    sweep: Sweep | None = None  # tuned on validation problems with seed 0 (compare_sweep.py)


def load_grid(cfg: CompareConfig) -> tuple[list[str], int, list[Method]]:
    if cfg.grid is None:
        grid = default_grid(cfg.quick)
    else:
        p = Path(cfg.grid)
        if not p.is_file():
            raise UserError(f"grid file not found: {p}")
        try:
            grid = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"grid file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
    if not isinstance(grid, dict) or not isinstance(grid.get("methods"), list) or not grid["methods"]:
        raise UserError(f"grid {cfg.grid}: needs a non-empty `methods` list")
    methods = []
    for i, m in enumerate(grid["methods"]):
        if not isinstance(m, dict) or "name" not in m:
            raise UserError(f"grid {cfg.grid}: methods[{i}] needs a name")
        unknown = set(m) - {"name", "kind", "overrides", "match", "sweep"}
        if unknown:
            raise UserError(f"grid {cfg.grid}: methods[{i}] has unknown keys {sorted(unknown)} "
                            f"(allowed: name, kind, overrides, match, sweep)")
        meth = Method(str(m["name"]), m.get("kind", "train"), [str(x) for x in m.get("overrides", [])], m.get("match"),
                      parse_sweep(m.get("sweep"), f"grid {cfg.grid or '(built-in)'}: methods[{i}]"))
        if meth.kind not in KINDS:
            raise UserError(f"grid {cfg.grid}: methods[{i}].kind={meth.kind!r} is not one of {', '.join(KINDS)}")
        if meth.sweep is not None and meth.kind == "none":
            raise UserError(f"grid {cfg.grid}: methods[{i}] ({meth.name}) is kind none: it has nothing to sweep")
        methods.append(meth)
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise UserError(f"grid {cfg.grid}: method names must be unique")
    for m in methods:
        if m.kind == "sft" and m.match not in names:
            raise UserError(f"grid {cfg.grid}: sft method {m.name!r} needs `match:` naming a train method")
    base = [str(x) for x in grid.get("base", [])]
    if cfg.steps is not None:
        base.append(f"steps={cfg.steps}")
    if cfg.teacher_cache:
        base.append(f"teacher.cache_dir={Path(cfg.out_dir) / 'teacher_cache'}")
    seeds = cfg.seeds or int(grid.get("seeds", 3))
    return base, seeds, methods


# ------------------------------------------------------------------------------------------------ running
def _run_dir(out: Path, m: Method, seed: int, value=None) -> Path:
    """A run's directory; a swept method's runs live under sweep/<knob>=<value>/ (the chosen value by default)."""
    if m.sweep is None:
        return out / "runs" / m.name / f"seed{seed}"
    if value is None:
        choice = read_choice(out, m.name)
        if choice is None:
            raise UserError(f"compare: {m.name!r} has no chosen sweep value yet")
        value = choice["value"]
    return candidate_dir(out, m.name, m.sweep, value, seed)


def _launch(cmd: list[str], log: Path, threads: int) -> int:
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    with open(log, "a") as fh:
        shown = ["opdkit", *cmd[3:]] if cmd[1:2] == ["-c"] else cmd  # the launcher's code is not worth a log line
        fh.write(f"$ {' '.join(shown)}\n")
        fh.flush()
        return subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)


# The child runs start with this launcher rather than `python -m opdkit.cli`: `-m` (and `-c`) put the working
# directory first on the import path, so a `yaml.py` (or `torch.py`, ...) there would be imported instead of the
# installed package. The launcher drops that entry before importing anything else (Python 3.10 has no -P), keeps
# PYTHONPATH (the user's explicit choice), and appends the directory of the opdkit that runs `compare` only when
# opdkit is not importable otherwise (a source checkout): appended last, it cannot shadow an installed package.
_LAUNCHER = (
    "import sys\n"
    "if sys.path and sys.path[0] == '':\n"
    "    del sys.path[0]\n"
    "import importlib.util\n"
    "if importlib.util.find_spec('opdkit') is None:\n"
    "    sys.path.append({root!r})\n"
    "from opdkit.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)


def opdkit_command() -> list[str]:
    """The command prefix that runs `opdkit` in a child process with only the installed packages importable (plus
    PYTHONPATH, and the code an explicitly configured `py:` checker names); see `_LAUNCHER`."""
    root = str(Path(__file__).resolve().parent.parent)
    return [sys.executable, "-c", _LAUNCHER.format(root=root)]


def _swept(m: Method, value) -> list[str]:
    return [] if m.sweep is None or value is None else [m.sweep.label(value)]


def _train_cmd(cfg: CompareConfig, base: list[str], m: Method, seed: int, run_dir: Path, value=None) -> list[str]:
    resume = ["resume=true"] if (run_dir / "config.yaml").exists() else []
    return [*opdkit_command(), "train", *base, *m.overrides, *_swept(m, value), f"seed={seed}", f"run_dir={run_dir}",
            "progress=false", *resume, f"threads={cfg.threads}"]


def run_teacher_tokens(run_dir: Path) -> int:
    from opdkit.metrics_log import read_metrics

    rows = [r for r in read_metrics(run_dir) if "teacher_tokens" in r]
    return int(rows[-1]["teacher_tokens"]) if rows else 0


def _sft_cmd(cfg: CompareConfig, m: Method, seed: int, run_dir: Path, budget: int, train_cfg,
             value=None) -> list[str]:
    """Off-policy SFT of the same student on teacher samples, stopped at the teacher-token budget the matched OPD
    method used (a teacher forward per token generated vs one per token scored: equal teacher compute)."""
    resume = ["resume=true"] if (run_dir / "config.yaml").exists() else []
    task = train_cfg.data.prompts.split(":", 1)[1] if train_cfg.data.prompts.startswith("task:") else None
    if task is None:
        raise UserError("compare: the sft baseline needs a built-in task (data.prompts=task:...)")
    return [*opdkit_command(), "sft", f"model.init={train_cfg.model.student}",
            f"data.samples_from={train_cfg.teacher.model}", f"data.task={task}",
            f"data.batch_size={train_cfg.rollout.prompts_per_step * train_cfg.rollout.n_samples}",
            f"data.max_new_tokens={train_cfg.rollout.max_new_tokens}", f"optim.lr={train_cfg.optim.lr}",
            f"max_teacher_tokens={budget}", "steps=100000", f"seed={seed}", f"run_dir={run_dir}",
            "data.eval_prompts=0", "progress=false", *resume, f"threads={cfg.threads}", *m.overrides, *_swept(m, value)]


def run_grid(cfg: CompareConfig) -> dict:
    from opdkit.train.config import TrainConfig
    from opdkit.train.sft import SFTConfig

    base, seeds, methods = load_grid(cfg)
    out = Path(cfg.out_dir)
    # Validate every train method's config (and every swept value) before launching anything (bad input: one
    # line, nothing written).
    train_cfgs = {m.name: load_config(TrainConfig, None, base + m.overrides) for m in methods if m.kind == "train"}
    for m in methods:
        for v in (m.sweep.values if m.sweep else ()):
            if m.kind == "train":
                load_config(TrainConfig, None, base + m.overrides + _swept(m, v))
            else:
                load_config(SFTConfig, None, m.overrides + _swept(m, v))
    ref_cfg = next(iter(train_cfgs.values())) if train_cfgs else load_config(TrainConfig, None, base)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    def job(m: Method, seed: int, value=None) -> None:
        if m.sweep is not None and value is None:  # the remaining seeds of a swept method: the chosen value
            value = read_choice(out, m.name)["value"]
        rd = _run_dir(out, m, seed, value)
        if (rd / "final").is_dir() or m.kind == "none":
            return
        if m.kind == "train":
            cmd = _train_cmd(cfg, base, m, seed, rd, value)
        else:
            match = next(x for x in methods if x.name == m.match)
            budget = run_teacher_tokens(_run_dir(out, match, seed))
            cmd = _sft_cmd(cfg, m, seed, rd, budget, train_cfgs[m.match], value)
        tag = f"{m.name}_seed{seed}" + ("" if value is None else f"_{m.sweep.label(value)}")
        code = _launch(cmd, out / "logs" / f"{tag}.log", cfg.threads)
        if code != 0:
            print(f"opdkit compare: {tag} failed (exit {code}); see {out}/logs/{tag}.log", file=sys.stderr, flush=True)

    def stage(kinds: tuple[str, ...], pool) -> None:
        """Plain methods: every seed. Swept methods: seed 0 per value, the choice on validation, then the rest."""
        ms = [m for m in methods if m.kind in kinds]
        first = [(m, s, None) for m in ms if m.sweep is None for s in range(seeds)]
        first += [(m, 0, v) for m in ms if m.sweep is not None and read_choice(out, m.name) is None
                  for v in m.sweep.values]
        list(pool.map(lambda a: job(*a), first))
        for m in ms:
            if m.sweep is not None and read_choice(out, m.name) is None:
                choose(out, m.name, m.sweep, validation_scores(cfg, out, m, ref_cfg, pool))
        list(pool.map(lambda a: job(*a), [(m, s, None) for m in ms if m.sweep is not None for s in range(seeds)]))

    with ThreadPoolExecutor(max_workers=cfg.parallel) as pool:  # train runs first: sft matches their budgets
        stage(("train",), pool)
        stage(("sft", "none"), pool)
    train_seconds = time.time() - t0
    results = evaluate_grid(cfg, out, methods, seeds, ref_cfg)
    write_outputs(cfg, out, methods, seeds, results, train_seconds, time.time() - t0)
    return results


# ------------------------------------------------------------------------------------------------ evaluation
def _evaluate_run(cfg: CompareConfig, model_dir: str, ref_cfg, cache: Path, seed: int,
                  split: str = "test") -> dict:
    """avg@k / pass@k of one model on the test problems (the table) or the validation problems (sweeps)."""
    if cache.is_file():
        return json.loads(cache.read_text())
    import torch

    from opdkit.eval.run import evaluate, load_eval_model, resolve_task, task_examples

    torch.set_num_threads(cfg.threads)
    prompts = ref_cfg.data.prompts
    if not prompts.startswith("task:"):
        raise UserError("compare evaluates on a built-in task: set data.prompts=task:<name> in the grid's base")
    task, max_new = resolve_task(prompts.split(":", 1)[1])
    model, tok = load_eval_model(model_dir)
    examples = (task_examples(task, "heldout", cfg.eval_n, seed=TEST_SEED) if split == "test"
                else validation_examples(task, cfg.eval_n))
    res = evaluate(model, tok, examples, task, k=cfg.eval_k, temperature=cfg.eval_temperature,
                   max_new_tokens=max_new, seed=seed, keep_records=False)
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(res))
    return res


def validation_scores(cfg: CompareConfig, out: Path, m: Method, ref_cfg, pool) -> dict:
    """{str(value): validation avg@k} of a swept method's seed-0 runs (failed runs left out)."""
    def one(v):
        rd = _run_dir(out, m, 0, v)
        if not (rd / "final").is_dir():
            return str(v), None
        return str(v), _evaluate_run(cfg, str(rd / "final"), ref_cfg, rd / "validation.json", 0, "validation")["avg@k"]

    return {v: a for v, a in pool.map(one, m.sweep.values) if a is not None}


def evaluate_grid(cfg: CompareConfig, out: Path, methods: list[Method], seeds: int, ref_cfg) -> dict:
    from opdkit.metrics_log import read_metrics

    results: dict = {}
    jobs = []
    for m in methods:
        for s in range(seeds):
            rd = _run_dir(out, m, s)
            model = ref_cfg.model.student if m.kind == "none" else str(rd / "final")
            if m.kind != "none" and not (rd / "final").is_dir():
                continue  # failed run: reported in the table as missing
            jobs.append((m, s, rd, model))

    def one(args):
        m, s, rd, model = args
        res = _evaluate_run(cfg, model, ref_cfg, rd / "eval.json", s)
        rows = read_metrics(rd) if (rd / "metrics.jsonl").exists() else []
        steps = [r for r in rows if "grad_norm" in r]
        return m.name, s, {
            "avg@k": res["avg@k"], "pass@k": res["pass@k"], "length": res["mean_response_tokens"],
            "grad_norm_final": steps[-1]["grad_norm"] if steps else float("nan"),
            "grad_norm_max": max((r["grad_norm"] for r in steps), default=float("nan")),
            # training seconds: the trainer logs time/step, sft step_seconds (evals not counted)
            "wall_s": sum(r.get("time/step", r.get("step_seconds", 0.0)) for r in rows),
            "teacher_tokens": (steps[-1].get("teacher_tokens", 0) if steps else
                               (run_teacher_tokens(rd) if rows else 0)),
            "cache_hit_rate": _hit_rate(steps),
            "run_dir": str(rd),
        }

    with ThreadPoolExecutor(max_workers=cfg.parallel) as pool:
        for name, s, r in pool.map(one, jobs):
            results.setdefault(name, {})[s] = r
    return results


def _hit_rate(steps: list[dict]) -> float:
    """Fraction of the rows a run's teacher-score cache served (nan without a cache)."""
    hits = sum(r.get("teacher/cache_hits", 0) for r in steps)
    total = hits + sum(r.get("teacher/cache_misses", 0) for r in steps)
    return hits / total if total else float("nan")


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95% Student-t confidence interval (0 for a single value)."""
    vals = [v for v in values if v == v]
    if not vals:
        return float("nan"), float("nan")
    if len(vals) == 1:
        return vals[0], 0.0
    t = _T975.get(len(vals) - 1, 1.96)
    return statistics.fmean(vals), t * statistics.stdev(vals) / math.sqrt(len(vals))


def missing_runs(out: Path, methods: list[Method], seeds: int, results: dict) -> list[str]:
    """One line per trained run that has no final model, with the error its log ended on (e.g. the failure
    detector stopping a run whose responses kept running away)."""
    lines = []
    for m in methods:
        for s in range(seeds):
            if m.kind == "none" or s in results.get(m.name, {}):
                continue
            logs = sorted((out / "logs").glob(f"{m.name}_seed{s}*.log"), key=lambda f: f.stat().st_mtime)
            err = [ln for ln in logs[-1].read_text().splitlines() if ln.startswith("opdkit: error:")] if logs else []
            why = err[-1][len("opdkit: error: "):] if err else "no error line in its log"
            lines.append(f"- {m.name} seed {s}: {why}" + (f" (logs/{logs[-1].name})" if logs else ""))
    return lines


def write_outputs(cfg: CompareConfig, out: Path, methods: list[Method], seeds: int, results: dict,
                  train_s: float, total_s: float) -> None:
    from opdkit.report.html import markdown_table, write_html
    from opdkit.report.plots import plot_compare

    k = cfg.eval_k
    header = ["method", f"avg@{k}", f"pass@{k}", "length", "grad norm (final)", "grad norm (max)", "train s/run",
              "teacher tokens", "seeds"] + (["teacher cache hits"] if cfg.teacher_cache else [])
    rows, csv_rows = [], []
    for m in methods:
        per = results.get(m.name, {})
        col = {key: [r[key] for r in per.values()] for key in ("avg@k", "pass@k", "length", "grad_norm_final",
                                                              "grad_norm_max", "wall_s", "teacher_tokens",
                                                              "cache_hit_rate")}
        (a, ai), (p, pi) = mean_ci(col["avg@k"]), mean_ci(col["pass@k"])
        fmt = lambda x: "-" if x != x else f"{x:.3g}"  # noqa: E731
        choice = read_choice(out, m.name) if m.sweep is not None else None
        shown = m.name if choice is None else f"{m.name} ({choice['key']}={choice['value']})"
        pct = lambda x, half: "-" if x != x else f"{100 * x:.1f} ± {100 * half:.1f}"  # noqa: E731
        rows.append([shown, pct(a, ai), pct(p, pi),
                     fmt(mean_ci(col["length"])[0]), fmt(mean_ci(col["grad_norm_final"])[0]),
                     fmt(mean_ci(col["grad_norm_max"])[0]), fmt(mean_ci(col["wall_s"])[0]),
                     fmt(mean_ci(col["teacher_tokens"])[0]), f"{len(per)}/{seeds}"]
                    + ([f"{100 * mean_ci(col['cache_hit_rate'])[0]:.1f}%"] if cfg.teacher_cache else []))
        for s, r in sorted(per.items()):
            csv_rows.append({"method": m.name, "seed": s, **{kk: v for kk, v in r.items()}})
    table = markdown_table(header, rows)
    cmd = ("opdkit compare " + " ".join(a for a in sys.argv[2:])).strip() if len(sys.argv) > 1 else "opdkit compare"
    note = (f"{len(methods)} methods x {seeds} seeds; eval: {cfg.eval_n} held-out problems, k={k}, temperature "
            f"{cfg.eval_temperature}; mean ± 95% CI over seeds. This invocation: training wall time "
            f"{train_s / 60:.1f} min, total {total_s / 60:.1f} min (parallel={cfg.parallel}, threads/run="
            f"{cfg.threads}; finished runs and cached evals are reused, not re-timed).")
    sweeps = [f"- {m.name}: {describe(read_choice(out, m.name), k)}" for m in methods if m.sweep is not None]
    if sweeps:
        note += (" Swept methods ran seed 0 once per value; the value with the best validation avg@k (held-out "
                 "problems that are not the test problems) was used for every seed.")
    sweep_md = ("\n\nSweeps (validation split):\n\n" + "\n".join(sweeps)) if sweeps else ""
    missing = missing_runs(out, methods, seeds, results)
    missing_md = ("\n\nRuns without a final model (left out of their row):\n\n" + "\n".join(missing)
                  if missing else "")
    (out / "results.md").write_text(f"# opdkit compare\n\n`{cmd}`\n\n{note}{sweep_md}\n\n{table}{missing_md}\n")
    with open(out / "results.csv", "w", newline="") as fh:
        fields = ["method", "seed", "avg@k", "pass@k", "length", "grad_norm_final", "grad_norm_max", "wall_s",
                  "teacher_tokens", "cache_hit_rate", "run_dir"]
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(csv_rows)
    runs = {m.name: [r["run_dir"] for r in results.get(m.name, {}).values()] for m in methods if m.kind != "none"}
    images = plot_compare({k2: v for k2, v in runs.items() if v}, out / "plots")
    write_html(out / "report.html", "opdkit compare", [("Setup", note), ("Command", f"<code>{cmd}</code>")]
               + ([("Sweeps", "\n".join(sweeps))] if sweeps else []), images,
               [("Results", header, rows)])
    print(table)
    print(f"\nwrote {out}/results.md, results.csv, plots/, report.html")


def main(argv: list[str]) -> int:
    def run(args: list[str]) -> int:
        if any(a in ("-h", "--help") for a in args):
            print("usage: opdkit compare [grid.yaml] [--quick] [key=value ...]\n")
            print(help_text(CompareConfig))
            return 0
        args = ["quick=true" if a == "--quick" else a for a in args]
        grid = args[0] if args and "=" not in args[0] else None
        over = args[1:] if grid else args
        cfg = load_config(CompareConfig, None, over + ([f"grid={grid}"] if grid else []))
        from opdkit.eval.run import quiet_transformers

        quiet_transformers()
        run_grid(cfg)
        return 0

    return run_cli(run, argv)
