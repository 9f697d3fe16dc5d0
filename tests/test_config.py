"""craft.config: profiles + overrides -> strict stage dataclasses."""

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest

from craft import config
from craft.config import ConfigError, from_dict, load_profile, load_stage_config


@dataclass
class Inner:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass
class Toy:
    steps: int = 10
    name: str = "x"
    mode: Literal["a", "b"] = "a"
    flag: bool = False
    tags: list[str] = field(default_factory=list)
    base: str | None = None
    optim: Inner = field(default_factory=Inner)

    def validate(self):
        if self.steps < 0:
            raise ValueError("steps must be >= 0")


@pytest.fixture
def toy_stage(monkeypatch, tmp_path):
    import sys
    import types

    mod = types.ModuleType("toy_stage_mod")
    mod.Toy = Toy
    monkeypatch.setitem(sys.modules, "toy_stage_mod", mod)
    monkeypatch.setitem(config.STAGES, "toy", "toy_stage_mod:Toy")
    monkeypatch.setitem(config.STAGES, "other", "toy_stage_mod:Toy")
    prof = tmp_path / "p.yaml"
    prof.write_text("description: test\ntoy:\n  steps: 3\n  optim: {lr: 0.01}\n")
    return prof


def test_profile_and_overrides(toy_stage):
    cfg = load_stage_config("toy", toy_stage, ["name=hello", "optim.betas=[0.5, 0.6]", "tags=a,b", "flag=true"])
    assert cfg.steps == 3 and cfg.name == "hello" and cfg.flag is True
    assert cfg.optim.lr == 0.01 and cfg.optim.betas == (0.5, 0.6)
    assert cfg.tags == ["a", "b"]


def test_qualified_overrides_route_to_their_stage(toy_stage):
    cfg = load_stage_config("toy", toy_stage, ["toy.steps=7", "other.steps=99"])
    assert cfg.steps == 7


def test_string_field_keeps_text(toy_stage):
    assert load_stage_config("toy", toy_stage, ["name=123"]).name == "123"
    assert load_stage_config("toy", toy_stage, ["base=null"]).base is None
    assert load_stage_config("toy", toy_stage, ["base=s3://b/m"]).base == "s3://b/m"


def test_exponent_without_a_dot_is_a_number(toy_stage, tmp_path):
    # YAML 1.1 reads 3e-3 as a string; a float field must still take it, from the CLI and from a file
    assert load_stage_config("toy", toy_stage, ["optim.lr=3e-3"]).optim.lr == 0.003
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {toy_stage}\ntoy:\n  optim: {{lr: 2e-4}}\n")
    assert load_stage_config("toy", child).optim.lr == 0.0002


@pytest.mark.parametrize(
    "override, needle",
    [
        ("stepz=3", "toy.stepz: unknown key"),
        ("steps=abc", "toy.steps: expected an integer"),
        ("steps=1.5", "toy.steps: expected an integer"),
        ("flag=maybe", "toy.flag: expected true or false"),
        ("mode=c", "toy.mode: 'c' is not one of"),
        ("optim.lr=fast", "toy.optim.lr: expected a number"),
        ("optim.nope=1", "toy.optim.nope: unknown key"),
        ("steps=-1", "steps must be >= 0"),
        ("novalue", "not of the form key=value"),
    ],
)
def test_bad_values_name_the_key(toy_stage, override, needle):
    with pytest.raises(ConfigError, match=None) as err:
        load_stage_config("toy", toy_stage, [override])
    assert needle in str(err.value)


