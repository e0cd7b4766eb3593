"""`CrossTokenizerTeacher`: a teacher with ANOTHER tokenizer than the student's (cross-tokenizer OPD).

    opdkit train teacher.model=runs/xtok/teacher_bpe/final teacher.cross_tokenizer=true objective.estimator=sampled

Method: GOLD-style character-span chunk alignment of sampled-token log-probs (GOLD, "Unlocking On-Policy
Distillation for Any Model Family", Hugging Face TRL 2025: General Online Logit Distillation, TRL's GOLDTrainer,
which extends ULD, Boizard et al. 2024, "Towards Cross-Tokenizer Distillation: the Universal Logit Distillation
Loss for LLMs"; issue #16 names miles' chunk alignment as the same grouping), plus one correction of ours for
token-level rewards (safe chunks, step 4). For each row of the student's batch:

1. the student's response tokens are decoded to text, each token getting the character offset where it ends
   (`token_ends`: the length of the decoded prefix through it; a token that ends inside a character, e.g. one byte
   of a multi-byte UTF-8 character, has no end of its own and is glued to the next token). Tokens with no text — a
   final stop token (EOS), and <unk> / <pad> / <bos> sampled inside the response — are chunks of their own, mapped
   to the teacher's token of the same role (the text between them is aligned segment by segment);
2. the prompt (the row's record, rendered with the TEACHER's own prompt format: its BOS, its chat template) and the
   response text are tokenized separately by the teacher's tokenizer (so the response starts at a teacher token
   boundary), and the response's teacher token ends computed the same way;
3. the inner teacher (any local backend: `HFTeacher`, a cache around it) scores the response in its own ids;
4. chunks: the character offsets where BOTH tokenizations have a token boundary cut the response into minimal
   aligned chunks (one or more student tokens <-> one or more teacher tokens covering the same text; GOLD's rule,
   `chunks="minimal"`). By default (`chunks="safe"`) a cut is kept only where the teacher's token boundary is
   forced whatever text follows (no text ending there is a proper prefix of a teacher token, `merge_unsafe`);
   other cuts are joined, because there a minimal chunk's log-prob also carries the teacher's surprise at the NEXT
   characters (its token '\n' alone says "not '\n0'"): the tokenization bias of Phan et al. 2024, which made
   minimal chunks collapse the embedded demo (docs/cross_tokenizer.md). A chunk's teacher log-prob is the sum of
   its teacher tokens' log-probs (log q of the chunk's text, the chain rule); its student log-prob, the sum of its
   student tokens' log-probs under the sampling policy (pi_old, the rollout's `model_logprobs_BT`);
5. back to student tokens: a 1:1 chunk (one token each side) gets the teacher's log-prob as it is — so identical
   tokenizers give exactly the plain teacher's signal. A chunk with several student tokens splits its teacher
   log-prob T_c over them in proportion to their student log-probs s_i (w_i = s_i / S_c, uniform when S_c = 0):
   t_i = w_i T_c. The t_i are valid log-probs (<= 0), they sum to T_c, and each token's log-ratio
   t_i - s_i = w_i (T_c - S_c) has the sign of the chunk's (the chunk's credit goes mostly to the tokens the student
   was unsure of); for the k1 / reverse-KL reward the chunk's total reward is exactly T_c - S_c.

Estimators: `sampled` only. Top-K ids and full distributions are over the teacher's vocabulary, which has no
token-to-token map onto the student's; ULD's sorted-probability distance for dense signals is not implemented, so
`topk` / `full` are refused before training (`kinds`).

Alignment failures are never a silent wrong signal: a row whose response text does not round-trip through the
teacher's tokenizer (characters it does not know -> <unk>), whose response holds a student <unk> / <pad> / <bos>
for which the teacher's tokenizer has no token of that role, or whose teacher sequence exceeds the teacher's
context is SKIPPED: it is left out of the loss (`drop_unaligned`, called by the trainer right after scoring, sets
its response mask to 0) and counted per step in `xtok/skipped_rows` (and `xtok/skipped/<reason>`), with a one-line
notice the first time each reason occurs. Its log-probs are set to the student's own (a zero log-ratio), so even a consumer that ignored the
mask would get no push from it.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace
from typing import Sequence

import torch

from opdkit.objectives.signals import SampledSignal
from opdkit.rollout.batch import RolloutBatch, left_pad
from opdkit.teacher.base import TeacherRequest

REASONS = ("round_trip", "student_special", "teacher_context")
_REASON_TEXT = {
    "round_trip": "its text does not round-trip through the teacher's tokenizer",
    "student_special": "its response holds a student special token (<unk>/<pad>/<bos>) whose role the teacher's "
                       "tokenizer has no token for",
    "teacher_context": "prompt + response in the teacher's tokens exceed the teacher's context",
}
CHUNK_MODES = ("safe", "minimal")
_ROLES = ("unk_token_id", "pad_token_id", "bos_token_id")  # text-less special tokens, mapped by role
_REPLACEMENT = "\ufffd"  # what decoders emit for an incomplete UTF-8 sequence


# --------------------------------------------------------------------------------------------- alignment (pure)
def decode(tok, ids: Sequence[int]) -> str:
    """The text of `ids`, special tokens included as their strings, no clean-up (exact)."""
    return tok.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)


def token_ends(tok, ids: Sequence[int]) -> tuple[str, list[int | None]]:
    """(text, ends): text = decode(ids); ends[i] = the character offset in text where token i ends, or None when the
    text decoded through token i is not a prefix of text (token i ends inside a character, e.g. one byte of a
    multi-byte character, or the decoder rewrites earlier text): such a token is glued to the next one.

    Fast path: when the tokens decoded one by one concatenate to text (character tokenizers; BPE tokenizers where
    no character is split into bytes), the ends are the running lengths. Otherwise every prefix is decoded (in one batch call):
    slower, but exact for SentencePiece-style leading spaces and byte-fallback tokens."""
    ids = [int(i) for i in ids]
    text = decode(tok, ids)
    if not ids:
        return text, []
    pieces = [decode(tok, [i]) for i in ids]
    if "".join(pieces) == text and not any(_REPLACEMENT in p for p in pieces):
        ends, n = [], 0
        for p in pieces:
            n += len(p)
            ends.append(n)
        return text, ends
    prefixes = tok.batch_decode([ids[: i + 1] for i in range(len(ids))], skip_special_tokens=False,
                                clean_up_tokenization_spaces=False)
    # a prefix ending in an incomplete character decodes to a replacement character the full text does not have
    ends = [len(p) if text.startswith(p) else None for p in prefixes]
    ends[-1] = len(text)  # the whole sequence decodes to text by definition
    return text, ends


@dataclass(frozen=True)
class Chunk:
    """Student tokens [s0, s1) and teacher tokens [t0, t1) that cover the same characters [c0, c1)."""

    s0: int
    s1: int
    t0: int
    t1: int
    c0: int
    c1: int


def align_chunks(s_ends: Sequence[int | None], t_ends: Sequence[int | None], n_chars: int) -> list[Chunk] | None:
    """Minimal aligned chunks of two tokenizations of the same `n_chars` characters (GOLD / miles chunk
    alignment): cut wherever both sides have a token ending at the same character offset. Each chunk holds >= 1
    token of each side; a token with no end of its own (None) or of zero width goes to the chunk that contains the
    next boundary. None when the ends are not a valid tokenization of n_chars characters (decreasing, past the end,
    or the last token not ending at n_chars)."""
    if not s_ends and not t_ends:
        return [] if n_chars == 0 else None
    if not s_ends or not t_ends:
        return None

    def clean(ends):
        known = [e for e in ends if e is not None]
        if ends[-1] != n_chars or any(b < a for a, b in zip(known, known[1:])) or known[0] < 0:
            return None
        return known

    ks, kt = clean(s_ends), clean(t_ends)
    if ks is None or kt is None:
        return None
    cuts = sorted((set(ks) & set(kt)) - {0})  # n_chars is in both; a cut at 0 would make an empty chunk
    if n_chars == 0:
        cuts = [0]  # zero-width tokens only (no text): one chunk

    def assign(ends) -> list[int]:
        """chunk index of each token: the first cut >= its end (a None end takes the next known one)."""
        out, nxt = [0] * len(ends), n_chars
        for i in range(len(ends) - 1, -1, -1):
            if ends[i] is not None:
                nxt = ends[i]
            out[i] = _first_at_least(cuts, nxt)
        return out

    a_s, a_t = assign(s_ends), assign(t_ends)
    chunks, s_i, t_i = [], 0, 0
    for k, c in enumerate(cuts):
        s_j, t_j = s_i, t_i
        while s_j < len(a_s) and a_s[s_j] == k:
            s_j += 1
        while t_j < len(a_t) and a_t[t_j] == k:
            t_j += 1
        if s_j == s_i or t_j == t_i:  # cannot happen for valid ends (both sides end a token at every cut)
            return None
        chunks.append(Chunk(s_i, s_j, t_i, t_j, 0 if k == 0 else cuts[k - 1], c))
        s_i, t_i = s_j, t_j
    return chunks if s_i == len(a_s) and t_i == len(a_t) else None


def _first_at_least(sorted_vals: list[int], x: int) -> int:
    import bisect

    return bisect.bisect_left(sorted_vals, x)


def vocab_prefixes(tok) -> tuple[frozenset[str], int]:
    """(proper prefixes of the surface strings of the tokenizer's non-special tokens, longest token length). A
    token's surface string is its text after another token (so SentencePiece's '▁the' counts as ' the') and on its
    own; both are kept (the set only makes cuts rarer)."""
    special = set(getattr(tok, "all_special_ids", []) or [])
    ids = [i for i in sorted(set(tok.get_vocab().values())) if i not in special]
    anchor = next((i for i in ids if len(s := decode(tok, [i])) == 1 and s.isalnum()), None)
    a_text = decode(tok, [anchor]) if anchor is not None else ""
    alone = tok.batch_decode([[i] for i in ids], skip_special_tokens=False, clean_up_tokenization_spaces=False)
    after = (tok.batch_decode([[anchor, i] for i in ids], skip_special_tokens=False,
                              clean_up_tokenization_spaces=False) if anchor is not None else [])
    surfaces = set(alone) | {t[len(a_text):] for t in after if t.startswith(a_text)}
    prefixes = {w[:k] for w in surfaces for k in range(1, len(w))}
    return frozenset(prefixes), max((len(w) for w in surfaces), default=1)


def merge_unsafe(chunks: Sequence[Chunk], text: str, segment_start: Sequence[int], prefixes: frozenset[str],
                 max_len: int) -> list[Chunk]:
    """Join consecutive chunks across every cut at which the teacher's token boundary says something about the text
    AFTER it. A cut at character c (after a text chunk) is safe when no text[i:c] (i from the chunk's text segment
    start) is a proper prefix of a teacher token: then no continuation could have produced a token spanning c, so the
    boundary is forced and the chunk's summed log-prob is the teacher's probability of its text. At an unsafe cut
    (the teacher's token '\n' alone also says "the next character is not '0'", when '\n0' is a token) the minimal
    chunks' log-probs move the teacher's surprise at the NEXT character onto the token before it: the tokenization
    bias of token-level probabilities (Phan et al. 2024, "Exact Byte-Level Probabilities from Tokenized Language
    Models"). `segment_start[k]`: where chunk k's text segment starts (special tokens end segments; a zero-width
    chunk, a special token, ends none: nothing merges across it)."""
    out: list[Chunk] = []
    for k, ch in enumerate(chunks):
        if out:
            prev, last = out[-1], chunks[k - 1]
            c, lo = last.c1, segment_start[k - 1]
            textual = last.c1 > last.c0  # after a special-token chunk nothing merges: a safe cut
            if textual and any(text[i:c] in prefixes for i in range(max(lo, c - max_len), c)):
                out[-1] = Chunk(prev.s0, ch.s1, prev.t0, ch.t1, prev.c0, ch.c1)
                continue
        out.append(ch)
    return out


def map_chunk_logprobs(chunks: Sequence[Chunk], teacher_lp: Sequence[float], student_lp: Sequence[float],
                       n_student: int) -> list[float]:
    """Per-student-token teacher log-probs from the teacher's per-token log-probs (rule 5 of the module docstring):
    a chunk with one student token gets the chunk's teacher log-prob T_c; several student tokens share it in
    proportion to their student log-probs (uniformly when those sum to 0)."""
    out = [0.0] * n_student
    for ch in chunks:
        T_c = float(sum(teacher_lp[ch.t0:ch.t1])) if ch.t1 - ch.t0 > 1 else float(teacher_lp[ch.t0])
        n = ch.s1 - ch.s0
        if n == 1:
            out[ch.s0] = T_c
            continue
        s = [min(float(v), 0.0) for v in student_lp[ch.s0:ch.s1]]
        S_c = sum(s)
        for j, s_j in enumerate(s):
            out[ch.s0 + j] = T_c * (s_j / S_c) if S_c < 0 else T_c / n
    return out


# --------------------------------------------------------------------------------------------- the teacher
@dataclass
class RowPlan:
    """One aligned row: the teacher's prompt and response ids, the chunks, the number of student tokens scored."""

    prompt_ids: list[int]
    response_ids: list[int]
    chunks: list[Chunk]
    n_student: int  # student tokens covered (the row's eos_mask length)


@dataclass
class AlignedSampledSignal(SampledSignal):
    """A sampled signal in the student's tokens plus which rows it scored (`scored_B`, bool [B]). Rows with False
    must not reach the loss: `drop_unaligned(batch, signal)` masks them and returns a plain SampledSignal."""

    scored_B: torch.Tensor | None = None

    def rows(self, idx) -> AlignedSampledSignal:
        base = SampledSignal.rows(self, idx)
        sc = None if self.scored_B is None else self.scored_B[torch.as_tensor(idx) if not isinstance(idx, slice)
                                                              else idx]
        return AlignedSampledSignal(base.logprobs_BT, sc)

    @staticmethod
    def cat(parts) -> AlignedSampledSignal:
        base = SampledSignal.cat([SampledSignal(p.logprobs_BT) for p in parts])
        sc = torch.cat([p.scored_B if p.scored_B is not None else torch.ones(p.logprobs_BT.shape[0], dtype=torch.bool)
                        for p in parts])
        return AlignedSampledSignal(base.logprobs_BT, sc)


def drop_unaligned(batch: RolloutBatch, signal):
    """(batch, signal) for the objective: rows a cross-tokenizer teacher could not align get response mask 0 (out
    of the loss, the token counts and the batch statistics), and the signal becomes a plain `SampledSignal`. Any
    other signal passes through unchanged."""
    scored = getattr(signal, "scored_B", None)
    if scored is None:
        return batch, signal
    plain = SampledSignal(signal.logprobs_BT)
    if bool(scored.all()):
        return batch, plain
    keep_B1 = scored.to(batch.response_mask_BT.device).unsqueeze(1).to(batch.response_mask_BT.dtype)
    return replace(batch, response_mask_BT=batch.response_mask_BT * keep_B1), plain


class CrossTokenizerTeacher:
    """Wraps a local teacher (`inner`, scoring in the teacher tokenizer's ids) for a student with another tokenizer;
    see the module docstring for the alignment. `student_tok` / `teacher_tok`: the two tokenizers;
    `use_chat_template`: how the teacher's prompt is rendered (data.use_chat_template); `max_len`: the teacher's
    context (rows beyond it are skipped); `notice`: where the first skip of each reason is reported."""

    kinds = frozenset({"sampled"})

    def __init__(self, inner, student_tok, teacher_tok, *, use_chat_template: bool | None = None,
                 max_len: int | None = None, chunks: str = "safe", notice=None):
        if teacher_tok.eos_token_id is None:
            from opdkit.errors import UserError

            raise UserError("teacher.cross_tokenizer=true: the teacher's tokenizer has no eos_token, so the student's "
                            "EOS has nothing to map to; fix: a teacher tokenizer with an eos_token")
        self.inner, self.s_tok, self.t_tok = inner, student_tok, teacher_tok
        self.use_chat_template, self.max_len = use_chat_template, max_len
        if chunks not in CHUNK_MODES:
            raise ValueError(f"chunks={chunks!r} is not one of {', '.join(CHUNK_MODES)}")
        self.chunk_mode = chunks
        # "safe": chunks joined across cuts the teacher's tokenization makes informative (merge_unsafe)
        self._prefixes = vocab_prefixes(teacher_tok) if chunks == "safe" else None
        self.t_eos = int(teacher_tok.eos_token_id)
        self.t_pad = int(teacher_tok.pad_token_id if teacher_tok.pad_token_id is not None else self.t_eos)
        self.t_unk = getattr(teacher_tok, "unk_token_id", None)
        # student tokens that stand for no text: mapped to the teacher's token of the same role, not re-tokenized
        self.s_roles = {int(i): r for r in _ROLES if (i := getattr(student_tok, r, None)) is not None}
        self.t_roles = {r: int(i) for r in _ROLES if (i := getattr(teacher_tok, r, None)) is not None}
        self._notice = notice or (lambda line: print(line, file=sys.stderr, flush=True))
        self._told: set[str] = set()
        self._stats: dict[str, float] = {}

    # -- protocol
    @property
    def dtype(self):
        return self.inner.dtype

    def identity(self) -> str | None:
        inner = self.inner.identity()
        if inner is None:
            return None
        import hashlib

        h = hashlib.sha256(repr(sorted(self.s_tok.get_vocab().items())).encode()).hexdigest()[:12]
        return f"xtok:{self.chunk_mode}:{h}:{inner}"

    def describe(self) -> str:
        return f"cross-tokenizer ({self.chunk_mode} chunks, sampled log-probs) around {self.inner.describe()}"

    def close(self) -> None:
        self.inner.close()

    def stats(self) -> dict:
        out = dict(self.inner.stats())
        s, self._stats = self._stats, {}
        out.update({k: v for k, v in s.items()})
        if s.get("xtok/student_tokens"):
            out["xtok/one_to_one_frac"] = s.get("_one_to_one", 0.0) / s["xtok/student_tokens"]
        out.pop("_one_to_one", None)
        return out

    # -- planning one row
    def _teacher_prompt(self, batch: RolloutBatch, b: int) -> list[int]:
        from opdkit.data.prompts import prompt_to_ids

        if batch.records_B is not None:
            return prompt_to_ids(batch.records_B[b].prompt_text, self.t_tok, use_chat_template=self.use_chat_template)
        # no records: the student's prompt tokens as text (its special tokens, e.g. its BOS, left out)
        P = batch.prompt_len
        ids = [int(i) for i, a in zip(batch.input_ids_BL[b, :P].tolist(), batch.attention_mask_BL[b, :P].tolist())
               if a]
        text = self.s_tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        bos = getattr(self.t_tok, "bos_token_id", None)
        return ([bos] if bos is not None else []) + list(self.t_tok(text, add_special_tokens=False)["input_ids"])

    def plan_row(self, batch: RolloutBatch, b: int) -> RowPlan | str:
        """The row's teacher ids and chunks, or the reason it cannot be aligned (one of REASONS).

        The response is cut at the student's text-less special tokens (<unk>, <pad>, <bos>): each text segment is
        re-tokenized and aligned on its own, and each special token maps 1:1 to the teacher's token of the same
        role (the teacher's log-prob of its own <pad> is the signal against a student that writes <pad>); a role
        the teacher's tokenizer does not have fails the row."""
        n = int(batch.eos_mask_BT[b].sum())
        ids = [int(i) for i in batch.response_ids_BT[b, :n].tolist()]
        stop = bool(batch.finished_B[b]) and n > 0  # the last token is the stop token: mapped to the teacher's EOS
        body = ids[:-1] if stop else ids
        t_ids: list[int] = []
        chunks: list[Chunk] = []
        seg_of: list[int] = []  # per chunk: the character offset where its text segment starts
        texts: list[str] = []
        n_chars = 0

        def add_text(start: int, seg: list[int]) -> bool:
            nonlocal n_chars
            if not seg:
                return True
            text, s_ends = token_ends(self.s_tok, seg)
            seg_t = list(self.t_tok(text, add_special_tokens=False)["input_ids"]) if text else []
            if (self.t_unk is not None and self.t_unk in seg_t) or decode(self.t_tok, seg_t) != text:
                return False
            seg_chunks = align_chunks(s_ends, token_ends(self.t_tok, seg_t)[1], len(text))
            if seg_chunks is None:
                return False
            k = len(t_ids)
            chunks.extend(Chunk(c.s0 + start, c.s1 + start, c.t0 + k, c.t1 + k, c.c0 + n_chars, c.c1 + n_chars)
                          for c in seg_chunks)
            seg_of.extend([n_chars] * len(seg_chunks))
            t_ids.extend(seg_t)
            texts.append(text)
            n_chars += len(text)
            return True

        seg_start = 0
        for i, tid in enumerate(body):
            role = self.s_roles.get(tid)
            if role is None:
                continue
            if self.t_roles.get(role) is None:
                return "student_special"
            if not add_text(seg_start, body[seg_start:i]):
                return "round_trip"
            chunks.append(Chunk(i, i + 1, len(t_ids), len(t_ids) + 1, n_chars, n_chars))
            seg_of.append(n_chars)
            t_ids.append(self.t_roles[role])
            seg_start = i + 1
        if not add_text(seg_start, body[seg_start:]):
            return "round_trip"
        if stop:
            chunks.append(Chunk(len(body), len(body) + 1, len(t_ids), len(t_ids) + 1, n_chars, n_chars))
            seg_of.append(n_chars)
            t_ids.append(self.t_eos)
        if self._prefixes is not None:
            chunks = merge_unsafe(chunks, "".join(texts), seg_of, *self._prefixes)
        prompt = self._teacher_prompt(batch, b)
        if self.max_len is not None and len(prompt) + len(t_ids) > self.max_len:
            return "teacher_context"
        return RowPlan(prompt, t_ids, chunks, n)

    def _skip(self, reason: str, batch: RolloutBatch, b: int) -> None:
        s = self._stats
        s["xtok/skipped_rows"] = s.get("xtok/skipped_rows", 0) + 1
        s[f"xtok/skipped/{reason}"] = s.get(f"xtok/skipped/{reason}", 0) + 1
        if reason not in self._told:
            self._told.add(reason)
            n = int(batch.eos_mask_BT[b].sum())
            snippet = decode(self.s_tok, batch.response_ids_BT[b, :n].tolist())[:60]
            self._notice(f"opdkit: note: cross-tokenizer: a row is left out of the loss because "
                         f"{_REASON_TEXT[reason]} (response {snippet!r}); such rows are counted per step in "
                         f"xtok/skipped_rows (this notice once per reason)")

    # -- scoring
    def score(self, batch: RolloutBatch, request: TeacherRequest) -> AlignedSampledSignal:
        if request.kind not in self.kinds:  # check_serves refuses this before training; a direct caller too
            raise ValueError(f"cross-tokenizer teacher serves sampled only, not {request.kind}")
        B, T = batch.batch_size, batch.response_len
        plans: list[RowPlan | None] = []
        for b in range(B):
            p = self.plan_row(batch, b)
            if isinstance(p, str):
                self._skip(p, batch, b)
                plans.append(None)
            else:
                plans.append(p)
        s = self._stats
        s["xtok/rows"] = s.get("xtok/rows", 0) + B
        # a skipped row: the student's own log-probs (log-ratio 0), and scored_B False (masked by drop_unaligned)
        out_BT = batch.model_logprobs_BT.detach().float().clone() * batch.response_mask_BT.float()
        scored_B = torch.tensor([p is not None for p in plans], dtype=torch.bool)
        idx = [b for b, p in enumerate(plans) if p is not None]
        if idx:
            t_lp = self._score_teacher(batch, [plans[b] for b in idx], idx, request)
            s_lp = batch.model_logprobs_BT.detach().double().cpu()
            mask = batch.response_mask_BT.bool().cpu()
            rows_out = torch.zeros(len(idx), T, dtype=torch.float32)
            for j, b in enumerate(idx):
                p = plans[b]
                mapped = map_chunk_logprobs(p.chunks, t_lp[j], s_lp[b, :p.n_student].tolist(), p.n_student)
                rows_out[j, :p.n_student] = torch.tensor(mapped, dtype=torch.float32)
                s["xtok/student_tokens"] = s.get("xtok/student_tokens", 0) + p.n_student
                s["xtok/teacher_tokens"] = s.get("xtok/teacher_tokens", 0) + len(p.response_ids)
                s["_one_to_one"] = s.get("_one_to_one", 0) + sum(
                    1 for c in p.chunks if c.s1 - c.s0 == 1 and c.t1 - c.t0 == 1)
            rows_out = rows_out * mask[idx].float()  # positions outside the response mask: 0 (the convention)
            out_BT[torch.tensor(idx)] = rows_out.to(out_BT.device)
        s.setdefault("xtok/skipped_rows", 0)
        return AlignedSampledSignal(out_BT, scored_B)

    def _score_teacher(self, batch: RolloutBatch, plans: list[RowPlan], idx: list[int],
                       request: TeacherRequest) -> list[list[float]]:
        """The inner teacher's log-prob of every teacher response token, per planned row (its own ids, layout and
        vocabulary: the student's vocab_size restriction does not apply)."""
        dev = batch.input_ids_BL.device
        prompt_BP, pmask_BP = left_pad([p.prompt_ids for p in plans], self.t_pad)
        lens = [len(p.response_ids) for p in plans]
        Tt = max(max(lens), 1)
        resp = torch.full((len(plans), Tt), self.t_pad, dtype=torch.long)
        rmask = torch.zeros((len(plans), Tt), dtype=torch.long)
        for j, p in enumerate(plans):
            if p.response_ids:
                resp[j, :len(p.response_ids)] = torch.tensor(p.response_ids)
                rmask[j, :len(p.response_ids)] = 1
        zeros = torch.zeros((len(plans), Tt), dtype=torch.float32)
        ix = torch.tensor(idx)
        tb = RolloutBatch(
            input_ids_BL=torch.cat([prompt_BP, resp], 1).to(dev), attention_mask_BL=torch.cat([pmask_BP, rmask], 1).to(dev),
            prompt_len=int(prompt_BP.shape[1]), response_ids_BT=resp.to(dev), response_mask_BT=rmask.to(dev),
            eos_mask_BT=rmask.to(dev), sampler_logprobs_BT=zeros.to(dev), model_logprobs_BT=zeros.to(dev),
            prompt_index_B=batch.prompt_index_B[ix.to(batch.prompt_index_B.device)],
            response_lengths_B=torch.tensor(lens, device=dev),
            finished_B=batch.finished_B[ix.to(batch.finished_B.device)],
            records_B=None if batch.records_B is None else [batch.records_B[b] for b in idx],
            policy_version_B=None if batch.policy_version_B is None else batch.policy_version_B[
                ix.to(batch.policy_version_B.device)])
        sig = self.inner.score(tb, replace(request, kind="sampled", vocab_size=None, need_sampled=False, top_k=None))
        lp = sig.logprobs_BT.detach().double().cpu()
        return [lp[j, :n].tolist() for j, n in enumerate(lens)]
