"""Data for rlhf-jax: the embedded toy task and datasets in the formats TRL users have.

- :mod:`rlhf_jax.data.toy` -- the micro-language, its Hugging Face tokenizer, the gold preference
  and the simulated labelers (the embedded default task).
- :mod:`rlhf_jax.data.formats` -- JSONL / Parquet / ``datasets`` rows (prompt, prompt/completion,
  preference, ranking; plain text or chat messages) validated and tokenized into static-shape
  numpy batches, with seeded shuffling and a resumable cursor.
"""

from rlhf_jax.data import formats, toy
from rlhf_jax.data.formats import DataConfig, DataError, DataLoader, TokenizedDataset, load_dataset

__all__ = [
    "DataConfig",
    "DataError",
    "DataLoader",
    "TokenizedDataset",
    "formats",
    "load_dataset",
    "toy",
]
