"""`opdkit bench`: fixed OPD workloads, timed per phase, each case in its own process, optionally side by side with
TRL's GKDTrainer / DistillationTrainer on identical work (docs/performance.md).

- `workloads`: the workloads (TRL's OPD workload at vocab 512 and 32000, the embedded default, the SmolLM2 presets,
  a tiny smoke case) and the models, tokenizer and prompts they are built from, in code;
- `flops`: the update's matmul FLOP count and this machine's measured fp32 matmul rate;
- `child`: one case in a subprocess (opdkit's trainer, or `trl_case` for TRL), results as JSON;
- `run`: the command line, the ABAB schedule, the table and the one-line summary.
"""
