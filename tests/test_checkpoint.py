"""Checkpoints: atomic saves, keep-K, restore onto another mesh, and exact resume after kill -9.

The resume tests run a small deterministic jitted training step (Adam on a 2-layer MLP, a PRNG key
in the state used for dropout, a data cursor in the meta record) in a subprocess, kill it, resume
it, and compare every logged metric with an uninterrupted run, bit for bit.
"""

import json
import os
import signal
import subprocess
import sys
import textwrap

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from rlhf_jax.checkpoint import Checkpointer, CheckpointError, abstract_like, to_jsonable
from rlhf_jax.logging import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The child: a run that resumes from its checkpoint directory if there is one.
CHILD = textwrap.dedent(
    """
    import os, sys, signal, time
    import flax.struct, jax, jax.numpy as jnp, optax
    jax.config.update("jax_disable_most_optimizations", True)
    from rlhf_jax.checkpoint import Checkpointer, abstract_like
    from rlhf_jax.logging import RunLogger

    run_dir, total, save_every, sleep = sys.argv[1:5]
    total, save_every, sleep = int(total), int(save_every), float(sleep)

    class State(flax.struct.PyTreeNode):
        params: dict
        opt_state: optax.OptState
        step: jax.Array
        key: jax.Array
        kl_coef: jax.Array

    opt = optax.adam(1e-2)
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"w1": jax.random.normal(k1, (4, 16)) * 0.5, "w2": jax.random.normal(k2, (16, 1)) * 0.5}
    state = State(params, opt.init(params), jnp.int32(0), jax.random.key(1), jnp.float32(0.1))

    def batch_at(cursor):
        x = jax.random.normal(jax.random.fold_in(jax.random.key(7), cursor), (32, 4))
        return x, jnp.sin(x.sum(-1, keepdims=True))

    @jax.jit
    def train_step(state, x, y):
        key, drop = jax.random.split(state.key)
        def loss_fn(p):
            h = jnp.tanh(x @ p["w1"]) * jax.random.bernoulli(drop, 0.9, (x.shape[0], 16)) / 0.9
            return jnp.mean((h @ p["w2"] - y) ** 2)
        loss, grads = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = opt.update(grads, state.opt_state, state.params)
        kl_coef = state.kl_coef * (1.0 + 0.01 * jnp.tanh(loss))  # a controller state that drifts
        new = State(optax.apply_updates(state.params, updates), opt_state, state.step + 1, key, kl_coef)
        return new, {"loss": loss, "kl_coef": kl_coef}

    ckpt = Checkpointer(os.path.join(run_dir, "checkpoints"), save_every=save_every, keep=2)
    restored = ckpt.restore_latest(abstract_like(state))
    cursor = 0
    if restored is not None:
        start, state, meta = restored
        assert int(state.step) == start == meta["cursor"], (start, meta)
        cursor = meta["cursor"]
        print("resumed", start, flush=True)
    logger = RunLogger(run_dir, resume_step=cursor, tensorboard=False, progress=False)
    while cursor < total:
        state, metrics = train_step(state, *batch_at(cursor))
        cursor += 1
        logger.log(cursor, metrics)
        print("step", cursor, flush=True)
        ckpt.save(cursor, state, {"cursor": cursor})
        if ckpt.preempted:
            ckpt.save(cursor, state, {"cursor": cursor}, force=True)
            ckpt.wait()
            print("preempted", cursor, flush=True)
            sys.exit(0)
        time.sleep(sleep)
    ckpt.save(cursor, state, {"cursor": cursor}, force=True)
    ckpt.close()
    logger.close()
    print("done", flush=True)
    """
)

TOTAL = 10


def _env():
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = os.environ["RLHF_JAX_TEST_XLA_FLAGS"]  # one device in every child
    return env


