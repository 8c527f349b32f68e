"""Sweeps through the pipeline: N PPO runs of the toy task in one program equal the same runs
made one by one; each run has its logs and its final model; a resumed sweep writes what an
uninterrupted one does; static axes become separate programs; bad keys fail before writing."""

import dataclasses
import json
import os

import jax
import numpy as np
import pytest

from rlhf_jax import config as config_lib
from rlhf_jax import pipeline, quickstart
from rlhf_jax.cli import main
from rlhf_jax.data.toy import ToyTask
from rlhf_jax.logging import read_metrics
from rlhf_jax.optim import OptimConfig
from rlhf_jax.parallel import MeshConfig, ParallelConfig
from rlhf_jax.sweep import SweepConfig, expand
from rlhf_jax.train import LoopConfig

r = dataclasses.replace
SWEEP = SweepConfig(stage="ppo", seeds=(0, 1), grid={"ppo.trainer.kl_coef": (0.05, 0.2)})


def _config(run_dir, inputs_cfg, *, max_steps=4, sweep=SWEEP, eval_every=2):
    """PPO of the tiny random toy LM on the gold reward function (shared critic), 8 prompts."""
    cfg = inputs_cfg
    base = os.path.join(cfg.run.dir, "inputs", "base")
    return r(
        cfg,
        run=r(cfg.run, dir=str(run_dir)),
        ppo=r(
            cfg.ppo,
            policy=base,
            batch_size=8,
            save_every=2,
            eval=r(cfg.ppo.eval, size=8, samples_per_prompt=1, log_samples=1),
            trainer=r(
                cfg.ppo.trainer,
                critic="shared",
                reward_fn="rlhf_jax.data.toy:gold_reward",
                num_samples=2,
                num_epochs=1,
                num_minibatches=2,
                # Adam eps 1e-3: the one-program and the one-by-one runs agree to rounding
                # (see tests/test_ppo.py::test_vmap_over_seeds_equals_separate_runs)
                optim=OptimConfig(learning_rate=3e-3, eps=1e-3),
                loop=LoopConfig(max_steps=max_steps, eval_every=eval_every),
            ),
        ),
        sweep=sweep,
    )


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    cfg = quickstart.default_config()
    cfg = r(
        cfg,
        run=r(cfg.run, dir=str(tmp_path_factory.mktemp("sweep") / "inputs_run"), progress=False),
        toy=ToyTask(
            hidden_size=16,
            num_layers=1,
            num_heads=2,
            sft_examples=16,
            sft_eval_examples=8,
            rm_prompts=8,
            rm_eval_prompts=8,
        ),
    )
    return quickstart.prepare(cfg)


@pytest.fixture(scope="module")
def swept(inputs, tmp_path_factory):
    """The sweep, stopped after 2 iterations (as a kill after the checkpoint of step 2 would
    leave it) and resumed to 4."""
    run_dir = tmp_path_factory.mktemp("sweep") / "run"
    pipeline.run_stage(_config(run_dir, inputs, max_steps=2), "ppo", verbose=False)
    checkpoints = os.listdir(run_dir / "ppo" / "programs" / "0" / "checkpoints")
    cfg = _config(run_dir, inputs)
    return cfg, pipeline.run_stage(cfg, "ppo", verbose=False), checkpoints


def _strip(records):
    return [
        {k: v for k, v in rec.items() if k != "wall_time" and not k.startswith("time/")}
        for rec in records
    ]


@pytest.mark.slow
def test_one_program_resumed_equals_the_runs_one_by_one(swept, inputs, tmp_path):
    cfg, res, checkpoints = swept
    assert checkpoints == ["2"] and res.result.start_step == 2
    assert [rr.step for rr in res.runs] == [4, 4, 4, 4]
    # run 3 = seed 1, beta 0.2 (seeds innermost), made alone without a sweep, uninterrupted
    alone_cfg = _config(tmp_path / "alone", inputs, sweep=SweepConfig(), eval_every=0)
    alone_cfg = r(
        alone_cfg,
        run=r(alone_cfg.run, seed=1),
        ppo=r(alone_cfg.ppo, trainer=r(alone_cfg.ppo.trainer, kl_coef=0.2)),
    )
    alone = pipeline.run_stage(alone_cfg, "ppo", verbose=False).result
    swept_history = _strip(read_metrics(os.path.join(cfg.run.dir, "ppo", "runs", "3")))
    assert len(alone.history) == len(swept_history) == 4
    for a, b in zip(alone.history, swept_history, strict=True):
        for key, value in a.items():
            np.testing.assert_allclose(b[key], value, rtol=1e-4, atol=1e-5, err_msg=key)
    # the runs differ: seeds change the rollouts, beta the rewards
    first = [read_metrics(os.path.join(cfg.run.dir, "ppo", "runs", str(k)))[0] for k in range(4)]
    assert first[0]["score/mean"] != first[1]["score/mean"]
    assert first[0]["reward/response"] == first[2]["reward/response"]  # KL is 0 at step 1
    assert [h["beta"] for h in first] == pytest.approx([0.05, 0.05, 0.2, 0.2])


