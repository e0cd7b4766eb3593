"""`TrainConfig`: every knob of `opdkit train`, one typed section per concern, validated on construction.

`opdkit train --help` and the README's knob table are generated from these help strings.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from opdkit.config import h
from opdkit.diagnostics import DetectorConfig
from opdkit.objectives.config import ObjectiveConfig
from opdkit.validate import choice, in_range, pos_int

EMBEDDED_STUDENT = "embedded:student"
EMBEDDED_TEACHER = "embedded:teacher"
DTYPES = ("auto", "float32", "bfloat16", "float64")
TEACHER_BACKENDS = ("hf", "self", "self_live", "server")


@dataclass
class ModelConfig:
    student: str = h("student: HF model dir, a .gguf file, a model config .json/.yaml (random init), or "
                     "embedded:student", default=EMBEDDED_STUDENT)
    teacher: str | None = h("shorthand for teacher.model, or self / self_live for teacher.backend (kept for "
                            "existing configs and presets)", default=None)
    teacher_dtype: str | None = h("shorthand for teacher.dtype", default=None)
    tokenizer: str | None = h("tokenizer dir (needed when the student is built from a config; default: the "
                              "student's own)", default=None)
    dtype: str = h("weights dtype for the student's master copy: float32, bfloat16 or float64 (exactness tests)",
                   default="float32")
    trust_remote_code: bool = h("allow model code from the checkpoint dir (off: only transformers' own classes)",
                                default=False)
    gguf_cache_dir: str | None = h("where dequantised copies of .gguf models are cached (default "
                                   "~/.cache/opdkit/gguf)", default=None)
    lora_r: int = h("LoRA rank for the student (0 = full fine-tuning)", default=0)
    lora_alpha: float = h("LoRA alpha", default=16.0)
    lora_dropout: float = h("LoRA dropout", default=0.0)
    lora_target_modules: list[str] = h("LoRA target module names", default_factory=lambda: ["q_proj", "v_proj"])

    def __post_init__(self) -> None:
        choice("model", "dtype", self.dtype, ("float32", "bfloat16", "float64"))
        if self.teacher_dtype is not None:
            choice("model", "teacher_dtype", self.teacher_dtype, DTYPES)
        pos_int("model", "lora_r", self.lora_r, allow_zero=True)
        in_range("model", "lora_dropout", self.lora_dropout, 0.0, 1.0, hi_open=True)
        if not self.student:
            raise ValueError("model.student is empty: give a model dir, .gguf file, config file or embedded:student")


@dataclass
class DataConfig:
    prompts: str = h("prompt source: task:<name> (built-in task, train split; task:a+b mixes tasks equally), a "
                     ".jsonl file, or a datasets dir "
                     "saved with save_to_disk (alias: data.jsonl, opdkit sft's name)", default="task:embedded")
    prompt_field: str = h("JSONL/dataset field with the prompt text", default="prompt")
    messages_field: str | None = h("field with chat messages (list of {role, content}) instead of prompt_field",
                                   default=None)
    answer_field: str | None = h("field with the reference answer (for task rewards and eval)", default="answer")
    completion_field: str | None = h("field with a reference response (GKD off-policy data, lambda < 1)",
                                     default=None)
    route_field: str | None = h("JSONL/dataset field whose value picks the prompt's teacher in teacher.routes "
                                "(built-in tasks: the task name)", default=None)
    privileged_field: str | None = h("field with privileged context for a self-teacher (OPSD), e.g. the reference "
                                     "solution (default: the answer field)", default=None)
    checker: str = h("answer checker for user datasets: math_verify, marker:<TEXT>, marker (= marker:=>, no shell "
                     "character to quote), py:<module>:<function> or py:<file.py>:<function> (imports and runs that "
                     "code; docs/tasks.md); checked on the reference completions before any compute",
                     default="marker:=>")
    use_chat_template: bool | None = h("apply the tokenizer's chat template (default: when it has one)", default=None)
    max_prompt_tokens: int = h("prompts longer than this are reported and handled by on_too_long", default=256)
    on_too_long: str = h("skip or truncate (left) over-long prompts", default="skip")
    eval_prompts: int = h("held-out prompts used by the in-training evaluation (built-in tasks: the held-out split; "
                          "datasets: the held-out split of data.prompts, or the first rows of data.eval_jsonl)",
                          default=500)
    eval_jsonl: str | None = h("datasets: a separate held-out JSONL / save_to_disk dir (prompt + answer fields) for "
                               "the in-training evaluation, as `opdkit sft data.eval_jsonl` and `opdkit eval data` "
                               "use; then every row of data.prompts trains (no hash split)", default=None)

    def __post_init__(self) -> None:
        choice("data", "on_too_long", self.on_too_long, ("skip", "truncate"))
        pos_int("data", "max_prompt_tokens", self.max_prompt_tokens)
        pos_int("data", "eval_prompts", self.eval_prompts, allow_zero=True)
        if self.eval_jsonl is not None:
            if self.prompts.startswith("task:"):
                raise ValueError(f"data.eval_jsonl is for datasets: data.prompts={self.prompts} is a built-in task, "
                                 "evaluated on its own held-out split")
            if not self.eval_jsonl:
                raise ValueError("data.eval_jsonl is empty: give a JSONL file or null")


@dataclass
class VLLMRolloutConfig:
    """rollout.backend=vllm: the engine that samples the student's responses (docs/rollouts.md)."""

    mode: str = h("server (a vllm serve process: launched by opdkit on 127.0.0.1 unless url is given) or colocate "
                  "(vllm.LLM in this process; needs vllm importable here)", default="server")
    url: str | None = h("a running rollout server (started with opdkit's worker extension, see docs/rollouts.md)",
                        default=None)
    python: str = h("server launch: the Python with vllm installed (scripts/setup_vllm.sh)",
                    default=".venv-vllm/bin/python")
    dtype: str = h("engine dtype: float32 or bfloat16", default="float32")
    max_model_len: int | None = h("engine context length (default: data.max_prompt_tokens + rollout.max_new_tokens)",
                                  default=None)
    kv_cache_gib: int = h("server launch on CPU: VLLM_CPU_KVCACHE_SPACE in GiB", default=1)
    gpu_memory_utilization: float = h("colocate on a GPU: the engine's share of GPU memory (the trainer keeps "
                                      "the rest)", default=0.3)
    launch_args: list[str] = h("server launch: extra vllm serve arguments", default_factory=list)
    startup_timeout_s: float = h("server launch: seconds to wait for the engine", default=600.0)
    timeout_s: float = h("seconds per generation request before it is retried", default=300.0)
    retries: int = h("retries per request (exponential backoff) before the run stops", default=2)
    concurrency: int = h("requests in flight at once", default=4)
    rows_per_request: int = h("prompts per /v1/completions request", default=16)

    def __post_init__(self) -> None:
        choice("vllm", "mode", self.mode, ("server", "colocate"))
        choice("vllm", "dtype", self.dtype, ("float32", "bfloat16"))
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"vllm.url={self.url!r} must start with http:// or https://")
        if self.url is not None and self.mode == "colocate":
            raise ValueError("vllm.url is a server: it excludes vllm.mode=colocate")
        if self.max_model_len is not None:
            pos_int("vllm", "max_model_len", self.max_model_len)
        pos_int("vllm", "kv_cache_gib", self.kv_cache_gib)
        in_range("vllm", "gpu_memory_utilization", self.gpu_memory_utilization, 0.0, 1.0, lo_open=True)
        in_range("vllm", "startup_timeout_s", self.startup_timeout_s, 0.0, 1e6, lo_open=True)
        in_range("vllm", "timeout_s", self.timeout_s, 0.0, 1e6, lo_open=True)
        pos_int("vllm", "retries", self.retries, allow_zero=True)
        pos_int("vllm", "concurrency", self.concurrency)
        pos_int("vllm", "rows_per_request", self.rows_per_request)


