"""Config loading, overrides, the YAML round trip, the presets (files and source defaults), and a
table of bad inputs."""

import dataclasses
import glob
import os

import pytest

from rlhf_jax import config as C
from rlhf_jax.optim import OptimConfig
from rlhf_jax.pipeline import ExperimentConfig

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = sorted(glob.glob(os.path.join(ROOT, "experiments", "configs", "*.yaml")))


@dataclasses.dataclass(frozen=True)
class _Leaf:
    pair: tuple[int, float] = (1, 2.0)  # a fixed-length tuple
    mode: str = "a"  # a string


@dataclasses.dataclass(frozen=True)
class _Root:
    optim: OptimConfig = OptimConfig()  # a real library section
    leaf: _Leaf = _Leaf()  # a nested local section
    names: tuple[str, ...] = ()  # a variable-length tuple
    table: dict[str, int] = dataclasses.field(default_factory=dict)  # a mapping
    maybe: _Leaf | None = None  # an optional section


@dataclasses.dataclass(frozen=True)
class _Needs:
    size: int  # required
    name: str  # required
    leaf: _Leaf = _Leaf()  # a section


@dataclasses.dataclass(frozen=True)
class _Algo:
    preset: str = "rlhf-jax"  # names an entry of rlhf_jax.presets.PRESETS
    kl_coef: float = 1.0  # one of the SourceDefaults fields
    gamma: float = 0.5  # another
    vf_coef: float = 0.3  # None in some sources: left alone there
    other: int = 7  # not a source default


def test_layers_defaults_yaml_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("run:\n  seed: 5\n  dir: runs/x\nparallel:\n  mesh:\n    data: 2\n")
    cfg = C.load_config(f, ["run.seed=7", "parallel.preset=fsdp", "run.wandb_project=null"])
    assert isinstance(cfg, ExperimentConfig)
    assert cfg.run.seed == 7 and cfg.run.dir == "runs/x" and cfg.parallel.mesh.data == 2
    assert cfg.parallel.preset == "fsdp" and cfg.run.wandb_project is None
    assert cfg.run.tensorboard is True  # untouched default
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.run.seed = 1


def test_yaml_round_trip_and_describe(tmp_path):
    cfg = C.load_config(None, ["run.seed=3", "parallel.distributed.local_device_ids=[0,1]"])
    text = C.to_yaml(cfg)
    assert "seed: 3  # the run seed" in text
    (tmp_path / "back.yaml").write_text(text)
    assert C.load_config(tmp_path / "back.yaml") == cfg
    table = C.describe(cfg)
    assert "run.seed" in table and "int = 3" in table and "parallel.mesh.data" in table


def test_local_types():
    cfg = C.from_dict(
        _Root,
        {
            "optim": {"learning_rate": 1e-4},
            "leaf": {"pair": [3, 4]},
            "names": ["a"],
            "table": {"x": 1},
        },
    )
    assert cfg.optim.learning_rate == 1e-4 and cfg.leaf.pair == (3, 4.0)
    assert cfg.names == ("a",) and cfg.table == {"x": 1}
    assert C.from_dict(_Root, C.to_dict(cfg)) == cfg


def test_the_three_presets_exist():
    assert {os.path.basename(p) for p in PRESETS} >= {"toy.yaml", "gpt2-imdb.yaml", "qwen3-hh.yaml"}


@pytest.mark.parametrize("path", PRESETS, ids=[os.path.basename(p) for p in PRESETS])
def test_presets_load(path):
    cfg = C.load_config(path)
    assert isinstance(cfg, ExperimentConfig)
    if os.path.basename(path).startswith("toy"):
        from rlhf_jax.quickstart import default_config

        assert cfg == default_config()  # the quickstart fills the file keys at run time
    else:
        assert cfg.sft.model and cfg.rm.train_file and cfg.ppo.prompts_file
    assert C.from_dict(type(cfg), C.to_dict(cfg)) == cfg


