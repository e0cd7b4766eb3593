"""`VLLMRollout`: the student's responses sampled by vLLM, which receives the student's weights after optimizer steps.

    CPU here:   bash scripts/setup_vllm.sh && opdkit train rollout.backend=vllm model.student=embedded:student_vllm
    1 GPU:      opdkit train rollout.backend=vllm rollout.vllm.mode=colocate ...   (vllm installed in this env)
    N GPUs:     vllm serve <student> --worker-extension-cls opdkit_vllm_worker.WeightSync --logprobs-mode raw_logprobs
                (VLLM_SERVER_DEV_MODE=1, the extension on its PYTHONPATH) on the rollout GPUs, then
                opdkit train rollout.backend=vllm rollout.vllm.url=http://<host>:8000   (docs/rollouts.md)

Two engines, one behaviour:
- `server` (default): a stock `vllm serve` process — launched by opdkit on 127.0.0.1 from a copy of the student
  (rollout.vllm.launch=true, the default when no url is given) or reached at rollout.vllm.url. Requests go to
  `/v1/completions` with token ids, `n`, temperature / top_p / top_k, `max_tokens`, `stop_token_ids` = the EOS ids,
  a per-request `seed` (deterministic given the weights), `logprobs=0` and `return_token_ids`.
- `colocate`: `vllm.LLM` in this process (needs vllm importable here, e.g. `pip install opdkit[vllm]` on a GPU box).

Weights: after every `weight_sync_steps` optimizer steps the student's state dict (LoRA merged into a copy) is
written as one safetensors file and loaded by every vLLM worker through `collective_rpc` (the worker extension in
`vllm_worker.py`); then the prefix cache is reset (its KV entries came from the old weights). Each row records the
version it was sampled with (`policy_version_B`).

Log-probs: the engine runs with `--logprobs-mode raw_logprobs`, so the log-prob vLLM returns for each sampled token
is the RAW model's (before temperature / top-k / top-p): exactly `model_logprobs_BT`, pi_old of the objective, with
no extra forward in the trainer. (vLLM returns one mode per engine; `sampler_logprobs_BT`, which no objective
reads, holds the same raw values for this backend.) Tests check them against the HF student after a push.
Masked tokens are generated and attended, and removed from the loss mask after sampling, as in HFRollout.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from opdkit.errors import UserError, one_line
from opdkit.rollout.base import SamplingSpec
from opdkit.rollout.batch import RolloutBatch, left_pad
from opdkit.vllm_server import HTTPClient, LaunchedServer, ServerError

EXTENSION_MODULE = "opdkit_vllm_worker"
EXTENSION = f"{EXTENSION_MODULE}.WeightSync"
SERVED_NAME = "student"


def extension_dir(parent: Path) -> Path:
    """A dir under `parent` holding the worker extension as a top-level module (the server's PYTHONPATH): it
    imports only torch and safetensors, so the vLLM environment needs no opdkit."""
    d = Path(parent) / "ext"
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(Path(__file__).with_name("vllm_worker.py"), d / f"{EXTENSION_MODULE}.py")
    return d


def merged_state_dict(student) -> dict[str, torch.Tensor]:
    """The student's weights as HF-named tensors for the engine (a peft model: LoRA merged into a copy)."""
    from opdkit.checkpoint import split_shared
    from opdkit.fsdp import full_state_dict, is_sharded

    if is_sharded(student):
        state = full_state_dict(student)
        if student.config.tie_word_embeddings:  # vLLM ties the head itself
            state.pop("lm_head.weight", None)
        return state
    model = student
    if hasattr(student, "merge_and_unload"):
        import copy

        model = copy.deepcopy(student).merge_and_unload()
    tensors, _aliases = split_shared(model.state_dict())  # a tied lm_head once: vLLM ties it itself
    return tensors


def write_model_dir(state: dict[str, torch.Tensor], config, tokenizer, out: Path) -> Path:
    """A HF model dir from full tensors (e.g. gathered from FSDP2 shards) and the model's config."""
    from safetensors.torch import save_file

    from opdkit.checkpoint import split_shared

    out.mkdir(parents=True, exist_ok=True)
    tensors, _ = split_shared(state)
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


def save_student_dir(student, tokenizer, out: Path) -> Path:
    """A HF model dir of the student's current weights for the engine to start from."""
    model = student
    if hasattr(student, "merge_and_unload"):
        import copy

        model = copy.deepcopy(student).merge_and_unload()
    model.save_pretrained(str(out))
    tokenizer.save_pretrained(str(out))
    return out


class _ServerEngine:
    def __init__(self, url: str, *, timeout_s: float, retries: int, concurrency: int, rows_per_request: int,
                 launched: LaunchedServer | None):
        self.client = HTTPClient(url, timeout_s, retries, what="rollout", knob="rollout.vllm.url")
        self.url, self.launched = url, launched
        self.concurrency, self.rows_per_request = int(concurrency), int(rows_per_request)
        try:
            models = self.client.call("/v1/models", retries=min(retries, 1), timeout_s=min(timeout_s, 10.0))
        except ServerError as e:
            raise UserError(f"{one_line(e)}; fix: start the rollout server or correct rollout.vllm.url") from None
        names = [m.get("id") for m in models.get("data", [])]
        if not names:
            raise UserError(f"the rollout server {url} lists no model in /v1/models")
        self.model = SERVED_NAME if SERVED_NAME in names else names[0]
        info = next(m for m in models["data"] if m.get("id") == self.model)
        self.max_model_len = info.get("max_model_len")
        try:
            self.client.call("/collective_rpc", {"method": "opdkit_weights_digest"}, retries=0)
        except (UserError, ServerError) as e:
            raise UserError(f"the rollout server {url} cannot receive weights ({one_line(e)[:160]}); start it with "
                            f"VLLM_SERVER_DEV_MODE=1, --worker-extension-cls {EXTENSION} (the module "
                            f"opdkit/rollout/vllm_worker.py on its PYTHONPATH as {EXTENSION_MODULE}.py) and "
                            "--logprobs-mode raw_logprobs, or let opdkit launch it (rollout.vllm.launch=true)") from None

    def generate(self, prompts: list[list[int]], spec: SamplingSpec, seed: int) -> list[list[dict]]:
        """Per prompt: `spec.n` outputs {token_ids, logprobs, finished}."""
        chunks = [list(range(i, min(i + self.rows_per_request, len(prompts))))
                  for i in range(0, len(prompts), self.rows_per_request)]

        def one(j_ix):
            j, ix = j_ix
            body = {"model": self.model, "prompt": [prompts[i] for i in ix], "n": spec.n,
                    "max_tokens": spec.max_new_tokens, "temperature": spec.temperature, "top_p": spec.top_p,
                    "top_k": spec.top_k or 0, "logprobs": 0, "seed": int(seed * 1009 + j) % (2**31 - 1),
                    "stop_token_ids": list(spec.eos_ids), "return_token_ids": True, "skip_special_tokens": False}
            ans = self.client.call("/v1/completions", body)
            try:
                choices = sorted(ans["choices"], key=lambda c: c["index"])
                out = [{"token_ids": list(c["token_ids"]), "logprobs": list(c["logprobs"]["token_logprobs"]),
                        "finished": c.get("finish_reason") == "stop"} for c in choices]
            except (KeyError, TypeError) as e:
                raise ServerError(f"the rollout server answered without token ids / log-probs ({e})") from None
            if len(out) != len(ix) * spec.n:
                raise ServerError(f"the rollout server answered {len(out)} choices for {len(ix)} x {spec.n}")
            return [out[k * spec.n:(k + 1) * spec.n] for k in range(len(ix))]

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            parts = list(pool.map(one, enumerate(chunks)))
        return [x for p in parts for x in p]

    def load_weights(self, path: str) -> None:
        self.client.call("/collective_rpc", {"method": "opdkit_load_weights", "args": [path]})
        self.client.call("/reset_prefix_cache", {})

    def digest(self) -> str:
        return self.client.call("/collective_rpc", {"method": "opdkit_weights_digest"})["results"][0]

    def prompt_logprobs(self, ids: list[int]) -> list[float]:
        ans = self.client.call("/v1/completions", {"model": self.model, "prompt": [ids], "max_tokens": 1,
                                                   "prompt_logprobs": 0})
        plp = ans["choices"][0]["prompt_logprobs"]
        return [float(plp[i][str(ids[i])]["logprob"]) for i in range(1, len(ids))]

    def close(self) -> None:
        if self.launched is not None:
            self.launched.stop()


class _LocalEngine:
    """vllm.LLM in this process (colocated with the trainer)."""

    def __init__(self, model_dir: str, *, dtype: str, max_model_len: int, gpu_memory_utilization: float,
                 work: Path):
        try:
            import vllm  # noqa: F401
        except ImportError:
            raise UserError("rollout.vllm.mode=colocate needs vllm importable in this environment (pip install "
                            "'opdkit[vllm]'); or use mode=server (a vLLM in its own environment)") from None
        import sys

        from vllm import LLM

        ext = extension_dir(work)
        sys.path.insert(0, str(ext))
        os.environ["PYTHONPATH"] = os.pathsep.join([str(ext), os.environ.get("PYTHONPATH", "")])
        self.llm = LLM(model=model_dir, dtype=dtype, max_model_len=max_model_len, logprobs_mode="raw_logprobs",
                       worker_extension_cls=EXTENSION, gpu_memory_utilization=gpu_memory_utilization,
                       enable_prefix_caching=True, seed=0)
        self.max_model_len = max_model_len

    def generate(self, prompts, spec: SamplingSpec, seed: int):
        from vllm import SamplingParams, TokensPrompt

        outs = []
        reqs = [TokensPrompt(prompt_token_ids=p) for p in prompts]
        params = [SamplingParams(n=spec.n, max_tokens=spec.max_new_tokens, temperature=spec.temperature,
                                 top_p=spec.top_p, top_k=spec.top_k or 0, logprobs=0,
                                 seed=int(seed * 1009 + i) % (2**31 - 1), stop_token_ids=list(spec.eos_ids),
                                 skip_special_tokens=False) for i in range(len(prompts))]
        for r in self.llm.generate(reqs, params, use_tqdm=False):
            outs.append([{"token_ids": list(o.token_ids),
                          "logprobs": [next(iter(d.values())).logprob if len(d) == 1 else d[t].logprob
                                       for t, d in zip(o.token_ids, o.logprobs)],
                          "finished": o.finish_reason == "stop"} for o in r.outputs])
        return outs

    def load_weights(self, path: str) -> None:
        self.llm.collective_rpc("opdkit_load_weights", args=(path,))
        self.llm.reset_prefix_cache()

    def digest(self) -> str:
        return self.llm.collective_rpc("opdkit_weights_digest")[0]

    def prompt_logprobs(self, ids):
        from vllm import SamplingParams, TokensPrompt

        r = self.llm.generate([TokensPrompt(prompt_token_ids=ids)], SamplingParams(max_tokens=1, prompt_logprobs=0),
                              use_tqdm=False)[0]
        return [float(r.prompt_logprobs[i][ids[i]].logprob) for i in range(1, len(ids))]

    def close(self) -> None:
        self.llm = None


class VLLMRollout:
    """Rollouts from a vLLM engine (see the module docstring). Build it with `VLLMRollout.start(...)`."""

    def __init__(self, engine, work_dir: Path, *, weight_sync_steps: int = 1):
        from opdkit.dist import Dist

        self.engine, self.work_dir = engine, Path(work_dir)
        self.dist = Dist()  # under torchrun: every rank gathers the weights, rank 0 pushes them
        self.weight_sync_steps = int(weight_sync_steps)
        self.version = 0
        self._sync_s = 0.0
        self._syncs = 0
        self._gen_tokens = 0
        self._gen_s = 0.0

    @classmethod
    def start(cls, student, tokenizer, *, mode: str = "server", url: str | None = None, python: str = "",
              dtype: str = "float32", max_model_len: int = 512, kv_cache_gib: int = 1, launch_args=(),
              startup_timeout_s: float = 600.0, timeout_s: float = 300.0, retries: int = 2, concurrency: int = 4,
              rows_per_request: int = 16, weight_sync_steps: int = 1, gpu_memory_utilization: float = 0.3,
              version: int = 0, push: bool = True, model_dir: str | None = None) -> VLLMRollout:
        work = Path(tempfile.mkdtemp(prefix="opdkit-vllm-rollout-"))
        try:
            if mode == "colocate":
                model_dir = save_student_dir(student, tokenizer, work / "student")
                engine = _LocalEngine(str(model_dir), dtype=dtype, max_model_len=max_model_len,
                                      gpu_memory_utilization=gpu_memory_utilization, work=work)
            else:
                launched = None
                if url is None:
                    model_dir = model_dir or save_student_dir(student, tokenizer, work / "student")
                    ext = extension_dir(work)
                    env = {"VLLM_SERVER_DEV_MODE": "1",
                           "PYTHONPATH": os.pathsep.join(x for x in (str(ext), os.environ.get("PYTHONPATH")) if x)}
                    launched = LaunchedServer(str(model_dir), python=python, dtype=dtype, max_logprobs=8,
                                              kv_cache_gib=kv_cache_gib, startup_timeout_s=startup_timeout_s,
                                              max_model_len=max_model_len, served_model_name=SERVED_NAME,
                                              extra_args=["--worker-extension-cls", EXTENSION, "--logprobs-mode",
                                                          "raw_logprobs", *launch_args], env=env, what="rollout")
                    url = launched.url
                try:
                    engine = _ServerEngine(url, timeout_s=timeout_s, retries=retries, concurrency=concurrency,
                                           rows_per_request=rows_per_request, launched=launched)
                except BaseException:
                    if launched is not None:
                        launched.stop()
                    raise
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
        r = cls(engine, work, weight_sync_steps=weight_sync_steps)
        if push and mode != "colocate" and engine.launched is None:  # a server started elsewhere: these weights
            r.load_weights(student, version, force=True)
        r.version = int(version)
        return r

    # ---- sampling
    def sample(self, prompt_ids, spec: SamplingSpec, *, records=None, generator=None, seed: int = 0) -> RolloutBatch:
        prompts = [list(p) for p in prompt_ids]
        if self.engine.max_model_len and max(len(p) for p in prompts) + spec.max_new_tokens > self.engine.max_model_len:
            raise UserError(f"prompt + rollout.max_new_tokens ({max(len(p) for p in prompts)} + "
                            f"{spec.max_new_tokens}) exceeds the rollout engine's max_model_len "
                            f"{self.engine.max_model_len}; lower them or raise rollout.vllm.max_model_len")
        t0 = time.perf_counter()
        outs = self.engine.generate(prompts, spec, seed)
        self._gen_s += time.perf_counter() - t0
        batch = build_batch(prompts, outs, spec, version=self.version)
        self._gen_tokens += int(batch.eos_mask_BT.sum())
        return batch.with_records(records) if records is not None else batch

    # ---- weights
    def load_weights(self, student, version: int, force: bool = False) -> None:
        """Push the student's weights (every weight_sync_steps versions, or when `force`)."""
        if not force and int(version) % self.weight_sync_steps:
            return
        t0 = time.perf_counter()
        from safetensors.torch import save_file

        state = merged_state_dict(student)  # a collective for an FSDP2 student: full tensors on every rank
        if self.dist.is_main:
            path = self.work_dir / f"weights-{int(version) % 2}.safetensors"
            tmp = path.with_suffix(".tmp")
            save_file(state, str(tmp))
            os.replace(tmp, path)
            self.engine.load_weights(str(path))
        self.dist.barrier()
        self.version = int(version)
        self._sync_s += time.perf_counter() - t0
        self._syncs += 1

    def stats(self) -> dict:
        out = {"rollout/weight_sync_seconds": self._sync_s, "rollout/weight_syncs": self._syncs,
               "rollout/engine_tokens_per_s": self._gen_tokens / self._gen_s if self._gen_s else 0.0,
               "rollout/engine_version": self.version}
        self._sync_s, self._syncs, self._gen_tokens, self._gen_s = 0.0, 0, 0, 0.0
        return out

    def close(self) -> None:
        self.engine.close()
        shutil.rmtree(self.work_dir, ignore_errors=True)


def build_batch(prompts: list[list[int]], outs: list[list[dict]], spec: SamplingSpec, *, version: int) -> RolloutBatch:
    """A RolloutBatch (HFRollout's layout) from per-prompt engine outputs {token_ids, logprobs, finished}: rows
    prompt-major, responses cut at their first EOS (included), masked ids out of the loss mask."""
    rows = [(pi, o) for pi, group in enumerate(outs) for o in group]
    eos = set(spec.eos_ids)
    resp, lps, fin = [], [], []
    for _, o in rows:
        ids, lp = o["token_ids"][: spec.max_new_tokens], o["logprobs"][: spec.max_new_tokens]
        if len(lp) != len(ids) or any(x is None or not (math.isfinite(x) or x == -math.inf) or x > 1e-4 for x in lp):
            raise ServerError("the rollout engine returned missing or invalid log-probs for its tokens")
        cut = next((i + 1 for i, t in enumerate(ids) if t in eos), None)
        if cut is not None:
            ids, lp = ids[:cut], lp[:cut]
        resp.append(ids)
        lps.append([min(float(x), 0.0) for x in lp])
        fin.append(cut is not None)
    if any(len(r) == 0 for r in resp):
        raise ServerError("the rollout engine returned an empty response (it must emit at least one token)")
    T = max(len(r) for r in resp)
    B = len(rows)
    ids_BP, pmask_BP = left_pad([prompts[pi] for pi, _ in rows], spec.pad_id)
    resp_BT = torch.full((B, T), spec.pad_id, dtype=torch.long)
    eos_BT = torch.zeros(B, T, dtype=torch.long)
    lp_BT = torch.zeros(B, T, dtype=torch.float32)
    for b, (r, lp) in enumerate(zip(resp, lps, strict=True)):
        resp_BT[b, : len(r)] = torch.tensor(r)
        eos_BT[b, : len(r)] = 1
        lp_BT[b, : len(r)] = torch.tensor(lp)
    masked = torch.tensor(sorted(set(spec.masked_ids)), dtype=torch.long)
    response_mask = eos_BT * (~torch.isin(resp_BT, masked)).long()
    return RolloutBatch(
        input_ids_BL=torch.cat([ids_BP, resp_BT], 1), attention_mask_BL=torch.cat([pmask_BP, eos_BT], 1),
        prompt_len=int(ids_BP.shape[1]), response_ids_BT=resp_BT, response_mask_BT=response_mask, eos_mask_BT=eos_BT,
        sampler_logprobs_BT=lp_BT.clone(), model_logprobs_BT=lp_BT,
        prompt_index_B=torch.tensor([pi for pi, _ in rows], dtype=torch.long),
        response_lengths_B=eos_BT.sum(-1), finished_B=torch.tensor(fin, dtype=torch.bool),
        policy_version_B=torch.full((B,), int(version), dtype=torch.long))
