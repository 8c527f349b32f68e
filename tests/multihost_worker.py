"""One process of the multi-process test job of ``tests/test_multihost.py`` (and its shared problem).

Run as ``python tests/multihost_worker.py --process-id I --num-processes N --port PORT --out F``:
it joins a ``jax.distributed`` job over loopback (CPU collectives: gloo) holding ``--local-devices``
fake CPU devices, trains the problem of :func:`train` for a few steps on a hybrid mesh whose
``data`` axis spans the processes, and process 0 writes the losses and final parameters to ``F``
(``.npz``). The test compares them with one process holding all the devices.

The training is the trainers' own path, as ``pipeline.run_stage`` takes it: the
state placed by the preset's rules (``parallel.state_shardings``), the step of
``rlhf_jax.algorithms.sft.make_step`` compiled for the mesh (``parallel.jit_step``, gradients by
``parallel.accumulate`` in the ``jit`` or ``shard_map`` form), and each process feeding only its
own rows of the global batch (``parallel.process_rows``) through ``parallel.shard_batches``.

Importable too (``import multihost_worker``): the tests call :func:`train` in-process.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

STEPS = 3  # optimizer steps of the comparison
GLOBAL_BATCH = 16  # rows of the global batch (divisible by data x fsdp = 8)
SEQ_LEN = 8  # tokens per row


@functools.cache
def model():
    """A tiny Llama-shaped LM (2 layers, GQA), the same in every process (fixed seed)."""
    import jax

    from rlhf_jax import models

    cfg = models.ModelConfig(
        arch="llama",
        vocab_size=32,
        hidden_size=16,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=4,
        intermediate_size=32,
        max_position_embeddings=SEQ_LEN,
    )
    return models.init_model(cfg, jax.random.key(0))


@functools.cache
def problem():
    """``(params, batch)``: :func:`model`'s parameters and a global batch of token rows
    (``tokens``, ``mask`` [GLOBAL_BATCH, SEQ_LEN], right-padded), trained on by the SFT token
    loss of every real token after the first (:func:`rlhf_jax.algorithms.sft.corpus_batch`).

    All host (numpy) values, identical in every process (fixed seeds); cached, so the compiled
    steps are shared between tests (never modify the returned arrays).
    """
    import jax
    import numpy as np

    lm = model()
    params = jax.tree.map(np.asarray, lm.params)
    rng = np.random.default_rng(1)
    tokens = rng.integers(0, lm.config.vocab_size, (GLOBAL_BATCH, SEQ_LEN)).astype(np.int32)
    lengths = rng.integers(2, SEQ_LEN + 1, (GLOBAL_BATCH,))
    mask = (np.arange(SEQ_LEN)[None] < lengths[:, None]).astype(np.int32)
    return params, {"tokens": tokens, "mask": mask}


def sft_config():
    """The trainer's config: AdamW with ``eps=1e-3`` and a large learning rate.

    Adam divides each gradient entry by its own magnitude, so an entry whose gradient is far
    below ``eps`` moves by ``lr / eps`` times its gradient. A rounding difference ``d`` in that
    gradient (the cross-device summation order changes the last bits) becomes ``d * lr / eps``
    in the parameter: 1e3 x with ``lr=1e-2, eps=1e-5``, more than the 1e-5 tolerance on entries
    near zero. ``eps=1e-3`` bounds the amplification to 10x, so the comparison tests the
    parallelism, not Adam's conditioning; entries with larger gradients still get Adam's
    normalised update.
    """
    from rlhf_jax.algorithms import sft
    from rlhf_jax.optim import OptimConfig

    return sft.SFTConfig(optim=OptimConfig(learning_rate=1e-2, eps=1e-3), batch_size=GLOBAL_BATCH)


@functools.cache
def compiled_step(mesh, preset: str, mode: str):
    """``(step, state_shardings)``: the SFT trainer's step compiled for ``mesh`` with the state on
    ``preset``'s rule shardings (cached: compiled once per placement and test run)."""
    import jax

    from rlhf_jax import parallel
    from rlhf_jax.algorithms import sft

    params, _ = problem()
    cfg = sft_config()
    abstract = jax.eval_shape(lambda p: sft.init_state(p, cfg), params)
    shardings = parallel.state_shardings(abstract, mesh, preset)
    step = sft.make_step(model().graphdef, cfg, mesh=mesh, state_shardings=shardings, mode=mode)
    return step, shardings


