"""Config loading, overrides, the YAML round trip, the presets, and a table of bad inputs."""

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
            "optim": {"learning_rate": "1e-4"},
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
    if os.path.basename(path).startswith("toy"):
        from rlhf_jax.quickstart import QuickstartConfig

        cfg = C.load_config(path, cls=QuickstartConfig)
        assert cfg.run_dir == "runs/toy"
    else:
        cfg = C.load_config(path)
        assert isinstance(cfg, ExperimentConfig)
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


def test_local_bad_types():
    with pytest.raises(C.ConfigError, match=r"leaf.pair: expected 2 items"):
        C.from_dict(_Root, {"leaf": {"pair": [1, 2, 3]}})
    with pytest.raises(C.ConfigError, match=r"optim.learning_rate: expected float, got bool"):
        C.from_dict(_Root, {"optim": {"learning_rate": True}})
    with pytest.raises(C.ConfigError, match=r"in optim: optim.learning_rate=-1.0: must be > 0"):
        C.from_dict(_Root, {"optim": {"learning_rate": -1}})
    with pytest.raises(C.ConfigError, match=r"table.x: expected int"):
        C.from_dict(_Root, {"table": {"x": "y"}})


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
