"""RunLogger files (JSONL, TensorBoard, samples), resume truncation, and the report's PNG/table."""

import json
import math
import os

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.logging import METRICS_FILE, RunLogger, read_metrics
from rlhf_jax.report import match_panels, report, summary_table


def _fake_ppo_run(run_dir, steps=6, scale=1.0, **kw):
    with RunLogger(run_dir, progress_total=steps, **kw) as lg:
        for s in range(1, steps + 1):
            with lg.phase("rollout"):
                pass
            lg.log(
                s,
                {
                    "reward": jnp.float32(scale * s),
                    "gold_score": np.float64(0.5 * s),
                    "kl": 0.01 * s,
                    "entropy": 2.0 - 0.1 * s,
                    "response_length": 10.0 + s,
                    "value_loss": 1.0 / s,
                    "clip_frac": 0.1,
                    "kl_coef": 0.2,
                },
                timings={"update": 0.5},
            )


def test_jsonl_tensorboard_timings(tmp_path):
    _fake_ppo_run(tmp_path / "run")
    recs = read_metrics(tmp_path / "run")
    assert [r["step"] for r in recs] == [1, 2, 3, 4, 5, 6]
    assert recs[2]["reward"] == 3.0 and recs[2]["kl"] == pytest.approx(0.03)
    assert recs[0]["time/update"] == 0.5 and "time/rollout" in recs[0]
    assert "time/wall_per_step" in recs[1]
    events = os.listdir(tmp_path / "run" / "tensorboard")
    assert events and events[0].startswith("events.out.tfevents")
    assert os.path.getsize(tmp_path / "run" / "tensorboard" / events[0]) > 100


def test_nonfinite_is_null_and_nonscalar_is_an_error(tmp_path):
    with RunLogger(tmp_path, tensorboard=False, progress=False) as lg:
        lg.log(1, {"loss": float("nan"), "x": float("inf")})
        with pytest.raises(ValueError, match="metric 'v' at step 2 is not a scalar"):
            lg.log(2, {"v": jnp.ones(3)})
    line = (tmp_path / METRICS_FILE).read_text().splitlines()[0]
    assert json.loads(line)["loss"] is None and "NaN" not in line


def test_disabled_process_writes_nothing(tmp_path):
    with RunLogger(tmp_path / "r", enabled=False) as lg:
        rec = lg.log(1, {"loss": 1.0})
    assert rec["loss"] == 1.0 and not (tmp_path / "r").exists()


def test_resume_drops_lines_after_the_checkpoint_and_a_torn_line(tmp_path):
    _fake_ppo_run(tmp_path, steps=5, tensorboard=False, progress=False)
    with open(tmp_path / METRICS_FILE, "a") as f:
        f.write('{"step": 6, "rew')  # killed mid-write
    with RunLogger(tmp_path, resume_step=3, tensorboard=False, progress=False) as lg:
        lg.log(4, {"reward": 40.0})
    recs = read_metrics(tmp_path)
    assert [r["step"] for r in recs] == [1, 2, 3, 4] and recs[-1]["reward"] == 40.0


def _raw_steps(run_dir, name=METRICS_FILE):
    """Every step line in the file, duplicates included (read_metrics keeps the last of each)."""
    with open(os.path.join(run_dir, name)) as f:
        return [json.loads(line)["step"] for line in f if line.strip()]


def _killed_run_with_checkpoints_at_6_7_8(run_dir):
    """A run logged 1..8 (checkpoints 6, 7, 8); the caller then finds checkpoint 8 unreadable."""
    with RunLogger(run_dir, tensorboard=False, progress=False) as lg:
        for s in range(1, 9):
            lg.log(s, {"loss": float(s)})
            lg.log_samples(s, [{"text": f"sample {s}"}])


def test_truncate_to_the_step_actually_restored(tmp_path):
    # The logger is built with the latest checkpoint (8) as resume_step; the restore then falls
    # back to 6: truncate_to(6) must drop 7 and 8 so the resumed run does not write them twice.
    _killed_run_with_checkpoints_at_6_7_8(tmp_path)
    with RunLogger(tmp_path, resume_step=8, tensorboard=True, progress=True) as lg:
        lg.truncate_to(6)
        for s in (7, 8):
            lg.log(s, {"loss": 10.0 * s})
            lg.log_samples(s, [{"text": f"resumed {s}"}])
    assert _raw_steps(tmp_path) == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [r["loss"] for r in read_metrics(tmp_path)][-3:] == [6.0, 70.0, 80.0]
    assert _raw_steps(tmp_path, "samples.jsonl") == [1, 2, 3, 4, 5, 6, 7, 8]