@dataclass
class RolloutConfig:
    prompts_per_step: int = h("prompts sampled per step", default=32)
    n_samples: int = h("responses sampled per prompt", default=1)
    max_new_tokens: int = h("response length limit (tokens)", default=100)
    temperature: float | None = h(
        "sampling temperature; default (null): 0.7 for the dense estimators (full/topk: the samples only choose the "
        "prefixes at which the exact divergence is taken; on the embedded default (900 steps) 0.7 gained +22.4 pts "
        "over 3 seeds vs +20.3 at 1.0, docs/embedded.md), 1.0 for sampled (its policy-gradient estimators assume y ~ pi_S)",
        default=None)
    top_p: float = h("nucleus sampling (1.0 = off); Revisiting OPD uses top-p rollouts", default=1.0)
    top_k: int = h("top-k sampling (0 = off)", default=0)
    sampler: str = h("inverse_cdf (fast) or multinomial (torch.multinomial)", default="inverse_cdf")
    masked_tokens: list[str] = h("special tokens excluded from the loss (e.g. <think>)", default_factory=list)
    gkd_lambda: float = h("GKD lambda: probability that a step uses student rollouts; otherwise the dataset's "
                          "responses (data.completion_field)", default=1.0)
    backend: str = h("hf (the student's own KV-cached decode loop, in this process) or vllm (a vLLM engine that "
                     "receives the weights, see rollout.vllm)", default="hf")
    weight_sync_steps: int = h("vllm: push the student's weights to the engine every N optimizer steps (rows then "
                               "carry the version that sampled them)", default=1)
    max_staleness: int | None = h("asynchronous OPD: generate up to this many steps ahead while the trainer "
                                  "updates (0 = the async path with no overlap, identical to synchronous); rows "
                                  "older than this are dropped, stale rows are importance-weighted; null = "
                                  "synchronous", default=None)
    is_truncation: float = h("stale rows: per-token importance weight pi_theta / pi_behaviour truncated at this "
                             "(truncated IS, Espeholt et al. 2018; Yao et al. 2025 use 2)", default=2.0)
    seed_per_prompt: bool = h("seed every row's sampling by (step, prompt, sample) instead of one generator per "
                              "step: a prompt's samples then do not depend on the batch or rank that holds it "
                              "(always on under torchrun)", default=False)
    max_turns: int | None = h("multi-turn (tool) tasks such as task:calc: policy turns per episode (default: the "
                              "task's); rollout.max_new_tokens is then the budget of the whole episode (policy and "
                              "environment tokens, docs/agents.md)", default=None)
    vllm: VLLMRolloutConfig = field(default_factory=VLLMRolloutConfig)

    def __post_init__(self) -> None:
        for name in ("prompts_per_step", "n_samples", "max_new_tokens"):
            pos_int("rollout", name, getattr(self, name))
        if self.max_turns is not None:
            pos_int("rollout", "max_turns", self.max_turns)
        pos_int("rollout", "top_k", self.top_k, allow_zero=True)
        if self.temperature is not None:
            in_range("rollout", "temperature", self.temperature, 0.0, 100.0, lo_open=True)
        in_range("rollout", "top_p", self.top_p, 0.0, 1.0, lo_open=True)
        in_range("rollout", "gkd_lambda", self.gkd_lambda, 0.0, 1.0)
        choice("rollout", "sampler", self.sampler, ("inverse_cdf", "multinomial"))
        choice("rollout", "backend", self.backend, ("hf", "vllm"))
        pos_int("rollout", "weight_sync_steps", self.weight_sync_steps)
        if self.max_staleness is not None:
            pos_int("rollout", "max_staleness", self.max_staleness, allow_zero=True)
        in_range("rollout", "is_truncation", self.is_truncation, 1.0, 1e6)
        if self.backend == "hf" and self.weight_sync_steps != 1:
            raise ValueError("rollout.weight_sync_steps applies to rollout.backend=vllm (the HF rollout samples from "
                             "the live student)")


