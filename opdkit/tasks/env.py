"""The environment of a multi-turn (tool-using) episode: the `Env` protocol.

An episode alternates policy turns and environment turns:

    prompt | policy turn 1 (ends with a stop string, e.g. a tool call "[12*34]") | observation ("=408\\n") |
             policy turn 2 ... | policy's last turn (ends with EOS) -> reward

    env = task.make_env(example)          # one Env per episode (row), fresh state
    first = env.reset(record)             # an optional first observation (None: the policy speaks first)
    step = env.step(policy_text)          # EnvStep(observation="=408\\n", done=False) or EnvStep(None, done=True)
    env.reward()                          # the episode's final reward in [0, 1]

`stop` lists the strings that end a policy turn besides EOS (each must be ONE token of the policy's tokenizer: the
rollout stops generation on its id and hands the turn's text to `step`). Observations are tokenized with the
policy's tokenizer (no special tokens) and appended to the context: the student and the teacher both see them,
the loss never does (they are outside `response_mask_BT`; `env_mask_BT` marks them).

An env must never guess: a malformed tool call gets an observation that says so (the built-in calculator answers
`=?`); an exception inside `reset` / `step` / `reward` stops the run with an error naming the env and the row
(`opdkit.rollout.multiturn`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

__all__ = ["Env", "EnvStep", "SingleTurnEnv"]


@dataclass(frozen=True)
class EnvStep:
    observation: str | None  # text appended to the context after the policy's turn (None when done)
    done: bool  # True: the episode is over (a final answer, or the env ends it)

    def __post_init__(self) -> None:
        if not self.done and not self.observation:
            raise ValueError("EnvStep: an episode that goes on needs a non-empty observation (or done=True)")


@runtime_checkable
class Env(Protocol):
    """One episode's environment (see the module docstring)."""

    name: str  # named in errors and metrics
    stop: tuple[str, ...]  # strings (one token each) that end a policy turn besides EOS

    def reset(self, record: Any) -> str | None: ...

    def step(self, text: str) -> EnvStep: ...

    def reward(self) -> float: ...


class SingleTurnEnv:
    """A task without a tool inside a multi-turn mixture (`task:calc+addition`): one policy turn, then done; the
    reward is `score(text)` of that turn."""

    name = "single_turn"
    stop: tuple[str, ...] = ()

    def __init__(self, score):
        self._score, self._text = score, None

    def reset(self, record) -> str | None:
        self._text = None
        return None

    def step(self, text: str) -> EnvStep:
        self._text = text
        return EnvStep(None, done=True)

    def reward(self) -> float:
        return float(self._score(self._text)) if self._text is not None else 0.0
