"""opdkit.config: YAML + overrides -> typed nested dataclass; one-line UserErrors; help / markdown / hash / dump."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path

import pytest

from opdkit.config import config_hash, config_to_dict, dump_config, h, load_config
from opdkit.config_help import help_text, markdown_table
from opdkit.errors import UserError, cli_entry, run_cli
from opdkit.objectives.config import ObjectiveConfig


@dataclass
class Optim:
    """Optimizer settings."""

    lr: float = h("learning rate", default=1e-4)
    betas: tuple[float, float] = h("Adam betas", default=(0.9, 0.999))

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"lr={self.lr} must be > 0")


@dataclass
class Cfg:
    """A test config."""

    name: str = h("run name", default="run")
    steps: int = h("steps | count", default=10)
    seeds: list[int] = h("seeds", default_factory=lambda: [0])
    teacher: str | None = h("teacher path", default=None)
    resume: bool = h("resume", default=False)
    objective: ObjectiveConfig = h("the OPD objective", default_factory=ObjectiveConfig)
    optim: Optim = h("optimizer", default_factory=Optim)


@dataclass
class Outer:
    """A config whose section default differs from the section class's defaults (as TrainConfig.objective)."""

    objective: ObjectiveConfig = h("objective", default_factory=lambda: ObjectiveConfig(estimator="full", top_k=8))


def test_section_factory_defaults_survive_overrides(tmp_path: Path) -> None:
    # Overriding one key of a section keeps the enclosing config's defaults for its other keys (a bug once turned
    # `opdkit train objective.divergence=forward_kl` into the sampled estimator, the class default).
    c = load_config(Outer, None, ["objective.divergence=forward_kl"])
    assert (c.objective.estimator, c.objective.top_k, c.objective.divergence) == ("full", 8, "forward_kl")
    y = tmp_path / "o.yaml"
    y.write_text("objective:\n  beta: 0.3\n")
    c = load_config(Outer, str(y), [])
    assert (c.objective.estimator, c.objective.beta) == ("full", 0.3)
    assert load_config(Outer, None, ["objective.estimator=sampled"]).objective.estimator == "sampled"
    # a sampled-only knob is refused by ObjectiveConfig on the full default, and accepted with the estimator in
    # either order (the section is built once from all its keys)
    with pytest.raises(UserError, match=r"objective\.gamma=0\.5 applies to the sampled estimator only.*add "
                                        r"objective\.estimator=sampled"):
        load_config(Outer, None, ["objective.gamma=0.5"])
    for ov in (["objective.estimator=sampled", "objective.gradient=corrected", "objective.gamma=0.5"],
               ["objective.gamma=0.5", "objective.gradient=corrected", "objective.estimator=sampled"]):
        c = load_config(Outer, None, ov)
        assert (c.objective.estimator, c.objective.gradient, c.objective.gamma) == ("sampled", "corrected", 0.5)
    y.write_text("objective:\n  gradient: corrected\n")
    assert load_config(Outer, str(y), ["objective.estimator=sampled"]).objective.gradient == "corrected"
    # --help and the generated knob tables show the same defaults
    assert "objective.estimator (str, default: full)" in help_text(Outer)
    assert "| `objective.estimator` | str | `full` |" in markdown_table(Outer)


def err(overrides=(), yaml_path=None) -> str:
    with pytest.raises(UserError) as exc:
        load_config(Cfg, yaml_path, list(overrides))
    msg = str(exc.value)
    assert "\n" not in msg
    return msg


def test_defaults_and_overrides(tmp_path: Path) -> None:
    assert load_config(Cfg, None, []) == Cfg()
    y = tmp_path / "c.yaml"
    y.write_text("name: base\nsteps: 5\nobjective:\n  divergence: jsd\n  beta: 0.25\noptim:\n  lr: 1.0e-3\n")
    c = load_config(
        Cfg, str(y),
        ["optim.lr=1e-4", "steps=1e3", "seeds=[1, 2]", "name=2024", "teacher=null", "resume=true", "objective.top_k=4"],
    )
    assert c.objective.divergence == "jsd" and c.objective.beta == 0.25 and c.objective.top_k == 4
    assert c.optim.lr == pytest.approx(1e-4) and isinstance(c.optim.lr, float)
    assert c.steps == 1000 and c.seeds == [1, 2] and c.name == "2024" and c.teacher is None and c.resume is True
    assert c.optim.betas == (0.9, 0.999)
    assert load_config(Cfg, None, ["teacher=/m/x", "optim.lr=1"]).teacher == "/m/x"
    assert load_config(Cfg, None, ["optim.lr=1"]).optim.lr == 1.0  # int accepted for float
    # later overrides win; a whole section as a mapping
    assert load_config(Cfg, None, ["steps=1", "steps=2"]).steps == 2
    assert load_config(Cfg, None, ["objective={divergence: tv}"]).objective.divergence == "tv"


