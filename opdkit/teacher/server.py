"""`ServerTeacher`: a stock vLLM server (OpenAI-compatible API) scores the responses with its prompt log-probs.

    CPU here:  bash scripts/setup_vllm.sh && opdkit train teacher.backend=server teacher.server.launch=true \
                   objective.estimator=topk objective.top_k=8
    1 GPU:     vllm serve <teacher> --max-logprobs 64 &   opdkit train teacher.backend=server \
                   teacher.server.url=http://127.0.0.1:8000 objective.estimator=topk
    N GPUs / another node: the same, `vllm serve <teacher> --tensor-parallel-size 8 --host <ip>` on the teacher's
                   node and teacher.server.url=http://<ip>:8000 (the trainer talks HTTP only).

How a row is scored: its attended tokens (the prompt's real tokens, then the response up to and including EOS) go
to `/v1/completions` as token ids with `max_tokens=1` and `prompt_logprobs=K`. At every prompt position vLLM returns
the log-probs of the K most likely tokens of the teacher's FULL distribution plus the actual token's (ranked), so one
request serves both `sampled` (the actual token) and `topk` (the K ranked ones; the tail bucket is 1 - their mass,
as for a local teacher). `full` cannot be served (it would need V log-probs per position) and is refused before
any compute. vLLM computes prompt log-probs from the raw logits (temperature 1); other teacher temperatures are
refused.

Robustness: requests run `concurrency` at a time; a failed request (connection refused, timeout, HTTP 5xx) is
retried `retries` times with exponential backoff, then the run stops with one line (exit code 3). An answer that is
malformed (missing positions, a log-prob above 0 or not finite, fewer than K ranked tokens) stops it the same way:
never a silent zero. The server's tokenizer must equal the student's (probe strings through `/tokenize`, ids through
`/detokenize`), checked before training. A server opdkit launches binds 127.0.0.1 and is stopped when the run ends,
crashes or is killed (it dies with its parent).
"""

from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

import torch

from opdkit.errors import UserError, one_line
from opdkit.objectives.signals import SampledSignal, TopKSignal
from opdkit.rollout.batch import RolloutBatch
from opdkit.teacher.base import TeacherRequest
from opdkit.vllm_server import HTTPClient, LaunchedServer, ServerError  # noqa: F401 (re-exported)

PROBES = ("12+34=46", "The answer is 7.", " hello world\n", "<think>", "x = 3 * (4 - 1)")