@pytest.mark.slow
def test_each_run_has_its_logs_model_report_and_export(swept, tmp_path, capsys):
    cfg, res, _ = swept
    stage = os.path.join(cfg.run.dir, "ppo")
    with open(os.path.join(stage, "sweep.json")) as f:
        record = json.load(f)
    assert [(x["run"], x["seed"], x["config"]) for x in record["runs"]] == [
        (0, 0, "trainer.kl_coef=0.05"),
        (1, 1, "trainer.kl_coef=0.05"),
        (2, 0, "trainer.kl_coef=0.2"),
        (3, 1, "trainer.kl_coef=0.2"),
    ]
    for k in range(4):
        run = os.path.join(stage, "runs", str(k))
        records = read_metrics(run)
        assert [x["step"] for x in records] == [1, 2, 3, 4]
        assert [x["step"] for x in records if "eval/gold" in x] == [2, 4]
        assert _strip(records)[-1]["score/mean"] == pytest.approx(
            res.runs[k].history[-1]["score/mean"]
        )
        assert os.path.isfile(os.path.join(run, "final", "config.json"))
        assert os.path.getsize(os.path.join(run, "samples.jsonl")) > 0
    capsys.readouterr()
    assert (
        main(["report", cfg.run.dir, "--metric", "eval/gold", "--out", str(tmp_path / "r.png")])
        == 0
    )
    out = capsys.readouterr().out
    assert "trainer.kl_coef=0.05  2" in out and "Welch" in out and "95% CI" in out
    assert os.path.getsize(tmp_path / "r.png") > 0
    assert main(["export", cfg.run.dir, str(tmp_path / "out"), "--run", "2"]) == 0
    assert os.path.isfile(tmp_path / "out" / "policy" / "config.json")
    assert main(["export", cfg.run.dir, str(tmp_path / "out"), "--run", "9"]) == 2


def test_static_axes_are_programs_one_after_another(inputs, tmp_path):
    sweep = SweepConfig(
        stage="ppo",
        seeds=(3, 4),
        grid={"ppo.trainer.num_epochs": (1, 2), "ppo.trainer.optim.learning_rate": (1e-3, 1e-2)},
    )
    runs = expand(_config(tmp_path / "run", inputs, sweep=sweep), "ppo")
    assert [(x.program, x.seed) for x in runs] == [(0, 3), (0, 4)] * 2 + [(1, 3), (1, 4)] * 2
    assert runs[2].label == "trainer.num_epochs=1, trainer.optim.learning_rate=0.01"
    assert runs[7].cfg.ppo.trainer.num_epochs == 2 and runs[7].cfg.run.seed == 4
    # the DPO and GRPO hyperparameters are arrays too: one program
    for stage, key in (("grpo", "trainer.kl_coef"), ("dpo", "trainer.beta")):
        grid = {f"{stage}.{key}": (0.05, 0.1), f"{stage}.trainer.optim.learning_rate": (1e-3, 1e-4)}
        cfg = r(inputs, sweep=SweepConfig(stage=stage, seeds=(0, 1), grid=grid))
        assert {x.program for x in expand(cfg, stage)} == {0}


def test_bad_sweeps_fail_in_one_line_before_anything_is_written(inputs, tmp_path):
    for grid, match in (
        ({"ppo.trainer.kl_coeff": (0.1,)}, "is not a config key"),
        ({"sft.trainer.batch_size": (2,)}, "is not in the ppo section"),
        ({"ppo.trainer.kl_coef": (-1.0,)}, "kl_coef=-1.0: must be >= 0"),
    ):
        cfg = _config(tmp_path / "run", inputs, sweep=SweepConfig(stage="ppo", grid=grid))
        with pytest.raises(config_lib.ConfigError, match=match):
            pipeline.run_stage(cfg, "ppo", verbose=False)
        assert not os.path.exists(tmp_path / "run")
    cfg = _config(tmp_path / "run", inputs, sweep=SweepConfig(stage="ppp", seeds=(1, 2)))
    with pytest.raises(config_lib.ConfigError, match="sweep.stage='ppp' is not a stage"):
        pipeline.run_stage(cfg, "ppo", verbose=False)
    with pytest.raises(config_lib.ConfigError, match="different lengths"):
        config_lib.load_config(
            None, ["sweep.paired={ppo.trainer.lam: [0.9], ppo.trainer.gamma: [1.0, 0.99]}"]
        )
    cfg = config_lib.load_config(
        None,
        ["sweep.stage=ppo", "sweep.seeds=[0,1]", "sweep.grid={ppo.trainer.kl_coef: [0.05, 0.1]}"],
    )
    assert cfg.sweep.grid == {"ppo.trainer.kl_coef": (0.05, 0.1)}