def test_errors_are_one_line_and_helpful(tmp_path: Path) -> None:
    m = err(["objective.divergance=jsd"])
    assert "objective.divergance" in m and "did you mean 'objective.divergence'" in m and "estimator" in m
    assert "did you mean 'optim.lr'" in err(["lr=1e-3"])
    m = err(["steps=abc"])
    assert "'steps'" in m and "int" in m and "abc" in m
    assert "bool" in err(["resume=3"])
    assert "list[int]" in err(["seeds=x"])
    assert "key=value" in err(["steps"])
    assert "not a section" in err(["name.x=1"])
    assert "is a section" in err(["optim=3"])
    # the dataclasses' own validation, prefixed with the section path
    assert err(["objective.beta=2"]).startswith("objective.beta=2.0 must be")
    assert err(["optim.lr=-1"]).startswith("optim.lr=-1.0 must be > 0")
    # files
    missing = tmp_path / "nope.yaml"
    assert str(missing) in err(yaml_path=str(missing))
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\nb: {")
    assert "bad.yaml" in err(yaml_path=str(bad))
    lst = tmp_path / "list.yaml"
    lst.write_text("- 1\n- 2\n")
    assert "mapping" in err(yaml_path=str(lst))
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("optim:\n  lrr: 1\n")
    assert "optim.lrr" in err(yaml_path=str(unknown))


def test_dump_round_trip_and_hash(tmp_path: Path) -> None:
    c = load_config(Cfg, None, ["objective.divergence=alpha", "optim.lr=3e-5", "teacher=t", "seeds=[3]"])
    d = config_to_dict(c)
    assert d["objective"]["divergence"] == "alpha" and d["optim"]["betas"] == [0.9, 0.999]
    p = dump_config(c, tmp_path / "out" / "config.yaml", header="hello")
    assert p.read_text().startswith("# hello\n")
    assert load_config(Cfg, str(p), []) == c
    assert config_hash(c) == config_hash(load_config(Cfg, str(p), []))
    assert config_hash(c) != config_hash(Cfg())
    assert len(config_hash(c)) == 16
    other = load_config(Cfg, str(p), ["resume=true", "steps=99"])
    assert config_hash(other) != config_hash(c)
    assert config_hash(other, exclude=("resume", "steps")) == config_hash(c, exclude=("resume", "steps"))
    assert config_hash(c, exclude=("objective.divergence",)) == config_hash(Cfg(
        objective=ObjectiveConfig(), optim=c.optim, teacher="t", seeds=[3]), exclude=("objective.divergence",))


def test_help_and_markdown() -> None:
    text = help_text(Cfg)
    for knob in ("name", "steps", "teacher", "objective.divergence", "objective.beta", "optim.lr", "optim.betas"):
        assert f"  {knob} (" in text
    assert "[objective] the OPD objective" in text and "[optim] optimizer" in text
    assert "optim.lr (float, default: 0.0001)" in text and "teacher (str | None, default: null)" in text
    assert "per-position divergence" in text
    md = markdown_table(Cfg)
    assert md.startswith("| knob | type | default | description |")
    assert "| `optim.lr` | float | `0.0001` | learning rate |" in md
    assert "steps \\| count" in md and "str \\| None" in md
    n_knobs = len([ln for ln in text.splitlines() if ln.startswith("  ") and "default:" in ln])
    assert len(md.strip().splitlines()) == 2 + n_knobs


def test_run_cli() -> None:
    def main(argv):
        load_config(Cfg, None, argv)
        return 0

    buf = io.StringIO()
    assert run_cli(main, ["objective.beta=2"], stderr=buf) == 2
    assert buf.getvalue() == "opdkit: error: objective.beta=2.0 must be a number in [0.0, 1.0]\n"
    assert run_cli(main, ["steps=3"], stderr=buf) == 0

    def direct(argv):  # a config built directly: its __post_init__ ValueError is a user error too
        ObjectiveConfig(divergence="nope")

    buf = io.StringIO()
    assert run_cli(direct, [], stderr=buf) == 2 and buf.getvalue().startswith("opdkit: error: objective.divergence=")

    def bug(argv):
        raise ValueError("internal bug")

    with pytest.raises(ValueError, match="internal bug"):
        run_cli(bug, [])

    @cli_entry
    def wrapped(argv):
        raise UserError("two\nlines")

    assert wrapped([]) == 2


def test_data_path_aliases_are_shared_by_train_sft_and_eval(tmp_path: Path) -> None:
    """The data path is data.prompts (train), data.jsonl (sft) and data (eval): each command accepts the others'
    names, in overrides and in a config file; an alias next to its knob is refused."""
    from opdkit.eval.run import EvalConfig
    from opdkit.train.config import TrainConfig
    from opdkit.train.sft import SFTConfig

    assert load_config(TrainConfig, None, ["data.jsonl=a.jsonl"]).data.prompts == "a.jsonl"
    assert load_config(SFTConfig, None, ["data.prompts=a.jsonl"]).data.jsonl == "a.jsonl"
    assert load_config(EvalConfig, None, ["data.jsonl=a.jsonl"]).data == "a.jsonl"
    assert load_config(EvalConfig, None, ["data.prompts=a.jsonl"]).data == "a.jsonl"
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  jsonl: z.jsonl\n")
    assert load_config(TrainConfig, str(p), []).data.prompts == "z.jsonl"
    assert load_config(EvalConfig, str(p), []).data == "z.jsonl"
    assert load_config(SFTConfig, str(p), []).data.jsonl == "z.jsonl"
    # the canonical name is what a run saves: the same hash either way
    assert config_hash(load_config(TrainConfig, None, ["data.jsonl=a.jsonl"])) == config_hash(
        load_config(TrainConfig, None, ["data.prompts=a.jsonl"]))
    p.write_text("data:\n  jsonl: z.jsonl\n  prompts: y.jsonl\n")
    with pytest.raises(UserError, match="another name of 'data.prompts'"):
        load_config(TrainConfig, str(p), [])
    assert "data.jsonl = data.prompts" in help_text(TrainConfig)
    assert run_cli(lambda a: load_config(EvalConfig, None, a) and 0, ["data.jsonl.x=1"], stderr=io.StringIO()) == 2