def _child(tmp_path, run_dir, *, sleep=0.0):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    args = [sys.executable, str(script), str(run_dir), str(TOTAL), "3"]
    return subprocess.Popen(
        [*args, str(sleep)], env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _losses(run_dir):
    return [(r["step"], r["loss"], r["kl_coef"]) for r in read_metrics(run_dir)]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ref")
    proc = _child(tmp, tmp / "run")
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    ref = _losses(tmp / "run")
    assert [s for s, _, _ in ref] == list(range(1, TOTAL + 1))
    return ref


def _resume_and_check(tmp_path, run_dir, reference, expect_resume_from):
    proc = _child(tmp_path, run_dir)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"resumed {expect_resume_from}" in out
    assert not [p for p in os.listdir(run_dir / "checkpoints") if "tmp" in p]
    # Every step, including the ones the killed run logged after its last checkpoint, equals the
    # uninterrupted run exactly (float equality, not a tolerance).
    assert _losses(run_dir) == reference


def test_kill_minus_9_from_outside_mid_run_then_resume(tmp_path, reference):
    run_dir = tmp_path / "run"
    proc = _child(tmp_path, run_dir, sleep=0.2)
    for line in proc.stdout:
        if line.strip() == "step 5":
            proc.kill()
            break
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    _resume_and_check(tmp_path, run_dir, reference, expect_resume_from=3)


def test_sigterm_in_the_run_loop_saves_exits_and_resumes_exactly(tmp_path):
    """SIGTERM mid-run: the real run loop finishes the step, saves, returns; a rerun continues."""
    import optax

    from rlhf_jax.logging import RunLogger
    from rlhf_jax.train import LoopConfig, TrainState, run_loop

    opt = optax.adam(1e-2)

    @jax.jit
    def step(state, batch, key):
        def loss_fn(w):
            noise = 0.1 * jax.random.normal(key, batch.shape[:1])
            return jnp.mean((batch @ w - 1.0 + noise) ** 2)

        loss, g = jax.value_and_grad(loss_fn)(state.params)
        updates, opt_state = opt.update(g, state.opt_state, state.params)
        new = TrainState(optax.apply_updates(state.params, updates), opt_state, state.step + 1)
        return new, {"loss": loss}

    def batches(s):
        if s == 4 and sigterm_at_4:
            os.kill(os.getpid(), signal.SIGTERM)  # arrives while step 5 is being fetched
        return jax.random.normal(jax.random.fold_in(jax.random.key(3), s), (8, 4))

    def run(run_dir):
        w = jnp.ones((4,)) * 0.1
        ck = Checkpointer(run_dir / "c", save_every=3)
        lg = RunLogger(
            run_dir, resume_step=ck.latest_step() or 0, tensorboard=False, progress=False
        )
        try:
            return run_loop(
                step,
                TrainState(w, opt.init(w), jnp.int32(0)),
                batches,
                loop=LoopConfig(max_steps=8),
                key=jax.random.key(0),
                logger=lg,
                checkpointer=ck,
            )
        finally:
            lg.close()
            ck.close()

    sigterm_at_4 = False
    ref = run(tmp_path / "ref")
    sigterm_at_4 = True
    stopped = run(tmp_path / "run")
    assert stopped.stop_reason == "preempted" and stopped.step == 5
    sigterm_at_4 = False
    resumed = run(tmp_path / "run")
    assert resumed.start_step == 5 and resumed.stop_reason == "max_steps"
    strip = lambda recs: [(r["step"], r["loss"]) for r in recs]  # noqa: E731
    assert strip(read_metrics(tmp_path / "run")) == strip(read_metrics(tmp_path / "ref"))
    np.testing.assert_array_equal(resumed.state.params, ref.state.params)


# -- in-process ----------------------------------------------------------------------------


class _State(flax.struct.PyTreeNode):
    params: dict
    step: jax.Array
    key: jax.Array


def _state(scale=1.0, sharding=None):
    w = jnp.arange(32.0).reshape(8, 4) * scale
    if sharding is not None:
        w = jax.device_put(w, sharding)
    return _State({"w": w, "b": jnp.ones(4)}, jnp.int32(0), jax.random.key(3))


def test_save_every_keep_and_skip(tmp_path):
    with Checkpointer(tmp_path / "c", save_every=2, keep=2, async_save=False) as ck:
        saved = [s for s in range(1, 8) if ck.save(s, _state(s), {"cursor": s})]
        assert saved == [2, 4, 6]
        assert ck.save(7, _state(7), {"cursor": 7}, force=True)
        assert not ck.save(7, _state(7), {"cursor": 7}, force=True)  # already saved
        assert ck.all_steps() == [6, 7]  # keep=2
        step, state, meta = ck.restore_latest(abstract_like(_state()))
        assert step == 7 and meta == {"cursor": 7}
        np.testing.assert_array_equal(state.params["w"], _state(7).params["w"])
        assert jax.random.key_data(state.key).tolist() == jax.random.key_data(_state().key).tolist()
        with pytest.raises(CheckpointError, match="newer checkpoint"):
            ck.save(5, _state(), {}, force=True)


def test_empty_directory_restores_none(tmp_path):
    with Checkpointer(tmp_path / "c", save_every=1) as ck:
        assert ck.restore_latest(abstract_like(_state())) is None
        assert ck.read_meta() is None


def test_restore_onto_a_different_mesh(tmp_path):
    devices = np.array(jax.devices())
    assert len(devices) == 8
    mesh8 = jax.sharding.Mesh(devices.reshape(8), ("data",))
    with Checkpointer(tmp_path / "c", save_every=1) as ck:
        ck.save(1, _state(sharding=NamedSharding(mesh8, P("data"))), {"cursor": 1})
    mesh2 = jax.sharding.Mesh(devices[:4].reshape(2, 2), ("data", "tensor"))
    target_sh = NamedSharding(mesh2, P("data", "tensor"))
    abstract = abstract_like(_state())
    abstract = abstract.replace(
        params={
            **abstract.params,
            "w": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=target_sh),
        }
    )
    with Checkpointer(tmp_path / "c", save_every=1) as ck:
        step, state, _ = ck.restore_latest(abstract)
    assert state.params["w"].sharding == target_sh
    np.testing.assert_array_equal(state.params["w"], _state().params["w"])


