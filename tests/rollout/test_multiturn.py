"""Multi-turn rollouts: the episode layout (policy turns + env observations in one response region), the loss mask
over policy tokens only, single-turn as a bit-identical special case, and bad input (an env that raises, an
observation over the budget, a multi-token stop string)."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from opdkit.data.prompts import PromptRecord
from opdkit.errors import UserError
from opdkit.rollout.base import SamplingSpec
from opdkit.rollout.batch import RolloutBatch
from opdkit.rollout.hf import HFRollout
from opdkit.rollout.multiturn import MultiTurnRollout
from opdkit.tasks import build_char_tokenizer, get_task
from opdkit.tasks.env import EnvStep

TASK = get_task("calc")
TOK = build_char_tokenizer([TASK.alphabet + "x"])
EOS, PAD = TOK.eos_token_id, TOK.pad_token_id


def ids(text: str) -> list[int]:
    return TOK(text, add_special_tokens=False)["input_ids"]


class Scripted:
    """An inner rollout that writes a fixed turn per (prompt, turn number): turn k of a row is script[k], the turn
    number being the count of observations ("\\n") already in the context after the prompt."""

    version = 3

    def __init__(self, script: list[str], prompt_len: int):
        self.script, self.P, self.calls = script, prompt_len, []

    def sample(self, prompt_ids, spec, *, records=None, generator=None, seed=0):
        self.calls.append((len(prompt_ids), spec.max_new_tokens, spec.eos_ids))
        outs = []
        for p in prompt_ids:
            k = TOK.decode(p[self.P:]).count("\n")
            toks = ids(self.script[k].replace("<eos>", "")) + ([EOS] if self.script[k].endswith("<eos>") else [])
            toks = toks[:spec.max_new_tokens]
            outs.append(toks)
        T = max(len(t) for t in outs)
        B = len(outs)
        resp = torch.full((B, T), PAD)
        m = torch.zeros((B, T), dtype=torch.long)
        for b, t in enumerate(outs):
            resp[b, :len(t)] = torch.tensor(t)
            m[b, :len(t)] = 1
        lp = -0.5 * m.float()
        return RolloutBatch(input_ids_BL=resp, attention_mask_BL=m, prompt_len=0, response_ids_BT=resp,
                            response_mask_BT=m, eos_mask_BT=m, sampler_logprobs_BT=lp, model_logprobs_BT=lp - 0.25,
                            prompt_index_B=torch.arange(B), response_lengths_B=m.sum(-1),
                            finished_B=torch.ones(B, dtype=torch.bool),
                            policy_version_B=torch.full((B,), self.version))

    def stats(self):
        return {}


def records(problems):
    exs = [TASK.make_example(p) for p in problems]
    return exs, [PromptRecord(prompt_text=e.prompt, answer=e.answer, meta={"example": e}) for e in exs]


def env_for(rec):
    return TASK.make_env(rec.meta["example"])


def spec(max_new=64, n=1):
    return SamplingSpec(max_new_tokens=max_new, eos_ids=(EOS,), pad_id=PAD, n=n)


def test_episode_layout_masks_and_reward():
    exs, recs = records(["12*34+5"])
    prompt = [1] + ids(exs[0].prompt)
    inner = Scripted(["[12*34]", "[408+5]", "=> 413\n<eos>"], len(prompt))
    mt = MultiTurnRollout(inner, env_for, TOK, max_turns=4)
    b = mt.sample([prompt], spec(), records=recs)
    want = "[12*34]=408\n[408+5]=413\n=> 413\n"
    n = int(b.response_lengths_B[0])
    assert TOK.decode(b.response_ids_BT[0, :n - 1].tolist()) == want and b.response_ids_BT[0, n - 1] == EOS
    env_text = "".join(TOK.decode([t]) for t, e in zip(b.response_ids_BT[0, :n].tolist(), b.env_mask_BT[0, :n].tolist())
                       if e)
    assert env_text == "=408\n=413\n"
    # policy tokens: in the loss with their log-probs; env tokens: attended, out of the loss, log-prob 0
    pol = b.response_mask_BT[0, :n].bool()
    assert torch.equal(pol, ~b.env_mask_BT[0, :n].bool())
    assert bool((b.sampler_logprobs_BT[0, :n][pol] == -0.5).all()) and bool((b.sampler_logprobs_BT[0, :n][~pol] == 0).all())
    assert int(b.eos_mask_BT[0].sum()) == n and torch.equal(b.input_ids_BL[:, b.prompt_len:], b.response_ids_BT)
    assert bool(b.finished_B[0]) and b.env_rewards_B.tolist() == [1.0] and int(b.policy_version_B[0]) == 3
    assert TASK.score(TOK.decode(b.response_ids_BT[0, :n].tolist(), skip_special_tokens=True), exs[0]) == 1.0
    assert inner.calls[0][2] == tuple(sorted({EOS, ids("]")[0]}))  # a turn stops at EOS or at the tool call's "]"
    st = mt.stats()
    assert st["rollout/turns_mean"] == 3 and st["rollout/env_overflow"] == 0 and st["rollout/turn_limit"] == 0


def test_wrong_call_and_turn_limit_and_truncation():
    exs, recs = records(["12*34+5", "7*8+9"])
    prompt = [1] + ids(exs[0].prompt)
    # a malformed call gets "=?" (never a guess); the episode then hits the turn limit: cut, counted, reward 0
    mt = MultiTurnRollout(Scripted(["[12x34]", "[1+1]", "[1+1]"], len(prompt)), env_for, TOK, max_turns=2)
    b = mt.sample([prompt], spec(), records=recs[:1])
    n = int(b.response_lengths_B[0])
    assert TOK.decode(b.response_ids_BT[0, :n].tolist()) == "[12x34]=?\n[1+1]=2\n"
    assert not bool(b.finished_B[0]) and b.env_rewards_B.tolist() == [0.0]
    assert mt.stats()["rollout/turn_limit"] == 1
    # the episode budget: a turn longer than what is left is cut there
    b = mt.sample([prompt], spec(max_new=12), records=recs[:1])
    assert int(b.response_lengths_B[0]) == 12 and not bool(b.finished_B[0])
    assert mt.stats()["rollout/truncated"] == 1


def test_observation_over_budget_ends_episode_and_is_counted():
    exs, recs = records(["999*99+999"])
    prompt = [1] + ids(exs[0].prompt)
    mt = MultiTurnRollout(Scripted(["[999*99]", "=> 1\n<eos>"], len(prompt)), env_for, TOK, max_turns=4)
    b = mt.sample([prompt], spec(max_new=12), records=recs)  # "[999*99]" (8) + "=98901\n" (7) > 12
    n = int(b.response_lengths_B[0])
    assert TOK.decode(b.response_ids_BT[0, :n].tolist()) == "[999*99]"  # the observation was NOT cut to fit
    assert int(b.env_mask_BT.sum()) == 0 and not bool(b.finished_B[0])
    assert mt.stats()["rollout/env_overflow"] == 1


class Raising:
    name = "broken"
    stop = ("]",)

    def reset(self, record):
        return None

    def step(self, text):
        raise KeyError("no such tool")

    def reward(self):
        return 0.0


def test_env_that_raises_names_env_and_row():
    exs, recs = records(["12*34+5", "7*8+9"])
    prompt = [1] + ids(exs[0].prompt)
    mt = MultiTurnRollout(Scripted(["[1+1]"], len(prompt)), lambda r: Raising(), TOK, max_turns=2)
    with pytest.raises(UserError, match=r"env 'broken' raised in step on row 0 \(prompt 'Q: 12\*34\+5.*KeyError"):
        mt.sample([prompt, prompt], spec(), records=recs)
    with pytest.raises(UserError, match="the env factory raised in making the env on row 1"):
        MultiTurnRollout(Scripted(["x"], 0), lambda r: {"12*34+5": Raising()}[r.meta["example"].meta["problem"]],
                         TOK, max_turns=1).sample([prompt, prompt], spec(), records=recs)


def test_multi_token_stop_string_is_refused():
    class Env2(Raising):
        stop = ("]]",)

    exs, recs = records(["12*34+5"])
    mt = MultiTurnRollout(Scripted(["[1+1]"], 1), lambda r: Env2(), TOK, max_turns=2)
    with pytest.raises(UserError, match=r"stop string '\]\]' is 2 tokens"):
        mt.sample([[1]], spec(), records=recs)

    class Env3(Raising):
        stop = ("#",)  # not a character of the calc alphabet: the unknown token

    mt = MultiTurnRollout(Scripted(["[1+1]"], 1), lambda r: Env3(), TOK, max_turns=2)
    with pytest.raises(UserError, match=r"stop string '#' is not in the policy's vocabulary"):
        mt.sample([[1]], spec(), records=recs)


class OneTurn:
    name = "single"
    stop = ()

    def reset(self, record):
        return None

    def step(self, text):
        return EnvStep(None, done=True)

    def reward(self):
        return 1.0


def tiny_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(TOK), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, eos_token_id=EOS, pad_token_id=PAD,
                      max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("per_row", [False, True])
def test_single_turn_is_bit_identical_to_the_plain_rollout(per_row):
    model = tiny_model()
    exs, recs = records(["12*34+5", "7*8+9", "123*45+678"])
    prompts = [[1] + ids(e.prompt) for e in exs]
    sp = SamplingSpec(max_new_tokens=20, eos_ids=(EOS,), pad_id=PAD, n=2, temperature=1.0)

    def gen():
        if per_row:
            return [torch.Generator().manual_seed(100 + i) for i in range(len(prompts) * sp.n)]
        return torch.Generator().manual_seed(7)

    a = HFRollout(model).sample(prompts, sp, records=recs, generator=gen())
    b = MultiTurnRollout(HFRollout(model), lambda r: OneTurn(), TOK, max_turns=3).sample(
        prompts, sp, records=recs, generator=gen())
    for f in ("input_ids_BL", "attention_mask_BL", "response_ids_BT", "response_mask_BT", "eos_mask_BT",
              "sampler_logprobs_BT", "model_logprobs_BT", "prompt_index_B", "response_lengths_B", "finished_B",
              "policy_version_B"):
        x, y = getattr(a, f), getattr(b, f)
        assert x.dtype == y.dtype and torch.equal(x, y), f
    assert a.prompt_len == b.prompt_len and a.records_B == b.records_B
    assert int(b.env_mask_BT.sum()) == 0 and a.env_mask_BT is None


def test_real_model_episode_is_consistent_and_teacher_scores_full_context():
    from opdkit.teacher.hf import score

    model = tiny_model()
    exs, recs = records(["12*34+5", "7*8+9"])
    prompts = [[1] + ids(e.prompt) for e in exs]
    mt = MultiTurnRollout(HFRollout(model), env_for, TOK, max_turns=3)
    b = mt.sample(prompts, spec(max_new=40, n=2), records=recs, generator=torch.Generator().manual_seed(0))
    assert b.batch_size == 4 and torch.equal(b.input_ids_BL[:, b.prompt_len:], b.response_ids_BT)
    assert torch.equal(b.response_mask_BT, b.eos_mask_BT * (1 - b.env_mask_BT))
    assert b.records_B == [recs[0], recs[0], recs[1], recs[1]]
    assert int(b.env_mask_BT.sum()) > 0  # (this seed) the random model closes calls: observations in the context
    lp = score(model, b.input_ids_BL, b.attention_mask_BL, b.prompt_len, b.response_ids_BT, b.response_mask_BT,
               signal="sampled").logprobs_BT
    assert bool((lp[b.env_mask_BT.bool()] == 0).all())
    # the teacher's log-prob of a policy token = the model's on the full episode context (teacher-forced)
    with torch.no_grad():
        from opdkit.rollout.batch import position_ids_from_mask

        full = model(input_ids=b.input_ids_BL, attention_mask=b.attention_mask_BL,
                     position_ids=position_ids_from_mask(b.attention_mask_BL)).logits[:, b.prompt_len - 1:-1]
        ref = torch.log_softmax(full.float(), -1).gather(-1, b.response_ids_BT[..., None]).squeeze(-1)
    m = b.response_mask_BT.bool()
    torch.testing.assert_close(lp[m], ref[m], atol=1e-5, rtol=1e-5)
    # the sampler's log-probs of policy tokens are those of the same context (re-prefilled each turn)
    torch.testing.assert_close(b.model_logprobs_BT[m], ref[m], atol=1e-4, rtol=1e-4)
