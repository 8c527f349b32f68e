"""The one deterministic batcher every stage uses: batch ``s`` is a function of ``(seed, s)``.

A run's data cursor is its step: step ``s`` reads epoch ``s // batches_per_epoch``, chunk
``s % batches_per_epoch`` of :func:`epoch_permutation` ``(n, seed, epoch)``. A resumed run therefore
sees exactly the batches an uninterrupted one would, with nothing to save but the step, and the
order does not depend on how many devices or processes read it. Every batch is full (the tail of an
epoch that does not fill one is skipped), so shapes are static and the step compiles once.

With several processes each reads only its own rows of the global batch
(:func:`rlhf_jax.parallel.process_rows`); the trainer assembles the global arrays.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

__all__ = ["epoch_batches", "epoch_permutation"]


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The order of epoch ``epoch``: a permutation of ``range(n)``, a function of (seed, epoch)."""
    return np.random.default_rng(np.random.SeedSequence([seed, epoch])).permutation(n)


def epoch_batches(
    data: Any,
    batch_size: int,
    seed: int,
    *,
    rename: Mapping[str, str] | None = None,
    rows: slice | None = None,
    what: str = "the dataset",
) -> Callable[[int], dict[str, np.ndarray]]:
    """``batches(s)``: batch ``s`` of the seeded epoch order.

    Args:
      data: a :class:`rlhf_jax.data.formats.TokenizedDataset` (its ``take`` adds the rows'
        global ``index``), or a mapping of arrays with a common leading axis.
      batch_size: rows per (global) batch; must be between 1 and the number of rows.
      seed: the order's seed (the run seed).
      rename: batch keys to rename, e.g. ``{"index": "prompt_index"}``.
      rows: the slice of each global batch this process reads (default: all of it).
      what: how an error names the data (a config key or file).

    Raises:
      ValueError: the batch size does not fit the data (the caller turns it into a ConfigError
        naming its key).
    """
    if hasattr(data, "take"):
        n = len(data)
        take = data.take
    else:
        arrays = {k: np.asarray(v) for k, v in data.items()}
        n = len(next(iter(arrays.values())))

        def take(idx):
            return {k: v[idx] for k, v in arrays.items()} | {"index": idx.astype(np.int32)}

    if not 1 <= batch_size <= n:
        raise ValueError(
            f"batch size {batch_size} does not fit {what} ({n} usable rows): lower the batch "
            "size or give more data"
        )
    per_epoch = n // batch_size
    rows = slice(None) if rows is None else rows
    cache: dict[int, np.ndarray] = {}

    def batches(step: int) -> dict[str, np.ndarray]:
        epoch, i = divmod(int(step), per_epoch)
        if epoch not in cache:
            cache.clear()
            cache[epoch] = epoch_permutation(n, seed, epoch)
        batch = take(cache[epoch][i * batch_size : (i + 1) * batch_size][rows])
        for old, new in (rename or {}).items():
            batch[new] = batch.pop(old)
        return batch

    batches.rows = n  # type: ignore[attr-defined]
    return batches