def test_half_written_checkpoint_is_ignored_and_cleaned(tmp_path):
    import shutil

    with Checkpointer(tmp_path / "c", save_every=1, async_save=False) as ck:
        ck.save(1, _state(), {"cursor": 1})
        ck.save(2, _state(2.0), {"cursor": 2})
    # What kill -9 during the save of step 3 leaves: a partial copy under Orbax's temporary name.
    tmp_dir = tmp_path / "c" / "3.orbax-checkpoint-tmp-1700000000000000"
    shutil.copytree(tmp_path / "c" / "2", tmp_dir)
    shutil.rmtree(tmp_dir / "state")
    with Checkpointer(tmp_path / "c", save_every=1) as ck:
        step, state, meta = ck.restore_latest(abstract_like(_state()))
    assert step == 2 and meta["cursor"] == 2
    assert not tmp_dir.exists()


def test_mismatched_state_gives_a_clear_error(tmp_path):
    with Checkpointer(tmp_path / "c", save_every=1) as ck:
        ck.save(1, _state(), {})
    wrong = _State(
        {"w": jnp.zeros((8, 4)), "b": jnp.ones(4), "extra": jnp.ones(2)},
        jnp.int32(0),
        jax.random.key(0),
    )
    with Checkpointer(tmp_path / "c", save_every=1) as ck:
        with pytest.raises(CheckpointError) as info:
            ck.restore_latest(abstract_like(wrong))
    message = str(info.value)
    assert "params/extra is in this run but not in the checkpoint" in message
    assert "\n" not in message and "config the run was started with" in message
    assert sorted(os.listdir(tmp_path / "c")) == ["1"]  # nothing set aside as unreadable


def test_a_different_model_width_names_the_parameter_and_both_shapes(tmp_path, capfd):
    with Checkpointer(tmp_path / "c", save_every=1, async_save=False) as ck:
        ck.save(1, _state(), {})
        ck.save(2, _state(), {})
    wider = _State({"w": jnp.zeros((8, 6)), "b": jnp.ones(4)}, jnp.int32(0), jax.random.key(0))
    with Checkpointer(tmp_path / "c", save_every=1) as ck:
        with pytest.raises(CheckpointError) as info:
            ck.restore_latest(abstract_like(wider))
    message = str(info.value)
    assert "params/w has shape (8, 4) there but (8, 6) in this run" in message
    assert "different config" in message and "step 2" in message
    # one line, short apart from the directory it names (twice; the test's path length varies)
    assert "\n" not in message
    assert len(message.replace(str(tmp_path / "c"), "DIR")) < 300
    assert info.value.__cause__ is None  # no chained 100-line Orbax trace behind it
    assert sorted(os.listdir(tmp_path / "c")) == ["1", "2"]
    assert "Event loop is closed" not in capfd.readouterr().err


def test_a_different_model_width_with_the_real_trainer_state(tmp_path):
    """The same, on an SFT TrainState (nnx parameters inside, Adam moments): the paths of the
    saved metadata and of the run state must be matched, or the check never fires."""
    from rlhf_jax import models
    from rlhf_jax.algorithms import sft as sft_lib

    def state(width):
        cfg = models.ModelConfig(
            arch="gpt2", vocab_size=32, hidden_size=width, num_layers=1, num_heads=2,
            num_kv_heads=2, head_dim=width // 2, intermediate_size=32, max_position_embeddings=16,
        )  # fmt: skip
        return sft_lib.init_state(
            models.init_model(cfg, jax.random.key(0)).params, sft_lib.SFTConfig()
        )

    with Checkpointer(tmp_path / "c", save_every=1, async_save=False) as ck:
        ck.save(1, state(16), {})
    with Checkpointer(tmp_path / "c", save_every=1) as ck:
        with pytest.raises(CheckpointError, match=r"params/embed/embedding has shape \(32, 16\) "):
            ck.restore_latest(abstract_like(state(32)))
        assert ck.restore_latest(abstract_like(state(16)))[0] == 1


