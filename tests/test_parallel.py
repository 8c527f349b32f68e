"""rlhf_jax.parallel on 8 fake CPU devices: meshes, rule tables, placement, device-count invariance.

Tolerance policy: float32, 1e-5 relative to each array's scale (``assert_results_close`` in
``multihost_worker.py``, which also holds the shared problem: a tiny Llama-shaped LM, an SFT token
loss and AdamW).
"""

import logging
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import multihost_worker as mw
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rlhf_jax import memory, parallel
from rlhf_jax.parallel import DistributedConfig, MeshConfig, ParallelConfig

# --------------------------------------------------------------------------------------------
# Mesh and configs
# --------------------------------------------------------------------------------------------


def test_mesh_config_resolves_the_rest():
    # (data, fsdp, expert, tensor)
    assert MeshConfig().resolve(8) == (8, 1, 1, 1)
    assert MeshConfig(data=2, fsdp=-1).resolve(8) == (2, 4, 1, 1)
    assert MeshConfig(data=1, fsdp=4, tensor=-1).resolve(8) == (1, 4, 1, 2)
    assert MeshConfig(data=2, fsdp=2, tensor=2).resolve(8) == (2, 2, 1, 2)
    assert MeshConfig(data=2, expert=-1).resolve(8) == (2, 1, 4, 1)


@pytest.mark.parametrize(
    "kwargs, devices, match",
    [
        (dict(data=-1, fsdp=-1), 8, "at most one axis may be -1"),
        (dict(data=0), 8, "positive size or -1"),
        (dict(data=2, fsdp=2, tensor=1), 8, "holds 4 devices but 8 are available"),
        (dict(data=-1, fsdp=3), 8, "not divisible by the fixed axes"),
        (dict(data=4, dcn_data=3), 8, "dcn_data=3 must divide mesh.data=4"),
        (dict(data=-1, fsdp=4, dcn_fsdp=1, dcn_data=4), 8, "dcn_data=4 must divide the resolved"),
        (dict(data=-1, expert=-1), 8, "at most one axis may be -1"),
        (dict(data=-1, expert=3), 8, "not divisible by the fixed axes"),
        (dict(expert=2, dcn_expert=4), 8, "dcn_expert=4 must divide mesh.expert=2"),
    ],
)
def test_mesh_config_errors_say_what_to_change(kwargs, devices, match):
    with pytest.raises(ValueError, match=match):
        MeshConfig(**kwargs).resolve(devices)


def test_make_mesh_axes_and_types():
    mesh = parallel.make_mesh(MeshConfig(data=2, fsdp=-1))
    assert mesh.axis_names == parallel.AXES
    assert dict(mesh.shape) == {"data": 2, "fsdp": 4, "expert": 1, "tensor": 1}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    # dcn > 1 asks for more hosts than this single process has
    with pytest.raises(ValueError, match="ask for 2 hosts/slices"):
        parallel.make_mesh(MeshConfig(data=2, fsdp=-1, dcn_data=2))


def test_parallel_config_validation():
    with pytest.raises(ValueError, match="choose one of"):
        ParallelConfig(preset="zero3")
    with pytest.raises(ValueError, match="preset='dp'"):
        ParallelConfig(preset="fsdp", step="shard_map")
    with pytest.raises(ValueError, match="must be <"):
        DistributedConfig(num_processes=2, process_id=2)


def test_initialize_distributed_auto_without_a_cluster_is_a_no_op(monkeypatch):
    for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", *parallel.CLUSTER_ENV):
        monkeypatch.delenv(name, raising=False)
    assert parallel.initialize_distributed() is False
    assert parallel.initialize_distributed(DistributedConfig(enabled="off")) is False


# --------------------------------------------------------------------------------------------
# Rule tables
# --------------------------------------------------------------------------------------------


def test_presets_differ_only_in_the_table():
    patterns = {preset: [p for p, _ in rules] for preset, rules in parallel.RULES.items()}
    assert set(patterns) == set(parallel.PRESETS)
    assert all(v == patterns["dp"] for v in patterns.values())
    # dp replicates every parameter but the experts of a mixture, split over `expert` (size 1
    # unless configured) in every preset
    assert all(all(a in (None, "expert") for a in spec) for _, spec in parallel.RULES["dp"])
    assert parallel.RULES["dp"][-1] == (".*", P())


