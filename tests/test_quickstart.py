"""The default pipeline on the toy task, shrunk: sft -> label -> rm -> ppo (two seeds in one
program, as the quickstart's five) -> report, through the same stages as the command; PPO's reward
rises, the report gives each figure as mean ± 95% CI over the seeds with a row per seed, a rerun
reports the same, the run directory is an ordinary one, and the trained models are usable by
`generate`, `evaluate` and `export --run K`."""

import dataclasses
import json
import os

import numpy as np
import pytest

from rlhf_jax import quickstart
from rlhf_jax.cli import main
from rlhf_jax.data.toy import ToyTask
from rlhf_jax.logging import read_metrics
from rlhf_jax.optim import OptimConfig
from rlhf_jax.stats import mean_ci
from rlhf_jax.sweep import SweepConfig
from rlhf_jax.train import LoopConfig


def _tiny(run_dir):
    cfg = quickstart.default_config()
    r = dataclasses.replace
    return r(
        cfg,
        run=r(cfg.run, dir=str(run_dir), progress=False),
        toy=ToyTask(
            hidden_size=32,
            num_layers=1,
            num_heads=2,
            sft_examples=1024,
            sft_eval_examples=64,
            rm_prompts=256,
            rm_eval_prompts=64,
        ),
        sft=r(
            cfg.sft,
            eval_size=64,
            trainer=r(
                cfg.sft.trainer,
                optim=OptimConfig(learning_rate=1e-2),
                loop=LoopConfig(max_steps=60, eval_every=60),
            ),
        ),
        label=r(cfg.label, chunk=256),
        rm=r(
            cfg.rm,
            trainer=r(
                cfg.rm.trainer,
                optim=OptimConfig(learning_rate=3e-3),
                loop=LoopConfig(max_steps=40, eval_every=40),
            ),
        ),
        ppo=r(
            cfg.ppo,
            batch_size=16,
            eval=r(cfg.ppo.eval, samples_per_prompt=1),
            trainer=r(
                cfg.ppo.trainer,
                optim=OptimConfig(learning_rate=3e-4, eps=1e-5),
                loop=LoopConfig(max_steps=12, eval_every=6),
            ),
        ),
        sweep=SweepConfig(stage="ppo", seeds=(0, 1)),
    )


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    cfg = _tiny(tmp_path_factory.mktemp("qs") / "run")
    return cfg, quickstart.run(cfg, verbose=False)


@pytest.mark.slow
def test_tiny_pipeline_reward_rises_and_report_is_written(tiny_run):
    cfg, report = tiny_run
    rewards = [c["reward"] for c in report["ppo_curve"][1:]]  # the mean over the two seeds
    assert np.mean(rewards[-3:]) > np.mean(rewards[:3]) + 0.2, rewards
    for name in ("report.json", "report.md", "ppo_curves.png", "config.yaml"):
        assert os.path.getsize(os.path.join(cfg.run.dir, name)) > 0
    with open(os.path.join(cfg.run.dir, "report.json")) as f:
        saved = json.load(f)
    assert saved["seeds"] == [0, 1] and [r["seed"] for r in saved["per_seed"]] == [0, 1]
    assert set(saved["after"]) >= {"gold", "reward", "kl", "well_formed"}
    assert 0.0 <= saved["gold_win_rate"] <= 1.0 and len(saved["samples"]) > 0
    assert saved["reward_model"]["eval_accuracy"] > 0.5
    assert saved["before"]["kl"] == 0.0  # the reference against itself
    # each headline figure is the mean over the seeds with its Student-t interval
    for key in ("win_rate", "kl", "well_formed", "gold"):
        est = mean_ci([r[key] for r in saved["per_seed"]])
        ci = saved["ci"][key]
        assert ci["n"] == 2 and ci["low"] < ci["mean"] < ci["high"]
        assert (ci["mean"], ci["low"], ci["high"]) == pytest.approx((est.mean, est.low, est.high))
    assert saved["gold_win_rate"] == pytest.approx(saved["ci"]["win_rate"]["mean"])
    # the curve's band at each evaluated iteration is the interval of the seeds' gold scores
    gold = [[c["gold"] for c in run if c["iteration"] == 12] for run in saved["ppo_curves"]]
    last = [c for c in saved["ppo_curve"] if c["iteration"] == 12][0]
    est = mean_ci([g[0] for g in gold])
    assert (last["gold"], last["gold_low"], last["gold_high"]) == pytest.approx(
        (est.mean, est.low, est.high)
    )
    text = open(os.path.join(cfg.run.dir, "report.md")).read()
    assert "over 2 seeds" in text and "| 1 | 1 |" in text
    # each run's evaluations are in its metrics, at iterations 6 and 12, with the gold figures
    for k in (0, 1):
        run = os.path.join(cfg.run.dir, "ppo", "runs", str(k))
        evals = [r for r in read_metrics(run) if "eval/gold" in r]
        assert [r["step"] for r in evals] == [6, 12]
        assert all(0.0 <= r["eval/win_rate"] <= 1.0 for r in evals)


@pytest.mark.slow
def test_a_rerun_resumes_and_reports_the_same(tiny_run):
    """Every stage resumes at its end (nothing retrained): the report, read back from the run
    directory, has the same figures."""
    cfg, report = tiny_run

    def lines():  # raw lines: a retrained stage would append its steps again
        paths = [os.path.join(cfg.run.dir, s, "metrics.jsonl") for s in ("sft", "rm")]
        paths += [os.path.join(cfg.run.dir, "ppo", "runs", str(k), "metrics.jsonl") for k in (0, 1)]
        return [sum(1 for _ in open(p)) for p in paths]

    written = lines()
    again = quickstart.run(cfg, verbose=False)
    assert lines() == written
    assert again["ci"] == report["ci"] and again["per_seed"] == report["per_seed"]
    assert again["ppo_curve"] == report["ppo_curve"]