def _damage(step_dir):
    """Overwrite every array data file of a committed step (disk trouble after the commit)."""
    files = [
        p for p in step_dir.joinpath("state").rglob("*") if p.is_file() and p.parent.name == "d"
    ]
    assert files
    for path in files:
        path.write_bytes(os.urandom(path.stat().st_size))


def test_every_checkpoint_unreadable_is_one_line_naming_the_directory(tmp_path, caplog):
    with Checkpointer(tmp_path / "c", save_every=1, async_save=False) as ck:
        for step in (1, 2, 3):
            ck.save(step, _state(step), {"cursor": step})
    for step in (1, 2, 3):
        _damage(tmp_path / "c" / str(step))
    with Checkpointer(tmp_path / "c", save_every=1) as ck:
        with pytest.raises(CheckpointError) as info:
            ck.restore_latest(abstract_like(_state()))
    message = str(info.value)
    assert f"every checkpoint in {tmp_path / 'c'} is unreadable" in message
    assert "tried steps 3, 2, 1" in message and "DATA_LOSS" in message
    assert "Delete" in message and "run.dir" in message
    assert "model size" not in message  # not the wrong guess
    assert '"driver"' not in message and "\n" not in message and len(message) < 400
    assert info.value.__cause__ is None
    assert sorted(os.listdir(tmp_path / "c")) == ["1", "2", "3"]  # nothing renamed
    assert not [r for r in caplog.records if r.levelname == "WARNING"]  # the error says it all


def test_the_closed_event_loop_noise_of_a_failed_read_is_dropped(monkeypatch):
    """TensorStore callbacks that outlive a failed Orbax read report RuntimeError('Event loop is
    closed') through sys.unraisablehook: dropped; every other unraisable error still shows."""
    import gc

    from rlhf_jax import checkpoint

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", lambda u: seen.append(str(u.exc_value)))
    monkeypatch.setattr(checkpoint, "_NOISE_FILTERED", False)
    checkpoint._quiet_closed_loop_noise()

    class RaisesInDel:
        def __init__(self, message):
            self.message = message

        def __del__(self):
            raise RuntimeError(self.message)

    noise, other = RaisesInDel("Event loop is closed"), RaisesInDel("something else")
    del noise, other
    gc.collect()
    assert seen == ["something else"]


def test_meta_must_be_json(tmp_path):
    assert to_jsonable({"a": (1, np.float32(2.5)), "b": jnp.int32(3)}) == {"a": [1, 2.5], "b": 3}
    with Checkpointer(tmp_path / "c", save_every=1) as ck:
        with pytest.raises(CheckpointError, match=r"meta\.cursor\.x"):
            ck.save(1, _state(), {"cursor": {"x": np.zeros(3)}})
        assert ck.all_steps() == []  # nothing half-written


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="save_every"):
        Checkpointer(tmp_path / "c", save_every=-1)
    with pytest.raises(ValueError, match="keep"):
        Checkpointer(tmp_path / "c", save_every=1, keep=0)
    (tmp_path / "file").write_text("x")
    with pytest.raises(CheckpointError, match="not a directory"):
        Checkpointer(tmp_path / "file", save_every=1)
    with pytest.raises(CheckpointError, match=r"cannot create the checkpoint directory .*Not a"):
        Checkpointer(tmp_path / "file" / "run" / "checkpoints", save_every=1)


def test_a_read_only_disk_is_one_line(tmp_path, monkeypatch):
    import errno

    def read_only(path, exist_ok=False):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), path)

    monkeypatch.setattr(os, "makedirs", read_only)
    with pytest.raises(CheckpointError) as info:
        Checkpointer(tmp_path / "c", save_every=1)
    assert str(info.value) == (
        f"cannot create the checkpoint directory {tmp_path / 'c'}: Read-only file system; choose "
        "a run.dir on a writable disk, whose path does not pass through a regular file"
    )