ARCH_SHAPES = {  # small but with every parameter kind of each family (qkv bias, q/k norm, GQA)
    "gpt2": dict(arch="gpt2", num_heads=4, hidden_size=32),
    "llama": dict(arch="llama", num_heads=4, num_kv_heads=2, hidden_size=32, intermediate_size=64),
    "qwen2": dict(arch="qwen2", num_heads=4, num_kv_heads=2, hidden_size=32, intermediate_size=64),
    "qwen3": dict(
        arch="qwen3", num_heads=4, num_kv_heads=2, hidden_size=32, head_dim=16, intermediate_size=64
    ),
    "mixtral": dict(
        arch="mixtral",
        num_heads=4,
        num_kv_heads=2,
        hidden_size=32,
        intermediate_size=64,
        num_experts=4,
    ),
}

# What the fsdp+tp table gives each kind of parameter (trailing dims; stacked layers add a None).
EXPECTED_FSDP_TP = {
    "embed/embedding": P("tensor", "fsdp"),
    "pos_embed/embedding": P(None, "fsdp"),
    "lm_head/kernel": P(None, ("fsdp", "tensor")),
    "layers/attn/q_proj/kernel": P(None, None, ("fsdp", "tensor")),
    "layers/attn/q_proj/bias": P(None, "tensor"),
    "layers/attn/k_proj/kernel": P(None, None, ("fsdp", "tensor")),
    "layers/attn/k_proj/bias": P(None, "tensor"),
    "layers/attn/v_proj/kernel": P(None, None, ("fsdp", "tensor")),
    "layers/attn/v_proj/bias": P(None, "tensor"),
    "layers/attn/o_proj/kernel": P(None, "tensor", "fsdp"),
    "layers/attn/o_proj/bias": P(),
    "layers/attn/q_norm/scale": P(),
    "layers/mlp/gate_proj/kernel": P(None, None, ("fsdp", "tensor")),
    "layers/mlp/up_proj/kernel": P(None, None, ("fsdp", "tensor")),
    "layers/mlp/up_proj/bias": P(None, "tensor"),
    "layers/mlp/down_proj/kernel": P(None, "tensor", "fsdp"),
    "layers/mlp/down_proj/bias": P(),
    "layers/mlp/experts/gate_proj": P(None, "expert", None, ("fsdp", "tensor")),
    "layers/mlp/experts/up_proj": P(None, "expert", None, ("fsdp", "tensor")),
    "layers/mlp/experts/down_proj": P(None, "expert", "tensor", "fsdp"),
    "layers/mlp/router/kernel": P(None, "fsdp"),
    "layers/attn_norm/scale": P(),
    "final_norm/scale": P(),
    "value_head/kernel": P("fsdp"),
    "value_head/bias": P(),
    "score_head/kernel": P("fsdp"),
    "score_head/reward_gain": P(),
}


@pytest.mark.parametrize("arch", sorted(ARCH_SHAPES))
def test_rules_cover_every_architecture_and_head(arch):
    from rlhf_jax import models

    config = models.ModelConfig(vocab_size=64, num_layers=2, **ARCH_SHAPES[arch])
    _, params = memory.abstract_model(config, value_head=True, score_head=True)
    mesh = parallel.make_mesh(MeshConfig(data=1, fsdp=2, expert=2, tensor=2))
    specs = parallel.param_specs(params, "fsdp+tp", mesh)
    flat = jax.tree_util.tree_flatten_with_path(specs, is_leaf=lambda x: isinstance(x, P))[0]
    got = {parallel.path_str(path): spec for path, spec in flat}
    for path, spec in got.items():
        if path in EXPECTED_FSDP_TP:
            assert spec == EXPECTED_FSDP_TP[path], (arch, path, spec)
        else:  # only norm parameters and biases may be left out of the table above
            assert spec == P() and path.rsplit("/", 1)[-1] in ("scale", "bias", "reward_bias"), path
    kernels = [p for p in got if p.endswith(("kernel", "embedding", "_proj"))]
    assert all(got[p] != P() for p in kernels), arch  # every matrix is split
    assert "value_head/kernel" in got and "score_head/kernel" in got