@dataclass
class ServerConfig:
    """teacher.backend=server: a stock vLLM OpenAI-compatible server scores the responses (prompt log-probs)."""

    url: str | None = h("the server, e.g. http://127.0.0.1:8000 (null with launch=true: opdkit starts one)",
                        default=None)
    model: str | None = h("served model name (default: the server's first model in /v1/models)", default=None)
    launch: bool = h("start `vllm serve` of teacher.model on 127.0.0.1 for this run (stopped when it ends or "
                     "crashes); needs vllm in server.python's environment", default=False)
    python: str = h("launch: the Python with vllm installed (scripts/setup_vllm.sh makes .venv-vllm)",
                    default=".venv-vllm/bin/python")
    max_logprobs: int = h("launch: the server's --max-logprobs (the largest top-K it returns)", default=32)
    kv_cache_gib: int = h("launch on CPU: VLLM_CPU_KVCACHE_SPACE in GiB (a whole number)", default=1)
    launch_args: list[str] = h("launch: extra arguments for the server (e.g. [--tensor-parallel-size, '8'])",
                               default_factory=list)
    startup_timeout_s: float = h("launch: seconds to wait for the server to answer", default=600.0)
    timeout_s: float = h("seconds per request before it is retried", default=120.0)
    retries: int = h("retries per request (exponential backoff from 0.5 s) before the run stops with an error",
                     default=3)
    concurrency: int = h("requests in flight at once", default=8)
    rows_per_request: int = h("sequences per /v1/completions request", default=8)

    def __post_init__(self) -> None:
        if self.url is not None and not self.url.startswith(("http://", "https://")):
            raise ValueError(f"server.url={self.url!r} must start with http:// or https://")
        if self.url is not None and self.launch:
            raise ValueError("server.url and server.launch=true exclude each other: connect to a server, or start one")
        pos_int("server", "max_logprobs", self.max_logprobs)
        pos_int("server", "kv_cache_gib", self.kv_cache_gib)
        in_range("server", "startup_timeout_s", self.startup_timeout_s, 0.0, 1e6, lo_open=True)
        in_range("server", "timeout_s", self.timeout_s, 0.0, 1e6, lo_open=True)
        pos_int("server", "retries", self.retries, allow_zero=True)
        pos_int("server", "concurrency", self.concurrency)
        pos_int("server", "rows_per_request", self.rows_per_request)