def test_sigterm_before_the_checkpointer_exists_is_not_lost(tmp_path):
    from rlhf_jax import checkpoint

    before = signal.getsignal(signal.SIGTERM)
    try:
        assert checkpoint.install_sigterm_handler() and checkpoint.install_sigterm_handler()
        checkpoint.check_preempted("loading the model")  # nothing arrived yet: no-op
        os.kill(os.getpid(), signal.SIGTERM)  # during start-up: only a flag is set
        assert checkpoint.preempted()
        with pytest.raises(checkpoint.Preempted) as info:
            checkpoint.check_preempted("loading the model")
        assert info.value.exit_code == 3
        assert str(info.value).startswith("preempted before the first checkpoint")
        assert "nothing to resume" in str(info.value)
        with pytest.raises(checkpoint.Preempted, match="checkpoint of step 40 is unchanged"):
            checkpoint.check_preempted("compiling", resume_step=40)
        ck = Checkpointer(tmp_path / "c", save_every=1)  # shares the flag: already preempted
        assert ck.preempted
        ck.close()
        assert signal.getsignal(signal.SIGTERM) is checkpoint._on_sigterm  # still installed
    finally:
        checkpoint.uninstall_sigterm_handler()
    assert signal.getsignal(signal.SIGTERM) == before and not checkpoint.preempted()


def test_sigterm_during_start_up_exits_3_with_one_line(tmp_path):
    """The real signal, in a child that installs the handler first thing: status 3, not 143."""
    script = tmp_path / "startup.py"
    script.write_text(
        textwrap.dedent(
            """
            import sys, time
            from rlhf_jax import checkpoint
            checkpoint.install_sigterm_handler()
            print("loading", flush=True)
            for _ in range(1200):  # start-up work, until the signal arrives
                if checkpoint.preempted():
                    break
                time.sleep(0.05)
            try:
                checkpoint.check_preempted("loading the model")
            except checkpoint.Preempted as err:
                print(f"rlhf-jax: {err}", file=sys.stderr)
                sys.exit(err.exit_code)
            """
        )
    )
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    assert proc.stdout.readline().strip() == "loading"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 3, err
    assert err.strip().splitlines() == [
        "rlhf-jax: preempted before the first checkpoint (SIGTERM during loading the model): "
        "nothing to resume; run the same command again to start over"
    ]


def test_sigterm_sets_preempted_and_close_restores_handler(tmp_path):
    before = signal.getsignal(signal.SIGTERM)
    ck = Checkpointer(tmp_path / "c", save_every=1)
    assert not ck.preempted
    os.kill(os.getpid(), signal.SIGTERM)
    assert ck.preempted
    ck.close()
    assert signal.getsignal(signal.SIGTERM) == before
    json.dumps(repr(ck))


def test_damaged_newest_checkpoint_falls_back_to_the_older_one(tmp_path, caplog):
    import shutil

    with Checkpointer(tmp_path / "c", save_every=1, async_save=False) as ck:
        ck.save(1, _state(), {"cursor": 1})
        ck.save(2, _state(2.0), {"cursor": 2})
    shutil.rmtree(tmp_path / "c" / "2" / "state")  # files lost after the commit (disk trouble)
    with Checkpointer(tmp_path / "c", save_every=1) as ck:
        step, state, meta = ck.restore_latest(abstract_like(_state()))
        assert step == 1 and meta == {"cursor": 1} and ck.restored_step == 1
        np.testing.assert_array_equal(state.params["w"], _state().params["w"])
        warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
        assert len(warnings) == 1, warnings  # one line says what happened
        assert warnings[0].startswith(f"checkpoint step 2 in {tmp_path / 'c'} cannot be read (")
        assert warnings[0].endswith(
            "resumed from the older step 1; the unreadable one is kept as 2.unreadable"
        )
        # The damaged step is kept aside (not deleted), and the resumed run can save it anew.
        assert (tmp_path / "c" / "2.unreadable").is_dir() and ck.all_steps() == [1]
        assert ck.save(2, _state(3.0), {"cursor": 2}, force=True)
        ck.wait()
        assert ck.all_steps() == [1, 2]


# -- the same with the real SFT trainer and run loop ---------------------------------------

