"""Resuming after the newest checkpoint turned out unreadable: the run loop falls back to an older
checkpoint, and metrics.jsonl must still hold each step once, with an uninterrupted run's values
(issue: with checkpoints 60, 70, 80 and 80 damaged, steps 71-80 were written twice)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax.checkpoint import Checkpointer
from rlhf_jax.logging import METRICS_FILE, RunLogger, read_metrics
from rlhf_jax.train import LoopConfig, TrainState, run_loop

OPT = optax.adam(1e-2)


@jax.jit
def _step(state, batch, key):
    def loss_fn(w):
        noise = 0.1 * jax.random.normal(key, batch.shape[:1])
        return jnp.mean((batch @ w - 1.0 + noise) ** 2)

    loss, g = jax.value_and_grad(loss_fn)(state.params)
    updates, opt_state = OPT.update(g, state.opt_state, state.params)
    new = TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1)
    return new, {"loss": loss}


def _batches(s):
    return jax.random.normal(jax.random.fold_in(jax.random.key(3), s), (8, 4))


def _run(run_dir, max_steps=8):
    """What a stage does today: the logger resumes from latest_step(), read before the restore."""
    w = jnp.ones((4,)) * 0.1
    ck = Checkpointer(run_dir / "c", save_every=2, keep=3)
    lg = RunLogger(run_dir, resume_step=ck.latest_step() or 0, tensorboard=False, progress=False)
    try:
        return run_loop(
            _step,
            TrainState(w, OPT.init(w), jnp.int32(0)),
            _batches,
            loop=LoopConfig(max_steps=max_steps),
            key=jax.random.key(0),
            logger=lg,
            checkpointer=ck,
        )
    finally:
        lg.close()
        ck.close()


def _damage(step_dir):
    files = [
        p for p in step_dir.joinpath("state").rglob("*") if p.is_file() and p.parent.name == "d"
    ]
    assert files
    for path in files:
        path.write_bytes(os.urandom(path.stat().st_size))


def test_fallback_to_an_older_checkpoint_writes_each_step_once(tmp_path):
    ref = _run(tmp_path / "ref")
    _run(tmp_path / "run")
    assert sorted(os.listdir(tmp_path / "run" / "c")) == ["4", "6", "8"]
    _damage(tmp_path / "run" / "c" / "8")  # damaged after its commit, and no final result
    resumed = _run(tmp_path / "run")
    assert resumed.start_step == 6 and resumed.step == 8  # the fallback, then steps 7 and 8
    with open(tmp_path / "run" / METRICS_FILE) as f:
        steps = [json.loads(line)["step"] for line in f if line.strip()]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]
    strip = lambda recs: [(r["step"], r["loss"]) for r in recs]  # noqa: E731
    assert strip(read_metrics(tmp_path / "run")) == strip(read_metrics(tmp_path / "ref"))
    np.testing.assert_array_equal(resumed.state.params, ref.state.params)