@dataclass
class TeacherConfig:
    """Which teacher scores the student's responses, and how (docs/teachers.md)."""

    backend: str = h("hf (a HF model in this process), self (OPSD: the student's frozen initial weights with "
                     "privileged context), self_live (the live student), server (a vLLM server: sampled and topk "
                     "estimators)", default="hf")
    model: str = h("hf: the teacher model (HF dir, .gguf, embedded:teacher, smollm2); server with "
                   "server.launch=true: the model to serve", default=EMBEDDED_TEACHER)
    dtype: str = h("teacher dtype (hf / self): auto (bfloat16 where the CPU/GPU does bf16 natively - AVX512-BF16 or "
                   "AMX, where scoring ran 1.6-1.9x faster here - else float32), float32 or bfloat16", default="auto")
    privileged_template: str = h("self-teacher prompt: must contain {prompt} and {privileged}",
                                 default="{prompt}\n\nReference solution: {privileged}\n\n")
    score_chunk_size: int = h("positions per chunk when the teacher computes log-probs (peak O(chunk x V))",
                              default=1024)
    shard: bool = h("under torchrun: shard a local teacher with FSDP2 (1/world of it at rest, gathered for each "
                    "step's scoring) instead of a full copy per rank", default=False)
    server: ServerConfig = field(default_factory=ServerConfig)
    cache_dir: str | None = h("keep teacher scores on disk here and reuse them whenever the same teacher input is "
                              "scored again (resumed runs, reruns and grids that share rollouts, GKD reference data, "
                              "a cache built once for a fixed dataset); null = off", default=None)
    routes: dict[str, str] = h("multi-teacher: route key -> teacher (a model spec, or server:<url>); '*' is the "
                               "fallback; a prompt's key is its data.route_field (built-in tasks: the task name); "
                               "replaces teacher.backend/model", default_factory=dict)
    cross_tokenizer: bool = h("a teacher (backend hf) with ANOTHER tokenizer than the student: it scores the "
                              "student's response re-tokenized in its own vocabulary, mapped back by character-span "
                              "chunk alignment (GOLD-style; objective.estimator=sampled only; rows whose text does "
                              "not round-trip are left out of the loss and counted in xtok/skipped_rows; "
                              "docs/cross_tokenizer.md)", default=False)
    cross_tokenizer_chunks: str = h("cross_tokenizer: safe (chunks joined across cuts where the teacher's token "
                                    "boundary depends on the following text: unbiased chunk log-probs) or minimal "
                                    "(GOLD's smallest aligned chunks; biased where teacher tokens merge across "
                                    "them)", default="safe")

    def __post_init__(self) -> None:
        choice("teacher", "backend", self.backend, TEACHER_BACKENDS)
        choice("teacher", "dtype", self.dtype, DTYPES)
        if "{prompt}" not in self.privileged_template or "{privileged}" not in self.privileged_template:
            raise ValueError("teacher.privileged_template must contain {prompt} and {privileged}")
        pos_int("teacher", "score_chunk_size", self.score_chunk_size)
        if not self.model:
            raise ValueError("teacher.model is empty: give a model dir, .gguf file or embedded:teacher")
        for key, spec in self.routes.items():
            if not key or not spec:
                raise ValueError(f"teacher.routes: an empty key or teacher ({key!r}: {spec!r})")
            if spec in ("self", "self_live"):
                raise ValueError(f"teacher.routes.{key}={spec}: a route names a model or server:<url>, not a "
                                 "self-teacher")
        if self.routes and self.backend != "hf":
            raise ValueError(f"teacher.routes and teacher.backend={self.backend} exclude each other: each route names "
                             "its own teacher (a model spec or server:<url>)")
        choice("teacher", "cross_tokenizer_chunks", self.cross_tokenizer_chunks, ("safe", "minimal"))
        if not isinstance(self.cross_tokenizer, bool):
            raise ValueError(f"teacher.cross_tokenizer={self.cross_tokenizer!r} must be true or false")
        if self.cross_tokenizer and (self.backend != "hf" or self.routes):
            what = "teacher.routes" if self.routes else f"teacher.backend={self.backend}"
            raise ValueError(f"teacher.cross_tokenizer=true works with one local teacher (teacher.backend=hf), not "
                             f"{what}" + (" (a self-teacher has the student's tokenizer)" if self.backend in (
                                 "self", "self_live") else ""))
        if self.backend == "server" and self.server.url is None and not self.server.launch:
            raise ValueError("teacher.backend=server needs teacher.server.url=http://host:port (a running vLLM "
                             "server) or teacher.server.launch=true (opdkit starts one for teacher.model)")