SFT_CHILD = textwrap.dedent(
    """
    import os, sys, signal
    import jax
    jax.config.update("jax_disable_most_optimizations", True)
    import numpy as np
    from rlhf_jax import models
    from rlhf_jax.algorithms import sft as sft_lib
    from rlhf_jax.checkpoint import Checkpointer
    from rlhf_jax.logging import RunLogger
    from rlhf_jax.optim import OptimConfig
    from rlhf_jax.train import LoopConfig, run_loop

    class DyingCheckpointer(Checkpointer):
        # kill -9 this process right after the save of step `die_in_save_at` has started
        die_in_save_at = -1

        def save(self, step, state, meta, *, force=False):
            started = super().save(step, state, meta, force=force)
            if started and step == self.die_in_save_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return started

    def train(run_dir, die_in_save_at):
        # A tiny GPT-2-style LM on random prompt/completion tokens (no tokenizer to import).
        mcfg = models.ModelConfig(arch="gpt2", vocab_size=32, hidden_size=16, num_layers=1,
                                  num_heads=2, num_kv_heads=2, head_dim=8, intermediate_size=32,
                                  max_position_embeddings=16)
        model = models.init_model(mcfg, jax.random.PRNGKey(0))
        rng = np.random.default_rng(0)
        arrays = {
            "prompt_tokens": rng.integers(1, 32, (64, 4)).astype(np.int32),
            "prompt_mask": np.ones((64, 4), np.int32),
            "completion_tokens": rng.integers(1, 32, (64, 6)).astype(np.int32),
            "completion_mask": (np.arange(6) < rng.integers(2, 7, (64, 1))).astype(np.int32),
        }
        cfg = sft_lib.SFTConfig(
            optim=OptimConfig(learning_rate=1e-2, schedule="cosine", warmup_steps=2, decay_steps=6),
            loop=LoopConfig(max_steps=8),
            batch_size=8,
        )
        batches = quickstart_batches(arrays, 8)
        ckpt = DyingCheckpointer(os.path.join(run_dir, "checkpoints"), save_every=3, keep=2)
        ckpt.die_in_save_at = die_in_save_at
        logger = RunLogger(run_dir, resume_step=ckpt.latest_step() or 0, tensorboard=False,
                           progress=False)
        # The trainer's own compiled step under the shared run loop (what the SFT stage runs).
        result = run_loop(sft_lib.make_step(model.graphdef, cfg), sft_lib.init_state(model.params, cfg),
                          batches, loop=cfg.loop, key=jax.random.PRNGKey(1), logger=logger,
                          checkpointer=ckpt, meta={"stage": "sft"})
        logger.close()
        ckpt.close()
        print(run_dir, "start", result.start_step, "stop", result.stop_reason, flush=True)

    def quickstart_batches(arrays, batch_size):
        # batch s = chunk s of a per-epoch permutation: a function of s only (exact resume)
        n = len(arrays["prompt_tokens"])
        def get(s):
            epoch, i = divmod(s, n // batch_size)
            idx = np.random.default_rng([0, epoch]).permutation(n)[i * batch_size:(i + 1) * batch_size]
            return {k: v[idx] for k, v in arrays.items()}
        return get

    # argv: RUN_DIR DIE_AT [RUN_DIR DIE_AT ...], run one after the other in this process
    for i in range(1, len(sys.argv), 2):
        train(sys.argv[i], int(sys.argv[i + 1]))
    """
)


def _sft_child(tmp_path, *runs):
    script = tmp_path / "sft_child.py"
    script.write_text(SFT_CHILD)
    args = [str(a) for run in runs for a in run]
    return subprocess.run(
        [sys.executable, str(script), *args],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _sft_metrics(run_dir):
    return [
        {k: v for k, v in r.items() if not k.startswith("time/") and k != "wall_time"}
        for r in read_metrics(run_dir)
    ]


@pytest.mark.slow
def test_real_sft_loop_killed_mid_save_resumes_exactly(tmp_path):
    # One process: the uninterrupted reference run, then a run killed in the save of step 6.
    killed = _sft_child(tmp_path, (tmp_path / "ref", -1), (tmp_path / "run", 6))
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert "ref start 0 stop max_steps" in killed.stdout
    entries = os.listdir(tmp_path / "run" / "checkpoints")
    # Step 6 never committed: its temporary directory is all that is left of it.
    assert "6" not in entries and any(e.startswith("6.orbax-checkpoint-tmp") for e in entries)
    resumed = _sft_child(tmp_path, (tmp_path / "run", -1))
    assert resumed.returncode == 0, resumed.stderr
    assert "start 3 stop max_steps" in resumed.stdout
    reference = _sft_metrics(tmp_path / "ref")
    assert [r["step"] for r in reference] == list(range(1, 9))
    assert _sft_metrics(tmp_path / "run") == reference  # loss, lr, grad norm: bit for bit