def test_unmatched_parameter_is_an_error():
    rules = ((r"kernel$", P("fsdp")),)
    with pytest.raises(ValueError, match="no sharding rule matches parameter 'norm/scale'"):
        parallel.param_specs({"norm": {"scale": np.zeros(4)}}, rules)


def test_divisibility_fallback_replicates_and_logs(caplog):
    mesh = parallel.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    params = {"embed": {"embedding": np.zeros((50257, 8), np.float32)}}  # GPT-2's odd vocab
    with caplog.at_level(logging.WARNING, logger="rlhf_jax.parallel"):
        specs = parallel.param_specs(params, "fsdp+tp", mesh)
    assert specs["embed"]["embedding"] == P(None, "fsdp")
    assert "dim 0 of size 50257 is not divisible by mesh axis 'tensor' of size 2" in caplog.text


def test_combined_axis_falls_back_to_the_axis_that_divides():
    mesh = parallel.make_mesh(MeshConfig(data=1, fsdp=4, tensor=2))
    spec, why = parallel.fit_spec(P(None, ("fsdp", "tensor")), (4, 12), mesh, "w")
    assert spec == P(None, "fsdp") and "split over 'fsdp' only" in why[0]
    spec, why = parallel.fit_spec(P(None, ("fsdp", "tensor")), (4, 6), mesh, "w")
    assert spec == P(None, "tensor")


def test_stacked_layer_axis_is_replicated():
    spec, why = parallel.fit_spec(P("fsdp", "tensor"), (3, 8, 16), None)
    assert spec == P(None, "fsdp", "tensor") and not why
    with pytest.raises(ValueError, match="names 2 dims"):
        parallel.fit_spec(P("fsdp", "tensor"), (8,), None)


def test_optimizer_state_follows_the_parameters():
    from rlhf_jax.optim import OptimConfig, make_optimizer

    params, _ = mw.problem()
    mesh = parallel.make_mesh(MESHES["fsdp+tp"])
    specs = parallel.param_specs(params, "fsdp+tp", mesh)
    optimizer = make_optimizer(OptimConfig(weight_decay=0.1))
    opt_specs = parallel.opt_state_specs(optimizer, params, specs)
    is_spec = lambda x: isinstance(x, P)
    flat_params = jax.tree.leaves(specs, is_leaf=is_spec)
    moments = [opt_specs.inner_state[1].mu, opt_specs.inner_state[1].nu]  # scale_by_adam
    for tree in moments:
        assert jax.tree.leaves(tree, is_leaf=is_spec) == flat_params
    assert opt_specs.inner_state[1].count == P()
    assert opt_specs.hyperparams["learning_rate"] == P()
    # the whole-state rules give the same placement
    state = jax.eval_shape(optimizer.init, params)
    by_path = parallel.param_specs(state, "fsdp+tp", mesh)
    assert jax.tree.leaves(by_path, is_leaf=is_spec) == jax.tree.leaves(opt_specs, is_leaf=is_spec)


def test_batch_and_cache_specs():
    mesh = parallel.make_mesh(MeshConfig(data=2, fsdp=2, tensor=2))
    assert parallel.batch_spec(2) == P(("data", "fsdp"), None)
    cache = {"k": jax.ShapeDtypeStruct((2, 8, 16, 4, 4), jnp.float32), "index": np.zeros(())}
    specs = parallel.cache_specs(cache, mesh, "tp")
    assert specs["k"] == P(None, ("data", "fsdp"), None, "tensor")
    assert specs["index"] == P()
    assert parallel.cache_specs(cache, mesh, "fsdp")["k"] == P(None, ("data", "fsdp"))
    with pytest.raises(ValueError, match="not divisible by data x fsdp = 4"):
        parallel.shard_batch({"tokens": np.zeros((6, 3), np.int32)}, mesh)