@pytest.mark.slow
def test_sft_and_reward_model_sweeps(inputs, tmp_path):
    """SFT: 2 seeds x 2 learning rates in one program; the run of seed 1, lr 3e-3 equals that run
    made alone. Reward model: 2 seeds in one program (the seed draws the head and the data order)."""
    cfg = inputs
    sft = r(
        cfg.sft,
        model=os.path.join(cfg.run.dir, "inputs", "base"),
        eval_size=8,
        save_every=0,
        trainer=r(
            cfg.sft.trainer,
            batch_size=4,
            optim=OptimConfig(learning_rate=1e-2),
            loop=LoopConfig(max_steps=3, eval_every=3),
        ),
    )
    grid = {"sft.trainer.optim.learning_rate": (1e-2, 3e-3)}
    swept_cfg = r(cfg, run=r(cfg.run, dir=str(tmp_path / "s")), sft=sft,
                  sweep=SweepConfig(stage="sft", seeds=(0, 1), grid=grid))  # fmt: skip
    res = pipeline.run_stage(swept_cfg, "sft", verbose=False)
    alone_sft = r(sft, trainer=r(sft.trainer, optim=OptimConfig(learning_rate=3e-3)))
    alone_cfg = r(cfg, run=r(cfg.run, dir=str(tmp_path / "a"), seed=1), sft=alone_sft)
    alone = pipeline.run_stage(alone_cfg, "sft", verbose=False).result
    for a, b in zip(alone.history, res.runs[3].history, strict=True):
        for key in ("loss", "token_accuracy", "grad_norm", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    assert res.runs[0].history[0]["loss"] != res.runs[1].history[0]["loss"]  # data order
    assert [rr.history[0]["lr"] for rr in res.runs] == pytest.approx([1e-2, 1e-2, 3e-3, 3e-3])
    assert os.path.isfile(tmp_path / "s" / "sft" / "runs" / "3" / "final" / "config.json")
    # the run axis split over devices: 2 runs on the 2 devices of the mesh axis "data"
    shard_cfg = r(
        swept_cfg,
        run=r(cfg.run, dir=str(tmp_path / "sh")),
        parallel=ParallelConfig(mesh=MeshConfig(data=2), preset="dp"),
        sweep=SweepConfig(stage="sft", seeds=(0, 1), shard_runs="data"),
    )
    sharded = pipeline.run_stage(shard_cfg, "sft", verbose=False)
    for k in range(2):
        for a, b in zip(res.runs[k].history, sharded.runs[k].history, strict=True):
            assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), k
    leaf = jax.tree.leaves(sharded.result.state.params)[0]
    assert leaf.sharding.spec[0] == "data" and len(leaf.sharding.device_set) == 2

    with open(os.path.join(cfg.run.dir, "inputs", "sft_train.jsonl")) as f:
        rows = [json.loads(line) for line in f][:16]
    rankings = tmp_path / "rankings.jsonl"
    with open(rankings, "w") as f:
        for i, row in enumerate(rows):
            group = [rows[(i + j) % len(rows)]["completion"] for j in range(4)]
            f.write(json.dumps({"prompt": row["prompt"], "completions": group}) + "\n")
    rm = r(
        cfg.rm,
        model=sft.model,
        train_file=str(rankings),
        save_every=0,
        trainer=r(cfg.rm.trainer, batch_size=4, normalize=False, loop=LoopConfig(max_steps=2)),
    )
    rm_cfg = r(cfg, run=r(cfg.run, dir=str(tmp_path / "rm")), rm=rm,
               sweep=SweepConfig(stage="rm", seeds=(0, 1)))  # fmt: skip
    res = pipeline.run_stage(rm_cfg, "rm", verbose=False)
    assert [rr.step for rr in res.runs] == [2, 2]
    assert res.runs[0].history[0]["loss"] != res.runs[1].history[0]["loss"]
    for k in range(2):
        assert os.path.isfile(tmp_path / "rm" / "rm" / "runs" / str(k) / "final" / "config.json")


# ------------------------------------------------------------------------------------------
# The learning-curve band: a change that breaks learning, not just code, fails the suite
# ------------------------------------------------------------------------------------------

