"""`opdkit <command> ...`: train | sft | eval | compare (each takes `[config.yaml] key=value ...`; `--help` lists
knobs) | bench [--workload ...] | plot <run_dir>."""

from __future__ import annotations

import sys

COMMANDS = {
    "train": ("opdkit.train.loop", "on-policy distillation of a student from a teacher (default: embedded models)"),
    "sft": ("opdkit.train.sft", "supervised fine-tuning on prompt/completion pairs (cold start; make a teacher)"),
    "eval": ("opdkit.eval.run", "avg@k / pass@k / response length of a model on a task or dataset"),
    "compare": ("opdkit.compare", "a grid of methods x seeds -> results table, plots, HTML report"),
    "bench": ("opdkit.bench.run", "time fixed OPD workloads per phase (generate / score / update), optionally side by "
                                  "side with TRL (docs/performance.md)"),
    "plot": ("opdkit.report.plots", "redraw the plots of a run dir (train or sft; also a killed run) from its "
                                    "metrics.jsonl"),
}


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        args = ["train"]  # the main job: distil the embedded default
    if args[0] in ("-h", "--help"):
        print("usage: opdkit {" + ",".join(COMMANDS) + "} [config.yaml] [key=value ...]\n")
        for name, (_, text) in COMMANDS.items():
            print(f"  {name:6s} {text}")
        return 0
    if args[0] not in COMMANDS:
        print(f"opdkit: error: unknown command {args[0]!r}; use one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    import importlib

    module = importlib.import_module(COMMANDS[args[0]][0])
    return int(module.main(args[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