def _bad_yaml(tmp_path, text, name="bad.yaml", raw=None):
    f = tmp_path / name
    if raw is not None:
        f.write_bytes(raw)
    else:
        f.write_text(text)
    return f


# (id, YAML text or None, overrides, regex the message must match)
BAD = [
    (
        "unknown top key",
        None,
        ["rn.dir=x"],
        r"override 'rn.dir=x': unknown key 'rn'; did you mean 'run'\?",
    ),
    (
        "unknown nested key in file",
        "run:\n  sed: 1\n",
        [],
        r"bad.yaml:2: unknown key 'run.sed'; did you mean 'run.seed'\? The keys of run",
    ),
    ("wrong type int", None, ["run.seed=abc"], r"run.seed: expected int, got str 'abc'"),
    ("wrong type bool", None, ["run.tensorboard=3"], r"run.tensorboard: expected bool, got int 3"),
    ("null for a required int", None, ["run.seed=null"], r"run.seed: expected int, got NoneType"),
    (
        "section set to a value",
        "parallel: 3\n",
        [],
        r"bad.yaml:1: parallel: expected ParallelConfig.*a section",
    ),
    (
        "rejected by __post_init__",
        None,
        ["run.keep_checkpoints=0"],
        r"in run: run.keep_checkpoints=0: must be >= 1",
    ),
    ("bad choice", None, ["parallel.preset=zero"], r"parallel.preset='zero': choose one of"),
    ("override without =", None, ["run.seed"], r"override 'run.seed': write key.path=value"),
    ("override with a bad key", None, ["run..seed=1"], r"write key.path=value"),
    (
        "override into a value",
        "run:\n  seed: 1\n",
        ["run.seed.x=2"],
        r"run.seed is a value, not a section",
    ),
    ("override value not YAML", None, ["run.dir=[1,"], r"the value is not valid YAML"),
    (
        "list item wrong type",
        None,
        ["parallel.distributed.local_device_ids=[a]"],
        r"local_device_ids\[0\]: expected int, got str 'a'",
    ),
    ("invalid YAML", "run:\n  seed: 1\n   dir: x\n", [], r"bad.yaml:3: not valid YAML"),
    ("top level is a list", "- 1\n- 2\n", [], r"top level must be a mapping"),
    (
        "mesh mismatch from parallel",
        None,
        ["parallel.mesh.data=0"],
        r"mesh.data=0: must be a positive size",
    ),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_configs(tmp_path, case):
    _, text, overrides, pattern = case
    path = _bad_yaml(tmp_path, text) if text is not None else None
    with pytest.raises(C.ConfigError, match=pattern):
        C.load_config(path, overrides)


def test_bad_files(tmp_path):
    with pytest.raises(
        C.ConfigError, match=r"does not exist \(presets live in experiments/configs/\)"
    ):
        C.load_config(tmp_path / "missing.yaml")
    f = _bad_yaml(tmp_path, None, raw=b"run:\n  dir: \xff\xfe\n")
    with pytest.raises(C.ConfigError, match="not UTF-8"):
        C.load_config(f)
    assert C.load_config(_bad_yaml(tmp_path, "", name="empty.yaml")) == ExperimentConfig()


def test_floats_without_a_dot_are_floats(tmp_path):
    # PyYAML (YAML 1.1) reads 1e-5 as a string; the loader reads it as YAML 1.2 does.
    f = tmp_path / "c.yaml"
    f.write_text("ppo:\n  trainer:\n    optim:\n      learning_rate: 3e-4\n    kl_coef: 1E-2\n")
    cfg = C.load_config(f, ["ppo.trainer.clip_eps=2e-1", "run.dir=1e5x"])
    trainer = cfg.ppo.trainer
    assert trainer.optim.learning_rate == 3e-4 and trainer.kl_coef == 0.01
    assert trainer.clip_eps == 0.2 and cfg.run.dir == "1e5x"
    with pytest.raises(C.ConfigError, match=r"run.dir: expected str, got float 100000.0"):
        C.load_config(None, ["run.dir=1e5"])  # a string that looks like a float must be quoted


def test_local_bad_types():
    with pytest.raises(C.ConfigError, match=r"leaf.pair: expected 2 items"):
        C.from_dict(_Root, {"leaf": {"pair": [1, 2, 3]}})
    with pytest.raises(C.ConfigError, match=r"optim.learning_rate: expected float, got bool"):
        C.from_dict(_Root, {"optim": {"learning_rate": True}})
    with pytest.raises(C.ConfigError, match=r"in optim: optim.learning_rate=-1.0: must be > 0"):
        C.from_dict(_Root, {"optim": {"learning_rate": -1}})
    with pytest.raises(C.ConfigError, match=r"table.x: expected int"):
        C.from_dict(_Root, {"table": {"x": "y"}})
    with pytest.raises(
        C.ConfigError, match=r"^optim.learning_rate: expected float, got str '1e-4'$"
    ):
        C.from_dict(_Root, {"optim": {"learning_rate": "1e-4"}})  # strict: no str -> float
    with pytest.raises(C.ConfigError, match=r"^names: expected tuple\[str, \.\.\.\], got str 'a'$"):
        C.from_dict(_Root, {"names": "a"})
    with pytest.raises(C.ConfigError, match=r"^leaf.pair\[0\]: expected int, got float 1.5$"):
        C.from_dict(_Root, {"leaf": {"pair": [1.5, 2]}})
    with pytest.raises(
        C.ConfigError,
        match=r"^unknown key 'maybe.pari'; did you mean 'maybe.pair'\? "
        r"The keys of maybe \(_Leaf\) are: pair, mode$",
    ):
        C.from_dict(_Root, {"maybe": {"pari": [1, 2]}})  # inside an optional section
    with pytest.raises(C.ConfigError, match=r"^unknown key 'zzz'\. The keys of the top level"):
        C.from_dict(_Root, {"zzz": 1})
    with pytest.raises(
        C.ConfigError, match=r"^the top level \(_Needs\): required keys missing: size, name$"
    ):
        C.from_dict(_Needs, {"leaf": {}})
    with pytest.raises(C.ConfigError, match=r"^stage.leaf.mode: expected str, got int 3$"):
        C.from_dict(_Needs, {"size": 1, "name": "x", "leaf": {"mode": 3}}, path="stage")


def test_messages_are_one_line(tmp_path):
    for _, text, overrides, _ in BAD:
        path = _bad_yaml(tmp_path, text) if text is not None else None
        with pytest.raises(C.ConfigError) as err:
            C.load_config(path, overrides)
        assert "\n" not in str(err.value) and "pydantic" not in str(err.value)


def test_a_section_keeps_its_parents_defaults(tmp_path):
    # PPOConfig's own default optimizer has eps=1e-5 (not OptimConfig's 1e-8): setting one key of
    # the section must keep the others from that default, not from the section class.
    cfg = C.load_config(None, ["ppo.trainer.optim.learning_rate=3e-4"])
    assert cfg.ppo.trainer.optim.learning_rate == 3e-4 and cfg.ppo.trainer.optim.eps == 1e-5
    f = tmp_path / "c.yaml"
    f.write_text("sft:\n  data:\n    max_completion_length: 7\n")
    data = C.load_config(f).sft.data
    assert data.kind == "completion" and data.max_prompt_length == 128
    assert data.max_completion_length == 7


def test_composed_sections_validate():
    with pytest.raises(
        C.ConfigError, match=r"override 'sft.data.kind=prompt': in sft: .*'completion'"
    ):
        C.load_config(None, ["sft.data.kind=prompt"])
    with pytest.raises(C.ConfigError, match=r"ppo.critic='x': choose one of"):
        C.load_config(None, ["ppo.trainer.critic=x"])
    with pytest.raises(C.ConfigError, match=r"did you mean 'ppo.trainer.kl_coef'"):
        C.load_config(None, ["ppo.trainer.kl_cof=0.1"])
    with pytest.raises(C.ConfigError, match=r"num_completions \(K\) must be set"):
        C.load_config(None, ["rm.data.kind=ranking"])


# --- the chosen preset's source defaults: dataclass defaults < preset < YAML < overrides ---


def test_a_preset_applies_its_source_defaults():
    from rlhf_jax.presets import PRESETS

    src = PRESETS["lm-human-preferences"].defaults
    cfg = C.load_config(
        None, ["ppo.trainer.preset=lm-human-preferences", "ppo.trainer.stop_tokens=[2]"]
    ).ppo.trainer
    assert (
        (cfg.kl_coef, cfg.kl_controller) == (0.15, "adaptive") == (src.kl_coef, src.kl_controller)
    )
    assert (cfg.kl_target, cfg.kl_horizon) == (6.0, 10000.0) == (src.kl_target, src.kl_horizon)
    assert (cfg.gamma, cfg.lam, cfg.clip_eps, cfg.value_clip, cfg.vf_coef) == (
        src.gamma,
        src.lam,
        src.clip_eps,
        src.value_clip,
        src.vf_coef,
    )
    assert cfg.conventions == PRESETS["lm-human-preferences"].conventions
    # safe-rlhf: kl_coef 0.02, value_clip 5; its vf_coef is None (separate critic optimizer): kept
    safe = C.load_config(None, ["ppo.trainer.preset=safe-rlhf"]).ppo.trainer
    assert (safe.kl_coef, safe.value_clip, safe.vf_coef) == (0.02, 5.0, 0.1)


def test_explicit_keys_beat_the_preset(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("ppo:\n  trainer:\n    preset: safe-rlhf\n    kl_coef: 0.3\n    gamma: 0.9\n")
    cfg = C.load_config(f, ["ppo.trainer.gamma=0.99"]).ppo.trainer
    assert cfg.kl_coef == 0.3  # YAML beats the preset
    assert cfg.gamma == 0.99  # the override beats YAML
    assert cfg.value_clip == 5.0  # not set: the preset's
    # the preset chosen by an override still loses to a key the file sets
    g = tmp_path / "d.yaml"
    g.write_text("ppo:\n  trainer:\n    value_clip: 0.5\n")
    cfg = C.load_config(g, ["ppo.trainer.preset=safe-rlhf"]).ppo.trainer
    assert (cfg.value_clip, cfg.kl_coef) == (0.5, 0.02)
    # a written config reads back unchanged (every key is explicit there)
    (tmp_path / "back.yaml").write_text(C.to_yaml(C.load_config(f)))
    assert C.load_config(tmp_path / "back.yaml") == C.load_config(f)


def test_the_rlhf_jax_preset_changes_nothing():
    assert C.load_config(None, ["ppo.trainer.preset=rlhf-jax"]) == C.load_config(None)


def test_preset_defaults_are_generic():
    # any section with a `preset` field naming a source takes the source defaults it has fields for
    assert C.from_dict(_Algo, {}) == _Algo()  # a preset that is only a default applies nothing
    cfg = C.from_dict(_Algo, {"preset": "trl-ppo", "gamma": 0.25})
    assert cfg == _Algo(preset="trl-ppo", kl_coef=0.05, gamma=0.25, vf_coef=0.1, other=7)
    cfg = C.from_dict(_Algo, {"preset": "deepspeed-chat"})
    assert (cfg.kl_coef, cfg.gamma, cfg.vf_coef) == (0.1, 1.0, 0.3)  # vf_coef None: untouched
    assert C.from_dict(_Algo, {"preset": "not-a-source"}).kl_coef == 1.0  # not a source: nothing