def test_shard_batch_places_rows_over_data_and_fsdp():
    mesh = parallel.make_mesh(MeshConfig(data=2, fsdp=4))
    x = np.arange(16 * 3, dtype=np.int32).reshape(16, 3)
    arr = parallel.shard_batch({"x": x}, mesh)["x"]
    assert arr.sharding == NamedSharding(mesh, P(("data", "fsdp"), None))
    assert {s.data.shape for s in arr.addressable_shards} == {(2, 3)}
    np.testing.assert_array_equal(np.asarray(arr), x)


def test_constrain_batch_keeps_new_arrays_split():
    mesh = parallel.make_mesh(MeshConfig(data=2, fsdp=4))
    x = jax.device_put(np.ones((8, 3), np.float32), NamedSharding(mesh, P()))
    y = jax.jit(lambda x: parallel.constrain_batch({"y": x * 2}, mesh))(x)["y"]
    assert y.sharding.is_equivalent_to(NamedSharding(mesh, P(("data", "fsdp"))), 2)


# --------------------------------------------------------------------------------------------
# Device-count invariance: 8 devices == 1 device, per preset and step form
# --------------------------------------------------------------------------------------------

MESHES = {
    "dp": MeshConfig(data=8),
    "fsdp": MeshConfig(data=2, fsdp=4),
    "tp": MeshConfig(data=4, tensor=2),
    "fsdp+tp": MeshConfig(data=1, fsdp=4, tensor=2),
}


@pytest.fixture(scope="module")
def one_device():
    mesh = parallel.make_mesh(MeshConfig(data=1), jax.devices()[:1])
    result, _ = mw.train(mesh, "dp")
    assert result["loss"][-1] < result["loss"][0]  # the problem trains
    return result


def _assert_placed_by_rules(params, specs, mesh, preset):
    flat_params = jax.tree.leaves(params)
    flat_specs = jax.tree.leaves(specs, is_leaf=lambda x: isinstance(x, P))
    sharded = 0
    for leaf, spec in zip(flat_params, flat_specs, strict=True):
        assert leaf.sharding.is_equivalent_to(NamedSharding(mesh, spec), leaf.ndim)
        shard = leaf.addressable_shards[0].data.shape
        sharded += shard != leaf.shape
    if preset == "dp":
        assert sharded == 0
    else:
        assert sharded >= len(flat_params) // 2, f"{preset}: only {sharded} parameters sharded"


@pytest.mark.parametrize("preset", parallel.PRESETS)
def test_preset_on_8_devices_equals_1_device(preset, one_device):
    """The SFT trainer's step (``sft.make_step(mesh=, state_shardings=)``) on 8 devices with each
    preset's rules: the losses, gradient norms and parameters of the one-device run, every state
    leaf back in its rule layout after the steps, one executable for all of them."""
    mesh = parallel.make_mesh(MESHES[preset])
    result, state = mw.train(mesh, preset)
    mw.assert_results_close(result, one_device)
    params = state.params
    _assert_placed_by_rules(params, parallel.param_specs(params, preset, mesh), mesh, preset)
    step, shardings = mw.compiled_step(mesh, preset, "jit")
    _assert_layout_kept(state, shardings)
    assert step._cache_size() == 1


def test_shard_map_form_equals_jit_form(one_device):
    """``mode='shard_map'`` of the trainer's step (per-device gradient sums, one explicit pmean
    over data x fsdp) on (data=4, fsdp=2): the numbers of the one-device ``jit`` step."""
    mesh = parallel.make_mesh(MeshConfig(data=4, fsdp=2))
    result, state = mw.train(mesh, "dp", mode="shard_map")
    mw.assert_results_close(result, one_device)
    _assert_layout_kept(state, mw.compiled_step(mesh, "dp", "shard_map")[1])
    with pytest.raises(ValueError, match="mode='pmap': choose one of"):
        parallel.accumulate(lambda p, b: (0.0, (1.0, {})), {}, {}, mesh=mesh, mode="pmap")


# --------------------------------------------------------------------------------------------
# Save on one mesh, restore on another, continue
# --------------------------------------------------------------------------------------------


