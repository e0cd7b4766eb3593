"""teacher.cache_dir (CachedTeacher) and teacher.routes (RoutedTeacher): equal to the plain teachers, faults
detected and recomputed, and both wired into `opdkit train`."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from opdkit.data.prompts import PromptRecord
from opdkit.errors import UserError
from opdkit.models import tiny_llama
from opdkit.rollout import generate
from opdkit.tasks import Addition, ArithChain, build_char_tokenizer
from opdkit.teacher import HFTeacher, SelfTeacher, TeacherRequest
from opdkit.teacher.cache import INDEX, MARKER, CachedTeacher
from opdkit.teacher.route import RoutedTeacher
from opdkit.train import loop
from opdkit.checkpoint import save_model_dir

REQUESTS = [TeacherRequest("sampled"), TeacherRequest("topk", top_k=4, need_sampled=True), TeacherRequest("full")]


def _fields(sig):
    return {k: v for k, v in vars(sig).items() if isinstance(v, torch.Tensor) and not k.startswith("head")}


def _equal(a, b, mask=None) -> bool:
    """Equal signals; a full signal at the scored positions (`mask`, default all) only: a hidden-state signal
    carries hidden states past EOS too, which no loss reads and the cache does not keep."""
    fa, fb = _fields(a), _fields(b)
    if "hidden_BTH" in fa or "hidden_BTH" in fb:
        m = torch.ones(a.shape_BT(), dtype=torch.bool) if mask is None else mask.bool()
        return torch.equal(a.dense_logprobs()[m], b.dense_logprobs()[m])
    return fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)


@pytest.fixture(scope="module")
def setting():
    tok = build_char_tokenizer([Addition.alphabet + ArithChain.alphabet])
    ids = dict(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    V = len(tok)
    student, t1, t2 = (tiny_llama(V, seed=s, **ids) for s in (0, 1, 2))
    prompts = [list(tok(p, add_special_tokens=False)["input_ids"]) for p in ("12+3=", "4*(5-1)=", "7+8=", "9-2=")]
    batch = generate(student, prompts, n_samples=2, max_new_tokens=8, eos_token_ids=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id, generator=torch.Generator().manual_seed(0))
    recs = [PromptRecord(p, meta={"task": k}) for p, k in
            zip(("a", "b", "c", "d"), ("addition", "arith_chain", "addition", "arith_chain"))]
    return tok, student, t1, t2, batch.with_records(recs)


# ------------------------------------------------------------------------------------------------ cache
@pytest.mark.parametrize("req", REQUESTS, ids=lambda r: r.kind)
def test_cache_hits_give_the_teachers_own_signal(setting, tmp_path, req):
    tok, _, t1, _, batch = setting
    plain = HFTeacher(t1).score(batch, req)
    cached = CachedTeacher(HFTeacher(t1), tmp_path / "c")
    first = cached.score(batch, req)
    s = cached.stats()
    assert (s["teacher/cache_hits"], s["teacher/cache_misses"]) == (0, 8) and s["teacher/cache_bytes_written"] > 0
    again = CachedTeacher(HFTeacher(t1), tmp_path / "c")  # a new process: reads the index from disk
    second = again.score(batch, req)
    assert again.stats()["teacher/cache_hits"] == 8
    m = batch.response_mask_BT
    assert _equal(first, plain, m) and _equal(second, plain, m)
    # a batch sharing rows with the cached one: those rows hit, the rest are scored
    mixed = again.score(batch.rows([0, 5, 3]), req)
    assert again.stats()["teacher/cache_hits"] == 3 and _equal(mixed, plain.rows([0, 5, 3]), m[[0, 5, 3]])
    # another teacher or another request never hits
    other = CachedTeacher(HFTeacher(setting[3]), tmp_path / "c")
    other.score(batch, req)
    assert other.stats()["teacher/cache_hits"] == 0


def test_damaged_cache_files_are_reported_and_recomputed(setting, tmp_path):
    tok, _, t1, _, batch = setting
    req = REQUESTS[1]
    plain = HFTeacher(t1).score(batch, req)
    CachedTeacher(HFTeacher(t1), tmp_path / "c").score(batch, req)
    shard = next((tmp_path / "c").glob("shard-*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-5] ^= 0x55
    shard.write_bytes(bytes(data))
    with open(tmp_path / "c" / INDEX, "a") as fh:
        fh.write("{not json\n")
    notes = []
    c = CachedTeacher(HFTeacher(t1), tmp_path / "c", notice=notes.append)
    assert _equal(c.score(batch, req), plain) and c.stats()["teacher/cache_hits"] == 0
    assert any("unreadable index" in n for n in notes) and any("checksum differs" in n for n in notes)
    # a shard re-signed with a NaN in it (checksum fine): caught by the value check, recomputed
    (tmp_path / "d").mkdir()
    CachedTeacher(HFTeacher(t1), tmp_path / "d").score(batch, req)
    shard = next((tmp_path / "d").glob("shard-*.safetensors"))
    sd = load_file(str(shard))
    name = next(k for k in sd if k.endswith(".topk_lp"))
    sd[name][0, 0] = float("nan")
    save_file(sd, str(shard))
    from opdkit.teacher.cache import _sha256_file

    lines = [json.loads(x) for x in (tmp_path / "d" / INDEX).read_text().splitlines()]
    (tmp_path / "d" / INDEX).write_text("".join(json.dumps({**x, "sha256": _sha256_file(shard)}) + "\n" for x in lines))
    notes = []
    c = CachedTeacher(HFTeacher(t1), tmp_path / "d", notice=notes.append)
    assert _equal(c.score(batch, req), plain) and any("invalid log-probs" in n for n in notes)


def test_foreign_cache_dir_and_live_teacher_are_refused(setting, tmp_path):
    tok, student, t1, _, _ = setting
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / MARKER).write_text('{"kind": "something else"}')
    with pytest.raises(UserError, match="not an opdkit teacher cache"):
        CachedTeacher(HFTeacher(t1), tmp_path / "x")
    live = SelfTeacher(student, tok, "{prompt} {privileged}", live=True, pad_token_id=tok.pad_token_id)
    with pytest.raises(UserError, match="cannot be cached"):
        CachedTeacher(live, tmp_path / "y")


def test_a_resumed_run_hits_the_cache_and_ends_with_the_same_weights(tmp_path, monkeypatch):
    from tests.train.test_trainer import _metrics, _run, _weights
    from tests.train.tiny_run import make_pair

    pair = make_pair(tmp_path / "pair")
    _run(pair, tmp_path / "plain", "save_every=2", steps=4)
    cache = f"teacher.cache_dir={tmp_path / 'cache'}"
    real = loop.update
    calls = {"n": 0}

    def dying(*a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(loop, "update", dying)
    with pytest.raises(KeyboardInterrupt):
        _run(pair, tmp_path / "run", "save_every=2", cache, steps=4)
    monkeypatch.setattr(loop, "update", real)
    _run(pair, tmp_path / "run", "save_every=2", cache, "resume=true", steps=4)
    rows = {r["step"]: r for r in _metrics(tmp_path / "run") if "loss" in r}
    assert rows[3]["teacher/cache_hit_rate"] == 1.0 and rows[4]["teacher/cache_hits"] > 0  # re-rolled steps hit
    a, b = _weights(tmp_path / "plain"), _weights(tmp_path / "run")
    assert all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------------------ routing
@pytest.mark.parametrize("req", REQUESTS, ids=lambda r: r.kind)
def test_routed_rows_get_their_own_teachers_signal(setting, req):
    tok, _, t1, t2, batch = setting
    routed = RoutedTeacher({"addition": HFTeacher(t1), "arith_chain": HFTeacher(t2)}, lambda r: r.meta["task"])
    sig = routed.score(batch, req)
    rows_a = [b for b, r in enumerate(batch.records_B) if r.meta["task"] == "addition"]
    rows_c = [b for b, r in enumerate(batch.records_B) if r.meta["task"] == "arith_chain"]
    ref_a, ref_c = HFTeacher(t1).score(batch, req), HFTeacher(t2).score(batch, req)
    if req.kind == "full":
        dense = sig.dense_logprobs()
        assert torch.allclose(dense[rows_a], ref_a.dense_logprobs()[rows_a], atol=1e-6)
        assert torch.allclose(dense[rows_c], ref_c.dense_logprobs()[rows_c], atol=1e-6)
    else:
        assert _equal(sig.rows(rows_a), ref_a.rows(rows_a)) and _equal(sig.rows(rows_c), ref_c.rows(rows_c))
    st = routed.stats()
    assert st["route/addition/rows"] == 4 and st["route/arith_chain/tokens"] > 0
    if req.kind != "topk" or req.need_sampled:
        assert "route/addition/kl" in st
    with pytest.raises(Exception, match="no teacher for route key"):
        RoutedTeacher({"addition": HFTeacher(t1)}, lambda r: r.meta["task"]).score(batch, req)
    fallback = RoutedTeacher({"addition": HFTeacher(t1), "*": HFTeacher(t2)}, lambda r: r.meta["task"])
    assert _equal(fallback.score(batch, REQUESTS[0]), routed.score(batch, REQUESTS[0]))


def test_train_with_two_teachers_on_mixed_prompts(setting, tmp_path, capsys):
    tok, student, t1, t2, _ = setting
    paths = {}
    for name, m in (("student", student), ("t_add", t1), ("t_chain", t2)):
        paths[name] = str(save_model_dir(m, tok, tmp_path / name))
    common = [f"model.student={paths['student']}", "data.prompts=task:addition+arith_chain", "data.eval_prompts=6",
              "rollout.prompts_per_step=4", "rollout.max_new_tokens=12", "steps=2", "save_every=0", "progress=false",
              "teacher.dtype=float32", f"run_dir={tmp_path / 'run'}"]
    routes = f"teacher.routes={{addition: {paths['t_add']}, arith_chain: {paths['t_chain']}}}"
    assert loop.main(common + [routes]) == 0
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step = [r for r in recs if "loss" in r][-1]
    assert step["route/addition/rows"] + step["route/arith_chain/rows"] == 4
    assert "eval/accuracy/addition" in recs[0] and "eval/accuracy/arith_chain" in recs[-1]
    # a key without a teacher is refused before anything is written
    bad = tmp_path / "bad"
    args = [a if not a.startswith("run_dir=") else f"run_dir={bad}" for a in common]
    assert loop.main(args + [f"teacher.routes={{addition: {paths['t_add']}}}"]) == 2
    assert "no teacher for route key 'arith_chain'" in capsys.readouterr().err and not bad.exists()
