"""The real entry point (``rlhf_jax.pipeline.run_stage``: sft, ppo) on 8 fake CPU devices.

Each stage builds its mesh from ``parallel.*`` of the config and runs born sharded: the same
metrics as on one device (float32, 1e-5 relative), the trained parameters placed as the preset's
rules say, one executable for the whole run, a rerun's checkpoint restored onto the mesh's
shardings, and the ``shard_map`` step form equal to the ``jit`` form. Tiny models and few steps:
compile time dominates.
"""

import os
import shutil

import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rlhf_jax import config as C
from rlhf_jax import parallel, pipeline
from rlhf_jax.logging import read_metrics


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny GPT-2 checkpoint for the toy vocabulary and TRL-format data files."""
    from rlhf_jax import quickstart
    from rlhf_jax.data import toy

    out = str(tmp_path_factory.mktemp("sharded_runs"))
    quickstart.write_base(
        os.path.join(out, "base"), toy.ToyTask(hidden_size=16, num_layers=1, num_heads=2)
    )
    toy.write_jsonl(os.path.join(out, "sft.jsonl"), toy.sft_records(64, seed=0))
    prompts = [{"prompt": p} for p in toy.all_prompts()]
    toy.write_jsonl(os.path.join(out, "prompts.jsonl"), prompts)
    return out


def _config(files, run, *overrides):
    settings = [
        f"run.dir={run}",
        "run.tensorboard=false",
        "run.progress=false",
        f"sft.model={files}/base",
        f"sft.train_file={files}/sft.jsonl",
        "sft.data.max_prompt_length=4",
        "sft.data.max_completion_length=10",
        "sft.trainer.batch_size=8",
        "sft.trainer.loop.max_steps=3",
        "sft.save_every=0",
        f"ppo.prompts_file={files}/prompts.jsonl",
        "ppo.data.kind=prompt",
        "ppo.data.max_prompt_length=4",
        "ppo.batch_size=8",
        "ppo.trainer.response_length=4",
        "ppo.trainer.critic=shared",
        "ppo.trainer.num_epochs=1",
        "ppo.trainer.num_minibatches=1",
        "ppo.trainer.optim.learning_rate=1e-3",
        "ppo.trainer.loop.max_steps=2",
        "ppo.save_every=0",
        *overrides,
    ]
    return C.load_config(None, settings)


ONE_DEVICE = ("parallel.mesh.data=1",)
FSDP = ("parallel.mesh.data=2", "parallel.mesh.fsdp=4", "parallel.preset=fsdp")
SHARD_MAP = ("parallel.mesh.data=8", "parallel.preset=dp", "parallel.step=shard_map")


@pytest.fixture
def compiled(monkeypatch):
    """Every step ``parallel.jit_step`` compiles during the test (to count their executables)."""
    made = []
    original = parallel.jit_step

    def recording(*args, **kwargs):
        jitted = original(*args, **kwargs)
        made.append(jitted)
        return jitted

    monkeypatch.setattr(parallel, "jit_step", recording)
    return made


@pytest.fixture(scope="module")
def one_device(files, tmp_path_factory):
    """SFT and PPO on a one-device mesh: the reference run directory. The reward model is a
    freshly initialised one written as the RM stage's result (its training is not under test
    here; ``parallel.step=shard_map`` of the RM step is, in ``test_parallel.py``)."""
    from rlhf_jax import models
    from rlhf_jax.algorithms import reward_model as rm_lib

    run = str(tmp_path_factory.mktemp("one_device") / "run")
    cfg = _config(files, run, *ONE_DEVICE)
    sft = pipeline.run_stage(cfg, "sft", devices=jax.devices()[:1], verbose=False)
    sft_model = models.from_pretrained(sft.final)
    rm = rm_lib.init_reward_model(sft_model, jax.random.PRNGKey(1))
    pipeline.save_final(os.path.join(run, "rm"), pipeline.Outputs(rm, sft.outputs.tokenizer), {})
    assert not pipeline.run_stage(cfg, "ppo", devices=jax.devices()[:1], verbose=False).preempted
    return run


def _metrics(run, stage):
    records = read_metrics(os.path.join(run, stage))
    drop = ("wall_time", "step")
    return [
        {k: v for k, v in r.items() if not k.startswith("time/") and k not in drop} for r in records
    ]


def _assert_same_metrics(run, reference, stage, steps):
    got, want = _metrics(run, stage), _metrics(reference, stage)
    assert len(got) == len(want) == steps, (len(got), len(want))
    for g, w in zip(got, want, strict=True):
        assert g.keys() == w.keys()
        for key in w:
            np.testing.assert_allclose(g[key], w[key], rtol=1e-5, atol=1e-6, err_msg=key)


def _assert_placed(params, mesh, preset):
    """Every parameter sits on ``mesh`` as ``preset``'s rules say; some are really split."""
    specs = parallel.param_specs(params, preset, mesh)
    split = 0
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    for leaf, spec in zip(jax.tree.leaves(params), flat_specs, strict=True):
        want = NamedSharding(mesh, spec)
        assert leaf.sharding.is_equivalent_to(want, leaf.ndim), (leaf.sharding, spec)
        split += not leaf.sharding.is_fully_replicated
    assert split > 0 or preset == "dp"