def test_restore_on_another_mesh_and_continue(tmp_path, one_device):
    """A trainer state saved on one mesh and rule table, restored onto another's shardings (as
    ``run_loop`` restores), then trained on: the numbers of the uninterrupted one-device run."""
    from rlhf_jax.checkpoint import Checkpointer, abstract_like

    mesh_a = parallel.make_mesh(MESHES["fsdp"])
    step_a, state, batches_a, _ = mw.setup(mesh_a, "fsdp")
    state, metrics = step_a(state, batches_a(0), jax.random.key(0))
    history = [metrics]
    with Checkpointer(tmp_path / "ckpt", save_every=1, handle_sigterm=False) as ckpt:
        ckpt.save(1, state, {"note": "mesh a"})
        ckpt.wait()

    # A fresh setup on a different mesh shape and rule table gives the target shardings.
    mesh_b = parallel.make_mesh(MESHES["fsdp+tp"])
    step_b, target, batches_b, shardings = mw.setup(mesh_b, "fsdp+tp")
    with Checkpointer(tmp_path / "ckpt", save_every=1, handle_sigterm=False) as ckpt:
        step, state, meta = ckpt.restore_latest(abstract_like(target, shardings))
    assert step == 1 and meta["note"] == "mesh a"
    assert jax.tree.structure(state) == jax.tree.structure(target)
    _assert_layout_kept(state, shardings)
    for s in range(1, mw.STEPS):
        state, metrics = step_b(state, batches_b(s), jax.random.key(s))
        history.append(metrics)
    mw.assert_results_close(mw.to_host(state.params, history), one_device)


# --------------------------------------------------------------------------------------------
# Layout checks, and the reward-model trainer's shard_map step
# --------------------------------------------------------------------------------------------


def _assert_layout_kept(state, shardings):
    """Every leaf is placed exactly as ``shardings`` say (the step's out_shardings)."""
    flat = jax.tree_util.tree_flatten_with_path(state)[0]
    drift = [
        (parallel.path_str(path), leaf.sharding, want.spec)
        for (path, leaf), want in zip(flat, jax.tree.leaves(shardings), strict=True)
        if not leaf.sharding.is_equivalent_to(want, leaf.ndim)
    ]
    assert not drift, drift


def test_reward_model_shard_map_step_equals_plain_step():
    """``parallel.step=shard_map`` for the reward-model trainer: its step in the per-device form
    (gradient sums and the loss, accuracy and score sums pmean-ed over data x fsdp) on
    (data=2, fsdp=2), against the same step jitted on one device: the same metrics at every
    step (the pairwise loss, accuracy, score mean and spread, gradient norm)."""
    from rlhf_jax.algorithms import reward_model as rm_lib
    from rlhf_jax.optim import OptimConfig

    _, batch = mw.problem()
    rm = rm_lib.init_reward_model(mw.model(), jax.random.key(1))
    tokens, mask = batch["tokens"], batch["mask"]
    pairs = {
        "prompt_tokens": tokens[:, :3],
        "prompt_mask": np.ones_like(tokens[:, :3]),
        "chosen_tokens": tokens[:, 3:],
        "chosen_mask": mask[:, 3:],
        "rejected_tokens": tokens[::-1, 3:],
        "rejected_mask": mask[::-1, 3:],
    }
    cfg = rm_lib.RewardModelConfig(
        loss="pairwise", optim=OptimConfig(learning_rate=1e-2, eps=1e-3), batch_size=16
    )

    def run(mesh, mode):
        state = rm_lib.init_state(rm.params, cfg)
        shardings = None if mesh is None else parallel.state_shardings(state, mesh, "dp")
        state = state if mesh is None else jax.device_put(state, shardings)
        step = rm_lib.make_step(rm.graphdef, cfg, mesh=mesh, state_shardings=shardings, mode=mode)
        data = pairs if mesh is None else parallel.shard_batch(pairs, mesh)
        history = []
        for _ in range(2):
            state, metrics = step(state, data, jax.random.key(0))
            history.append(jax.device_get(metrics))
        assert step._cache_size() == 1
        return history

    plain = run(None, "jit")
    four = jax.devices()[:4]  # both batch axes, and a faster compile than on 8 devices
    per_device = run(parallel.make_mesh(MeshConfig(data=2, fsdp=2), four), "shard_map")
    for want, got in zip(plain, per_device, strict=True):
        for key in ("loss", "accuracy", "score_mean", "score_std", "grad_norm"):
            np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)


