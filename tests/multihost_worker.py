"""One process of the multi-process test job of ``tests/test_multihost.py`` (and its shared problem).

Run as ``python tests/multihost_worker.py --process-id I --num-processes N --port PORT --out F``:
it joins a ``jax.distributed`` job over loopback (CPU collectives: gloo) holding ``--local-devices``
fake CPU devices, trains the problem of :func:`train` for a few steps on a hybrid mesh whose
``data`` axis spans the processes, and process 0 writes the losses and final parameters to ``F``
(``.npz``). The test compares them with one process holding all the devices.

Importable too (``import multihost_worker``): the test calls :func:`train` in-process.
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
    """``(params, loss_fn, batch)``: :func:`model`, an SFT token loss, a global batch.

    All host (numpy) values, identical in every process (fixed seeds); cached, so the compiled
    steps are shared between tests (never modify the returned arrays).
    """
    import jax
    import numpy as np

    from rlhf_jax import models

    lm = model()
    params = jax.tree.map(np.asarray, lm.params)
    graphdef = lm.graphdef
    cfg = lm.config

    def loss_fn(params, batch):
        logp = models.token_logprobs(graphdef, params, batch["tokens"], batch["mask"])
        mask = batch["mask"][:, 1:].astype(logp.dtype)
        return -(logp * mask).sum(), (mask.sum(), {})

    rng = np.random.default_rng(1)
    tokens = rng.integers(0, cfg.vocab_size, (GLOBAL_BATCH, SEQ_LEN)).astype(np.int32)
    lengths = rng.integers(2, SEQ_LEN + 1, (GLOBAL_BATCH,))
    mask = (np.arange(SEQ_LEN)[None] < lengths[:, None]).astype(np.int32)
    return params, loss_fn, {"tokens": tokens, "mask": mask}


def setup(mesh, preset: str, mode: str = "jit"):
    """Place :func:`problem` on ``mesh`` by the ``preset`` rules.

    Returns ``(step, params, opt_state, batch, specs)``; ``batch`` is the global batch assembled
    from this process's own rows, ``specs`` the parameters' specs on this mesh.
    """
    import jax

    from rlhf_jax import parallel

    params, _, batch = problem()
    step, optimizer = _step(mesh, preset, mode)
    specs = parallel.param_specs(params, preset, mesh)
    params = parallel.shard_params(params, mesh, preset)
    opt_state = parallel.init_opt_state(optimizer, params, mesh, specs)
    rows = GLOBAL_BATCH // jax.process_count()
    lo = jax.process_index() * rows
    local = jax.tree.map(lambda x: x[lo : lo + rows], batch)
    return step, params, opt_state, parallel.shard_batch(local, mesh), specs


@functools.cache
def _step(mesh, preset: str, mode: str):
    """The compiled step of :func:`problem` for one placement (cached: compiled once per test run).

    AdamW with ``eps=1e-3``: Adam divides each gradient entry by its own magnitude, so an entry
    whose gradient is far below ``eps`` moves by ``lr / eps`` times its gradient. A rounding
    difference ``d`` in that gradient (the cross-device summation order changes the last bits)
    becomes ``d * lr / eps`` in the parameter: 1e3 x with ``lr=1e-2, eps=1e-5``, more than the
    1e-5 tolerance on entries near zero. ``eps=1e-3`` bounds the amplification to 10x, so the
    comparison tests the parallelism, not Adam's conditioning; entries with larger gradients
    still get Adam's normalised update.
    """
    from rlhf_jax import parallel
    from rlhf_jax.optim import OptimConfig, make_optimizer

    params, loss_fn, _ = problem()
    optimizer = make_optimizer(OptimConfig(learning_rate=1e-2, eps=1e-3))
    specs = parallel.param_specs(params, preset, mesh)
    step = parallel.make_data_parallel_step(
        loss_fn, optimizer, mesh, mode=mode, param_specs_tree=specs
    )
    return step, optimizer


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
    """Train :func:`problem` for ``steps`` on ``mesh``. Returns ``(to_host(...), params)``.

    Cached: a test that needs a run another test already made reuses it (read-only results).
    """
    step, params, opt_state, batch, _ = setup(mesh, preset, mode)
    history = []
    for _ in range(steps):
        params, opt_state, metrics = step(params, opt_state, batch)
        history.append(metrics)
    return to_host(params, history), params


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
    ap.add_argument("--out", required=True)
    args = ap.parse_args(argv)

    os.environ["JAX_PLATFORMS"] = "cpu"
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.local_devices}"
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
    result, _ = train(mesh, args.preset)
    if jax.process_index() == 0:
        np.savez(args.out, **result)
    jax.distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