BAND_FILE = os.path.join(os.path.dirname(__file__), "fixtures", "curve_band_ppo.json")
BAND_WORDS = ["<pad>", "<eos>", "a", "dog", "cat", "is", "furry", "."]
BAND_SEEDS = (0, 1, 2)
BAND_ITERATIONS = 12
BAND_MIN_HALF_WIDTH = 0.2  # the band is the reference mean ± max(this, 3 x its standard error)


def band_curve(tmp_path) -> np.ndarray:
    """Per-iteration mean reward ``[seeds, iterations]`` of a tiny PPO run (shared critic, a
    reward function counting the word "dog"), the seeds as one sweep program."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    from rlhf_jax import models
    from rlhf_jax.algorithms import ppo
    from rlhf_jax.reward_fn import RewardFunction
    from rlhf_jax.sweep import stack, vmap_step
    from rlhf_jax.train import run_loop

    (tmp_path / "dog_reward.py").write_text(
        "def dogs(prompts, responses):\n"
        "    return [float(r.split().count('dog')) for r in responses]\n"
    )
    tok = Tokenizer(tok_models.WordLevel({w: i for i, w in enumerate(BAND_WORDS)}, "<pad>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")
    model_cfg = models.ModelConfig(
        arch="gpt2",
        vocab_size=len(BAND_WORDS),
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        max_position_embeddings=16,
    )
    cfg = ppo.PPOConfig(
        response_length=5,
        num_samples=2,
        num_epochs=2,
        num_minibatches=2,
        critic="shared",
        reward_fn=f"{tmp_path / 'dog_reward.py'}:dogs",
        optim=OptimConfig(learning_rate=3e-2),
        loop=LoopConfig(max_steps=BAND_ITERATIONS),
        kl_coef=0.01,
        temperature=1.0,
    )
    sft = models.init_model(model_cfg, jax.random.PRNGKey(0))
    reward = RewardFunction.load(cfg.reward_fn, tokenizer)
    static, params, frozen = ppo.make_models(cfg, sft, reward_fn=reward)
    tokens = np.array([[0, 2, 3], [2, 4, 5], [0, 0, 3], [6, 3, 5]], np.int32)
    mask = (np.arange(3)[None, :] >= np.array([1, 0, 2, 0])[:, None]).astype(np.int32)
    n = len(BAND_SEEDS)
    batch = {"prompt_tokens": np.stack([tokens] * n), "prompt_mask": np.stack([mask] * n)}
    states = [
        ppo.init_state(cfg, params, ppo.PPOHParams.from_config(cfg, seed=s)) for s in BAND_SEEDS
    ]
    result = run_loop(
        vmap_step(ppo.make_step(cfg, static, frozen)),
        stack(states),
        lambda s: batch,
        loop=cfg.loop,
        runs=n,
    )
    return np.array([[h["score/mean"] for h in rr.history] for rr in result.runs])


@pytest.mark.slow
def test_learning_curve_stays_in_its_band(tmp_path):
    """The mean reward of 3 seeds at each PPO iteration stays inside the committed band (made by
    ``RLHF_JAX_WRITE_CURVE_BAND=1 pytest tests/test_sweep.py -k band``, which rewrites it).
    A policy that stops learning, or learns the wrong way (an advantage with the wrong sign),
    leaves it within a few iterations."""
    from rlhf_jax.stats import curve_band

    curves = band_curve(tmp_path)
    mean, low, high = curve_band(curves)
    if os.environ.get("RLHF_JAX_WRITE_CURVE_BAND"):
        half = np.maximum(BAND_MIN_HALF_WIDTH, 3 * curves.std(0, ddof=1) / np.sqrt(len(curves)))
        with open(BAND_FILE, "w") as f:
            json.dump(
                {
                    "what": "tests/test_sweep.py::band_curve: mean reward per PPO iteration over "
                    f"seeds {list(BAND_SEEDS)}; band = mean ± max({BAND_MIN_HALF_WIDTH}, 3 SE)",
                    "mean": np.round(mean, 4).tolist(),
                    "low": np.round(mean - half, 4).tolist(),
                    "high": np.round(mean + half, 4).tolist(),
                },
                f,
                indent=1,
            )
    with open(BAND_FILE) as f:
        band = json.load(f)
    assert len(band["mean"]) == BAND_ITERATIONS == len(mean)
    outside = [
        f"iteration {i + 1}: {m:.3f} not in [{lo:.3f}, {hi:.3f}]"
        for i, (m, lo, hi) in enumerate(zip(mean, band["low"], band["high"], strict=True))
        if not lo <= m <= hi
    ]
    assert not outside, "the learning curve left its band: " + "; ".join(outside)
    assert band["mean"][-1] > band["mean"][0] + 0.5  # the band itself says that PPO learns