# --------------------------------------------------------------------------------------------
# Dry run: compiled memory from abstract shapes
# --------------------------------------------------------------------------------------------


def test_dry_run_counts_exactly_the_sharded_state_and_batch():
    from rlhf_jax.algorithms import sft

    config = mw.model().config
    cfg = ParallelConfig(mesh=MESHES["fsdp"], preset="fsdp")
    report = memory.dry_run(config, cfg, batch_size=8, seq_len=mw.SEQ_LEN)
    # Expected argument bytes: each leaf's shard on one device, from the same placement.
    mesh = parallel.make_mesh(cfg.mesh)
    _, params = memory.abstract_model(config)
    state = jax.eval_shape(lambda p: sft.init_state(p, sft.SFTConfig(batch_size=8)), params)
    shardings = parallel.state_shardings(state, mesh, "fsdp")
    shard_bytes = lambda x, s: np.prod(s.shard_shape(x.shape)) * x.dtype.itemsize
    expected = sum(jax.tree.leaves(jax.tree.map(shard_bytes, state, shardings)))
    expected += 3 * (8 // 8) * mw.SEQ_LEN * 4  # tokens, attention_mask, loss_mask rows
    # (the SFT step ignores its key, and jit drops unused arguments)
    assert report.arguments == expected
    assert report.aliased > 0.9 * expected  # the state is donated: updated in place
    assert report.temps > 0 and report.total > report.arguments
    assert report.num_params == sum(np.prod(x.shape) for x in jax.tree.leaves(params))
    assert report.name in memory.format_memory_table([report])
    with pytest.raises(ValueError, match="not divisible by data x fsdp = 8"):
        memory.dry_run(config, cfg, batch_size=12, seq_len=mw.SEQ_LEN)


def test_dry_run_of_the_shard_map_step():
    """``parallel.step='shard_map'``: the trainer's per-device step compiles from abstract
    shapes too; the replicated state is the same size on every device (dp rules)."""
    config = mw.model().config
    cfg = ParallelConfig(mesh=MeshConfig(data=4, fsdp=2), preset="dp", step="shard_map")
    report = memory.dry_run(config, cfg, batch_size=8, seq_len=mw.SEQ_LEN)
    params = report.num_params * 4  # float32 parameters, replicated
    assert report.arguments > 3 * params  # params, Adam's mu and nu, whole on each device
    assert report.aliased > 0.9 * 3 * params


def test_parallel_imports_no_trainer_and_no_memory():
    """The layering: ``rlhf_jax.parallel`` imports neither ``rlhf_jax.algorithms`` nor
    ``rlhf_jax.memory``, the trainers do not import ``rlhf_jax.memory``, and the memory names
    live only in ``rlhf_jax.memory``."""
    code = (
        "import sys\n"
        "import rlhf_jax.parallel\n"
        "loaded = lambda p: sorted(m for m in sys.modules if m.startswith(p))\n"
        "assert not loaded('rlhf_jax.algorithms') and not loaded('rlhf_jax.memory'), sys.modules\n"
        "import rlhf_jax.algorithms.ppo, rlhf_jax.algorithms.reward_model, rlhf_jax.algorithms.sft\n"
        "assert not loaded('rlhf_jax.memory')\n"
        "from rlhf_jax import parallel\n"
        "assert not hasattr(parallel, 'dry_run') and not hasattr(parallel, 'format_memory_table')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(parallel.__all__) <= set(dir(parallel))


# --------------------------------------------------------------------------------------------
# The real PPO iteration (rollout, scoring, GAE, minibatch updates): 8 devices == 1 device
# --------------------------------------------------------------------------------------------


def _ppo_run(mesh, preset, iterations=2, mode="jit", **overrides):
    from rlhf_jax import models
    from rlhf_jax.algorithms import ppo
    from rlhf_jax.optim import OptimConfig

    lm = mw.model()
    rm = models.init_model(lm.config, jax.random.key(1), lm_head=False, score_head=True)
    settings = dict(
        response_length=3,
        num_epochs=1,
        num_minibatches=2,
        critic="separate",
        optim=OptimConfig(name="sgd", learning_rate=0.1, max_grad_norm=None),
        kl_coef=0.1,
    )
    cfg = ppo.PPOConfig(**(settings | overrides))
    static, params, frozen = ppo.make_models(cfg, lm, rm)
    state = ppo.init_state(cfg, params)
    shardings = parallel.state_shardings(state, mesh, preset)
    state = jax.device_put(state, shardings)
    frozen_shardings = parallel.state_shardings(frozen, mesh, preset)
    frozen = jax.device_put(frozen, frozen_shardings)
    _, batch = mw.problem()
    mask = batch["mask"][:8, :4][:, ::-1].copy()  # left-padded prompts
    prompts = parallel.shard_batch(
        {"tokens": np.where(mask == 1, batch["tokens"][:8, :4], 0), "mask": mask}, mesh
    )
    iterate = ppo.make_iteration(
        cfg,
        static,
        mesh=mesh,
        state_shardings=shardings,
        frozen_shardings=frozen_shardings,
        mode=mode,
    )
    history = []
    for _ in range(iterations):
        state, metrics = iterate(state, frozen, prompts["tokens"], prompts["mask"])
        history.append(jax.device_get(metrics))
        _assert_layout_kept(state, shardings)
    assert iterate.jitted._cache_size() == 1
    return history, jax.device_get(state.params)


def _assert_same_ppo_runs(got, want):
    (history, params), (history_want, params_want) = got, want
    for m, m_want in zip(history, history_want, strict=True):
        for key in m_want:
            np.testing.assert_allclose(m[key], m_want[key], rtol=1e-5, atol=1e-6, err_msg=key)
    assert float(history_want[0]["score/mean"]) != 0.0  # the reward model really scored

    def flat(tree):
        pairs = jax.tree_util.tree_flatten_with_path(tree)[0]
        return {parallel.path_str(p): np.asarray(x) for p, x in pairs}

    mw.assert_results_close(flat(params), flat(params_want))


def test_ppo_iterations_on_8_devices_equal_1_device():
    one = _ppo_run(parallel.make_mesh(MeshConfig(data=1), jax.devices()[:1]), "dp")
    _assert_same_ppo_runs(_ppo_run(parallel.make_mesh(MESHES["fsdp"]), "fsdp"), one)


@pytest.mark.parametrize("adapters", [False, True], ids=["full", "lora"])
def test_ppo_shard_map_update_equals_jit_and_one_device(adapters):
    """``parallel.step=shard_map`` for PPO's update on (data=2, fsdp=4), dp rules: each device
    takes the gradient sum of its 2 rows of each 16-row minibatch (2 microbatches of 1 row), one
    pmean, one division by the minibatch's row count. With SGD (a gradient off by any factor,
    e.g. the device count, moves the parameters differently) the metrics and parameters after
    two iterations equal the ``jit`` form on the same mesh and on one device; with LoRA too (the
    adapters and heads are the state, the frozen base enters the per-device loss replicated)."""
    from rlhf_jax import lora
    from rlhf_jax.optim import OptimConfig

    sgd = OptimConfig(name="sgd", learning_rate=0.1, max_grad_norm=None, grad_accum_steps=2)
    kw = dict(num_samples=4, optim=sgd)  # 8 prompts x 4 = 32 rows, 2 minibatches of 16
    if adapters:
        kw["lora"] = lora.LoRAConfig(rank=2, alpha=4.0)
    one = _ppo_run(parallel.make_mesh(MeshConfig(data=1), jax.devices()[:1]), "dp", **kw)
    mesh = parallel.make_mesh(MESHES["fsdp"])
    per_device = _ppo_run(mesh, "dp", mode="shard_map", **kw)
    _assert_same_ppo_runs(per_device, one)
    _assert_same_ppo_runs(per_device, _ppo_run(mesh, "dp", mode="jit", **kw))