def _copy_stages(src, dst, stages):
    for stage in stages:
        shutil.copytree(os.path.join(src, stage), os.path.join(dst, stage))


def test_sft_fsdp_equals_one_device_and_restores_onto_the_mesh(
    files, one_device, tmp_path, compiled
):
    """SFT on (data=2, fsdp=4) with the fsdp rules: the metrics of the one-device run, the
    trained parameters split as the rules say, one executable for the 3 steps; run again, the
    loop restores the last checkpoint onto the mesh's shardings (the placed state's)."""
    run = str(tmp_path / "run")
    mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=4))
    cfg = _config(files, run, *FSDP, "sft.save_every=3")
    trained = pipeline.run_stage(cfg, "sft", verbose=False).result.state
    _assert_same_metrics(run, one_device, "sft", steps=3)
    _assert_placed(trained.params, mesh, "fsdp")
    assert len(compiled) == 1 and compiled[0]._cache_size() == 1
    # resumes at step 3 = max_steps: the restored state, no step
    restored = pipeline.run_stage(cfg, "sft", verbose=False).result.state
    _assert_placed(restored.params, mesh, "fsdp")
    pairs = zip(jax.tree.leaves(restored.params), jax.tree.leaves(trained.params), strict=True)
    for got, want in pairs:
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_shard_map_sft_equals_one_device(files, one_device, tmp_path, compiled):
    """``parallel.step=shard_map`` (per-device gradient sums, explicit pmean) on data=8 with the
    dp rules: the one-device (jit form) metrics; the parameters stay replicated."""
    run = str(tmp_path / "run")
    cfg = _config(files, run, *SHARD_MAP)
    trained = pipeline.run_stage(cfg, "sft", verbose=False).result.state
    _assert_same_metrics(run, one_device, "sft", steps=3)
    _assert_placed(trained.params, parallel.make_mesh(cfg.parallel.mesh), "dp")
    assert len(compiled) == 1 and compiled[0]._cache_size() == 1


def test_ppo_fsdp_equals_one_device(files, one_device, tmp_path, compiled):
    """PPO on (data=2, fsdp=4) with the fsdp rules (policy, value head, optimizer state and the
    frozen reference and reward model): the one-device metrics, one executable for the run."""
    run = str(tmp_path / "run")
    _copy_stages(one_device, run, ["sft", "rm"])
    state = pipeline.run_stage(_config(files, run, *FSDP), "ppo", verbose=False).result.state
    _assert_same_metrics(run, one_device, "ppo", steps=2)
    mesh = parallel.make_mesh(parallel.MeshConfig(data=2, fsdp=4))
    _assert_placed(state.params["policy"], mesh, "fsdp")
    assert len(compiled) == 1 and compiled[0]._cache_size() == 1


def test_shard_map_ppo_equals_one_device(files, one_device, tmp_path, compiled):
    """``parallel.step=shard_map`` for the PPO stage on data=8 with the dp rules: the update's
    gradient is each device's sum over its row, one pmean, one division by the minibatch's
    counts; the metrics (loss, grad_norm, ...) are the one-device (jit form) run's."""
    run = str(tmp_path / "run")
    _copy_stages(one_device, run, ["sft", "rm"])
    cfg = _config(files, run, *SHARD_MAP)
    state = pipeline.run_stage(cfg, "ppo", verbose=False).result.state
    _assert_same_metrics(run, one_device, "ppo", steps=2)
    _assert_placed(state.params["policy"], parallel.make_mesh(cfg.parallel.mesh), "dp")
    assert len(compiled) == 1 and compiled[0]._cache_size() == 1
