"""Reports of sweeps, from synthetic run directories: bands, the final-value table, Welch's
comparison as a sentence, and the command line around them."""

import json
import os

import numpy as np
import pytest

from rlhf_jax.cli import main
from rlhf_jax.report import compare_configs, load_sweep_runs, mean_curves, report, sweep_report
from rlhf_jax.stats import mean_ci, welch

FINAL = {"beta=0.05": [0.93, 0.95, 0.91], "beta=0.1": [0.81, 0.86, 0.84]}


def _write_sweep(stage_dir):
    """Two configurations x 3 seeds; eval/win_rate rises linearly to FINAL over 4 steps."""
    runs = []
    k = 0
    for config, finals in FINAL.items():
        for seed, final in enumerate(finals):
            run = os.path.join(stage_dir, "runs", str(k))
            os.makedirs(run)
            with open(os.path.join(run, "metrics.jsonl"), "w") as f:
                for step in (1, 2, 3, 4):
                    rec = {
                        "step": step,
                        "loss": 1.0 / step + seed,
                        "eval/win_rate": final * step / 4,
                    }
                    f.write(json.dumps(rec) + "\n")
            runs.append({"run": k, "program": 0, "config": config, "seed": seed,
                         "values": {}, "dir": os.path.join("runs", str(k))})  # fmt: skip
            k += 1
    with open(os.path.join(stage_dir, "sweep.json"), "w") as f:
        json.dump({"stage": "ppo", "runs": runs}, f)


def test_sweep_report_bands_table_and_comparison(tmp_path):
    stage = tmp_path / "run" / "ppo"
    _write_sweep(stage)
    _, groups = load_sweep_runs(stage)
    assert {k: len(v) for k, v in groups.items()} == {"beta=0.05": 3, "beta=0.1": 3}
    steps, est = mean_curves(groups["beta=0.1"], "eval/win_rate")
    assert steps == [1, 2, 3, 4]
    expected = mean_ci(np.asarray(FINAL["beta=0.1"]) / 2)
    assert (est[1].mean, est[1].low) == (pytest.approx(expected.mean), pytest.approx(expected.low))
    png, text = sweep_report(stage)
    assert os.path.getsize(png) > 0 and png.endswith("sweep_report.png")
    est = mean_ci(FINAL["beta=0.05"])
    assert f"beta=0.05      3     {est.mean:.4g} ± {est.half_width:.2g}" in text
    sentence = welch(FINAL["beta=0.1"], FINAL["beta=0.05"]).sentence(
        "eval/win_rate", "beta=0.1", "beta=0.05"
    )
    assert sentence in text and "beta=0.1 is lower, significant" in sentence
    # compare by table index, on another metric; a run directory finds its swept stage
    _, text = report([tmp_path / "run"], tmp_path / "r.png", compare=["0", "1"], metric="loss")
    assert "loss: beta=0.05 " in text and "not significant" in text
    with pytest.raises(KeyError, match="no configuration 'beta=9'"):
        compare_configs(groups, "beta=9", "beta=0.1", "loss")
    assert "at least 2 seeds" in compare_configs(
        {"a": groups["beta=0.1"][:1], "b": groups["beta=0.1"]}, "a", "b", "loss"
    )


def test_report_command_on_a_sweep(tmp_path, capsys):
    _write_sweep(tmp_path / "run" / "ppo")
    assert main(["report", str(tmp_path / "run" / "ppo"), "--out", str(tmp_path / "x.png")]) == 0
    out = capsys.readouterr().out
    assert "2 configurations" in out and "Welch" in out and os.path.isfile(tmp_path / "x.png")
    argv = ["report", str(tmp_path / "run" / "ppo"), "--compare", "beta=0.05"]
    assert main(argv) == 1
    assert "--compare takes two configurations" in capsys.readouterr().err


def test_seed_summary_of_run_results():
    from types import SimpleNamespace

    from rlhf_jax.report import seed_summary

    runs = [
        SimpleNamespace(evals=[{"step": 5, "win_rate": 0.5}, {"step": 10, "win_rate": w, "kl": 3}])
        for w in (0.9, 0.94, 0.92)
    ]
    out = seed_summary(runs, ["win_rate", "kl", "gold"])
    assert set(out) == {"win_rate", "kl"} and out["win_rate"].n == 3
    assert out["win_rate"].mean == pytest.approx(0.92) and out["kl"].half_width == 0.0
