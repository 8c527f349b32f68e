"""The shared run loop: stop criteria, non-finite handling inside the step, resume, timings."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.optim import OptimConfig, make_optimizer
from rlhf_jax.train import LoopConfig, NonFiniteError, TrainState, apply_update, run_loop

LR = 0.1
OPTIM = OptimConfig(name="sgd", learning_rate=LR, max_grad_norm=None)


def _make_step():
    """SGD on loss = scale * sum((w - 1)^2); a batch is the scale (NaN poisons the step)."""
    optimizer = make_optimizer(OPTIM)

    def step(state, scale, key):
        del key

        def loss_fn(params):
            return scale * jnp.sum((params["w"] - 1.0) ** 2)

        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        state, metrics = apply_update(optimizer, state, grads, loss, OPTIM)
        return state, {"loss": loss, **metrics}

    return jax.jit(step, donate_argnums=0), optimizer


def _init(optimizer, w=(3.0, -1.0)):
    params = {"w": jnp.asarray(w, jnp.float32)}
    return TrainState(params=params, opt_state=optimizer.init(params), step=jnp.int32(0))


def _w_after(n, w=(3.0, -1.0)):
    """Closed form: each SGD step maps (w - 1) to (1 - 2 lr)(w - 1)."""
    return 1.0 + (np.asarray(w) - 1.0) * (1.0 - 2.0 * LR) ** n


def test_apply_update_is_sgd_and_drops_nonfinite_updates():
    step, opt = _make_step()
    state, m = step(_init(opt), jnp.float32(1.0), jax.random.PRNGKey(0))
    np.testing.assert_allclose(state.params["w"], _w_after(1), rtol=1e-6)
    # grad = 2 (w - 1) = (4, -4): its norm is sqrt(32); lr is reported
    np.testing.assert_allclose(m["grad_norm"], np.sqrt(32.0), rtol=1e-6)
    assert float(m["lr"]) == pytest.approx(LR) and float(m["skipped"]) == 0.0
    before = np.asarray(state.params["w"])
    count = int(state.opt_state.count)
    state, m = step(state, jnp.float32(np.nan), jax.random.PRNGKey(0))
    assert float(m["skipped"]) == 1.0 and not np.isfinite(float(m["loss"]))
    np.testing.assert_array_equal(state.params["w"], before)  # nothing corrupted
    assert int(state.opt_state.count) == count and int(state.step) == 2


def test_max_steps_history_and_timings():
    step, opt = _make_step()
    res = run_loop(
        step, _init(opt), lambda s: jnp.float32(1.0), loop=LoopConfig(max_steps=5, log_every=2)
    )
    assert res.step == 5 and res.stop_reason == "max_steps" and res.skipped == 0
    assert [r["step"] for r in res.history] == [2.0, 4.0, 5.0]  # every 2 and the last
    np.testing.assert_allclose(res.state.params["w"], _w_after(5), rtol=1e-5)
    assert res.timings["step"] > 0 and res.first_step_s is not None


def test_stops_when_eval_metric_crosses_threshold():
    step, opt = _make_step()
    # distance to the optimum shrinks by 0.8 per step: |w0 - 1| = 2 -> 2 * 0.8^s <= 0.5 at s = 7
    eval_fn = lambda st: {"dist": jnp.max(jnp.abs(st.params["w"] - 1.0))}
    loop = LoopConfig(
        max_steps=50, eval_every=1, stop_metric="dist", stop_direction="below", stop_value=0.5
    )
    res = run_loop(step, _init(opt), lambda s: jnp.float32(1.0), loop=loop, eval_fn=eval_fn)
    assert res.stop_reason == "threshold" and res.step == 7
    assert res.evals[-1]["dist"] <= 0.5 < res.evals[-2]["dist"]


def test_nonfinite_stop_names_step_and_metric():
    step, opt = _make_step()
    batches = [1.0, 1.0, float("nan"), 1.0]
    with pytest.raises(NonFiniteError, match=r"non-finite loss=nan at step 3") as info:
        run_loop(step, _init(opt), (jnp.float32(b) for b in batches), loop=LoopConfig(max_steps=4))
    assert info.value.step == 3 and info.value.metric == "loss"
    np.testing.assert_allclose(info.value.state.params["w"], _w_after(2), rtol=1e-5)


def test_nonfinite_skip_continues_with_uncorrupted_state():
    step, opt = _make_step()
    batches = [1.0, float("nan"), float("inf"), 1.0, 1.0]
    res = run_loop(
        step,
        _init(opt),
        lambda s: jnp.float32(batches[s]),
        loop=LoopConfig(max_steps=5, on_nonfinite="skip"),
    )
    assert res.skipped == 2 and res.stop_reason == "max_steps"
    np.testing.assert_allclose(res.state.params["w"], _w_after(3), rtol=1e-5)  # 3 real updates
    res = run_loop(
        step,
        _init(opt),
        lambda s: jnp.float32(np.nan),
        loop=LoopConfig(max_steps=50, on_nonfinite="skip", max_consecutive_skips=3),
    )
    assert res.stop_reason == "skips" and res.step == 3


class _FakeLogger:
    def __init__(self):
        self.records, self.messages = [], []

    def log(self, step, metrics, timings=None):
        self.records.append((step, dict(metrics), dict(timings or {})))

    def write(self, message):
        self.messages.append(message)


def test_resume_from_checkpointer_equals_uninterrupted(tmp_path):
    from rlhf_jax.checkpoint import Checkpointer

    step, opt = _make_step()
    seen = []

    def batches(s):
        seen.append(s)
        return jnp.float32(1.0 + 0.1 * s)

    full = run_loop(step, _init(opt), batches, loop=LoopConfig(max_steps=6))
    with Checkpointer(tmp_path / "ck", save_every=2, async_save=False) as ck:
        run_loop(step, _init(opt), batches, loop=LoopConfig(max_steps=4), checkpointer=ck)
        assert ck.all_steps() == [2, 4]
    seen.clear()
    logger = _FakeLogger()
    with Checkpointer(tmp_path / "ck", save_every=2, async_save=False) as ck:
        res = run_loop(
            step, _init(opt), batches, loop=LoopConfig(max_steps=6), checkpointer=ck, logger=logger
        )
    assert res.start_step == 4 and seen == [4, 5]
    np.testing.assert_allclose(res.state.params["w"], full.state.params["w"], rtol=1e-6)
    assert [r[0] for r in logger.records] == [5, 6]
    assert "step" in logger.records[0][2] and "resumed" in logger.messages[0]


def test_loop_config_validation():
    with pytest.raises(ValueError, match="on_nonfinite"):
        LoopConfig(on_nonfinite="ignore")
    with pytest.raises(ValueError, match="eval_every"):
        LoopConfig(stop_metric="acc")


# ------------------------------------------------------------------------------------------
# The run axis: N runs stacked, one step for all, each stopping on its own (a mask)
# ------------------------------------------------------------------------------------------


def _runs_setup(lrs):
    """N SGD runs of the quadratic, learning rate per run in the optimizer state, one vmapped
    step; a batch is the [N] scales (NaN poisons that run's step)."""
    from rlhf_jax.optim import set_learning_rate
    from rlhf_jax.sweep import stack, vmap_step

    optimizer = make_optimizer(OPTIM)

    def step(state, scale, key):
        del key
        loss, grads = jax.value_and_grad(lambda p: scale * jnp.sum((p["w"] - 1.0) ** 2))(
            state.params
        )
        state, metrics = apply_update(optimizer, state, grads, loss, OPTIM)
        return state, {"loss": loss, **metrics}

    states = []
    for lr in lrs:
        st = _init(optimizer)
        states.append(st.replace(opt_state=set_learning_rate(st.opt_state, lr)))
    return jax.jit(vmap_step(step), donate_argnums=0), stack(states)


def _w_lr(n, lr, w=(3.0, -1.0)):
    return 1.0 + (np.asarray(w) - 1.0) * (1.0 - 2.0 * lr) ** n


def _dist_eval(state):
    return {"dist": jnp.max(jnp.abs(state.params["w"] - 1.0))}


STOP = dict(eval_every=1, stop_metric="dist", stop_direction="below", stop_value=0.5)


def test_run_axis_stops_each_run_on_its_own_and_keeps_its_state():
    # |w0 - 1| = 2 shrinks by (1 - 2 lr) per step: lr 0.3 crosses 0.5 at step 2, lr 0.1 at 7
    step, state = _runs_setup([0.1, 0.3])
    loggers = [_FakeLogger(), _FakeLogger()]
    res = run_loop(
        step,
        state,
        lambda s: jnp.ones(2, jnp.float32),
        loop=LoopConfig(max_steps=5, **STOP),
        eval_fn=[_dist_eval, _dist_eval],
        logger=loggers,
        runs=2,
    )
    assert [r.stop_reason for r in res.runs] == ["max_steps", "threshold"]
    assert [r.step for r in res.runs] == [5, 2] and res.stop_reason == "max_steps"
    w = np.asarray(res.state.params["w"])
    np.testing.assert_allclose(w[0], _w_lr(5, 0.1), rtol=1e-5)
    np.testing.assert_allclose(w[1], _w_lr(2, 0.3), rtol=1e-5)  # kept while run 0 went on
    assert int(res.state.step[1]) == 2 and int(res.state.step[0]) == 5
    assert [r[0] for r in loggers[1].records] == [1, 2]  # a stopped run logs nothing more
    assert [r[0] for r in loggers[0].records] == [1, 2, 3, 4, 5]
    assert "run 1: eval dist=" in loggers[1].messages[0]
    assert [e["step"] for e in res.runs[1].evals] == [1.0, 2.0]


def test_run_axis_nonfinite_stops_that_run_only():
    step, state = _runs_setup([0.1, 0.1])
    scales = lambda s: jnp.asarray([np.nan if s == 2 else 1.0, 1.0], jnp.float32)  # noqa: E731
    res = run_loop(step, state, scales, loop=LoopConfig(max_steps=4), runs=2)
    assert [r.stop_reason for r in res.runs] == ["nonfinite", "max_steps"]
    w = np.asarray(res.state.params["w"])
    np.testing.assert_allclose(w[0], _w_lr(2, 0.1), rtol=1e-5)  # the NaN update was dropped
    np.testing.assert_allclose(w[1], _w_lr(4, 0.1), rtol=1e-5)


def test_run_axis_resume_keeps_the_mask(tmp_path):
    from rlhf_jax.checkpoint import Checkpointer

    ones = lambda s: jnp.ones(2, jnp.float32)  # noqa: E731
    step, state = _runs_setup([0.1, 0.3])
    full = run_loop(
        step, state, ones, loop=LoopConfig(max_steps=8, **STOP), eval_fn=[_dist_eval] * 2, runs=2
    )
    with Checkpointer(tmp_path / "ck", save_every=2, async_save=False) as ck:
        step, state = _runs_setup([0.1, 0.3])
        loop = LoopConfig(max_steps=4, **STOP)
        run_loop(step, state, ones, loop=loop, eval_fn=[_dist_eval] * 2, checkpointer=ck, runs=2)
        assert ck.read_meta()["runs"] == {
            "active": [True, False],
            "stop_reason": [None, "threshold"],
            "steps": [4, 2],
        }
    with Checkpointer(tmp_path / "ck", save_every=2, async_save=False) as ck:
        step, state = _runs_setup([0.1, 0.3])
        loop = LoopConfig(max_steps=8, **STOP)
        res = run_loop(
            step, state, ones, loop=loop, eval_fn=[_dist_eval] * 2, checkpointer=ck, runs=2
        )
    assert res.start_step == 4
    assert [(r.step, r.stop_reason) for r in res.runs] == [(7, "threshold"), (2, "threshold")]
    assert [(r.step, r.stop_reason) for r in full.runs] == [(7, "threshold"), (2, "threshold")]
    np.testing.assert_allclose(res.state.params["w"], full.state.params["w"], rtol=1e-6)