DEFAULT_WARMUP_STEPS = 20  # optim.warmup_steps for every student but the embedded ones (issue #15)


@dataclass
class OptimConfig:
    lr: float = h("AdamW learning rate", default=2e-3)
    weight_decay: float = h("AdamW weight decay", default=0.0)
    beta1: float = h("AdamW beta1", default=0.9)
    beta2: float = h("AdamW beta2", default=0.99)
    warmup_steps: int | None = h("linear warm-up steps; default: 20, or 0 for the embedded students (their lr and "
                                 "steps were tuned without warm-up: 20 there gained +19.1 vs +23.1 points, seeds "
                                 "0-2); without warm-up AdamW's first updates knocked SFT-initialised students off "
                                 "their start on new tasks (issue #15)", default=None)
    schedule: str = h("learning-rate schedule after warm-up: constant or cosine", default="cosine")
    grad_clip: float = h("clip the gradient norm to this (0 = off); the norm is logged every step", default=1.0)
    micro_batch_size: int = h("sequences per forward/backward (gradient accumulation over the step)", default=32)
    ppo_epochs: int = h("passes over each step's rollouts (> 1 needs objective.pg=ppo to stay on-policy-ish)",
                        default=1)
    max_skipped_steps: int = h("a step whose loss or gradient norm is not finite is skipped (weights and optimizer "
                               "state untouched, logged); after this many in a row the run stops with a checkpoint "
                               "of the last finite weights (exit code 3)", default=10)
    fused_loss: str = h("full-vocabulary reverse/forward KL and JSD from hidden states, chunk by chunk with the "
                        "closed-form gradient (never [B, T, V]): auto (where exact, one process, vocabulary >= 256), "
                        "on (or a one-line error why not), off (generic autograd path)", default="auto")

    def __post_init__(self) -> None:
        in_range("optim", "lr", self.lr, 0.0, 1.0, lo_open=True)
        in_range("optim", "weight_decay", self.weight_decay, 0.0, 10.0)
        in_range("optim", "beta1", self.beta1, 0.0, 1.0, hi_open=True)
        in_range("optim", "beta2", self.beta2, 0.0, 1.0, hi_open=True)
        if self.warmup_steps is not None:
            pos_int("optim", "warmup_steps", self.warmup_steps, allow_zero=True)
        choice("optim", "schedule", self.schedule, ("constant", "cosine"))
        in_range("optim", "grad_clip", self.grad_clip, 0.0, math.inf, hi_open=True)
        pos_int("optim", "micro_batch_size", self.micro_batch_size)
        pos_int("optim", "ppo_epochs", self.ppo_epochs)
        pos_int("optim", "max_skipped_steps", self.max_skipped_steps)
        choice("optim", "fused_loss", self.fused_loss, ("auto", "on", "off"))