def test_stale_lines_of_the_killed_run_are_never_written_twice(tmp_path):
    # Without truncate_to (a caller that does not know about the fallback), the first step
    # logged that the file already holds drops the killed run's lines from there on.
    _killed_run_with_checkpoints_at_6_7_8(tmp_path)
    with RunLogger(tmp_path, resume_step=8, tensorboard=False, progress=False) as lg:
        lg.log(7, {"loss": 70.0})
        lg.log(7, {"loss": 71.0})  # this run's own lines are kept, even for the same step
        lg.log(8, {"loss": 80.0})
    assert _raw_steps(tmp_path) == [1, 2, 3, 4, 5, 6, 7, 7, 8]
    assert [r["loss"] for r in read_metrics(tmp_path)][-3:] == [6.0, 71.0, 80.0]
    # A fresh logger (no resume_step) appends, as before.
    with RunLogger(tmp_path, tensorboard=False, progress=False) as lg:
        lg.log(1, {"loss": 0.5})
    assert _raw_steps(tmp_path)[-1] == 1 and len(_raw_steps(tmp_path)) == 10


def test_an_unwritable_run_directory_is_one_line(tmp_path, monkeypatch):
    from rlhf_jax.errors import UserError
    from rlhf_jax.logging import RunLogError

    (tmp_path / "file").write_text("x")
    with pytest.raises(RunLogError, match=r"cannot write the run directory .*file/run: Not a") as e:
        RunLogger(tmp_path / "file" / "run", tensorboard=False, progress=False)
    assert isinstance(e.value, UserError) and "\n" not in str(e.value)
    monkeypatch.setattr(os, "access", lambda path, mode: False)  # a read-only mount
    with pytest.raises(RunLogError, match=r"not writable \(a read-only disk"):
        RunLogger(tmp_path / "ro", tensorboard=False, progress=False)


def test_read_metrics_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        read_metrics(tmp_path)
    for stage in ("ppo", "sft"):  # a run directory holds one directory per stage
        _fake_ppo_run(tmp_path / "run" / stage, steps=1, tensorboard=False, progress=False)
    with pytest.raises(FileNotFoundError, match=r"holds the stages ppo, sft; give one of them"):
        read_metrics(tmp_path / "run")
    (tmp_path / METRICS_FILE).write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a metrics record"):
        read_metrics(tmp_path)


def test_wandb_asked_but_missing_is_a_clear_error(tmp_path):
    pytest.importorskip("tqdm")
    try:
        import wandb  # noqa: F401

        pytest.skip("wandb is installed")
    except ImportError:
        pass
    with pytest.raises(ImportError, match="pip install wandb"):
        RunLogger(tmp_path, wandb_project="p")


def test_report_overlays_runs_png_and_table(tmp_path):
    _fake_ppo_run(tmp_path / "a", tensorboard=False, progress=False)
    _fake_ppo_run(tmp_path / "b", scale=2.0, tensorboard=False, progress=False)
    png, table = report([tmp_path / "a", tmp_path / "b"], tmp_path / "out" / "r.png")
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["run", "steps", "gold_score", "reward"]
    assert lines[2].split()[:4] == ["a", "6", "3", "6"] and lines[3].split()[3] == "12"
    with pytest.raises(KeyError, match="no run logged"):
        report([tmp_path / "a"], tmp_path / "x.png", metrics=["nope"])
    with pytest.raises(FileNotFoundError, match="not a directory"):
        report([tmp_path / "missing"])


def test_panel_matching_on_the_ppo_trainer_names():
    keys = [
        "score/mean",
        "eval/kl",
        "kl/response",
        "kl/token",
        "policy/approx_kl",
        "eval/gold",
        "entropy/sampled",
        "response/length",
        "value_loss",
        "policy/clip_frac",
        "beta",
    ]
    panels = match_panels(keys)
    assert panels["KL to reference"] == ["kl/response", "kl/token", "eval/kl"]
    assert panels["reward"] == ["score/mean"] and panels["gold score"] == ["eval/gold"]
    assert panels["KL coefficient"] == ["beta"] and panels["clip fraction"] == ["policy/clip_frac"]
    assert "policy/approx_kl" not in sum(panels.values(), [])


def test_panel_matching():
    panels = match_panels(
        [
            "ppo/score",
            "objective/kl",
            "gold",
            "policy/entropy",
            "mean_response_length",
            "loss/value_loss",
            "policy/clip_frac",
            "kl_coef",
            "accuracy",
            "loss",
            "lr",
        ]
    )
    assert panels["reward"] == ["ppo/score"] and panels["KL to reference"] == ["objective/kl"]
    assert panels["value loss"] == ["loss/value_loss"] and panels["KL coefficient"] == ["kl_coef"]
    assert "lr" not in sum(panels.values(), [])
    assert summary_table({"r": [{"step": 1, "loss": math.inf}]}).splitlines()[2].split() == [
        "r",
        "1",
        "-",
    ]
