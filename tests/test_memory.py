"""PPO's whole iteration compiled from abstract shapes: what each device holds is counted."""

import math

import jax

from rlhf_jax import memory, models, parallel
from rlhf_jax.algorithms import ppo

MODEL = models.ModelConfig(
    arch="llama",
    vocab_size=256,
    hidden_size=32,
    num_layers=1,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    intermediate_size=64,
    max_position_embeddings=64,
)


def _bytes(tree):
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def test_ppo_dry_run_holds_the_state_and_the_frozen_models():
    """Data parallel (replicated): every device holds the policy, the critic and their AdamW
    moments, the reference and the reward model, so the iteration's arguments are at least
    their sum."""
    cfg = ppo.PPOConfig(response_length=4)
    policy = memory.abstract_model(MODEL)[1]
    rm = memory.abstract_model(MODEL, lm_head=False, score_head=True)[1]
    held = 3 * (_bytes(policy) + _bytes(rm)) + _bytes(policy) + _bytes(rm)  # params, mu, nu
    dp = parallel.ParallelConfig(mesh=parallel.MeshConfig(data=8), preset="dp")
    replicated = memory.ppo_dry_run(MODEL, dp, cfg, batch_size=8, prompt_len=8)
    assert replicated.arguments >= held
    assert replicated.temps > 0 and replicated.num_params > 0


def test_a_sweep_dry_run_holds_n_stacked_states():
    """``runs=N`` compiles the sweep's program (N stacked states and batches, the step vmapped):
    the arguments grow by a whole train state (params and AdamW moments) per run, the temporaries
    grow too, and PPO's frozen reference and reward model are held once, not N times."""
    one_device = parallel.ParallelConfig(mesh=parallel.MeshConfig(data=1))
    devices = jax.devices()[:1]
    params = memory.abstract_model(MODEL)[1]
    sft = {
        n: memory.dry_run(MODEL, one_device, batch_size=4, seq_len=16, devices=devices, runs=n)
        for n in (1, 2, 4)
    }
    state = 3 * _bytes(params)  # params, mu, nu
    for n in (2, 4):
        grown = sft[n].arguments - sft[1].arguments
        assert (n - 1) * state <= grown <= (n - 1) * (state + 4096), (n, grown, state)
        assert sft[n].temps > sft[1].temps and sft[n].total > sft[1].total
    assert sft[4].total > sft[2].total
    assert sft[2].num_params == 2 * sft[1].num_params

    cfg = ppo.PPOConfig(response_length=4, num_minibatches=1)
    rm = memory.abstract_model(MODEL, lm_head=False, score_head=True)[1]
    runs = {
        n: memory.ppo_dry_run(
            MODEL, one_device, cfg, batch_size=4, prompt_len=8, devices=devices, runs=n
        )  # fmt: skip
        for n in (1, 3)
    }
    trained = 3 * (_bytes(params) + _bytes(rm))  # policy and critic, with their moments
    frozen = _bytes(params) + _bytes(rm)  # reference and reward model: shared by the runs
    grown = runs[3].arguments - runs[1].arguments
    assert 2 * trained <= grown < 2 * trained + frozen, (grown, trained, frozen)
    assert runs[3].temps > runs[1].temps


def test_a_sweep_dry_run_checks_the_run_axis():
    import pytest

    dp = parallel.ParallelConfig(mesh=parallel.MeshConfig(data=2))
    with pytest.raises(ValueError, match="3 runs do not split over the 2 devices"):
        memory.dry_run(MODEL, dp, batch_size=4, seq_len=8, devices=jax.devices()[:2], runs=3,
                       shard_runs="data")  # fmt: skip


