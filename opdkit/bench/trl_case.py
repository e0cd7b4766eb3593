"""TRL's trainers on the identical work of a synthetic bench workload (models, tokenizer, prompts, batch,
max_new_tokens, beta, lr from opdkit.bench.workloads), one case per process (opdkit.bench.child).

- `distillation`: trl.DistillationTrainer (on-policy, generalized JSD with `beta`, chunked loss);
- `gkd`: trl.experimental.gkd.GKDTrainer with lmbda=1 (every step on-policy) and temperature 1.

Both: CPU, fp32 (bf16 off), no gradient checkpointing (opdkit's student does not checkpoint either), AdamW
betas (0.9, 0.999), constant learning rate, gradient clip 1.0, no logging or saving. A callback times each optimizer
step; the generation inside it is timed (and its tokens counted) by wrapping the trainer's generation method.
"""

from __future__ import annotations

import time
from pathlib import Path

TRAINERS = ("gkd", "distillation")


def trl_available() -> str | None:
    """TRL's version when importable here, else None."""
    try:
        import trl
    except Exception:  # noqa: BLE001 - any import failure means: not usable here
        return None
    return getattr(trl, "__version__", "?")


def _common(out_dir: str, steps: int, batch: int, lr: float, seed: int) -> dict:
    return dict(output_dir=out_dir, per_device_train_batch_size=batch, gradient_accumulation_steps=1,
                max_steps=steps, learning_rate=lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
                adam_beta1=0.9, adam_beta2=0.999, max_grad_norm=1.0, bf16=False, fp16=False, use_cpu=True,
                gradient_checkpointing=False, logging_steps=10**6, save_strategy="no", report_to=[],
                disable_tqdm=True, dataloader_num_workers=0, seed=seed)


def run_trl(spec: dict) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    files = Path(spec["files"])
    steps, batch, new_tokens = int(spec["steps"]), int(spec["batch"]), int(spec["new_tokens"])
    lr, beta = float(spec["lr"]), float(spec["beta"])
    tok = AutoTokenizer.from_pretrained(files / "student", padding_side="left")
    student = AutoModelForCausalLM.from_pretrained(files / "student", dtype=torch.float32)
    teacher = AutoModelForCausalLM.from_pretrained(files / "teacher", dtype=torch.float32).eval()
    prompts = [__import__("json").loads(x)["prompt"] for x in (files / "prompts.jsonl").read_text().splitlines()]
    gen_times: list[float] = []
    gen_tokens: list[int] = []
    step_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            step_times.append(time.perf_counter() - self.t0)

    def timed(fn, count):
        """`fn` timed, and the tokens it generated counted by `count(result)`."""
        def wrapper(*a, **kw):
            t0 = time.perf_counter()
            out = fn(*a, **kw)
            gen_times.append(time.perf_counter() - t0)
            gen_tokens.append(int(count(out)))
            return out
        return wrapper

    common = _common(spec["out_dir"], steps, batch, lr, int(spec.get("seed", 0)))
    if spec["trainer"] == "distillation":
        from trl import DistillationConfig, DistillationTrainer

        args = DistillationConfig(**common, beta=beta, temperature=1.0, top_k=0, top_p=1.0,
                                  max_completion_length=new_tokens, disable_dropout=True)
        trainer = DistillationTrainer(model=student, teacher_model=teacher, args=args,
                                      train_dataset=Dataset.from_dict({"prompt": prompts}), processing_class=tok,
                                      callbacks=[Timer()])
        # returns (prompt_ids, completion_ids: one list per row, cut after EOS, ...)
        trainer._generate = timed(trainer._generate, lambda out: sum(len(ids) for ids in out[1]))
    elif spec["trainer"] == "gkd":
        from trl.experimental.gkd import GKDConfig, GKDTrainer

        args = GKDConfig(**common, beta=beta, lmbda=1.0, temperature=1.0, max_new_tokens=new_tokens,
                         max_length=4096, disable_dropout=True)
        # chat rows: the tokenizer's template renders only the text, so the prompt tokens are the plain prompt's
        rows = [[{"role": "user", "content": p}, {"role": "assistant", "content": "w4"}] for p in prompts]
        trainer = GKDTrainer(model=student, teacher_model=teacher, args=args,
                             train_dataset=Dataset.from_dict({"messages": rows}), processing_class=tok,
                             callbacks=[Timer()])
        # returns (sequences, attention mask, labels: -100 outside the completion up to its EOS)
        trainer.generate_on_policy_outputs = timed(trainer.generate_on_policy_outputs,
                                                   lambda out: int((out[2] != -100).sum()))
    else:
        raise ValueError(f"unknown TRL trainer {spec['trainer']!r}; use one of {', '.join(TRAINERS)}")
    torch.set_num_threads(int(spec["threads"]))
    trainer.train()
    from opdkit.bench.child import vm_hwm_bytes

    hwm = vm_hwm_bytes()
    n = len(step_times)
    gens, toks = (gen_times[-n:], gen_tokens[-n:]) if len(gen_times) >= n else ([None] * n, [None] * n)
    out = [{"step": s, "generate": g, "tokens": k} for s, g, k in zip(step_times, gens, toks, strict=True)]
    return {"steps": out, "rss_train_bytes": hwm, "trl_version": trl_available()}