@dataclass
class TrainConfig:
    """opdkit train: on-policy distillation of a student from a teacher."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # The trainer's default objective is exact full-vocabulary reverse KL: on the embedded task the sampled estimator
    # at this learning rate oscillates (heavy negative reward tail, see docs/embedded.md); every other objective is
    # one override away (objective.estimator=sampled, objective.reward=power, ...).
    objective: ObjectiveConfig = field(default_factory=lambda: ObjectiveConfig(estimator="full"))
    optim: OptimConfig = field(default_factory=OptimConfig)
    diagnostics: DetectorConfig = field(default_factory=DetectorConfig)
    steps: int = h("optimizer steps", default=1050)
    max_seconds: float = h("also stop once training (not eval) has taken this many seconds (0 = no limit): the "
                           "step that crosses it is the last, with the final eval, a checkpoint (resume=true "
                           "continues) and final/; the lr schedule still spans `steps`", default=0.0)
    seed: int = h("seed: every step's randomness derives from (seed, step), so a resumed run continues exactly",
                  default=0)
    threads: int = h("torch CPU threads (2-thread runs next to another busy process were 30-60x slower here)",
                     default=1)
    run_dir: str = h("output directory (metrics.jsonl, tb/, checkpoints/, config.yaml, plots)", default="runs/opd")
    resume: bool = h("continue the run in run_dir from its latest checkpoint", default=False)
    overwrite: bool = h("replace whatever run_dir holds", default=False)
    save_every: int = h("checkpoint every N steps (0 = only at the end)", default=300)
    keep_last: int = h("checkpoints kept", default=2)
    eval_every: int = h("evaluate on held-out prompts every N steps (0 = only before and after)", default=300)
    task_reward: bool = h("score responses with the answer checker and pass the reward to the objective "
                          "(used when objective.task_reward_coef != 0)", default=False)
    progress: bool = h("show a progress bar", default=True)

    def __post_init__(self) -> None:
        self._resolve_teacher_shorthands()
        pos_int("train", "steps", self.steps)
        in_range("train", "max_seconds", self.max_seconds, 0.0, math.inf, hi_open=True)
        pos_int("train", "threads", self.threads)
        pos_int("train", "save_every", self.save_every, allow_zero=True)
        pos_int("train", "keep_last", self.keep_last)
        pos_int("train", "eval_every", self.eval_every, allow_zero=True)
        obj = self.objective
        if self.rollout.temperature is None:
            self.rollout.temperature = 1.0 if obj.estimator == "sampled" else 0.7
        if self.optim.warmup_steps is None:  # resolved here, so config.yaml (and the config hash) hold the value
            self.optim.warmup_steps = 0 if self.model.student.startswith("embedded:") else DEFAULT_WARMUP_STEPS
        # Sampled-only knobs with a dense estimator (the trainer's default is `full`) are refused by ObjectiveConfig
        # itself (objectives/config.py: SAMPLED_ONLY), so a `load_config` override names the fix.
        if self.objective.estimator == "sampled" and self.objective.pg != "ppo" and self.optim.ppo_epochs > 1:
            raise ValueError("optim.ppo_epochs > 1 reuses rollouts: set objective.pg=ppo (or keep ppo_epochs=1)")

    def _resolve_teacher_shorthands(self) -> None:
        """model.teacher / model.teacher_dtype (the keys of earlier versions and of the presets) fill the teacher
        section, then are cleared, so both spellings give one resolved config (and one config hash)."""
        m, t = self.model, self.teacher
        if m.teacher is not None:
            if m.teacher in ("self", "self_live"):
                if t.backend not in ("hf", m.teacher):
                    raise ValueError(f"model.teacher={m.teacher} conflicts with teacher.backend={t.backend}: set one")
                t.backend = m.teacher
            else:
                if t.model not in (EMBEDDED_TEACHER, m.teacher):
                    raise ValueError(f"model.teacher={m.teacher!r} conflicts with teacher.model={t.model!r}: set one "
                                     "(teacher.model is the current key)")
                t.model = m.teacher
            m.teacher = None
        if m.teacher_dtype is not None:
            if t.dtype not in ("auto", m.teacher_dtype):
                raise ValueError(f"model.teacher_dtype={m.teacher_dtype} conflicts with teacher.dtype={t.dtype}")
            t.dtype, m.teacher_dtype = m.teacher_dtype, None


# the data path has one name per command (train: data.prompts, sft: data.jsonl, eval: data): each accepts the others'
TrainConfig.KEY_ALIASES = {"data.jsonl": "data.prompts"}