def test_the_dry_run_of_a_sweep_reports_its_program(capsys, tmp_path, monkeypatch):
    """``rlhf-jax sft --dry-run`` with a ``sweep:`` of sft compiles the N-run program: its row
    names the runs, and it holds three train states where the one-run dry run holds one."""
    import json

    from rlhf_jax.cli import main
    from rlhf_jax.models import hf

    (tmp_path / "config.json").write_text(json.dumps(hf.config_to_hf(MODEL)))  # no weights
    reports = []
    measure = memory.dry_run
    monkeypatch.setattr(memory, "dry_run", lambda *a, **k: reports.append(measure(*a, **k))
                        or reports[-1])  # fmt: skip
    argv = ["sft", f"sft.model={tmp_path}", "sft.trainer.batch_size=8",
            "sft.data.max_prompt_length=8", "sft.data.max_completion_length=8",
            "parallel.mesh.data=8", "--dry-run"]  # fmt: skip
    assert main(argv) == 0
    assert "runs" not in capsys.readouterr().out
    assert main([*argv[:-1], "sweep.stage=sft", "sweep.seeds=[0,1,2]", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "program 0: 3 runs (base)" in out and "sweep of sft: 3 runs" in out
    one, three = reports
    state = 3 * _bytes(memory.abstract_model(MODEL)[1])  # params, mu, nu
    assert three.arguments - one.arguments >= 2 * state and three.total > one.total


def test_float32_moments_with_bfloat16_parameters():
    """``optim.moment_dtype='float32'``: Adam's mu and nu are float32 beside bfloat16 parameters,
    the update is the float32 AdamW update of the same numbers cast to bfloat16, and PPO's
    iteration holds 4 more bytes per trainable parameter (two moments, 2 -> 4 bytes each)."""
    import dataclasses

    import jax.numpy as jnp
    import numpy as np

    from rlhf_jax.optim import OptimConfig, make_optimizer

    params = {"w": jnp.linspace(-1, 1, 12, dtype=jnp.bfloat16).reshape(3, 4)}
    grads = {"w": jnp.linspace(0.5, -0.7, 12, dtype=jnp.bfloat16).reshape(3, 4)}
    base = OptimConfig(learning_rate=1e-2, weight_decay=0.1)
    opt = make_optimizer(dataclasses.replace(base, moment_dtype="float32"))
    state = opt.init(params)
    mu, nu = state.inner_state[1].mu["w"], state.inner_state[1].nu["w"]
    assert mu.dtype == nu.dtype == jnp.float32
    f32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)  # noqa: E731
    ref_opt = make_optimizer(base)  # the float32 reference on the same (float32-cast) inputs
    ref_state = ref_opt.init(f32(params))
    for _ in range(2):  # the second step reads the float32 moments of the first
        upd, state = opt.update(grads, state, params)
        ref_upd, ref_state = ref_opt.update(f32(grads), ref_state, f32(params))
        assert upd["w"].dtype == jnp.bfloat16
    np.testing.assert_array_equal(upd["w"], ref_upd["w"].astype(jnp.bfloat16))
    assert make_optimizer(base).init(params).inner_state[1].mu["w"].dtype == jnp.bfloat16

    bf16 = MODEL.replace(dtype="bfloat16", param_dtype="bfloat16")
    dp = parallel.ParallelConfig(mesh=parallel.MeshConfig(data=1))
    devices = jax.devices()[:1]
    args = {}
    for moments in (None, "float32"):
        cfg = ppo.PPOConfig(response_length=4, num_minibatches=1,
                            optim=OptimConfig(moment_dtype=moments))  # fmt: skip
        args[moments] = memory.ppo_dry_run(
            bf16, dp, cfg, batch_size=4, prompt_len=8, devices=devices
        ).arguments
    policy = models.Model(*memory.abstract_model(bf16), config=bf16)
    rm = models.Model(*memory.abstract_model(bf16, lm_head=False, score_head=True), config=bf16)
    trained = ppo.make_models(cfg, policy, rm)[1]  # the policy and the critic
    grown = args["float32"] - args[None]
    more = 4 * sum(math.prod(x.shape) for x in jax.tree.leaves(trained))
    assert abs(grown - more) <= 64, (args, more)  # scalar leaves take 4 bytes in either dtype


def test_the_cli_dry_run_applies_run_remat(tmp_path, monkeypatch):
    """``run.remat`` reaches the model the CLI's dry run compiles (as it does every trainer's)."""
    import json

    from rlhf_jax.cli import main
    from rlhf_jax.models import hf

    (tmp_path / "config.json").write_text(json.dumps(hf.config_to_hf(MODEL)))  # no weights
    seen = []
    measure = memory.dry_run
    monkeypatch.setattr(memory, "dry_run", lambda cfg, *a, **k: seen.append(cfg.remat)
                        or measure(cfg, *a, **k))  # fmt: skip
    argv = ["sft", f"sft.model={tmp_path}", "sft.trainer.batch_size=8",
            "sft.data.max_prompt_length=8", "sft.data.max_completion_length=8", "--dry-run"]  # fmt: skip
    assert main(argv) == 0 and main([*argv[:-1], "run.remat=full", "--dry-run"]) == 0
    assert seen == ["none", "full"]