@pytest.mark.slow
def test_the_run_directory_is_an_ordinary_one(tiny_run, tmp_path, capsys):
    cfg, _ = tiny_run
    run = cfg.run.dir
    for k in (0, 1):  # each seed's policy
        assert main(["export", run, str(tmp_path / f"out{k}"), "--run", str(k)]) == 0
        for name in ("policy", "reward_model"):
            assert os.path.isfile(tmp_path / f"out{k}" / name / "config.json")
            assert os.path.isfile(tmp_path / f"out{k}" / name / "tokenizer.json")
    assert main(["export", run, str(tmp_path / "out"), "--run", "2"]) == 2  # no run 2
    # without --run the swept PPO stage has no one policy: refused, not SFT's taken silently
    capsys.readouterr()
    assert main(["export", run, str(tmp_path / "out")]) == 2
    assert "ppo is a sweep" in capsys.readouterr().err
    prompts = os.path.join(run, "inputs", "prompts.jsonl")
    gen = str(tmp_path / "gen.jsonl")
    seed0 = os.path.join(run, "ppo", "runs", "0")  # a stage directory: its final/
    argv = ["generate", seed0, prompts, gen, "--n", "2", "--max-new-tokens", "10", "--limit", "5"]
    assert main(argv) == 0
    with open(gen) as f:
        rows = [json.loads(line) for line in f]
    assert len(rows) == 10 and [r["sample"] for r in rows[:2]] == [0, 1]
    # score the generated responses with the run's reward model and with the gold function
    capsys.readouterr()
    assert main(["evaluate", gen, "--reward-model", run, "--out", str(tmp_path / "s.jsonl")]) == 0
    assert "score: " in capsys.readouterr().out
    gold = "rlhf_jax.data.toy:gold_reward"
    assert main(["evaluate", gen, "--reward-model", run, "--function", gold]) == 2
    # the PPO policy against the SFT policy, judged by the gold function: a win rate with a CI
    argv = ["evaluate", "--policy-a", seed0, "--policy-b",
            os.path.join(run, "sft"), "--prompts", prompts, "--function", gold,
            "--max-new-tokens", "10", "--n", "2"]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "win rate of A over B: " in out and "95% CI" in out


def test_toy_config_matches_what_the_quickstart_runs():
    from rlhf_jax import config as C

    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "experiments", "configs")
    assert C.load_config(os.path.join(path, "toy.yaml")) == quickstart.default_config()


def test_report_figures_are_means_over_seeds_with_intervals():
    """build_report's pieces on literal metrics: the last evaluation of each run, the mean curve
    with its band, and the targets on the mean and the interval's lower end."""
    from rlhf_jax.stats import Estimate

    def records(win, kl):
        ref = {"eval/reference/gold": 0.5, "eval/reference/kl": 0.0}
        return [
            {"step": 1, "score/mean": 0.1, "kl/response": 0.5},
            {"step": 2, "score/mean": 0.3, "kl/response": kl, "eval/gold": 2.0,
             "eval/win_rate": win, "eval/kl": kl, "eval/well_formed": 0.99, **ref},
        ]  # fmt: skip

    runs = [quickstart.run_figures(records(w, k)) for w, k in ((0.9, 2.0), (0.95, 4.0))]
    assert runs[1]["after"] == {"gold": 2.0, "kl": 4.0, "well_formed": 0.99}
    assert runs[0]["before"] == {"gold": 0.5, "kl": 0.0} and runs[0]["win_rate"] == 0.9
    curve = quickstart.mean_curve([r["curve"] for r in runs])
    assert [c["iteration"] for c in curve] == [0, 1, 2]
    assert curve[2]["kl"] == 3.0 and curve[2]["kl_low"] < 3.0 < curve[2]["kl_high"]
    assert curve[1]["reward_low"] == curve[1]["reward_high"] == pytest.approx(0.1)  # no spread
    assert curve[1]["gold"] is None  # not evaluated at iteration 1
    met = dict((name, fn) for name, fn in quickstart.TARGETS)
    good = {"win_rate": Estimate(0.93, 0.88, 0.98, 5), "kl": Estimate(3.0, 2.0, 4.0, 5),
            "well_formed": Estimate(0.99, 0.98, 1.0, 5)}  # fmt: skip
    assert all(fn(good) for fn in met.values())
    wide = {**good, "win_rate": Estimate(0.93, 0.80, 1.06, 5)}
    assert met["gold win rate mean >= 90%"](wide) and not met["gold win rate CI low >= 85%"](wide)
    assert not met["KL <= 8 nats"]({**good, "kl": Estimate(8.5, 8.0, 9.0, 5)})


def test_compile_seconds_is_the_first_step_minus_the_mean_of_the_others():
    """The report's compile figure: a 4-step run whose first step took 5 s and the others 1, 1.5
    and 0.5 s compiled for 4 s; a resumed run counts only the steps of this process; fewer than two
    steps give None."""
    from types import SimpleNamespace

    run = SimpleNamespace(first_step_s=5.0, timings={"step": 8.0}, step=4, start_step=0)
    assert quickstart.compile_seconds(run) == 4.0
    resumed = SimpleNamespace(first_step_s=3.0, timings={"step": 5.0}, step=12, start_step=9)
    assert quickstart.compile_seconds(resumed) == 2.0
    one = SimpleNamespace(first_step_s=3.0, timings={"step": 3.0}, step=10, start_step=9)
    assert quickstart.compile_seconds(one) is None
    skipped = SimpleNamespace(first_step_s=None, timings={"step": 0.0}, step=10, start_step=10)
    assert quickstart.compile_seconds(skipped) is None