# ----------------------------------------------------------------------------------------------------------- teacher
class ServerTeacher:
    """Teacher signals from a vLLM server (see the module docstring). `max_top_k`: the largest K it returns (found
    out before training by asking for the objective's K)."""

    kinds = frozenset({"sampled", "topk"})

    def __init__(self, url: str, model: str | None = None, *, timeout_s: float = 120.0, retries: int = 3,
                 concurrency: int = 8, rows_per_request: int = 8, launched: LaunchedServer | None = None):
        self.client = HTTPClient(url, timeout_s, retries)
        self.url, self.concurrency, self.rows_per_request = url.rstrip("/"), int(concurrency), int(rows_per_request)
        self.launched = launched
        self.max_top_k: int | None = None
        try:
            models = self.client.call("/v1/models", retries=min(retries, 1), timeout_s=min(timeout_s, 10.0))
        except ServerError as e:
            raise UserError(f"{one_line(e)}; fix: start the server or correct teacher.server.url") from None
        names = [m.get("id") for m in models.get("data", []) if isinstance(m, dict)]
        if not names:
            raise UserError(f"the teacher server {self.url} lists no model in /v1/models")
        if model is not None and model not in names:
            raise UserError(f"teacher.server.model={model!r} is not served by {self.url} (it serves "
                            f"{', '.join(map(str, names))})")
        self.model = model or names[0]
        info = next(m for m in models["data"] if m.get("id") == self.model)
        self.max_model_len = info.get("max_model_len")
        self.root = info.get("root") or self.model
        self.requests = 0
        self.seconds = 0.0

    # ---- checks before training
    def check_tokenizer(self, tokenizer) -> None:
        """UserError (one line) unless the server's tokenizer encodes the probe strings, and decodes a spread of ids,
        exactly as the student's `tokenizer` does."""
        probes = list(PROBES) + [t for t in (tokenizer.eos_token, tokenizer.bos_token, tokenizer.pad_token) if t]
        for text in probes:
            mine = list(tokenizer(text, add_special_tokens=False)["input_ids"])
            theirs = self.client.call("/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False})
            if list(theirs.get("tokens", [])) != mine:
                raise UserError(f"teacher/student tokenizer mismatch: the server ({self.root}) encodes {text!r} as "
                                f"{theirs.get('tokens')} and the student's tokenizer as {mine}; fix: serve a teacher "
                                "with the student's tokenizer")
        V = len(tokenizer)
        ids = sorted({0, V - 1, *range(0, V, max(1, V // 97))})
        for i in ids:
            mine = tokenizer.decode([i])
            theirs = self.client.call("/detokenize", {"model": self.model, "tokens": [i]}).get("prompt")
            if theirs != mine:
                raise UserError(f"teacher/student tokenizer mismatch: id {i} is {theirs!r} on the server "
                                f"({self.root}) and {mine!r} for the student; fix: serve a teacher with the student's "
                                "tokenizer")

    def validate(self, request: TeacherRequest) -> None:
        """Ask for the request's K once (on a 2-token prompt), so a K above the server's --max-logprobs or a teacher
        temperature it cannot apply fails before training."""
        if request.temperature != 1.0:
            raise UserError(f"a vLLM teacher server returns temperature-1 prompt log-probs; teacher temperature "
                            f"{request.temperature} needs a local teacher (teacher.backend=hf)")
        k = request.top_k if request.kind == "topk" else 0
        try:
            self.client.call("/v1/completions", {"model": self.model, "prompt": [[0, 0]], "max_tokens": 1,
                                                 "prompt_logprobs": k})
        except UserError as e:
            raise UserError(f"objective.top_k={k}: {one_line(e)}; lower objective.top_k or start the server with a "
                            "larger --max-logprobs (teacher.server.max_logprobs)") from None
        self.max_top_k = max(self.max_top_k or 0, k)

    # ---- scoring
    def _rows(self, batch: RolloutBatch) -> list[tuple[list[int], int]]:
        """(attended token ids, number of prompt tokens among them) per row."""
        out = []
        P = batch.prompt_len
        for ids, att in zip(batch.input_ids_BL.tolist(), batch.attention_mask_BL.tolist(), strict=True):
            seq = [t for t, a in zip(ids, att) if a]
            out.append((seq, sum(att[:P])))
        return out

    def _request(self, seqs: list[list[int]], k: int) -> list[list]:
        t0 = time.monotonic()
        ans = self.client.call("/v1/completions", {"model": self.model, "prompt": seqs, "max_tokens": 1,
                                                   "prompt_logprobs": k, "temperature": 1.0})
        self.seconds += time.monotonic() - t0
        self.requests += 1
        try:
            choices = sorted(ans["choices"], key=lambda c: c["index"])
            out = [c["prompt_logprobs"] for c in choices]
        except (KeyError, TypeError):
            raise ServerError(f"the teacher server {self.url} answered without choices[].prompt_logprobs") from None
        if len(out) != len(seqs):
            raise ServerError(f"the teacher server {self.url} answered {len(out)} choices for {len(seqs)} prompts")
        return out

    def score(self, batch: RolloutBatch, request: TeacherRequest):
        if request.kind not in self.kinds:
            raise UserError(f"the teacher server cannot serve the {request.kind} signal")
        k = request.top_k if request.kind == "topk" else 0
        rows = self._rows(batch)
        if self.max_model_len and max(len(s) for s, _ in rows) > self.max_model_len:
            raise ServerError(f"a sequence of {max(len(s) for s, _ in rows)} tokens exceeds the teacher server's "
                              f"max_model_len {self.max_model_len}; lower rollout.max_new_tokens / "
                              "data.max_prompt_tokens or serve with a longer --max-model-len")
        chunks = [list(range(i, min(i + self.rows_per_request, len(rows))))
                  for i in range(0, len(rows), self.rows_per_request)]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            answers = list(pool.map(lambda ix: self._request([rows[i][0] for i in ix], k), chunks))
        plps = [a for part in answers for a in part]
        B, T = batch.response_ids_BT.shape
        want_sampled = request.kind == "sampled" or request.need_sampled
        sampled_BT = torch.zeros(B, T, dtype=torch.float32) if want_sampled else None
        if request.kind == "topk":
            lp_BTK = torch.zeros(B, T, k, dtype=torch.float32)
            ids_BTK = torch.zeros(B, T, k, dtype=torch.long)
        valid = batch.response_mask_BT.bool().tolist()
        resp = batch.response_ids_BT.tolist()
        for b, ((seq, p_len), plp) in enumerate(zip(rows, plps, strict=True)):
            if not isinstance(plp, list) or len(plp) != len(seq):
                raise ServerError(f"the teacher server returned {len(plp) if isinstance(plp, list) else 'no'} prompt "
                                  f"log-prob positions for a sequence of {len(seq)} tokens")
            for t in range(T):
                if not valid[b][t]:
                    continue
                pos = p_len + t
                entry = plp[pos] if pos < len(plp) else None
                if not isinstance(entry, dict):
                    raise ServerError(f"the teacher server returned no log-probs at position {pos} (row {b})")
                tok = resp[b][t]
                if seq[pos] != tok:
                    raise ValueError("ServerTeacher: response token misaligned with the row's attended tokens")
                try:
                    parsed = {int(i): (float(v["logprob"]), int(v["rank"]) if v.get("rank") is not None else 0)
                              for i, v in entry.items()}
                except (ValueError, TypeError, KeyError, AttributeError):
                    raise ServerError(f"the teacher server returned malformed log-probs at position {pos}: "
                                      f"{str(entry)[:120]}") from None
                if any(not (math.isfinite(lp) or lp == -math.inf) or lp > 1e-4 for lp, _ in parsed.values()):
                    raise ServerError(f"the teacher server returned an invalid log-prob (> 0 or NaN) at position "
                                      f"{pos}: {str(entry)[:120]}")
                if want_sampled:
                    if tok not in parsed:
                        raise ServerError(f"the teacher server's log-probs at position {pos} lack the actual token "
                                          f"{tok}")
                    sampled_BT[b, t] = min(parsed[tok][0], 0.0)
                if request.kind == "topk":
                    ranked = sorted(((r, i, lp) for i, (lp, r) in parsed.items() if 1 <= r <= k))
                    if len(ranked) < k:
                        raise ServerError(f"the teacher server returned {len(ranked)} ranked tokens at position "
                                          f"{pos}, fewer than objective.top_k={k}")
                    ranked = sorted(ranked[:k], key=lambda x: -x[2])
                    ids_BTK[b, t] = torch.tensor([i for _, i, _ in ranked])
                    lp_BTK[b, t] = torch.tensor([min(lp, 0.0) for _, _, lp in ranked])
        if request.kind == "sampled":
            return SampledSignal(logprobs_BT=sampled_BT)
        return TopKSignal(logprobs_BTK=lp_BTK, ids_BTK=ids_BTK, sampled_logprobs_BT=sampled_BT)

    def identity(self) -> str | None:
        return f"server:{self.root}:{self.model}"

    def describe(self) -> str:
        return f"vLLM server {self.url} ({self.root})"

    def close(self) -> None:
        if self.launched is not None:
            self.launched.stop()

    def stats(self) -> dict:
        out = {"teacher/requests": self.requests, "teacher/request_seconds": self.seconds}
        self.requests, self.seconds = 0, 0.0
        return out