def setup(mesh, preset: str, mode: str = "jit"):
    """Place :func:`problem` on ``mesh`` as the trainers do.

    Returns ``(step, state, batches, shardings)``: the compiled trainer step, the fresh
    ``TrainState`` placed by ``preset``'s rules, a run-loop batch source ``batches(s)`` whose
    batches are the global batch assembled from this process's own rows, and the state's
    shardings (the step's in and out shardings).
    """
    import jax

    from rlhf_jax import parallel
    from rlhf_jax.algorithms import sft

    params, batch = problem()
    step, shardings = compiled_step(mesh, preset, mode)
    state = jax.device_put(sft.init_state(params, sft_config()), shardings)
    rows = parallel.process_rows(GLOBAL_BATCH)
    local = sft.corpus_batch(batch["tokens"][rows], batch["mask"][rows])
    return step, state, parallel.shard_batches(lambda s: local, mesh), shardings


def to_host(params, metrics: list[dict]) -> dict:
    """Host numpy values: ``loss`` and ``grad_norm`` per step, ``param/<path>`` per parameter."""
    import jax
    import numpy as np
    from jax.experimental import multihost_utils

    from rlhf_jax import parallel

    out = {k: np.asarray([float(m[k]) for m in metrics]) for k in ("loss", "grad_norm")}
    gathered = multihost_utils.process_allgather(params, tiled=True)
    for path, leaf in jax.tree_util.tree_flatten_with_path(gathered)[0]:
        out["param/" + parallel.path_str(path)] = np.asarray(leaf)
    return out


@functools.cache
def train(mesh, preset: str, mode: str = "jit", steps: int = STEPS):
    """Train :func:`problem` for ``steps`` on ``mesh``. Returns ``(to_host(...), state)``.

    Cached: a test that needs a run another test already made reuses it (read-only results).
    """
    import jax

    step, state, batches, _ = setup(mesh, preset, mode)
    history = []
    for s in range(steps):
        state, metrics = step(state, batches(s), jax.random.key(s))
        history.append(metrics)
    return to_host(state.params, history), state


def assert_results_close(actual: dict, expected: dict) -> None:
    """Tolerance policy (float32): every array within 1e-5 relative to its own scale.

    ``|a - e| <= 1e-5 * |e| + 1e-5 * max|e|`` elementwise: a pure relative test fails on entries
    near zero (Adam moves every entry by ~lr, whatever its size), where summation order across
    devices changes the last bits.
    """
    import numpy as np

    assert sorted(actual) == sorted(expected)
    for key, e in expected.items():
        scale = float(np.max(np.abs(e))) if np.size(e) else 0.0
        np.testing.assert_allclose(actual[key], e, rtol=1e-5, atol=1e-5 * scale, err_msg=key)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--process-id", type=int, required=True)
    ap.add_argument("--num-processes", type=int, required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--local-devices", type=int, default=4)
    ap.add_argument("--preset", default="fsdp")
    ap.add_argument("--mode", default="jit", choices=("jit", "shard_map"))
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = (
        f"--xla_force_host_platform_device_count={args.local_devices} "
        + os.environ.get("RLHF_JAX_TEST_XLA_FLAGS", "")
    )
    import jax
    import numpy as np

    jax.config.update("jax_default_matmul_precision", "highest")
    jax.config.update("jax_disable_most_optimizations", True)
    from rlhf_jax import parallel

    parallel.initialize_distributed(
        parallel.DistributedConfig(
            enabled="on",
            coordinator_address=f"127.0.0.1:{args.port}",
            num_processes=args.num_processes,
            process_id=args.process_id,
            initialization_timeout=60,
        )
    )
    # data = 2 spans the processes (DCN); fsdp = 4 within each process (ICI).
    cfg = parallel.MeshConfig(data=2, fsdp=-1, dcn_data=args.num_processes)
    mesh = parallel.make_mesh(cfg)
    result, _ = train(mesh, args.preset, args.mode)
    if jax.process_index() == 0:
        np.savez(args.out, **result)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
