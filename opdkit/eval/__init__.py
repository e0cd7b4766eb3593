"""Evaluation: pass@k / avg@k metrics and `opdkit eval` (greedy or sampled accuracy on held-out problems)."""

from opdkit.eval.metrics import avg_at_k, mean_pass_at_k, pass_at_k
from opdkit.eval.run import (
    EMBEDDED_DIR,
    EvalConfig,
    embedded_task_info,
    evaluate,
    load_eval_model,
    main,
    resolve_model_spec,
    resolve_task,
    run_eval,
    task_examples,
)

__all__ = [
    "EMBEDDED_DIR",
    "EvalConfig",
    "avg_at_k",
    "embedded_task_info",
    "evaluate",
    "load_eval_model",
    "main",
    "mean_pass_at_k",
    "pass_at_k",
    "resolve_model_spec",
    "resolve_task",
    "run_eval",
    "task_examples",
]