def test_unknown_stage_section_in_profile(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("dta:\n  n: 3\n")
    with pytest.raises(ConfigError, match="unknown stage section 'dta'"):
        load_profile(p)


def test_extends_merges_sections(tmp_path, toy_stage, monkeypatch):
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {toy_stage}\ntoy:\n  optim: {{betas: [0.1, 0.2]}}\n")
    cfg = load_stage_config("toy", child)
    assert cfg.steps == 3 and cfg.optim.lr == 0.01 and cfg.optim.betas == (0.1, 0.2)


def test_missing_profile_lists_bundled():
    with pytest.raises(ConfigError, match="demo-histo"):
        load_profile("no-such-profile")


def test_comma_list_items_are_typed(toy_stage):
    cfg = load_stage_config("toy", toy_stage, ["optim.betas=0.5,0.25"])
    assert cfg.optim.betas == (0.5, 0.25)


def test_from_dict_float_accepts_int():
    assert from_dict(Inner, {"lr": 1}).lr == 1.0


def test_bundled_profiles_load_every_section():
    """Every bundled profile parses and every section becomes its stage's dataclass."""
    profiles = sorted(Path(config.config_dir()).glob("*.yaml"))
    assert profiles
    for prof in profiles:
        for stage in load_profile(prof):
            load_stage_config(stage, prof)


def test_dotted_override_changes_one_entry_of_a_default_mapping():
    from craft.losses import DEFAULT_REWARD_WEIGHTS

    cfg = load_stage_config("reward", "demo-histo", ["reward.reward_weights.vdc=0"])
    assert cfg.reward_weights == {**DEFAULT_REWARD_WEIGHTS, "vdc": 0.0}  # leave-one-out keeps the others
    again = load_stage_config("reward", "demo-histo", [])
    assert again.reward_weights == DEFAULT_REWARD_WEIGHTS  # the default mapping itself was not mutated


@pytest.mark.parametrize(
    "item, why",
    [
        ("gates.cas.absolute=0", "promotion gates"),
        ("gates.near_duplicates.enabled=false", "promotion gates"),
        ("registry.root=s3://elsewhere", "model registry"),
        ("annotate.api_key_env=MY_KEY", "'api_key_env'"),
        ("api_key_env=MY_KEY", "'api_key_env'"),
        ("dpo.judge.api_key_env=MY_KEY", "'api_key_env'"),
    ],
)
def test_protected_overrides_are_refused(item, why):
    assert why in config.protected_override(item)
    with pytest.raises(ConfigError, match="refused"):
        config.check_run_overrides(["data.n=64", item])


def test_ordinary_run_overrides_pass():
    items = ("reward.loop.steps=10", "data.n=64", "validate.min_per_class=1", "pipeline.until=validate")
    for item in items:
        assert config.protected_override(item) is None
    assert config.check_run_overrides(items) == list(items)  # returned as a list
    assert config.check_run_overrides(None) == []
    assert config.protected_override("data.environment=x") is None  # only a field *ending* in _env is protected
    with pytest.raises(ConfigError, match="not of the form stage.key=value"):
        config.check_run_overrides(["data.n"])


@pytest.mark.parametrize("item", ["gates.cas.absolute=0", "registry.root=s3://elsewhere", "toy.name_env=X"])
def test_every_stage_refuses_protected_overrides(toy_stage, item):
    """A qualified gates.* / registry.* / *_env override is refused by whichever stage loads the list."""
    with pytest.raises(ConfigError, match="refused"):
        load_stage_config("toy", toy_stage, ["steps=2", item])
    with pytest.raises(ConfigError, match="refused"):
        load_stage_config("data", "demo-histo", [item])


def test_bundled_stages_refuse_protected_overrides():
    with pytest.raises(ConfigError, match="promotion gates"):
        load_stage_config("gates", "demo-histo", ["gates.cas.absolute=0.01"])  # not even by the gates stage
    with pytest.raises(ConfigError, match="model registry"):
        load_stage_config("registry", "demo-histo", ["registry.root=s3://elsewhere"])
    with pytest.raises(ConfigError, match="api_key_env"):
        load_stage_config("annotate", "demo-histo", ["api_key_env=ATTACKER_KEY"])  # unqualified too
    # the overrides that are not protected still route as before
    assert load_stage_config("data", "demo-histo", ["data.seed=7", "reward.loop.steps=1"]).seed == 7
