"""`CachedTeacher`: teacher scores kept on disk and reused whenever the same teacher input is scored again.

    opdkit train teacher.cache_dir=runs/tcache ...          # around any backend but self_live

A row's entry is keyed by SHA-256 of (the teacher's identity — model, weights fingerprint, dtype, template; the
request — kind, K, sampled flag, temperature, vocab; the token ids the teacher sees for that row — for a
self-teacher its privileged prompt — and which response positions are scored). Rows recur in: a resumed run (the
steps after the last checkpoint are re-rolled identically), a rerun or a grid that shares rollouts, GKD steps on
fixed reference data (rollout.gkd_lambda < 1), and a cache built once for a fixed dataset and reused by other
students or objectives (Lightning OPD: a run with rollout.gkd_lambda=0 fills it). No peer caches teacher scores for
on-policy runs; on-policy samples rarely repeat, so the hit rate there is what `teacher/cache_hit_rate` reports.

Layout of `cache_dir`: `opdkit-teacher-cache.json` (format marker), `index.jsonl` (one line per stored row: key,
shard, SHA-256 of the shard), `shard-*.safetensors` (the rows of one `score` call: per row its response-length
slice of the signal). Shards are written to a temp name and renamed, then indexed; a shard whose checksum, tensor
names or shapes do not match its index, or that holds log-probs > 0 or NaN, is reported once (one line) and its rows
are recomputed, never used. Files the cache did not write are left alone.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import uuid
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save

from opdkit.errors import UserError, one_line
from opdkit.objectives.signals import FullSignal, SampledSignal, TopKSignal
from opdkit.rollout.batch import RolloutBatch
from opdkit.teacher.base import TeacherRequest

MARKER = "opdkit-teacher-cache.json"
INDEX = "index.jsonl"
FORMAT = 1
FIELDS = ("sampled", "topk_lp", "topk_ids", "hidden", "logprobs")


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class CachedTeacher:
    """Any teacher backend with a disk cache of its scores (see the module docstring)."""

    def __init__(self, inner, cache_dir: str | os.PathLike, notice=None):
        ident = inner.identity()
        if ident is None:
            raise UserError(f"teacher.cache_dir: {inner.describe()} changes with every optimizer step (a live "
                            "self-teacher), so its scores cannot be cached; drop teacher.cache_dir")
        self.inner, self.ident = inner, ident
        self.kinds = inner.kinds if hasattr(inner, "full_head") else inner.kinds - {"full"}
        self.dir = Path(cache_dir)
        self.notice = notice or (lambda line: print(line, file=sys.stderr, flush=True))
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            marker = self.dir / MARKER
            if marker.exists():
                info = json.loads(marker.read_text())
                if info.get("format") != FORMAT or info.get("kind") != "opdkit teacher cache":
                    raise UserError(f"teacher.cache_dir={self.dir}: {marker} is not an opdkit teacher cache of "
                                    f"format {FORMAT}; choose another cache_dir")
            else:
                marker.write_text(json.dumps({"kind": "opdkit teacher cache", "format": FORMAT}) + "\n")
        except (OSError, ValueError) as exc:
            raise UserError(f"teacher.cache_dir={self.dir} cannot be used: {one_line(exc)}") from None
        self.index: dict[str, tuple[str, str]] = {}  # key -> (shard name, shard sha256)
        self._bad_shards: set[str] = set()
        self._verified: set[str] = set()
        self._load_index()
        self._head = None
        self.hits = self.misses = self.bytes_written = 0

    # ---- index
    def _load_index(self) -> None:
        path = self.dir / INDEX
        if not path.exists():
            return
        bad = 0
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                rec = json.loads(line)
                self.index[str(rec["key"])] = (str(rec["shard"]), str(rec["sha256"]))
            except (ValueError, KeyError, TypeError):
                bad += 1
        if bad:
            self.notice(f"opdkit: teacher cache {self.dir}: {bad} unreadable index line(s) ignored (those rows are "
                        "recomputed)")

    def _key(self, request: TeacherRequest, ids: list[int], scored: list[int]) -> str:
        h = hashlib.sha256()
        h.update(json.dumps([self.ident, request.kind, request.top_k, request.need_sampled, request.temperature,
                             request.vocab_size]).encode())
        h.update(json.dumps(ids).encode())
        h.update(json.dumps(scored).encode())
        return h.hexdigest()[:40]

    def _row_keys(self, batch: RolloutBatch, request: TeacherRequest) -> list[str]:
        inputs = self.inner.row_inputs(batch) if hasattr(self.inner, "row_inputs") else None
        if inputs is None:
            inputs = [[t for t, a in zip(ids, att) if a] for ids, att in
                      zip(batch.input_ids_BL.tolist(), batch.attention_mask_BL.tolist(), strict=True)]
        masks = batch.response_mask_BT.tolist()
        return [self._key(request, x, [t for t, m in enumerate(mk) if m]) for x, mk in zip(inputs, masks, strict=True)]

    # ---- reading
    def _shard_ok(self, shard: str, sha: str) -> bool:
        if shard in self._bad_shards:
            return False
        if shard in self._verified:
            return True
        path = self.dir / shard
        problem = None
        if not path.is_file():
            problem = "missing"
        elif _sha256_file(path) != sha:
            problem = "its checksum differs from the index (changed or corrupted)"
        if problem:
            self._bad_shards.add(shard)
            self.notice(f"opdkit: teacher cache shard {path} is {problem}: its rows are recomputed")
            return False
        self._verified.add(shard)
        return True

    def _read_all(self, keys: list[str], request: TeacherRequest, lens: list[int]) -> list[dict | None]:
        """The cached rows of `keys` (None where absent or unusable), each shard opened once."""
        out: list[dict | None] = [None] * len(keys)
        by_shard: dict[str, list[int]] = {}
        for i, k in enumerate(keys):
            if k in self.index:
                by_shard.setdefault(self.index[k][0], []).append(i)
        for shard, idx in by_shard.items():
            if not self._shard_ok(shard, self.index[keys[idx[0]]][1]):
                continue
            try:
                with safe_open(str(self.dir / shard), framework="pt") as fh:
                    names = set(fh.keys())
                    rows = {i: {f: fh.get_tensor(f"{keys[i]}.{f}") for f in FIELDS if f"{keys[i]}.{f}" in names}
                            for i in idx}
            except Exception as exc:  # a corrupt shard: several exception types
                self._bad_shards.add(shard)
                self.notice(f"opdkit: teacher cache shard {self.dir / shard} cannot be read "
                            f"({one_line(exc)[:100]}): its rows are recomputed")
                continue
            checked = {i: self._check_row(row, shard, request, lens[i]) for i, row in rows.items()}
            for i, row in checked.items():  # one bad entry condemns its whole shard
                out[i] = None if shard in self._bad_shards else row
        return out

    def _check_row(self, row: dict, shard: str, request: TeacherRequest, T_b: int) -> dict | None:
        need = {"sampled": ["sampled"], "topk": ["topk_lp", "topk_ids"], "full": []}[request.kind]
        if request.kind == "topk" and request.need_sampled:
            need.append("sampled")
        ok = all(n in row and row[n].shape[0] == T_b for n in need)
        if request.kind == "topk" and ok:
            ok = row["topk_lp"].shape[-1] == request.top_k == row["topk_ids"].shape[-1]
        if request.kind == "full":
            ok = ("hidden" in row) != ("logprobs" in row) and next(iter(row.values())).shape[0] == T_b
        lps = [row[n] for n in ("sampled", "topk_lp", "logprobs") if n in row]
        if ok and any(bool((x.isnan() | (x > 1e-4)).any()) for x in lps):
            ok = False
        if not ok:
            self._bad_shards.add(shard)
            self.notice(f"opdkit: teacher cache shard {self.dir / shard} holds an entry of the wrong shape or with "
                        "invalid log-probs: its rows are recomputed")
            return None
        return row

    # ---- scoring
    def score(self, batch: RolloutBatch, request: TeacherRequest):
        keys = self._row_keys(batch, request)
        lens = batch.eos_mask_BT.sum(-1).tolist()
        rows = self._read_all(keys, request, [int(n) for n in lens])
        miss = [b for b, r in enumerate(rows) if r is None]
        self.hits += len(rows) - len(miss)
        self.misses += len(miss)
        fresh = None
        if miss:
            fresh = self.inner.score(batch.rows(miss), request)
            if isinstance(fresh, FullSignal) and fresh.hidden_BTH is not None:
                self._head = (fresh.head_weight_VH, fresh.head_bias_V, fresh.temperature)
            self._write([keys[b] for b in miss], fresh, [int(lens[b]) for b in miss])
            for j, b in enumerate(miss):
                rows[b] = self._row_of(fresh, j, int(lens[b]))
        return self._assemble(rows, batch, request)

    @staticmethod
    def _row_of(sig, j: int, T_b: int) -> dict:
        if isinstance(sig, SampledSignal):
            return {"sampled": sig.logprobs_BT[j, :T_b]}
        if isinstance(sig, TopKSignal):
            out = {"topk_lp": sig.logprobs_BTK[j, :T_b], "topk_ids": sig.ids_BTK[j, :T_b]}
            if sig.sampled_logprobs_BT is not None:
                out["sampled"] = sig.sampled_logprobs_BT[j, :T_b]
            return out
        if sig.hidden_BTH is not None:
            return {"hidden": sig.hidden_BTH[j, :T_b]}
        return {"logprobs": sig.logprobs_BTV[j, :T_b]}

    def _write(self, keys: list[str], sig, lens: list[int]) -> None:
        tensors = {}
        for j, (key, T_b) in enumerate(zip(keys, lens, strict=True)):
            for name, t in self._row_of(sig, j, T_b).items():
                tensors[f"{key}.{name}"] = t.detach().to("cpu").contiguous().clone()
        shard = f"shard-{uuid.uuid4().hex[:16]}.safetensors"
        tmp = self.dir / f".{shard}.tmp"
        try:
            data = save(tensors)
            sha = hashlib.sha256(data).hexdigest()
            tmp.write_bytes(data)
            os.replace(tmp, self.dir / shard)
            with open(self.dir / INDEX, "a", encoding="utf-8") as fh:
                for key in keys:
                    fh.write(json.dumps({"key": key, "shard": shard, "sha256": sha}) + "\n")
        except OSError as exc:  # the cache is an optimisation: a full disk must not stop the run
            tmp.unlink(missing_ok=True)
            self.notice(f"opdkit: teacher cache {self.dir} not written ({one_line(exc)[:120]}); scoring goes on")
            return
        self.bytes_written += len(data)
        for key in keys:
            self.index[key] = (shard, sha)
        self._verified.add(shard)

    def _assemble(self, rows: list[dict], batch: RolloutBatch, request: TeacherRequest):
        B, T = batch.response_ids_BT.shape

        def stack(name: str, *tail, dtype=torch.float32):
            out = torch.zeros(B, T, *tail, dtype=dtype)
            for b, r in enumerate(rows):
                x = r[name]
                out[b, : x.shape[0]] = x.to(dtype)
            return out

        if request.kind == "sampled":
            return SampledSignal(stack("sampled"))
        if request.kind == "topk":
            K = request.top_k
            return TopKSignal(stack("topk_lp", K), stack("topk_ids", K, dtype=torch.long),
                              stack("sampled") if request.need_sampled else None)
        if "logprobs" in rows[0]:
            V = rows[0]["logprobs"].shape[-1]
            return FullSignal(logprobs_BTV=stack("logprobs", V))
        if self._head is None:
            self._head = self.inner.full_head(request)
        W, bias, temp = self._head
        H = rows[0]["hidden"].shape[-1]
        return FullSignal(hidden_BTH=stack("hidden", H, dtype=rows[0]["hidden"].dtype), head_weight_VH=W,
                          head_bias_V=bias, temperature=temp)

    # ---- the rest of the Teacher protocol
    def validate(self, request: TeacherRequest) -> None:
        if hasattr(self.inner, "validate"):
            self.inner.validate(request)

    def identity(self) -> str | None:
        return self.ident

    def describe(self) -> str:
        return f"{self.inner.describe()} + cache {self.dir}"

    def close(self) -> None:
        self.inner.close()

    def stats(self) -> dict:
        total = self.hits + self.misses
        out = {**self.inner.stats(), "teacher/cache_hits": self.hits, "teacher/cache_misses": self.misses,
               "teacher/cache_hit_rate": self.hits / total if total else 0.0,
               "teacher/cache_bytes_written": self.bytes_written}
        self.hits = self.misses = self.bytes_written = 0
        return out

    def __getattr__(self, name):  # dtype, model, ... of the inner teacher (for the run summary)
        if name in ("inner",):
            raise AttributeError(name)
        return getattr(self.inner, name)
